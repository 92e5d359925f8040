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
from torch.multiprocessing.spawn import ProcessException

from autoglm_rt.demo import checkpoint
from autoglm_rt.demo.report import write_report
from autoglm_rt.demo.train import PRESETS, RUNS, STOP_SIGNALS, DemoConfig, free_port, worker


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped a run; its ranks checkpointed and a rerun resumes.
    ``signum``: the signal (an interrupted ``autoglm-rt demo`` exits 128 + signum)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _run_one(run: str, index: int, cfg: DemoConfig, out: Path, show_progress: bool) -> dict[str, Any]:
    run_dir = out / run
    result_path = run_dir / "result.json"
    header = (
        f"run {index} of {len(RUNS)}: {run}, {cfg.steps} steps on {cfg.world} {cfg.device} ranks, "
        f"output {run_dir.resolve()}"
    )
    if result_path.exists():
        print(f"{header} (already finished; reusing its result)", flush=True)
        return dict(json.loads(result_path.read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = checkpoint.committed(run_dir)
    if resumed is None:
        checkpoint.clear(run_dir)  # left-overs of an incomplete save: start afresh
    print(header + (f" (resuming at step {resumed['step']})" if resumed else ""), flush=True)
    received = 0
    ctx: Any = None

    def forward(signum: int, frame: Any) -> None:
        nonlocal received
        received = received or signum
        for p in ctx.processes if ctx is not None else ():
            if p.is_alive() and p.pid is not None:
                p.terminate()  # SIGTERM: the ranks checkpoint at the same step and exit 0

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signal.signal(signal.SIGTERM, forward)
    # The ranks start with Ctrl-C ignored (no KeyboardInterrupt traceback while they import); each
    # installs its own handler first thing, and until then this process forwards SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctx = mp.start_processes(
            worker, args=(run, cfg, str(out), free_port(), show_progress), nprocs=cfg.world, join=False,
            start_method="spawn",
        )  # fmt: skip
        signal.signal(signal.SIGINT, forward)
        if received:
            forward(received, None)
        while not ctx.join(timeout=1.0):
            pass  # join in short waits so the signal handler runs between them
    except ProcessException:
        if not received:
            raise
        # A rank stopped before it could checkpoint (the signal came while it was starting).
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    saved = checkpoint.committed(run_dir)
    if received or not result_path.exists():
        signum = received or (signal.Signals[saved["signal"]].value if saved else signal.SIGTERM.value)
        name = signal.Signals(signum).name
        if result_path.exists():
            raise Interrupted(f"{name}: {run} had finished; rerun the same command to do the rest", signum)
        if saved is None:
            raise Interrupted(f"{name}: {run} stopped before its first checkpoint; rerun to start it again", signum)
        raise Interrupted(
            f"{name}: {run} checkpointed at step {saved['step']} of {cfg.steps} in {run_dir}; "
            "rerun the same command to resume",
            signum,
        )
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
    NCCL. Raises :class:`Interrupted` if SIGINT or SIGTERM stopped a run (rerun to resume)."""
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
    runs = {run: _run_one(run, i, cfg, out, show_progress) for i, run in enumerate(RUNS, 1)}
    meta = {
        "preset": preset,
        "steps": cfg.steps,
        "ranks": cfg.world,
        "device": cfg.device,
        "python": platform.python_version(),
        "demo_seconds": round(time.perf_counter() - started, 1),
    }
    return write_report(out, runs, meta)
