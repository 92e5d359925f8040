"""Thread counts that follow the process's CPU quota.

A job whose cgroup grants it ``q`` cores gains nothing from more than ``floor(q)`` compute threads
(at least one): the extra threads only wait for quota and contend with each other (on this
project's 2-core machines, 2 threads under a 1-core quota ran a step several times slower than
1). torch does not read the quota, so the Runtime does: :class:`QuotaThreads` sets every thread
count the Runtime chooses through one setter, capped at the quota's whole cores, and re-reads the
quota at most every ``interval`` seconds so a scheduler that changes it mid-run is followed.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def cores_cap(quota: float | None) -> int | None:
    """The thread cap for a quota of ``quota`` cores: its whole cores, at least 1 (None: no cap,
    also for a quota that is not a finite positive number)."""
    if quota is None or not isinstance(quota, (int, float)) or not math.isfinite(quota) or quota <= 0:
        return None
    return max(1, math.floor(quota))


class QuotaThreads:
    """Sets thread counts through ``setter``, never above the cap of the CPU quota ``read_quota``
    returns (cores, or None for none). ``wanted``: the count in effect now, kept as what the
    Runtime wants until it sets another. Guarantees: :meth:`set` applies ``min(n, cap)``; after
    :meth:`poll` sees the quota change, the applied count is ``min(wanted, cap)`` (``wanted`` again
    once the quota is gone); the setter is called only when the applied count changes."""

    def __init__(
        self,
        setter: Callable[[int], None],
        read_quota: Callable[[], float | None],
        *,
        wanted: int,
        interval: float = 1.0,
    ) -> None:
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise ValueError(f"wanted: expected a positive int, got {wanted!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
            raise ValueError(f"interval: expected seconds >= 0, got {interval!r}")
        self.setter = setter
        self.read_quota = read_quota
        self.interval = float(interval)
        self.wanted = wanted
        self.applied = wanted
        self.cap: int | None = None
        self._last_read: float | None = None

    def set(self, n: int) -> None:
        """Wants ``n`` threads; applies ``min(n, cap)``."""
        self.wanted = n
        self._apply()

    def poll(self, now: float) -> bool:
        """Re-reads the quota when ``interval`` seconds passed since the last read (``now`` on the
        caller's clock); True when the cap changed (the applied count follows it)."""
        if self._last_read is not None and now - self._last_read < self.interval:
            return False
        self._last_read = now
        cap = cores_cap(self.read_quota())
        if cap == self.cap:
            return False
        self.cap = cap
        self._apply()
        return True

    def _apply(self) -> None:
        n = self.wanted if self.cap is None else min(self.wanted, self.cap)
        if n != self.applied:
            self.setter(n)
            self.applied = n


__all__ = ["QuotaThreads", "cores_cap"]
