"""Runs a function on 2 gloo ranks over 127.0.0.1 in spawned processes, bounded in time.

A hang (a rank waiting on a collective that never comes) fails the test after ``timeout`` seconds
instead of blocking the suite; every collective also has its own process-group timeout.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, port: int, fn: Callable[[int], Any], results: Any, pg_timeout: float) -> None:
    try:
        import torch
        import torch.distributed as dist

        import autoglm_rt
        from autoglm_rt.distributed import init_process_group

        torch.set_num_threads(1)
        autoglm_rt.set_num_threads(1)
        # The store listens on 127.0.0.1 only, gloo on lo (autoglm_rt.distributed).
        init_process_group(
            "gloo", rank=rank, world_size=WORLD, port=port, timeout=datetime.timedelta(seconds=pg_timeout)
        )
        try:
            results.put((rank, "ok", fn(rank)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_on_two_ranks(fn: Callable[[int], Any], timeout: float = 120.0, pg_timeout: float = 60.0) -> list[Any]:
    """Returns ``[fn(0), fn(1)]`` computed on two ranks of one gloo process group. ``fn`` must be a
    module-level function (it is pickled into spawned processes). Raises AssertionError with the
    rank's traceback if a rank fails, or if the pair does not finish within ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, port, fn, results, pg_timeout), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(WORLD):
            try:
                rank, status, payload = results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"ranks did not finish within {timeout} s (hang?)") from None
            if status == "ok":
                out[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    assert not errors, "\n".join(errors)
    return [out[r] for r in range(WORLD)]
