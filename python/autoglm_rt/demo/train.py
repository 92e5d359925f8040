"""One data-parallel training run of the demo, on ``world`` processes over 127.0.0.1.

Two kinds of run share everything but the runtime: ``baseline`` (dense allreduce, a static batch,
no policy) and ``autoglm_rt`` (top-k hook with error feedback, fused statistics, noise scale,
phase detection, memory policy over a pool, batch controller, the bundled strategy, a Prometheus
endpoint, the energy meter). Both see the same samples at the same steps: the batch of rank r at
step s is drawn from a generator seeded with (seed, r, s), so a resumed run continues exactly.

Checkpoint contract: on SIGTERM each rank finishes its current step, all ranks agree (a tiny
all-reduce) to stop at the same step, each saves ``ckpt_rank{r}.pt`` (model, optimizer, step,
hook residuals, runtime counters) and exits 0. A rerun resumes from there.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt.demo.corpus import Corpus, load_corpus, sample_batch
from autoglm_rt.demo.model import CharGPT, GPTConfig

RUNS = ("autoglm_rt", "baseline")


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 400
    batch: int = 32  # samples per rank per optimizer step (the effective batch)
    block: int = 64
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    lr: float = 3e-3
    seed: int = 1234
    world: int = 2
    corpus_chars: int = 3_000_000
    val_windows: int = 256
    density: float = 0.01
    dense_steps: int = 5  # dense allreduce first (DDP rebuilds its buckets after step 1)
    warmup_steps: int = 20  # then the density falls geometrically to `density` (DGC warm-up)
    # Regime-aware density (autoglm_rt.policy.compression) instead of the fixed `density`: None
    # keeps the fixed density (with AdamW, the regime controller measured no better; see
    # docs/compression.md), else the density of quiet 10-step windows, `density_ceiling` that of
    # critical ones.
    density_floor: float | None = None
    density_ceiling: float = 0.05
    metrics_port: int = 0  # 0: a free port; the autoglm_rt run serves Prometheus metrics there
    threads_per_rank: int = 1
    device: str = "cpu"  # "cuda": one GPU per rank, NCCL

    def gpt(self) -> GPTConfig:
        return GPTConfig(block_size=self.block, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


PRESETS = {
    "smoke": DemoConfig(steps=12, batch=8, block=32, n_layer=1, n_embd=64, corpus_chars=200_000, val_windows=32),
    "quick": DemoConfig(steps=150, batch=16, corpus_chars=1_000_000, val_windows=128),
    "default": DemoConfig(),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Counters:
    bytes_communicated: int = 0
    dense_bytes: int = 0


def _counting_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """torch's allreduce_hook, counting the bytes it hands to the collective. (Unannotated: DDP
    checks the hook's annotations against real classes, and this module's are strings.)"""
    buf = bucket.buffer()
    state.bytes_communicated += buf.numel() * buf.element_size()
    state.dense_bytes += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


class _StopFlag:
    """Set by SIGTERM; ranks agree on it at step boundaries so all stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _evaluate(model: torch.nn.Module, corpus: Corpus, cfg: DemoConfig, device: torch.device) -> float:
    """Mean cross-entropy over fixed held-out windows (the same for every run)."""
    rng = np.random.default_rng([cfg.seed, 999_999])
    x, y = sample_batch(corpus.val, cfg.val_windows, cfg.block, rng)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, cfg.val_windows, 64):
            xb = torch.from_numpy(x[i : i + 64]).to(device)
            yb = torch.from_numpy(y[i : i + 64]).to(device)
            losses.append(float(model(xb, yb)) * xb.shape[0])
    model.train()
    return sum(losses) / cfg.val_windows


def _batch_for(corpus: Corpus, cfg: DemoConfig, rank: int, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng([cfg.seed, rank, step])
    x, y = sample_batch(corpus.train, cfg.batch, cfg.block, rng)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    loss: torch.Tensor = model(x, y)
    return loss


def _peak_memory_bytes(pool: Any, device: torch.device) -> int:
    if device.type == "cuda":
        if pool is not None:
            return int(pool.stats()["peak_reserved_bytes"])
        return int(torch.cuda.max_memory_reserved(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _BaselineRun:
    """Dense allreduce (torch's allreduce_hook, bytes counted), a static batch, no policy."""

    pool = None

    def __init__(self, model: DDP, optimizer: torch.optim.Optimizer, cfg: DemoConfig) -> None:
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.counters = _Counters()
        model.register_comm_hook(self.counters, _counting_allreduce_hook)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        loss = loss_fn(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), {
            "micro_batch": self.cfg.batch,
            "accumulation": 1,
            "phase": None,
            "bytes_communicated_total": self.counters.bytes_communicated,
        }

    def state(self) -> dict[str, Any]:
        return asdict(self.counters)

    def load_state(self, state: dict[str, Any]) -> None:
        self.counters.bytes_communicated = state["bytes_communicated"]
        self.counters.dense_bytes = state["dense_bytes"]

    def summary(self) -> dict[str, Any]:
        return {"bytes_communicated": self.counters.bytes_communicated, "dense_bytes": self.counters.dense_bytes}

    def close(self) -> None:
        """Nothing to release: the baseline holds no threads or servers."""


def _progress(run: str, step: int, steps: int, rec: dict[str, Any]) -> None:
    width = 24
    done = int(width * (step + 1) / steps)
    phase = rec.get("phase") or "-"
    saved = rec.get("bytes_saved_ratio")
    saved_txt = f" saved {saved:6.1%}" if saved is not None else ""
    line = (
        f"\r[{run:>10}] |{'#' * done}{'.' * (width - done)}| {step + 1:>4}/{steps} "
        f"loss {rec['loss']:.3f} phase {phase:<11} batch {rec['micro_batch']}x{rec['accumulation']}{saved_txt}"
    )
    sys.stdout.write(line)
    sys.stdout.flush()


def worker(rank: int, run: str, cfg: DemoConfig, out: str, port: int, show_progress: bool) -> None:
    """Entry point of one rank (torch.multiprocessing.spawn)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(cfg.world)
    torch.set_num_threads(cfg.threads_per_rank)
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    from autoglm_rt.distributed import init_process_group

    init_process_group(backend, rank=rank, world_size=cfg.world, port=port, timeout=timedelta(seconds=300))
    try:
        _train(rank, run, cfg, Path(out) / run, device, show_progress)
    finally:
        dist.destroy_process_group()


def _train(rank: int, run: str, cfg: DemoConfig, run_dir: Path, device: torch.device, show_progress: bool) -> None:
    from autoglm_rt.monitor.energy import EnergyMeter

    corpus = load_corpus(cfg.corpus_chars)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in both runs
    net = CharGPT(cfg.gpt()).to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    stop = _StopFlag()
    if run == "autoglm_rt":
        from autoglm_rt.demo.autoglm_run import AutoglmRun

        impl: Any = AutoglmRun(model, optimizer, cfg, device, rank)
    else:
        impl = _BaselineRun(model, optimizer, cfg)
    # Energy of the whole machine, metered once (rank 0) in both runs.
    meter = EnergyMeter(gpus=device.type == "cuda").start() if rank == 0 else None

    ckpt_path = run_dir / f"ckpt_rank{rank}.pt"
    step, wall_before, joules_before, prev_bytes = 0, 0.0, 0.0, 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        impl.load_state(ckpt["run"])
        step, wall_before, joules_before = ckpt["step"], ckpt["wall_seconds"], ckpt["energy_joules"]
        prev_bytes = ckpt["prev_bytes"]
    steps_file = (run_dir / "steps.jsonl").open("a") if rank == 0 else None
    t0 = time.perf_counter()
    try:
        while step < cfg.steps:
            if stop.agreed():
                torch.save(
                    {
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "run": impl.state(),
                        "step": step,
                        "wall_seconds": wall_before + time.perf_counter() - t0,
                        "energy_joules": joules_before + (meter.read().total_joules if meter else 0.0),
                        "prev_bytes": prev_bytes,
                    },
                    ckpt_path,
                )
                if rank == 0:
                    print(f"\n[{run}] SIGTERM: checkpointed at step {step}; rerun to resume", flush=True)
                return
            batch = _batch_for(corpus, cfg, rank, step, device)
            ts = time.perf_counter()
            loss, record = impl.step(batch)
            record.update(step=step, loss=loss, step_seconds=time.perf_counter() - ts)
            record["effective_batch"] = record["micro_batch"] * record["accumulation"]
            record["bytes_communicated_step"] = record["bytes_communicated_total"] - prev_bytes
            prev_bytes = record["bytes_communicated_total"]
            if steps_file is not None:
                steps_file.write(json.dumps(record) + "\n")
                steps_file.flush()
                if show_progress:
                    _progress(run, step, cfg.steps, record)
            step += 1
    finally:
        if steps_file is not None:
            steps_file.close()
        impl.close()
    if rank == 0 and show_progress:
        print(flush=True)
    result = {
        "val_loss": _evaluate(net, corpus, cfg, device),
        "wall_seconds": wall_before + time.perf_counter() - t0,
        "peak_memory_bytes": _peak_memory_bytes(impl.pool, device),
        **impl.summary(),
    }
    if meter is not None:
        energy = meter.read()
        result["energy_joules"] = joules_before + energy.total_joules
        result["energy_source"] = energy.describe()
    gathered: list[Any] = [None] * cfg.world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        summary = {
            "val_loss": gathered[0]["val_loss"],
            "wall_seconds": max(g["wall_seconds"] for g in gathered),
            "bytes_communicated": sum(g["bytes_communicated"] for g in gathered),
            "dense_bytes": sum(g["dense_bytes"] for g in gathered),
            "peak_memory_bytes": max(g["peak_memory_bytes"] for g in gathered),
            "energy_joules": gathered[0]["energy_joules"],
            "energy_source": gathered[0]["energy_source"],
            "per_rank": gathered,
            "config": asdict(cfg),
            "corpus": corpus.describe(),
        }
        for key in ("notes", "phases", "metrics_url"):
            if key in gathered[0]:
                summary[key] = gathered[0][key]
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    dist.barrier()
    ckpt_path.unlink(missing_ok=True)
