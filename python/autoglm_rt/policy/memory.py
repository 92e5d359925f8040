"""Phase -> memory limit of the pool, applied at once, never below the observed peak working set
plus a margin; and phase -> CPU threads, scaled to the machine.

The memory freed by a lower limit in later phases is what other tenants (another job, a data
loader, an inference server) can use: the pool gives cached blocks back when its limit drops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from autoglm_rt.constants import PHASES
from autoglm_rt.stateful import Stateful
from autoglm_rt.units import parse_size

DEFAULT_LIMITS: dict[str, float | int | str] = {"initial": 0.9, "convergence": 0.6, "fine_tuning": 0.3}
DEFAULT_THREADS: dict[str, int] = {"initial": 16, "convergence": 8, "fine_tuning": 4}
REFERENCE_CORES = 16


class Pool(Protocol):
    """What the policy needs of a pool (``autoglm_rt.memory.CachingPool`` has it)."""

    def set_limit(self, limit: int | str | None) -> None: ...

    def stats(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class MemoryDecision:
    """What :meth:`MemoryPolicy.apply` did: the phase, the limit set (bytes), the phase's own
    target, the floor (peak working set plus margin) that may have raised it, and the threads."""

    phase: str
    limit_bytes: int
    target_bytes: int
    floor_bytes: int
    threads: int | None
    reason: str


def default_thread_setter(n: int) -> None:
    """Sets torch's intra-op threads (when torch is imported) and the native kernels' threads."""
    import sys

    from autoglm_rt import set_num_threads

    set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


class MemoryPolicy(Stateful):
    """Maps a phase to a pool limit and a CPU thread count and applies them.

    ``capacity``: the device memory the fractions refer to (bytes or "80Gi"; required when a limit
    is a fraction). ``limits``: per phase, a fraction of ``capacity`` in (0, 1] or a size.
    ``margin``: the floor is ``peak_allocated_bytes * (1 + margin)`` from the pool's stats, so a
    lower phase limit never forces the working set out. ``threads``: per phase, scaled by
    ``cores / 16`` (at least 1); ``None`` leaves threads alone. ``thread_setter`` applies them.
    """

    _state_fields = ("decisions", "peak_bytes")

    def __init__(
        self,
        pool: Pool,
        *,
        capacity: int | str | None = None,
        limits: Mapping[str, float | int | str] | None = None,
        margin: float = 0.1,
        threads: Mapping[str, int] | None = None,
        cores: int | None = None,
        thread_setter: Callable[[int], None] | None = default_thread_setter,
    ) -> None:
        if not callable(getattr(pool, "set_limit", None)) or not callable(getattr(pool, "stats", None)):
            raise TypeError(f"pool: expected an object with set_limit() and stats(), got {type(pool).__name__}")
        self.pool = pool
        self.capacity = None if capacity is None else parse_size(capacity, name="capacity")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin: expected a non-negative fraction, got {margin!r}")
        self.margin = float(margin)
        self.limits = self._parse_limits(DEFAULT_LIMITS if limits is None else limits)
        cores = available_cores() if cores is None else cores
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError(f"cores: expected a positive int, got {cores!r}")
        self.cores = cores
        self.threads = self._parse_threads(DEFAULT_THREADS if threads is None else threads)
        self.thread_setter = thread_setter
        self.decisions: list[MemoryDecision] = []
        self.peak_bytes = 0

    def _parse_limits(self, limits: Mapping[str, float | int | str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for phase in PHASES:
            if phase not in limits:
                raise ValueError(f"limits: missing phase {phase!r}; expected {', '.join(PHASES)}")
        for phase, value in limits.items():
            if phase not in PHASES:
                raise ValueError(f"limits: unknown phase {phase!r}; expected {', '.join(PHASES)}")
            name = f"limits[{phase!r}]"
            if isinstance(value, float) and value <= 1.0:
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"{name}: expected a fraction in (0, 1] or a size, got {value}")
                if self.capacity is None:
                    raise ValueError(f"{name}: a fraction ({value}) needs capacity= (the device memory)")
                out[phase] = int(value * self.capacity)
            else:
                size = parse_size(value, name=name)
                if size <= 0:
                    raise ValueError(f"{name}: expected a positive size, got {value!r}")
                out[phase] = size
        return out

    def _parse_threads(self, threads: Mapping[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for phase in PHASES:
            value = threads.get(phase)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"threads[{phase!r}]: expected a positive int, got {value!r}")
            out[phase] = max(1, round(value * self.cores / REFERENCE_CORES))
        unknown = set(threads) - set(PHASES)
        if unknown:
            raise ValueError(f"threads: unknown phase {sorted(unknown)[0]!r}; expected {', '.join(PHASES)}")
        return out

    def observe_peak(self, nbytes: int) -> None:
        """Records a peak working set seen elsewhere (e.g. per step, by a caller that resets the
        pool's peak statistics), so the floor remembers it after the pool's own peak is reset."""
        self.peak_bytes = max(self.peak_bytes, int(nbytes))

    def floor_bytes(self) -> int:
        """The observed peak working set (the pool's peak, or a larger one recorded with
        :meth:`observe_peak`) plus the margin."""
        peak = max(self.peak_bytes, int(self.pool.stats().get("peak_allocated_bytes", 0)))
        return math.ceil(peak * (1 + self.margin))

    def limit_for(self, phase: str) -> tuple[int, int, int]:
        """``(limit, target, floor)`` for ``phase`` without applying it."""
        if phase not in self.limits:
            raise ValueError(f"phase: expected one of {', '.join(PHASES)}, got {phase!r}")
        target, floor = self.limits[phase], self.floor_bytes()
        return max(target, floor), target, floor

    def apply(self, phase: str, *, threads: bool = True) -> MemoryDecision:
        """Sets the pool's limit for ``phase`` now (the pool trims its cache to it) and the threads."""
        limit, target, floor = self.limit_for(phase)
        self.pool.set_limit(limit)
        n = None
        if threads and self.thread_setter is not None:
            n = self.threads[phase]
            self.thread_setter(n)
        reason = f"{phase}: limit {limit} bytes"
        if floor > target:
            reason += f" (raised from the phase's {target} to the peak working set plus {self.margin:.0%})"
        decision = MemoryDecision(phase, limit, target, floor, n, reason)
        self.decisions.append(decision)
        return decision

    def set_limit(self, limit: int | str | tuple[str, float]) -> int:
        """Applies an explicit limit (a size, or ``("ratio", x)`` of capacity, as a strategy's
        ``adjust_gpu_memory_limit`` gives it), still never below the floor. Returns the limit set."""
        if isinstance(limit, tuple):
            kind, value = limit
            if kind != "ratio" or self.capacity is None:
                raise ValueError(f"limit: a ratio limit {limit!r} needs capacity= (the device memory)")
            size = int(value * self.capacity)
        else:
            size = parse_size(limit, name="limit")
        size = max(size, self.floor_bytes())
        self.pool.set_limit(size)
        return size


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
