"""Thread counts that follow the process's CPU quota.

A job whose cgroup grants it ``q`` cores gains little from more than ``floor(q)`` compute threads
(at least one): the extra threads only wait for quota and contend with each other (on this
project's 2-core machines, 2 threads under a 1-core quota ran a step several times slower than
1). Within a quarter core of the next whole core the extra thread pays: CFS throttles a group's
threads together, so 2 threads under 1.75 cores run at 1.75 cores where 1 thread runs at 1 (a
lone tenant under 1.75-1.9 cores went from 1.0 to 1.6-2.0 cores used). :func:`cores_cap` is that
rule. torch does not read the quota, so the Runtime does: :class:`QuotaThreads` sets every thread
count the Runtime chooses through one setter, capped at :func:`cores_cap` of the quota, and
re-reads the quota at most every ``interval`` seconds so a scheduler that changes it mid-run is
followed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from autoglm_rt.policy.memory import MemoryPolicy
from autoglm_rt.runtime.pipeline import ThreadControl


def cores_cap(quota: float | None) -> int | None:
    """The thread cap for a quota of ``quota`` cores: ``floor(quota + 0.25)``, its whole cores
    with a quota within a quarter core of the next counting as it (1.75 -> 2, 1.5 -> 1), at
    least 1 (None: no cap, also for a quota that is not a finite positive number)."""
    if quota is None or not isinstance(quota, (int, float)) or not math.isfinite(quota) or quota <= 0:
        return None
    return max(1, math.floor(quota + 0.25))


class QuotaThreads:
    """Sets thread counts through ``setter``, never above the cap of the CPU quota ``read_quota``
    returns (cores, or None for none). ``wanted``: the count in effect now, kept as what the
    Runtime wants until it sets another. ``loop``: the step-time thread loop, if any: a cap
    change narrows (or widens) its range and its count becomes what is wanted. Guarantees:
    :meth:`set` applies ``min(n, cap)``; after :meth:`poll` sees the quota change, the applied
    count is ``min(wanted, cap)`` (``wanted`` again once the quota is gone); the setter is called
    only when the applied count changes."""

    def __init__(
        self,
        setter: Callable[[int], None],
        read_quota: Callable[[], float | None],
        *,
        wanted: int,
        interval: float = 1.0,
        loop: ThreadControl | None = None,
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
        self.loop = loop
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
        self.follow()
        return True

    def follow(self) -> None:
        """Re-applies the current cap: to the loop's range (its count is then what is wanted)
        and to the applied count. Call after restoring the loop's saved state."""
        if self.loop is not None:
            self.loop.limit(self.cap)
            self.wanted = self.loop.threads
        self._apply()

    def _apply(self) -> None:
        n = self.wanted if self.cap is None else min(self.wanted, self.cap)
        if n != self.applied:
            self.setter(n)
            self.applied = n


def follow_cpu_quota(
    read_quota: Callable[[], float | None] | None,
    setter: Callable[[int], None],
    loop: ThreadControl | None,
    memory_policy: MemoryPolicy | None,
    now: float,
) -> QuotaThreads | None:
    """The Runtime's :class:`QuotaThreads` (None when ``read_quota`` is None), with the memory
    policy's phase thread setter routed through it and the quota that holds at ``now`` applied."""
    if read_quota is None:
        return None
    import torch

    wanted = loop.threads if loop is not None else max(torch.get_num_threads(), 1)
    quota = QuotaThreads(setter, read_quota, wanted=wanted, loop=loop)
    if memory_policy is not None and memory_policy.thread_setter is not None:
        memory_policy.thread_setter = quota.set
    quota.poll(now)
    return quota


__all__ = ["QuotaThreads", "cores_cap", "follow_cpu_quota"]
