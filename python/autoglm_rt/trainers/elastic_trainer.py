"""The demo trainer for elastic runs, and the reference for the checkpoint contract.

    torchrun --nnodes=1:2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT \\
        elastic_trainer.py --checkpoint-dir DIR --steps 50 --global-batch 64 --micro-batch 16

The checkpoint contract (what ``autoglm-rt queue`` and :mod:`autoglm_rt.elastic` rely on):

1. On start, resume from the newest checkpoint in the checkpoint directory, if any.
2. After every completed step, rank 0 saves a checkpoint atomically (write, fsync, rename): a step
   counts as completed once it is saved, and no completed step is ever lost or repeated.
3. On SIGTERM, finish the current step, save, and exit 0.

The effective batch stays ``--global-batch`` at any world size: each step's batch is the same
deterministic samples, split across the ranks and, on each rank, into micro-batches of at most
``--micro-batch`` with gradient accumulation (``DistributedDataParallel.no_sync`` on all but the
last). So the weights after N steps do not depend on how often the world size changed. Rank 0
keeps one record per completed step (world size, accumulation, restart count) in the checkpoint
itself, so the record of completed steps is exactly what was saved, and also appends it to
``steps.jsonl`` for people to read.

Runs as a plain script under torchrun (it imports torch, not autoglm_rt); gloo on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autoglm_rt.distributed import exit_rank, init_process_group_from_env

CHECKPOINT = "checkpoint.pt"
STEP_LOG = "steps.jsonl"


def make_batch(step: int, global_batch: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s whole batch, the same on every rank and at every world size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(global_batch, features, generator=g, dtype=torch.float64)
    w_true = torch.arange(1, features + 1, dtype=torch.float64) / features
    y = x @ w_true + 0.1 * torch.randn(global_batch, generator=g, dtype=torch.float64)
    return x, y


def rank_share(global_batch: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of this rank's samples: the batch split as evenly as possible."""
    base, extra = divmod(global_batch, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def make_model(features: int) -> torch.nn.Module:
    model = torch.nn.Linear(features, 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    return model


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / f".{CHECKPOINT}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / CHECKPOINT)


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint-dir", default=os.environ.get("AUTOGLM_RT_CHECKPOINT_DIR"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step (pacing for tests)")
    args = ap.parse_args(argv)
    if not args.checkpoint_dir:
        ap.error("--checkpoint-dir (or AUTOGLM_RT_CHECKPOINT_DIR) is required")
    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    # Rank 0's worker store listens on MASTER_ADDR only (torchrun's env:// store would bind every interface).
    init_process_group_from_env("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch < world:
        raise SystemExit(f"--global-batch {args.global_batch} is smaller than the world size {world}")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    model = make_model(args.features)
    optimizer = make_optimizer(model, args.lr)
    state = load_checkpoint(ckpt_dir)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), list(state["history"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    start, stop_idx = rank_share(args.global_batch, world, rank)
    micro = max(1, args.micro_batch)
    accumulation = math.ceil((stop_idx - start) / micro)

    while step < args.steps:
        t0 = time.monotonic()
        x, y = make_batch(step, args.global_batch, args.features, args.seed)
        x, y = x[start:stop_idx], y[start:stop_idx]
        optimizer.zero_grad(set_to_none=True)
        for i in range(accumulation):
            xb, yb = x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]
            # Only the last micro-batch all-reduces (forward and backward both inside no_sync).
            sync = contextlib.nullcontext() if i == accumulation - 1 else ddp.no_sync()
            with sync:
                # DDP averages over ranks: scale so the sum over ranks is the global-batch mean.
                loss = ((ddp(xb).squeeze(1) - yb) ** 2).sum() * world / args.global_batch
                loss.backward()
        optimizer.step()
        step += 1
        if rank == 0:
            record = {
                "step": step,
                "world_size": world,
                "accumulation": accumulation,
                "local_batch": stop_idx - start,
                "restart": restarts,
                "pid": os.getpid(),
            }
            history.append(record)
            save_checkpoint(
                ckpt_dir,
                {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history},
            )
            with open(ckpt_dir / STEP_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        if stop:
            return 0
        time.sleep(max(0.0, args.step_time - (time.monotonic() - t0)))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_rank(main())  # no interpreter teardown after the process group (see exit_rank)
