"""The policy layer's scheduling actions reach real processes: agents of an elastic job are
added and removed within min..max, and a queue job is migrated."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from autoglm_rt.elastic import ElasticJob
from autoglm_rt.jobqueue import QueueRunner, parse_queue_spec
from autoglm_rt.jobqueue.actuator import SchedulingActuator
from autoglm_rt.trainers import elastic_trainer


class SleepingAgents(ElasticJob):
    """An ElasticJob whose agents are plain ``sleep`` processes: the bookkeeping is real, no torchrun."""

    def command(self) -> list[str]:
        return ["sleep", "60"]


def close_and_kill(runner: QueueRunner, job: str) -> None:
    """Closes the runner, kills what is left of ``job``'s process group and removes its cgroup
    (a closed runner leaves a running job's group for the next runner to adopt)."""
    record = runner.store.job(job)
    pid, attempt = record.pid, record.attempt
    runner.close()
    if pid is not None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    runner.placement.finished(job, attempt)


def test_scale_replicas_stays_within_min_and_max(tmp_path: Path) -> None:
    job = SleepingAgents(Path(elastic_trainer.__file__), min_nodes=1, max_nodes=3, log_dir=tmp_path)
    act = SchedulingActuator(elastic_job=job)
    with job:
        job.start()
        assert act.scale_replicas(+1) == "scaled replicas 1 -> 2"
        assert act.scale_replicas(+5) == "scaled replicas 2 -> 3 (asked +5, limited to 1..3)"
        assert job.replicas() == 3
        assert act.scale_replicas(+1) == "not scaled: 3 replica(s) already at max_nodes"
        assert act.scale_replicas(-10) == "scaled replicas 3 -> 1 (asked -10, limited to 1..3)"
        assert act.scale_replicas(-1) == "not scaled: 1 replica(s) already at min_nodes"
        assert job.replicas() == 1
    assert job.replicas() == 0
    assert len(act.history) == 5
    with pytest.raises(TypeError, match="delta"):
        act.scale_replicas(1.5)  # type: ignore[arg-type]
    assert SchedulingActuator().scale_replicas(1) == "not scaled: no elastic job attached"


def test_migrate_moves_the_queue_job_or_says_why_not(tmp_path: Path) -> None:
    spec = parse_queue_spec({"slots": 2, "grace_period": 5, "jobs": [{"name": "m", "command": ["sleep", "30"]}]})
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _line: None)
    act = SchedulingActuator(queue=runner, job="m")
    try:
        runner.step()
        first = runner.store.job("m").devices
        line = act.migrate()
        assert line.startswith("migrating m to slots") and str(list(first)) not in line
        assert act.migrate() == "not migrated: job 'm' is stopping; only a running job can be migrated"
        deadline = time.monotonic() + 20
        while runner.store.job("m").attempt < 2:
            assert time.monotonic() < deadline
            runner.step()
            time.sleep(0.05)
        assert runner.store.job("m").devices != first
    finally:
        close_and_kill(runner, "m")
    assert SchedulingActuator().migrate() == "not migrated: no queue attached"
    with pytest.raises(ValueError, match="both"):
        SchedulingActuator(queue=runner)


@pytest.mark.slow
def test_a_queue_jobs_strategy_migrates_it_through_the_runner(tmp_path: Path) -> None:
    """migrate_task from a queue job's Runtime reaches the real runner by default (the job learns
    its queue from the environment the runner sets): the job is stopped and restarted elsewhere."""
    import json
    import sys

    out = tmp_path / "actions.jsonl"
    script = Path(__file__).with_name("queue_strategy_job.py")
    command = [sys.executable, str(script), str(out)]
    spec = parse_queue_spec({"slots": 2, "grace_period": 10, "jobs": [{"name": "mover", "command": command}]})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _line: None, env=env)
    try:
        runner.step()
        first = runner.store.job("mover").devices
        deadline = time.monotonic() + 60
        while runner.store.job("mover").attempt < 2 or runner.store.job("mover").state != "running":
            assert time.monotonic() < deadline, (tmp_path / "q.db.d" / "mover" / "log").read_text()
            runner.step()
            time.sleep(0.1)
        assert runner.store.job("mover").devices != first
    finally:
        close_and_kill(runner, "mover")
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["attempt"] == "1" and result["applied"], result
    assert "requested from the queue runner" in result["detail"]
