"""Real effects for the policy layer's scheduling actions (``scale_up_replicas``,
``scale_down_replicas``, ``migrate_task``): the object to give ``autoglm_rt.policy.Actuators`` as
its ``scheduler``. It has the two methods that protocol asks for, ``scale_replicas(delta, action)``
and ``migrate(action)``, and returns a line that says what happened.
"""

from __future__ import annotations

from autoglm_rt.elastic import ElasticJob
from autoglm_rt.jobqueue.runner import QueueRunner
from autoglm_rt.policy.scheduler.tasks import SchedulerError

__all__ = ["SchedulingActuator"]


class SchedulingActuator:
    """Scales ``elastic_job``'s agents and migrates ``job`` in ``queue``; either may be absent.

    Scaling stays within the job's ``min_nodes..max_nodes``: a request beyond them does as much as
    it can and says so. ``history`` holds every answer."""

    def __init__(
        self,
        *,
        elastic_job: ElasticJob | None = None,
        queue: QueueRunner | None = None,
        job: str | None = None,
    ) -> None:
        if (queue is None) != (job is None):
            raise ValueError("queue and job: give both (the queue and the name of the job to migrate) or neither")
        self.elastic_job = elastic_job
        self.queue = queue
        self.job = job
        self.history: list[str] = []

    def scale_replicas(self, delta: int, action: object = None) -> str:
        """Adds (``delta`` > 0) or removes agents of the elastic job (see ``ElasticJob.scale_by``)."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta: expected an int, got {delta!r}")
        if self.elastic_job is None:
            return self._say("not scaled: no elastic job attached")
        return self._say(self.elastic_job.scale_by(delta))

    def migrate(self, action: object = None) -> str:
        """Moves the job to other free slots (checkpoint, stop, restart)."""
        if self.queue is None or self.job is None:
            return self._say("not migrated: no queue attached")
        try:
            target = self.queue.migrate_task(self.job)
        except SchedulerError as exc:
            return self._say(f"not migrated: {exc}")
        return self._say(f"migrating {self.job} to slots {list(target)}")

    def _say(self, line: str) -> str:
        self.history.append(line)
        return line
