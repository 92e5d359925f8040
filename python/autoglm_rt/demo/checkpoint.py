"""The demo's checkpoints: everything a run needs to continue exactly where it stopped.

One file per rank, ``ckpt_rank{r}.pt``: model, optimizer, the run's own state (the Runtime's and
the DDP hook's ``state_dict()``, counters), the RNG streams (torch, CUDA, numpy, python), the data
position (the next step) and the run's wall time and energy so far. Each file is written to a
temporary name and renamed, and rank 0 writes ``checkpoint.json`` only after every rank saved, so
a checkpoint counts (:func:`committed_step`) only when it is complete; files without the marker are
left-overs of an interrupted save and are ignored.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "checkpoint.json"


def rank_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"ckpt_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Every random stream a rank draws from (the demo's data comes from its own seeded
    generators; these cover the model, dropout and any library that uses the global streams)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_rank(run_dir: Path, rank: int, payload: dict[str, Any]) -> None:
    """Writes this rank's file atomically (a crash mid-write leaves the previous file intact)."""
    path = rank_path(run_dir, rank)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def commit(run_dir: Path, step: int, world: int, signal_name: str) -> None:
    """Rank 0, after every rank's :func:`save_rank` (a barrier): marks the checkpoint complete."""
    tmp = run_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "world": world, "signal": signal_name}) + "\n")
    os.replace(tmp, run_dir / MARKER)


def committed(run_dir: Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint (``step``, ``world``, ``signal``), or None when there is
    none or a rank's file is missing."""
    marker = run_dir / MARKER
    if not marker.exists():
        return None
    info: dict[str, Any] = json.loads(marker.read_text())
    if not all(rank_path(run_dir, r).exists() for r in range(int(info["world"]))):
        return None
    return info


def load_rank(run_dir: Path, rank: int, device: torch.device) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(rank_path(run_dir, rank), map_location=device, weights_only=False)
    return payload


def clear(run_dir: Path) -> None:
    """Removes the marker first (so a half-removed checkpoint never counts), then the files."""
    (run_dir / MARKER).unlink(missing_ok=True)
    for path in run_dir.glob("ckpt_rank*.pt*"):
        path.unlink(missing_ok=True)


__all__ = [
    "MARKER",
    "clear",
    "commit",
    "committed",
    "load_rank",
    "rank_path",
    "rng_state",
    "save_rank",
    "set_rng_state",
]
