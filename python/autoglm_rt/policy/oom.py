"""Out-of-memory recovery: what counts as running out of memory, and one optimizer step's
micro-batches redone smaller after it.

:func:`run_step` processes one optimizer step's samples in micro-batches and recovers from an OOM
in the middle of it: the failed micro-batch is redone smaller, and as long as the caller's
``process`` adds a micro-batch's contribution only when it succeeds, no sample is lost or counted
twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from autoglm_rt.policy.batch import BatchController


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors an allocation failure raises: ``MemoryError`` (including
    ``autoglm_rt.memory.OutOfMemoryError``), ``torch.OutOfMemoryError`` and torch's CPU allocator's
    ``RuntimeError`` ("can't allocate memory")."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def run_step(
    n: int,
    process: Callable[[int, int], object],
    controller: BatchController,
    *,
    limit_bytes: Callable[[], float | None] | None = None,
) -> list[tuple[int, int]]:
    """Calls ``process(start, stop)`` for consecutive micro-batches covering samples ``[0, n)``.
    An out-of-memory error (:func:`is_out_of_memory`) halves the controller's micro-batch and the
    same ``start`` is redone smaller; any other error propagates. Returns the bounds that
    succeeded, which tile ``[0, n)`` exactly once. ``process`` must leave no trace of a micro-batch
    that raised (accumulate its gradient only on success)."""
    done: list[tuple[int, int]] = []
    start = 0
    while start < n:
        stop = min(start + controller.micro_batch, n)
        try:
            process(start, stop)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            controller.on_oom(exc, limit_bytes=limit_bytes() if limit_bytes is not None else None)
            continue
        done.append((start, stop))
        start = stop
    return done


__all__ = ["is_out_of_memory", "run_step"]
