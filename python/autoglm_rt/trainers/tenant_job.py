"""A real training tenant for the multi-tenant benchmark: a small CNN or the demo's CharGPT,
trained with plain SGD inside :class:`autoglm_rt.Runtime`.

    python -m autoglm_rt.trainers.tenant_job --model cnn --width 16 --batch 32 --steps 40 \\
        [--grow-from 0.5 --grow 2.0] [--fixed] [--status FILE] [--samples-log FILE] [--save FILE]

- The input grows mid-run (image side / sequence length ramps up by ``--grow`` from
  ``--grow-from`` of the run to its end, like progressive resizing or sequence-length warm-up),
  so the job's memory peak exceeds what it needed at the start.
- Adaptive (default): the Runtime's pool is the job's own cgroup
  (:class:`autoglm_rt.resources.CgroupMemory`), so the batch controller shrinks the micro-batch
  (same effective batch, more accumulation) when the step's peak presses on the live limit, and
  grows it back when the limit rises; the thread count follows the cgroup's CPU quota and the
  CPU the job actually received (:func:`thread_count`).
  ``--fixed``: one micro-batch of the whole batch and no adaptation (a job of today).
- ``--status``: after every step, a JSON line-file with step, micro-batch, peak and limit.
- ``--samples-log``: one line per micro-batch with the sample indices it processed.
- Checkpoint contract: SIGTERM finishes the step, saves to $AUTOGLM_RT_CHECKPOINT_DIR and exits 0;
  a restart resumes there. Data are a deterministic function of (seed, step).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoglm_rt import resources
from autoglm_rt.demo.model import CharGPT, GPTConfig
from autoglm_rt.runtime.cpu_quota import cores_cap

__all__ = ["build_model", "main", "make_batch", "side_at", "thread_count"]


def build_model(kind: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 10),
        )
    if kind == "gpt":
        return CharGPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=width))
    raise ValueError(f"--model: expected 'cnn' or 'gpt', got {kind!r}")


def side_at(step: int, steps: int, base: int, grow_from: float, grow: float) -> int:
    """Input side (image side or sequence length) at ``step``: ``base`` until ``grow_from`` of the
    run, then a linear ramp to ``base * grow`` at the last step."""
    start = grow_from * steps
    if grow <= 1.0 or step < start or steps <= 1:
        return base
    frac = min(1.0, (step - start) / max(1.0, steps - 1 - start))
    return round(base * (1.0 + (grow - 1.0) * frac))


def make_batch(kind: str, step: int, batch: int, side: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The batch of ``step``: inputs, targets and the global sample indices (a pure function)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.arange(step * batch, (step + 1) * batch)
    if kind == "cnn":
        x = torch.randn(batch, 3, side, side, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
    else:
        x = torch.randint(0, 128, (batch, side), generator=g)
        y = torch.roll(x, -1, dims=1)
    return x, y, idx


def _loss(kind: str, log: Any) -> Any:
    def loss_fn(model: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, idx = b
        if log is not None:
            log.write(" ".join(str(int(i)) for i in idx) + "\n")
        if kind == "cnn":
            return nn.functional.cross_entropy(model(x), y)
        return model(x, y)

    return loss_fn


def thread_count(quota: float | None, received: float) -> int:
    """Intra-op threads for a job with CPU quota ``quota`` (cores; None: no quota) that received
    ``received`` cores over its last step: :func:`~autoglm_rt.runtime.cpu_quota.cores_cap` of the
    quota, but no more than it received rounded up with half a core to spare, and at least 1."""
    cap = cores_cap(quota) or os.cpu_count() or 1
    return max(1, min(cap, math.ceil(received + 0.5)))


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("cnn", "gpt"), default="cnn")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--side", type=int, default=32, help="image side (cnn) or sequence length (gpt) at the start")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--grow-from", type=float, default=1.0, help="fraction of the run where the input starts growing")
    ap.add_argument("--grow", type=float, default=1.0, help="input side factor reached at the end")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed", action="store_true", help="no adaptation: one micro-batch of the whole batch")
    ap.add_argument("--status", default=None)
    ap.add_argument("--samples-log", default=None)
    ap.add_argument("--save", default=None, help="write the final weights here (torch.save of the state dict)")
    args = ap.parse_args(argv)
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)  # before the slow setup: a preemption then is not lost
    if args.steps < 1 or args.batch < 1 or args.width < 1 or args.side < 1:
        print("tenant_job: --steps, --batch, --width and --side must be >= 1", file=sys.stderr)
        return 2

    from autoglm_rt.runtime import BatchConfig, Hooks, MemoryConfig, Runtime

    model = build_model(args.model, args.width, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    pool = None
    if not args.fixed:
        try:
            pool = resources.CgroupMemory.own()
        except resources.ResourceError as exc:
            print(f"tenant_job: running without a memory signal: {exc}", file=sys.stderr)
    big = 1 << 50  # the scheduler owns the limit; the job's own phase caps must not bind
    runtime = Runtime(
        model,
        opt,
        pool=pool,
        batch=BatchConfig(effective_batch=args.batch, micro_batch=args.batch, lr_rule="none"),  # fixed batch
        memory=MemoryConfig(
            capacity=big if pool is not None else None,
            limits={"initial": 1.0, "convergence": 1.0, "fine_tuning": 1.0} if pool is not None else None,
            threads_by_phase=False,
        ),
        precision_by_phase={},
        # This job sets its own thread count each step (thread_count: cores_cap of the quota, but
        # no more than the cores it received), so the Runtime's quota cap stays out of the way.
        hooks=Hooks(cpu_quota=None),
    )
    start = 0
    ckpt_dir = os.environ.get("AUTOGLM_RT_CHECKPOINT_DIR")
    ckpt = Path(ckpt_dir) / "tenant.pt" if ckpt_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    log = open(args.samples_log, "a") if args.samples_log else None  # noqa: SIM115
    status = Path(args.status) if args.status else None
    # One thread unless cores_cap of the quota allows more and the job really gets them: on a shared box
    # more threads than the cores a job receives only contend (measured here: 2 threads ran a step
    # 9x slower than 1 under load).
    torch.set_num_threads(1)
    loss_fn = _loss(args.model, log)
    # What exists now (torch, the model, the optimizer) lives as long as the process: out of the
    # collector's generations, it is walked neither by the collections during training nor by the
    # interpreter's at exit (which took 0.4 of the 0.55 CPU-seconds a gpt-s job spent exiting).
    gc.freeze()
    mark = (time.monotonic(), time.process_time())
    try:
        for step in range(start, args.steps):
            now = (time.monotonic(), time.process_time())
            if not args.fixed:
                want = thread_count(resources.cpu_quota_cores(), (now[1] - mark[1]) / max(1e-6, now[0] - mark[0]))
                if want != torch.get_num_threads():
                    torch.set_num_threads(want)
            mark = now
            side = side_at(step, args.steps, args.side, args.grow_from, args.grow)
            batch = make_batch(args.model, step, args.batch, side, args.seed)
            loss = runtime.forward_backward(batch, loss_fn)
            stats = pool.stats() if pool is not None else {}
            runtime.step()
            if log is not None:
                log.flush()
            if status is not None:
                doc = {
                    "step": step + 1,
                    "steps": args.steps,
                    "loss": float(loss),
                    "micro_batch": runtime.controller.micro_batch,
                    "accumulation": runtime.controller.accumulation,
                    "side": side,
                    "peak_bytes": stats.get("peak_allocated_bytes"),
                    "limit_bytes": stats.get("limit_bytes"),
                    "threads": torch.get_num_threads(),
                    "phase": runtime.phase_detector.phase,
                }
                tmp = status.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc))
                os.replace(tmp, status)
            if stop and ckpt is not None:
                _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1})
                return 0
    finally:
        if log is not None:
            log.close()
    if args.save:
        _save(Path(args.save), {"model": model.state_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
