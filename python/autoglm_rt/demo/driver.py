"""Runs the demo's two trainings one after the other and writes the comparison."""

from __future__ import annotations

import json
import platform
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from autoglm_rt.demo.report import write_report
from autoglm_rt.demo.train import PRESETS, RUNS, DemoConfig, free_port, worker


class Interrupted(Exception):
    """SIGTERM arrived; the ranks checkpointed and a rerun resumes."""


def _run_one(run: str, cfg: DemoConfig, out: Path, show_progress: bool) -> dict[str, Any]:
    run_dir = out / run
    result_path = run_dir / "result.json"
    if result_path.exists():
        print(f"[{run}] already finished; reusing {result_path}")
        return dict(json.loads(result_path.read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not any(run_dir.glob("ckpt_rank*.pt")):
        (run_dir / "steps.jsonl").unlink(missing_ok=True)  # a fresh start, not a resume
    ctx = mp.start_processes(
        worker, args=(run, cfg, str(out), free_port(), show_progress), nprocs=cfg.world, join=False,
        start_method="spawn",
    )  # fmt: skip
    terminated = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal terminated
        terminated = True
        for p in ctx.processes:
            if p.is_alive() and p.pid is not None:
                p.terminate()  # SIGTERM: the ranks checkpoint and exit 0

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while not ctx.join(timeout=1.0):
            pass  # join in short waits so the SIGTERM handler runs between them
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated or not result_path.exists():
        raise Interrupted(f"{run} interrupted; its ranks checkpointed under {run_dir}; run the demo again to resume")
    return dict(json.loads(result_path.read_text()))


def run_demo(
    out: str | Path = "autoglm_rt_demo",
    preset: str = "default",
    *,
    steps: int | None = None,
    gpus: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Trains with autoglm_rt, then the baseline, on the same data and steps; returns the report
    document (also written to ``out``). ``gpus``: 0 = CPU ranks over gloo, N >= 2 = N GPUs over
    NCCL. Raises :class:`Interrupted` if SIGTERM stopped a run (rerun to resume)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    cfg = PRESETS[preset]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        cfg = replace(cfg, steps=steps)
    if gpus:
        if gpus < 2:
            raise ValueError("gpus: the demo is data-parallel; expected 0 (CPU) or at least 2 GPUs")
        cfg = replace(cfg, device="cuda", world=gpus)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != asdict(cfg):
        raise ValueError(f"{out} holds a demo with another configuration; choose another --out or delete it")
    config_path.write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    started = time.perf_counter()
    runs = {run: _run_one(run, cfg, out, show_progress) for run in RUNS}
    meta = {
        "preset": preset,
        "steps": cfg.steps,
        "ranks": cfg.world,
        "device": cfg.device,
        "python": platform.python_version(),
        "demo_seconds": round(time.perf_counter() - started, 1),
    }
    return write_report(out, runs, meta)
