"""Puts each queued job into its own cgroup with the limits of its spec (``memory:``, ``cpus:``)
and tells, when it ends, whether the kernel's OOM killer ended it.

One :class:`CgroupPlacement` per runner. Groups are ``queue-<hash of the state file>/<job>.<attempt>``
under autoglm_rt's cgroup tree; a restarted runner removes the empty ones its predecessor left
(groups that still hold a job stay: the runner adopts that job), and groups any runner left
empty more than 10 minutes ago. Where no cgroup is writable,
jobs run without enforcement and the runner logs why once.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path

from autoglm_rt.jobqueue.spec import JobSpec
from autoglm_rt.resources import JobGroup, ResourceError, availability, cleanup_stale, detect

__all__ = ["CGROUP_PROCS_ENV", "CgroupPlacement"]

#: The wrapper writes its pid into each of these ``cgroup.procs`` files (os.pathsep-separated)
#: before it starts the job's command, so the command never runs outside its group.
CGROUP_PROCS_ENV = "AUTOGLM_RT_CGROUP_PROCS"


class CgroupPlacement:
    def __init__(self, state: str | Path, log: Callable[[str], None]) -> None:
        self.scope = "queue-" + hashlib.sha1(str(Path(state).resolve()).encode()).hexdigest()[:12]
        self.backend = detect()
        self._log = log
        if self.backend is None:
            log(f"jobs run without memory/cpu limits: {availability()[1]}")
            return
        for rel in cleanup_stale(self.backend, scope=self.scope):  # and old empty groups of others
            log(f"removed stale cgroup {rel}")

    def _group(self, name: str, attempt: int) -> JobGroup | None:
        return None if self.backend is None else JobGroup(self.backend, f"{self.scope}/{name}.{attempt}")

    def env_for(self, spec: JobSpec, attempt: int) -> dict[str, str]:
        """Creates the job's group with its limits; returns the environment the wrapper needs to
        join it (empty without enforcement). Raises ResourceError if the kernel refuses."""
        if self.backend is None:
            return {}
        group = JobGroup.create(self.scope, f"{spec.name}.{attempt}", self.backend)
        try:
            group.set_memory_limit(spec.memory)
            group.set_cpu_quota(spec.cpus)
        except (ResourceError, ValueError):
            group.remove()
            raise
        return {CGROUP_PROCS_ENV: ":".join(group.procs_files())}

    def finished(self, name: str, attempt: int) -> str | None:
        """Removes the job's group; returns a message when the OOM killer killed one of its processes."""
        group = self._group(name, attempt)
        if group is None or not group.exists():
            return None
        kills = 0
        with contextlib.suppress(ResourceError):
            kills = group.oom_kills()
        limit = None
        with contextlib.suppress(ResourceError):
            limit = group.memory_limit()
        group.remove()
        if kills:
            return f"killed by the kernel's OOM killer ({kills}x) at its memory limit of {limit} bytes"
        return None
