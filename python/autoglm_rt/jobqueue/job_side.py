"""The job's side of the queue: what a training process started by ``autoglm-rt queue`` uses to
ask its runner for scheduling actions (the Runtime finds it from the environment the runner sets:
``AUTOGLM_RT_QUEUE_STATE`` and ``AUTOGLM_RT_JOB_NAME``)."""

from __future__ import annotations

import time
from pathlib import Path

from autoglm_rt.jobqueue.store import QueueStore

__all__ = ["QueueJobScheduler"]


class QueueJobScheduler:
    """Scheduling actions of one queue job, carried out by the queue's runner.

    ``migrate`` leaves a migrate request in the queue's state; the runner checkpoints the job
    (SIGTERM), stops it and restarts it on other slots. A queue job has a fixed number of
    replicas, so ``scale_replicas`` is not carried out and says so (answers that are not carried
    out start with "not ", the actuators' convention)."""

    def __init__(self, state: str | Path, job: str) -> None:
        self.state = Path(state)
        self.job = job

    def migrate(self, action: object = None) -> str:
        if not self.state.is_file():
            return f"not migrated: the queue state {self.state} does not exist"
        with QueueStore(self.state) as store:
            request = store.request("migrate", self.job, None, time.time())
        return f"migration of {self.job} requested from the queue runner (request {request})"

    def scale_replicas(self, delta: int, action: object = None) -> str:
        return f"not scaled ({delta:+d}): a queue job runs a fixed number of replicas; use autoglm_rt.elastic"
