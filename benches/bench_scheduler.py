"""One scheduling decision over a busy queue (200 pending tasks, 16 devices, gang tasks), checked
against a plain sort by the score formula."""

from __future__ import annotations

import random

from autoglm_rt.policy.scheduler.priority import PriorityScheduler
from autoglm_rt.policy.scheduler.tasks import Task


def _queue() -> tuple[PriorityScheduler, list[Task]]:
    rng = random.Random(0)
    s = PriorityScheduler(16, aging_rate=0.0)
    tasks = [Task(f"t{i}", urgency=rng.random(), gpus=1, preemptible=False) for i in range(200)]
    for t in tasks:
        s.submit(t, now=0.0)
    return s, tasks


def test_schedule_200_pending_on_16_devices(benchmark) -> None:  # type: ignore[no-untyped-def]
    def decide() -> list[str]:
        s, _ = _queue()
        return [p.task for p in s.schedule(now=0.0).start]

    started = benchmark(decide)
    _, tasks = _queue()
    # Same demands, no dependencies: the order is the urgency order (ties by submission).
    want = [t.name for t in sorted(tasks, key=lambda t: -t.urgency)[:16]]
    assert sorted(started) == sorted(want)
