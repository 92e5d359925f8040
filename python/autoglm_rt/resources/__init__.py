"""Per-job resource enforcement through Linux cgroups (v1 or v2, detected at run time).

- :class:`JobGroup`: create a job's group, set/read its memory limit and CPU quota, read usage,
  peak, OOM kills and CPU time, remove it.
- :class:`CgroupMemory`: a job's own group as a pool for ``Runtime(pool=...)``.
- :func:`cpu_quota_cores`: the CPU quota that holds for a process, for its thread count.
- :func:`availability`: ``("cgroup-v1" | "cgroup-v2" | "none", reason)``.
- :func:`cleanup_stale`: removes groups a dead runner left behind.
"""

from autoglm_rt.resources.cgroup import (
    Backend,
    JobGroup,
    ResourceError,
    availability,
    cleanup_stale,
    cpu_quota_cores,
    detect,
    group_of_pid,
)
from autoglm_rt.resources.pool import CgroupMemory

__all__ = [
    "Backend",
    "CgroupMemory",
    "JobGroup",
    "ResourceError",
    "availability",
    "cleanup_stale",
    "cpu_quota_cores",
    "detect",
    "group_of_pid",
]
