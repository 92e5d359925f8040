"""``autoglm-rt queue``: a crash-safe, SQLite-backed job queue that runs real commands on this
machine's GPUs or CPU slots under :class:`autoglm_rt.policy.scheduler.priority.PriorityScheduler`."""

from __future__ import annotations

from autoglm_rt.jobqueue.runner import QueueRunner
from autoglm_rt.jobqueue.spec import JobSpec, QueueSpec, QueueSpecError, load_queue_spec, parse_queue_spec
from autoglm_rt.jobqueue.store import QueueStore

__all__ = ["JobSpec", "QueueRunner", "QueueSpec", "QueueSpecError", "QueueStore", "load_queue_spec", "parse_queue_spec"]
