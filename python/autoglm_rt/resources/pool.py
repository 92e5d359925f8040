"""A job's own cgroup seen as a memory pool, for the Runtime's memory signal.

``Runtime(model, optimizer, pool=CgroupMemory.own())`` makes the batch controller follow the live
limit the scheduler gives the job: it reads ``limit_bytes`` (the smallest of the group's hard
limit, its announced target and the job's own cap), ``allocated_bytes`` (the group's usage) and
``peak_allocated_bytes`` (the group's peak since :meth:`CgroupMemory.reset_peak_stats`), and the
controller shrinks the micro-batch when the step's peak presses on the limit.
"""

from __future__ import annotations

from typing import Any

from autoglm_rt.constants import UNLIMITED_BYTES
from autoglm_rt.resources.cgroup import JobGroup, ResourceError, availability, group_of_pid
from autoglm_rt.units import parse_size

__all__ = ["CgroupMemory"]


class CgroupMemory:
    """The pool interface (``stats()``, ``set_limit()``, ``reset_peak_stats()``) over one job group.

    ``set_limit`` is the job's *own* cap: it lowers what ``stats()`` reports as the limit (so the
    job's memory policy can keep headroom inside its group), but never writes the group's hard
    limit, which belongs to the scheduler; a cap above the group's limit has no effect until the
    scheduler raises the limit. ``limit_bytes`` is :data:`UNLIMITED_BYTES` when nothing limits."""

    device = "cpu"

    def __init__(self, group: JobGroup) -> None:
        if not isinstance(group, JobGroup):
            raise TypeError(f"group: expected a JobGroup, got {type(group).__name__}")
        self.group = group
        self._own_cap: int | None = None

    @classmethod
    def own(cls) -> CgroupMemory:
        """The group this process runs in. Raises ResourceError when there is no cgroup
        enforcement here, or this process was not started in an autoglm_rt job group."""
        group = group_of_pid("self")
        if group is None:
            kind, reason = availability()
            raise ResourceError(reason if kind == "none" else "this process is not in an autoglm_rt job group")
        return cls(group)

    def limit(self) -> int | None:
        limits = [x for x in (self.group.memory_limit(), self.group.memory_target(), self._own_cap) if x is not None]
        return min(limits) if limits else None

    def stats(self) -> dict[str, Any]:
        limit = self.limit()
        return {
            "limit_bytes": UNLIMITED_BYTES if limit is None else limit,
            "allocated_bytes": self.group.memory_usage(),
            "peak_allocated_bytes": self.group.memory_peak(),
            "hard_limit_bytes": self.group.memory_limit() or UNLIMITED_BYTES,
            "oom_kills": self.group.oom_kills(),
        }

    def set_limit(self, limit: int | str | None) -> None:
        """Sets the job's own cap (bytes, "12Gi", or None for none); see the class docstring."""
        self._own_cap = None if limit is None else parse_size(limit, name="CgroupMemory.set_limit")
        if self._own_cap == 0 or (self._own_cap is not None and self._own_cap >= UNLIMITED_BYTES):
            self._own_cap = None

    def reset_peak_stats(self) -> None:
        self.group.reset_memory_peak()

    def state_dict(self) -> dict[str, Any]:
        return {"own_cap": self._own_cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cap = state.get("own_cap")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            raise ValueError(f"CgroupMemory state: own_cap must be a positive int or None, got {cap!r}")
        self._own_cap = cap
