"""The fused CPU AdamW step and the disk tier against what a user would otherwise run.

- fused AdamW vs ``torch.optim.AdamW(foreach=True)`` and ``(foreach=False)`` on the parameter
  shapes of GPT-2 small (124M parameters, 148 tensors), all threads and one thread;
- fused AdamW vs ``_C.parallel_copy`` moving the same traffic (28 bytes per element: param, grad,
  exp_avg, exp_avg_sq read, param, exp_avg, exp_avg_sq written): the ratio is the fraction of the
  machine's copy bandwidth the step reaches;
- a training step of the demo's model (CharGPT, default preset) with its AdamW state on disk vs in
  memory (ratio = in-memory time / disk time; the target is >= 0.67, i.e. disk <= 1.5x), and the
  optimizer step alone for a 32M-parameter list, where the state file is larger than a block.
--quick shrinks the sizes.
"""

from __future__ import annotations

import tempfile

import torch

from autoglm_rt import benchmarking
from autoglm_rt._native import _C
from autoglm_rt.demo.model import CharGPT
from autoglm_rt.demo.train import PRESETS
from autoglm_rt.offload import OptimizerOffload, fused_adam_step
from grad_stats_workloads import gpt_shapes, gradient_list

BYTES_PER_ELEMENT = 28  # read p, g, m, v; write p, m, v (float32)


def _params(shapes: list[tuple[int, ...]], grads: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, grad in zip(shapes, grads, strict=True):
        p = torch.randn(shape, generator=g).requires_grad_(True)
        p.grad = grad  # shared: both optimizers read the same gradients
        out.append(p)
    return out


def _adam_comparisons(ctx, rounds: int) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    shapes = gpt_shapes(d_model=256, layers=4, vocab=8000) if ctx.quick else gpt_shapes()
    grads = gradient_list(shapes)
    numel = sum(g.numel() for g in grads)
    mine = torch.optim.AdamW(_params(shapes, grads, 1), lr=1e-4, weight_decay=0.01)
    ref = torch.optim.AdamW(_params(shapes, grads, 1), lr=1e-4, weight_decay=0.01, foreach=True)
    ref_loop = torch.optim.AdamW(_params(shapes, grads, 1), lr=1e-4, weight_decay=0.01, foreach=False)
    traffic = numel * BYTES_PER_ELEMENT
    src = torch.ones(traffic // 8, dtype=torch.float32)
    dst = torch.empty_like(src)
    label = f"GPT-2{' (quick)' if ctx.quick else ' small'}, {numel / 1e6:.0f}M params"
    out = [
        benchmarking.compare(
            f"fused AdamW vs torch AdamW foreach=True, {label}",
            lambda: fused_adam_step(mine),
            ref.step,
            baseline_label="torch.optim.AdamW(foreach=True)",
            rounds=rounds,
        ),
        benchmarking.compare(
            f"fused AdamW vs torch AdamW foreach=False, {label}",
            lambda: fused_adam_step(mine),
            ref_loop.step,
            baseline_label="torch.optim.AdamW(foreach=False)",
            rounds=rounds,
        ),
        benchmarking.compare(
            f"fused AdamW vs copy of the same traffic ({BYTES_PER_ELEMENT} B/element), {label}",
            lambda: fused_adam_step(mine),
            lambda: _C.parallel_copy(dst, src),
            baseline_label="_C.parallel_copy",
            rounds=rounds,
        ),
    ]
    out[2].extra["fused_gbps"] = traffic / out[2].case_seconds / 1e9
    out[2].extra["copy_gbps"] = traffic / out[2].baseline_seconds / 1e9
    threads, torch_threads = _C.num_threads(), torch.get_num_threads()
    try:
        _C.set_num_threads(1)
        torch.set_num_threads(1)
        out.append(
            benchmarking.compare(
                f"fused AdamW vs torch AdamW foreach=True, 1 thread each, {label}",
                lambda: fused_adam_step(mine),
                ref.step,
                baseline_label="torch.optim.AdamW(foreach=True)",
                rounds=max(3, rounds // 2),
            )
        )
    finally:
        _C.set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    return out


def _demo_step(ctx, rounds: int) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    cfg = PRESETS["smoke" if ctx.quick else "default"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (cfg.batch, cfg.block), generator=g)
    y = torch.randint(0, 128, (cfg.batch, cfg.block), generator=g)
    out = []
    with tempfile.TemporaryDirectory(prefix="agrt_offload_bench_") as tmp:
        runs = {}
        for tier_on in (False, True):
            torch.manual_seed(0)
            model = CharGPT(cfg.gpt())
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            off = OptimizerOffload(opt, tier="disk", directory=f"{tmp}/{tier_on}")
            if tier_on:
                off.offload()

            def step(model=model, opt=opt, off=off) -> None:  # type: ignore[no-untyped-def]
                opt.zero_grad(set_to_none=False)
                model(x, y).backward()
                off.step()

            runs[tier_on] = (step, off)
        nparams = sum(p.numel() for p in model.parameters())
        out.append(
            benchmarking.compare(
                f"demo train step, AdamW state on disk vs in memory (CharGPT {nparams / 1e6:.2f}M params)",
                runs[True][0],
                runs[False][0],
                case_label="disk tier",
                baseline_label="state in memory",
                rounds=rounds,
            )
        )
        # The optimizer step alone on a list whose state spans many blocks.
        numel = (4 if ctx.quick else 32) * 2**20
        shapes = [(numel // 8,)] * 8
        grads = gradient_list(shapes)
        offs = {}
        for tier_on in (False, True):
            opt = torch.optim.AdamW(_params(shapes, grads, 2), lr=1e-4)
            off = OptimizerOffload(opt, tier="disk", directory=f"{tmp}/big{tier_on}", block_bytes="64Mi")
            if tier_on:
                off.offload()
            off.step()
            offs[tier_on] = off
        out.append(
            benchmarking.compare(
                f"optimizer step, state on disk vs in memory ({numel / 2**20:.0f}Mi params, 64Mi blocks)",
                offs[True].step,
                offs[False].step,
                case_label="disk tier",
                baseline_label="state in memory",
                rounds=rounds,
            )
        )
        for off in [*offs.values(), *(r[1] for r in runs.values())]:
            off.close()
    return out


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    if ctx.device != "cpu":
        return []
    rounds = 3 if ctx.quick else 5
    return _adam_comparisons(ctx, rounds) + _demo_step(ctx, rounds)
