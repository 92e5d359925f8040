"""Density-vs-validation-loss sweep on the demo's model and data (2 gloo ranks, CPU).

Trains the demo's CharGPT at a preset's size (``--preset quick``: 150 steps) with dense allreduce
and with the top-k hook under several settings, for AdamW (the demo's optimizer; "update" runs
compress AdamW's preconditioned update with ``ddp.AdamUpdate`` and step SGD) and SGD with
momentum, and prints one row per run: validation loss, its ratio to the same optimizer's dense
run, and the compression ratio (dense bytes / bytes sent). Every run sees the same batches.

    PYTHONPATH=python python benches/compression_sweep.py --preset quick [--only "adamw dense,update"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt import ddp, onebit
from autoglm_rt.demo.corpus import load_corpus
from autoglm_rt.demo.model import CharGPT
from autoglm_rt.demo.train import PRESETS, DemoConfig, _batch_for, _evaluate, free_port, loss_fn
from autoglm_rt.policy.compression import DensityController, DensityControllerConfig

# name -> (optimizer, hook settings or None for dense). Optimizer "sgdm": SGD momentum 0.9 in the
# optimizer (dense, plain top-k) or in the hook (momentum correction, optimizer without momentum).
RUNS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "adamw dense": ("adamw", None),
    "adamw topk 1% (demo today)": ("adamw", {"density": 0.01, "start_iter": 5, "warmup": 20}),
    "adamw topk 2%": ("adamw", {"density": 0.02, "start_iter": 5, "warmup": 20}),
    "adamw topk 5%": ("adamw", {"density": 0.05, "start_iter": 5, "warmup": 20}),
    "adamw regime 0.5-5%": ("adamw", {"controller": (0.005, 0.05), "start_iter": 5}),
    "adamw regime 1-10%": ("adamw", {"controller": (0.01, 0.1), "start_iter": 5}),
    "adamw topk 1% + hook momentum": ("adamw", {"density": 0.01, "start_iter": 5, "warmup": 20, "momentum": 0.9}),
    "sgdm dense": ("sgdm", None),
    "sgdm topk 1% (no correction)": ("sgdm", {"density": 0.01, "start_iter": 5, "warmup": 20}),
    "sgdm dgc 1%": ("sgdm", {"density": 0.01, "start_iter": 5, "warmup": 20, "momentum": 0.9}),
    "sgdm dgc 0.5%": ("sgdm", {"density": 0.005, "start_iter": 5, "warmup": 20, "momentum": 0.9}),
    "sgdm dgc regime 0.5-5%": ("sgdm", {"controller": (0.005, 0.05), "start_iter": 5, "momentum": 0.9}),
    "adamw regime 0.5-10% eta .15": ("adamw", {"controller": (0.005, 0.1, 0.15), "start_iter": 5}),
    "sgdm dgc regime 0.5-5% eta .15": ("sgdm", {"controller": (0.005, 0.05, 0.15), "start_iter": 5, "momentum": 0.9}),
    # AdamW's update compressed (ddp.AdamUpdate; the optimizer is SGD with AdamW's lr and decay).
    "adamw update 1% frozen": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {}}),
    "adamw update 1% local": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"variance": "local"}}),
    "adamw update 0.5% frozen": ("adamw", {"density": 0.005, "start_iter": 5, "adam": {}}),
    "adamw update 2% frozen": ("adamw", {"density": 0.02, "start_iter": 5, "adam": {}}),
    "adamw update 5% frozen": ("adamw", {"density": 0.05, "start_iter": 5, "adam": {}}),
    "adamw update 10% frozen": ("adamw", {"density": 0.1, "start_iter": 5, "adam": {}}),
    "adamw update 1% nomask": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"masking": False}}),
    "adamw update 1% global m": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"momentum": "global"}}),
    "adamw update 5% global m": ("adamw", {"density": 0.05, "start_iter": 5, "adam": {"momentum": "global"}}),
    "adamw update 0.5% global m": ("adamw", {"density": 0.005, "start_iter": 5, "adam": {"momentum": "global"}}),
    # Isolates freezing v: every entry sent every step (exact), so only the frozen v differs.
    "adamw update 100% global m (frozen v only)": (
        "adamw",
        {"density": 1.0, "start_iter": 5, "adam": {"momentum": "global"}},
    ),
    "adamw update regime 0.5-5%": ("adamw", {"controller": (0.005, 0.05), "start_iter": 5, "adam": {}}),
    # 1-bit Adam (autoglm_rt.onebit; SGD steps on what it delivers). The old sweep-only prototype's
    # variants are in docs/compression.md; these are the product's settings around its defaults.
    "adamw onebit": ("adamw", {"onebit": {}}),
    "adamw onebit, v frozen": ("adamw", {"onebit": {"refresh_first": 0}}),
    "adamw onebit, fp32 dense": ("adamw", {"onebit": {"dense_bits": 32}}),
    "adamw onebit, chunk 256": ("adamw", {"onebit": {"chunk": 256}}),
    "adamw update 1% frozen, 10 dense": ("adamw", {"density": 0.01, "start_iter": 10, "adam": {}}),
    "adamw update 1% frozen, 20 dense": ("adamw", {"density": 0.01, "start_iter": 20, "adam": {}}),
    "adamw update 1% beta1 0": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"beta1": 0.0}}),
    "adamw update 1% beta1 .5": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"beta1": 0.5}}),
    "adamw update 1% lr x1.5": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {}, "lr_scale": 1.5}),
    "adamw update 1% frozen fp16": (
        "adamw",
        {"density": 0.01, "start_iter": 5, "adam": {}, "value_dtype": "fp16"},
    ),
}
SGD_LR = 0.5


def _state(settings: dict[str, Any]) -> ddp.TopKState:
    s = dict(settings)
    bounds = s.pop("controller", None)
    if "adam" in s:
        s["adam"] = ddp.AdamUpdate(**s["adam"])
    if s.get("value_dtype") == "fp16":
        s["value_dtype"] = torch.float16
    if bounds is not None:
        threshold = bounds[2] if len(bounds) > 2 else 0.5
        s["controller"] = DensityController(
            DensityControllerConfig(floor=bounds[0], ceiling=bounds[1], interval=10, threshold=threshold)
        )
    return ddp.TopKState(**s)


def _worker(rank: int, port: int, cfg: DemoConfig, names: list[str], out: Any) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=300)
    )
    corpus = load_corpus(cfg.corpus_chars)
    device = torch.device("cpu")
    for name in names:
        opt_name, settings = RUNS[name]
        torch.manual_seed(cfg.seed)
        net = CharGPT(cfg.gpt())
        model = DDP(net)
        state: Any = None
        if settings is None:
            model.register_comm_hook(None, allreduce_hook)
        elif "onebit" in settings:
            state = onebit.OneBitAdamState(onebit.OneBitAdam(**settings["onebit"]))
            model.register_comm_hook(state, onebit.onebit_adam_hook)
        else:
            state = _state({k: v for k, v in settings.items() if k != "lr_scale"})
            model.register_comm_hook(state, ddp.topk_hook)
        delivers_update = isinstance(state, onebit.OneBitAdamState) or getattr(state, "adam", None) is not None
        if delivers_update:
            # The hook delivers AdamW's direction: SGD's L2 term on it is AdamW's decoupled decay.
            lr = cfg.lr * settings.get("lr_scale", 1.0)
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.01)
        elif opt_name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        else:
            in_hook = settings is not None and settings.get("momentum", 0) > 0
            opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=0.0 if in_hook else 0.9)
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            batch = _batch_for(corpus, cfg, rank, step, device)
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()
        wall = time.perf_counter() - t0
        val = _evaluate(net, corpus, cfg, device)
        if rank == 0:
            out.put(
                {
                    "run": name,
                    "val_loss": val,
                    "ratio": state.compression_ratio if state else 1.0,
                    "critical_windows": (
                        state.controller.critical_windows_seen if state and getattr(state, "controller", None) else None
                    ),
                    "wall_s": wall,
                }
            )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--only", default="", help="comma-separated substrings of the run names to keep")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--seed", type=int, default=None, help="DemoConfig.seed (default: the preset's)")
    args = p.parse_args()
    cfg = PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    names = [n for n in RUNS if any(part in n for part in args.only.split(","))]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, cfg, names, q)) for r in range(2)]
    for proc in procs:
        proc.start()
    rows = []
    dense: dict[str, float] = {}
    print(f"preset {args.preset}: {cfg.steps} steps, batch {cfg.batch}x{cfg.block}, load {os.getloadavg()[0]:.1f}")
    print(f"{'run':34s} {'val_loss':>9s} {'vs dense':>9s} {'bytes x':>8s} {'crit':>5s} {'wall s':>7s}")
    for _ in names:
        row = q.get(timeout=3600)
        opt_name = RUNS[row["run"]][0]
        if RUNS[row["run"]][1] is None:
            dense[opt_name] = row["val_loss"]
        base = dense.get(opt_name)
        row["vs_dense"] = row["val_loss"] / base if base else None
        rows.append(row)
        vs = f"{row['vs_dense']:.3f}" if row["vs_dense"] else "-"
        crit = "-" if row["critical_windows"] is None else str(row["critical_windows"])
        print(f"{row['run']:34s} {row['val_loss']:9.4f} {vs:>9s} {row['ratio']:8.1f} {crit:>5s} {row['wall_s']:7.1f}")
        sys.stdout.flush()
    for proc in procs:
        proc.join()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
