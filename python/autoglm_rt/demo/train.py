"""One data-parallel training run of the demo, on ``world`` processes over 127.0.0.1.

Two kinds of run share everything but the runtime: ``baseline`` (dense allreduce, a static batch,
no policy; ``baseline_run``) and ``autoglm_rt`` (top-k hook with error feedback, the Runtime and
the demo strategy, a Prometheus endpoint; ``autoglm_run``). Both see the same samples at the same
steps: the batch of rank r at step s is drawn from a generator seeded with (seed, r, s).

Checkpoint contract: on SIGTERM or SIGINT (Ctrl-C) each rank finishes its current step, all ranks
agree (a tiny all-reduce of the signal number) to stop at the same step, each saves its checkpoint
(``checkpoint``: model, optimizer, the run's ``state_dict()``, RNG streams, the next step,
counters), rank 0 marks it complete, and the ranks exit 0 printing nothing (the driver prints the
one line). A rerun resumes from there and ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt.demo import checkpoint
from autoglm_rt.demo.corpus import Corpus, load_corpus, sample_batch
from autoglm_rt.demo.model import CharGPT, GPTConfig, loss_fn
from autoglm_rt.demo.progress import Progress

RUNS = ("autoglm_rt", "baseline")
WEIGHT_DECAY = 0.01  # AdamW's, in both runs
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    warmup_steps: int = 0  # then the density falls geometrically to `density` (DGC warm-up)
    # What the autoglm_rt run compresses: "frozen" / "local" AdamW's preconditioned update
    # (autoglm_rt.ddp.AdamUpdate with that variance; the run then steps SGD on what the hook
    # delivers, which is AdamW's step), "off" the raw gradient (AdamW steps on the sparse average).
    # See docs/compression.md for the sweep.
    compress_update: str = "frozen"
    # The hook of the autoglm_rt run: "onebit" (autoglm_rt.onebit: 1-bit Adam with int8 dense steps
    # and v refreshed; `dense_steps` is its start; SGD applies the step it delivers) or "topk" (the
    # top-k hook above, with `density`, `warmup_steps`, `compress_update`, `density_floor`).
    compressor: str = "onebit"
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


class StopFlag:
    """Set by SIGTERM or SIGINT; ranks agree on it at step boundaries so all stop at the same step."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank received (the largest number if several), or 0 to go on."""
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


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


def _batch_for(
    corpus: Corpus, cfg: DemoConfig, rank: int, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([cfg.seed, rank, step])
    x, y = sample_batch(corpus.train, cfg.batch, cfg.block, rng)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def _peak_memory_bytes(pool: Any, device: torch.device) -> int:
    if device.type == "cuda":
        if pool is not None:
            return int(pool.stats()["peak_reserved_bytes"])
        return int(torch.cuda.max_memory_reserved(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(rank: int, run: str, cfg: DemoConfig, out: str, port: int, show_progress: bool) -> None:
    """Entry point of one rank (torch.multiprocessing.spawn)."""
    stop = StopFlag()  # first: a signal from here on checkpoints instead of killing the rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(cfg.world)
    torch.set_num_threads(cfg.threads_per_rank)
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    from autoglm_rt.distributed import exit_rank, init_process_group

    init_process_group(backend, rank=rank, world_size=cfg.world, port=port, timeout=timedelta(seconds=300))
    try:
        _train(rank, run, cfg, Path(out) / run, device, show_progress, stop)
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # done and saved: no interpreter teardown (see exit_rank)


@dataclass
class _Position:
    """Where a run stands: the next step, and what the steps before it cost."""

    step: int = 0
    wall_seconds: float = 0.0
    energy_joules: float = 0.0
    prev_bytes: int = 0


def _build(
    run: str,
    cfg: DemoConfig,
    device: torch.device,
    rank: int,
    resume_batch: tuple[torch.Tensor, torch.Tensor] | None,
    energy: Any = None,
) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in both runs
    net = CharGPT(cfg.gpt()).to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    if resume_batch is not None:
        _settle_buckets(model, resume_batch)
    if run == "autoglm_rt":
        from autoglm_rt.demo.autoglm_run import AutoglmRun, make_optimizer

        optimizer = make_optimizer(model.parameters(), cfg, WEIGHT_DECAY)
        return net, optimizer, AutoglmRun(model, optimizer, cfg, device, rank, energy=energy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    from autoglm_rt.demo.baseline_run import BaselineRun

    return net, optimizer, BaselineRun(model, optimizer, cfg.batch)


def _settle_buckets(model: DDP, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """DDP lays its gradient buckets out anew after its first backward (in the order the gradients
    became ready), and the top-k hook selects and keeps residuals per bucket. A resumed run does
    that first backward here, before its hook is registered and its state loaded, so that it steps
    with the buckets of the run it continues. The gradients are discarded; the weights and the
    optimizer are untouched."""
    loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)


def _resume(
    saved: dict[str, Any] | None, run_dir: Path, rank: int, device: torch.device, net: torch.nn.Module, optimizer: Any,
    impl: Any,
) -> _Position:  # fmt: skip
    """Loads this rank's part of the committed checkpoint ``saved`` (None: a fresh start)."""
    if saved is None:
        return _Position()
    ckpt = checkpoint.load_rank(run_dir, rank, device)
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    impl.load_state_dict(ckpt["run"])
    checkpoint.set_rng_state(ckpt["rng"])
    return _Position(**ckpt["position"])


def _checkpoint(run_dir: Path, rank: int, cfg: DemoConfig, signum: int, net: torch.nn.Module, optimizer: Any,
                impl: Any, position: _Position) -> None:  # fmt: skip
    checkpoint.save_rank(
        run_dir,
        rank,
        {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "run": impl.state_dict(),
            "rng": checkpoint.rng_state(),
            "position": asdict(position),
        },
    )
    dist.barrier()  # every rank's file is in place before the marker says the checkpoint is whole
    if rank == 0:
        checkpoint.commit(run_dir, position.step, cfg.world, signal.Signals(signum).name)


def _train(rank: int, run: str, cfg: DemoConfig, run_dir: Path, device: torch.device, show_progress: bool,
           stop: StopFlag) -> None:  # fmt: skip
    from autoglm_rt.monitor.energy import EnergyMeter

    corpus = load_corpus(cfg.corpus_chars)
    saved = checkpoint.committed(run_dir)
    resume_batch = _batch_for(corpus, cfg, rank, saved["step"], device) if saved is not None else None
    # Energy of the whole machine, metered once (rank 0) in both runs; the autoglm_rt run also
    # exports it (the exporter's ``energy`` source).
    meter = EnergyMeter(gpus=device.type == "cuda").start() if rank == 0 else None
    net, optimizer, impl = _build(run, cfg, device, rank, resume_batch, meter)
    if meter is not None:
        meter.start()  # restart: the run's energy is metered from here on, not the model's construction
    pos = _resume(saved, run_dir, rank, device, net, optimizer, impl)
    steps_file = _open_steps(run_dir, pos.step) if rank == 0 else None
    progress = Progress(run, cfg.steps, pos.step, enabled=show_progress and rank == 0)
    t0 = time.perf_counter()
    try:
        while pos.step < cfg.steps:
            signum = stop.agreed()
            if signum:
                pos.wall_seconds += time.perf_counter() - t0
                pos.energy_joules += meter.read().total_joules if meter else 0.0
                _checkpoint(run_dir, rank, cfg, signum, net, optimizer, impl, pos)
                return
            batch = _batch_for(corpus, cfg, rank, pos.step, device)
            ts = time.perf_counter()
            loss, record = impl.step(batch)
            record.update(step=pos.step, loss=loss, step_seconds=time.perf_counter() - ts)
            record["effective_batch"] = record["micro_batch"] * record["accumulation"]
            record["bytes_communicated_step"] = record["bytes_communicated_total"] - pos.prev_bytes
            pos.prev_bytes = record["bytes_communicated_total"]
            if steps_file is not None:
                steps_file.write(json.dumps(record) + "\n")
                steps_file.flush()
            progress.update(pos.step, record)
            pos.step += 1
    finally:
        progress.close()
        if steps_file is not None:
            steps_file.close()
        impl.close()
    _finish(rank, cfg, corpus, run_dir, device, net, impl, meter, pos.wall_seconds + time.perf_counter() - t0,
            pos.energy_joules)  # fmt: skip


def _open_steps(run_dir: Path, first_step: int) -> Any:
    """steps.jsonl holding exactly the records of the steps before ``first_step`` (a fresh run:
    none; a resumed one: those up to its checkpoint, dropping any written after it)."""
    path = run_dir / "steps.jsonl"
    kept = []
    if first_step and path.exists():
        kept = [
            line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < first_step
        ]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _finish(rank: int, cfg: DemoConfig, corpus: Corpus, run_dir: Path, device: torch.device, net: torch.nn.Module,
            impl: Any, meter: Any, wall_seconds: float, joules_before: float) -> None:  # fmt: skip
    result = {
        "val_loss": _evaluate(net, corpus, cfg, device),
        "wall_seconds": wall_seconds,
        "peak_memory_bytes": _peak_memory_bytes(impl.pool, device),
    }
    if meter is not None:
        from autoglm_rt.monitor.energy import JOULES_PER_KWH

        energy = meter.read()
        result["energy_joules"] = joules_before + energy.total_joules
        result["energy_source"] = energy.describe()
        result["energy_estimated"] = energy.cpu_estimated
        # CO2e of the whole run (the meter's own figure covers only the time since a resume).
        result["co2e_grams"] = result["energy_joules"] / JOULES_PER_KWH * energy.pue * energy.carbon_intensity
        result["carbon_intensity"] = energy.carbon_intensity
    result.update(impl.summary())  # after the energy reading: the summary may time a few steps
    gathered: list[Any] = [None] * cfg.world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        summary = {
            "val_loss": gathered[0]["val_loss"],
            "wall_seconds": max(g["wall_seconds"] for g in gathered),
            "bytes_communicated": sum(g["bytes_communicated"] for g in gathered),
            "dense_bytes": sum(g["dense_bytes"] for g in gathered),
            "peak_memory_bytes": max(g["peak_memory_bytes"] for g in gathered),
            "per_rank": gathered,
            "config": asdict(cfg),
            "corpus": corpus.describe(),
        }
        for key in ("energy_joules", "energy_source", "energy_estimated", "co2e_grams", "carbon_intensity"):
            summary[key] = gathered[0][key]
        for key in ("notes", "phases", "actions", "strategy", "pool", "metrics_url", "step_costs"):
            if key in gathered[0]:
                summary[key] = gathered[0][key]
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    dist.barrier()
    if rank == 0:
        checkpoint.clear(run_dir)
