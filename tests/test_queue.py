"""The queue runner on short real commands: order and dependencies, environment per slot,
preemption through the checkpoint contract, SIGKILL after the grace period, migration, and a
runner killed mid-queue and restarted on the same SQLite file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_rt.jobqueue import QueueRunner, QueueSpecError, QueueStore, load_queue_spec, parse_queue_spec
from autoglm_rt.policy.scheduler.tasks import SchedulerError

ROOT = Path(__file__).resolve().parents[1]
JOB = str(Path(__file__).with_name("queue_job.py"))
PY = sys.executable


def write_spec(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def counter(out: Path, steps: int, dt: float, *extra: str) -> list[str]:
    return [PY, JOB, str(out), str(steps), str(dt), *extra]


def steps_by_job(out: Path) -> dict[str, list[tuple[int, str, int]]]:
    """name -> [(step, slots, attempt)] in the order written."""
    result: dict[str, list[tuple[int, str, int]]] = {}
    for line in out.read_text().splitlines():
        name, step, slots, attempt = line.split()
        result.setdefault(name, []).append((int(step), slots, int(attempt)))
    return result


def run_queue(tmp_path: Path, doc: dict[str, Any], timeout: float = 40.0) -> tuple[int, QueueStore]:
    spec = load_queue_spec(write_spec(tmp_path, doc))
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _line: None)
    try:
        rc = runner.run(timeout=timeout)
    finally:
        runner.close()
    return rc, QueueStore(tmp_path / "q.db")


def test_dependencies_order_failures_and_exit_status(tmp_path: Path) -> None:
    marks = tmp_path / "order"
    doc = {
        "slots": 2,
        "jobs": [
            {"name": "a", "command": ["sh", "-c", f"sleep 0.2; echo a >> {marks}"]},
            {"name": "b", "command": ["sh", "-c", "exit 3"]},
            {"name": "c", "command": ["sh", "-c", f"echo c >> {marks}"], "depends_on": ["a"], "urgency": 1.0},
            {"name": "d", "command": ["sh", "-c", f"echo d >> {marks}"], "depends_on": ["b"]},
            {"name": "e", "command": ["/nonexistent/command"]},
        ],
    }
    rc, store = run_queue(tmp_path, doc)
    with store:
        states = {j.name: (j.state, j.exit_code) for j in store.jobs()}
    assert rc == 1
    assert states == {
        "a": ("succeeded", 0),
        "b": ("failed", 3),
        "c": ("succeeded", 0),
        "d": ("failed", None),
        "e": ("failed", 127),
    }
    assert marks.read_text().split() == ["a", "c"]  # c only after a; d never ran


def test_all_succeeded_exits_zero_and_sets_the_slot_environment(tmp_path: Path) -> None:
    env_out = tmp_path / "env"
    show = f'echo "$AUTOGLM_RT_JOB_NAME [$CUDA_VISIBLE_DEVICES] $AUTOGLM_RT_SLOTS" >> {env_out}'
    doc = {
        "gpus": [3, 5],
        "jobs": [
            {"name": "pair", "command": ["sh", "-c", show], "gpus": 2},
            {"name": "one", "command": ["sh", "-c", show], "gpus": 1},
        ],
    }
    rc, store = run_queue(tmp_path, doc)
    store.close()
    assert rc == 0
    lines = dict(line.split(" ", 1) for line in env_out.read_text().splitlines())
    assert lines["pair"] == "[3,5] 3,5"
    assert lines["one"] in ("[3] 3", "[5] 5")
    # CPU slots hide every GPU.
    (tmp_path / "cpu").mkdir()
    rc, store = run_queue(tmp_path / "cpu", {"slots": 1, "jobs": [{"name": "cpu", "command": ["sh", "-c", show]}]})
    store.close()
    assert rc == 0 and env_out.read_text().splitlines()[-1] == "cpu [] 0"


def test_preemption_checkpoints_requeues_and_resumes_without_losing_a_step(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    doc = {
        "slots": 2,
        "grace_period": 5,
        "jobs": [
            {"name": "low", "command": counter(out, 12, 0.1), "urgency": 0.0},
            {"name": "tick", "command": ["sleep", "0.5"], "urgency": 0.9},
            # Needs both slots once 'tick' is done: only by preempting 'low'.
            {"name": "urgent", "command": counter(out, 3, 0.05), "urgency": 1.0, "gpus": 2, "depends_on": ["tick"]},
        ],
    }
    rc, store = run_queue(tmp_path, doc)
    with store:
        low = store.job("low")
        events = [e[2] for e in store.events("low")]
    assert rc == 0
    assert low.preemptions == 1 and low.attempt == 2
    assert events.count("stop") == 1 and "stopped" in events
    steps = steps_by_job(out)
    assert [s for s, _, _ in steps["low"]] == list(range(1, 13))  # resumed, nothing repeated or lost
    first_attempt = [s for s, _, a in steps["low"] if a == 1]
    assert 0 < len(first_attempt) < 12
    # 'urgent' ran between the two attempts of 'low'.
    order = [line.split()[0] + line.split()[3] for line in out.read_text().splitlines()]
    assert order.index("urgent1") > order.index("low1") and order.index("low2") > order.index("urgent1")


def test_a_job_ignoring_sigterm_is_killed_after_the_grace_period_and_requeued(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    doc = {
        "slots": 2,
        "grace_period": 0.5,
        "jobs": [
            {"name": "stubborn", "command": counter(out, 40, 0.05, "--ignore-term-on-first-attempt"), "urgency": 0.0},
            {"name": "tick", "command": ["sleep", "0.3"], "urgency": 0.9},
            {"name": "urgent", "command": ["true"], "urgency": 1.0, "gpus": 2, "depends_on": ["tick"]},
        ],
    }
    rc, store = run_queue(tmp_path, doc)
    with store:
        events = [e[2] for e in store.events("stubborn")]
        job = store.job("stubborn")
    assert rc == 0
    assert "killed" in events and job.attempt == 2
    steps = [s for s, _, _ in steps_by_job(out)["stubborn"]]
    assert sorted(set(steps)) == list(range(1, 41))  # every step done; the second attempt resumed


def test_migrate_task_checkpoints_and_restarts_on_another_slot(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    spec = load_queue_spec(
        write_spec(tmp_path, {"slots": 2, "grace_period": 5, "jobs": [{"name": "m", "command": counter(out, 15, 0.1)}]})
    )
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _line: None, scheduler_options={"aging_rate": 0.0})
    try:
        runner.step()
        first = runner.store.job("m").devices
        deadline = time.monotonic() + 20
        while not out.exists() or len(out.read_text().splitlines()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            runner.step()
        target = runner.migrate_task("m")
        assert set(target).isdisjoint(first)
        with pytest.raises(SchedulerError, match="only a running job"):
            runner.migrate_task("m")
        assert runner.run(timeout=30) == 0
    finally:
        runner.close()
    steps = steps_by_job(out)["m"]
    assert [s for s, _, _ in steps] == list(range(1, 16))
    assert {slots for _, slots, a in steps if a == 1} == {",".join(map(str, first))}
    assert {slots for _, slots, a in steps if a == 2} == {",".join(map(str, target))}


def test_migrate_task_needs_a_free_slot(tmp_path: Path) -> None:
    spec = parse_queue_spec({"slots": 1, "jobs": [{"name": "m", "command": ["sleep", "5"]}]})
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _line: None)
    try:
        runner.step()
        with pytest.raises(SchedulerError, match="free slot"):
            runner.migrate_task("m")
        assert runner.store.job("m").state == "running"
    finally:
        job = runner.store.job("m")
        assert job.pid is not None
        os.killpg(job.pid, signal.SIGKILL)
        runner.close()
        os.waitpid(job.pid, 0)
        runner.placement.finished("m", job.attempt)  # its cgroup, which a closed runner leaves


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_runner_killed_mid_queue_and_restarted_loses_and_repeats_no_job(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    doc = {
        "slots": 2,
        "jobs": [
            {"name": "first", "command": counter(out, 3, 0.05)},
            {"name": "long", "command": counter(out, 30, 0.1)},  # still running when the runner dies
            {"name": "short", "command": counter(out, 2, 0.05), "depends_on": ["first"]},
            {"name": "after", "command": counter(out, 2, 0.05), "depends_on": ["short"]},
        ],
    }
    jobs = write_spec(tmp_path, doc)
    state = tmp_path / "q.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    cmd = [PY, "-m", "autoglm_rt.cli", "queue", str(jobs), "--state", str(state)]
    runner = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def long_running() -> bool:
        return out.exists() and any(line.startswith("long 3 ") for line in out.read_text().splitlines())

    try:
        _wait_for(long_running, 30, "job 'long' to run")
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    with QueueStore(state) as store:
        assert store.job("long").state == "running"
    time.sleep(0.5)  # jobs keep running (and some finish) while no runner watches them
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "adopted long" in rerun.stdout
    with QueueStore(state) as store:
        rows = {j.name: j for j in store.jobs()}
    assert all(j.state == "succeeded" for j in rows.values())
    assert rows["long"].attempt == 1  # adopted, not restarted
    steps = steps_by_job(out)
    for name, n in [("first", 3), ("long", 30), ("short", 2), ("after", 2)]:
        assert [s for s, _, _ in steps[name]] == list(range(1, n + 1)), name


def test_restart_adopts_a_job_that_finished_while_no_runner_watched(tmp_path: Path) -> None:
    spec = parse_queue_spec(
        {
            "slots": 1,
            "jobs": [
                {"name": "quick", "command": ["sh", "-c", "sleep 0.3; exit 4"]},
                {"name": "next", "command": ["true"], "depends_on": ["quick"]},
            ],
        }
    )
    state = tmp_path / "q.db"
    runner = QueueRunner(spec, state, log=lambda _line: None)
    runner.step()
    pid = runner.store.job("quick").pid
    runner.close()  # the runner goes away; the job does not
    assert pid is not None
    os.waitpid(pid, 0)  # it ends (and is reaped) while no runner exists
    runner = QueueRunner(spec, state, log=lambda _line: None)
    try:
        assert runner.run(timeout=20) == 1
        assert runner.store.job("quick").exit_code == 4
        assert runner.store.job("next").state == "failed"
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "mapping"),
        ({"jobs": [{"name": "a", "command": ["true"]}]}, "exactly one of"),
        ({"slots": 1, "gpus": [0], "jobs": []}, "exactly one of"),
        ({"slots": 0, "jobs": [{"name": "a", "command": ["true"]}]}, "slots"),
        ({"gpus": [0, 0], "jobs": [{"name": "a", "command": ["true"]}]}, "twice"),
        ({"gpus": [-1], "jobs": [{"name": "a", "command": ["true"]}]}, "gpus"),
        ({"slots": 1, "jobs": []}, "jobs"),
        ({"slots": 1, "jobs": [{"name": "a", "command": "true"}]}, "list of strings"),
        ({"slots": 1, "jobs": [{"name": "a", "command": []}]}, "command"),
        ({"slots": 1, "jobs": [{"command": ["true"]}]}, "name"),
        ({"slots": 1, "jobs": [{"name": "a/b", "command": ["true"]}]}, "name"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "urgency": 2}]}, "urgency"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "urgency": float("nan")}]}, "urgency"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "gpus": 2}]}, "needs 2 slot"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "gpus": 0}]}, "gpus"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "preemptible": "yes"}]}, "preemptible"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "min_runtime": -1}]}, "min_runtime"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "depends_on": ["zz"]}]}, "unknown job"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "colour": "red"}]}, "unknown keys"),
        ({"slots": 1, "retries": 3, "jobs": [{"name": "a", "command": ["true"]}]}, "unknown keys"),
        ({"slots": 1, "jobs": [{"name": "a", "command": ["true"]}, {"name": "a", "command": ["true"]}]}, "unique"),
        (
            {
                "slots": 1,
                "jobs": [
                    {"name": "a", "command": ["true"], "depends_on": ["b"]},
                    {"name": "b", "command": ["true"], "depends_on": ["a"]},
                ],
            },
            "cycle",
        ),
    ],
)
def test_queue_file_errors_name_the_field(doc: object, match: str) -> None:
    with pytest.raises(QueueSpecError, match=match):
        parse_queue_spec(doc)


def test_cli_reports_a_bad_queue_file_without_running_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("slots: 1\njobs: [{name: a}]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    r = subprocess.run([PY, "-m", "autoglm_rt.cli", "queue", str(bad)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "command" in r.stderr
    assert not (tmp_path / "bad.db").exists()


def test_submit_while_running_checks_names_and_dependencies(tmp_path: Path) -> None:
    from autoglm_rt.jobqueue import JobSpec

    spec = parse_queue_spec({"slots": 1, "jobs": [{"name": "bad", "command": ["false"]}]})
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _line: None)
    try:
        with pytest.raises(SchedulerError, match="already in the queue"):
            runner.submit(JobSpec("bad", ("true",)))
        with pytest.raises(SchedulerError, match="unknown job"):
            runner.submit(JobSpec("late", ("true",), depends_on=("nope",)))
        with pytest.raises(TypeError, match="JobSpec"):
            runner.submit({"name": "x"})  # type: ignore[arg-type]
        assert runner.run(timeout=20) == 1
        runner.submit(JobSpec("after_bad", ("true",), depends_on=("bad",)))  # can never run
        assert runner.store.job("after_bad").state == "failed"
        runner.submit(JobSpec("fine", ("true",)))
        assert runner.run(timeout=20) == 1
        assert runner.store.job("fine").state == "succeeded"
        assert [j.name for j in runner.store.jobs()] == ["bad", "after_bad", "fine"]
    finally:
        runner.close()


def test_cli_bench_multi_tenant_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm_rt import cli

    assert cli.main(["bench-multi-tenant", "--memory", "lots"]) == 2
    assert "--memory" in capsys.readouterr().err
    assert cli.main(["bench-multi-tenant", "--cores", "0"]) == 2
    assert "cores must be a finite number > 0" in capsys.readouterr().err
    assert cli.main(["bench-multi-tenant", "--memory", "100Mi"]) == 2
    assert "memory must be >= 4x service_memory" in capsys.readouterr().err
    assert cli.main(["bench-multi-tenant", "--cores", "1"]) == 2  # 0.5 + 0.75 static partitions: nothing fits
    assert "cores must be >= the service's and one training job's static partitions" in capsys.readouterr().err
    from autoglm_rt.policy.memory import available_cores

    more = str(available_cores() + 0.5)
    assert cli.main(["bench-multi-tenant", "--cores", more]) == 2
    assert capsys.readouterr().err.strip().endswith(f"is more than the {available_cores()} CPUs this process may use")
    assert cli.main(["bench-multi-tenant", "--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "autoglm-rt bench-multi-tenant: --rounds must be >= 1, got 0"


def test_a_runner_that_dies_during_a_preemption_is_replaced_and_finishes_it(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    spec = load_queue_spec(
        write_spec(
            tmp_path,
            {
                "slots": 2,
                "grace_period": 0.5,
                "jobs": [
                    {"name": "stubborn", "command": counter(out, 30, 0.05, "--ignore-term-on-first-attempt")},
                    {"name": "tick", "command": ["sleep", "0.3"], "urgency": 0.9},
                    {"name": "urgent", "command": ["true"], "urgency": 1.0, "gpus": 2, "depends_on": ["tick"]},
                ],
            },
        )
    )
    state = tmp_path / "q.db"
    lines: list[str] = []
    first = QueueRunner(spec, state, log=lines.append)
    _wait_for(lambda: first.step() or first.store.job("stubborn").state == "stopping", 20, "a preemption")
    first.close()  # dies with a SIGTERM sent and SIGKILL pending
    second = QueueRunner(spec, state, log=lines.append)
    try:
        assert second.store.job("stubborn").state == "stopping"
        assert second.run(timeout=30) == 0
        events = [e[2] for e in second.store.events("stubborn")]
    finally:
        second.close()
    assert "adopted stubborn (pid" in "\n".join(lines)
    assert "killed" in events and events.count("stop") == 1
    steps = [s for s, _, _ in steps_by_job(out)["stubborn"]]
    assert sorted(set(steps)) == list(range(1, 31))


def test_gpus_auto_uses_visible_devices_or_falls_back_to_cpu_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"gpus": "auto", "jobs": [{"name": "a", "command": ["true"]}]}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    spec = parse_queue_spec(doc)
    assert spec.uses_gpus and spec.devices == (2, 5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = parse_queue_spec(doc)
    assert not spec.uses_gpus and spec.devices == tuple(range(os.cpu_count() or 1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    with pytest.raises(QueueSpecError, match="CUDA_VISIBLE_DEVICES"):
        parse_queue_spec(doc)


def test_queue_migrate_command_moves_a_job_of_a_running_queue(tmp_path: Path) -> None:
    from autoglm_rt import cli

    out = tmp_path / "steps"
    jobs = write_spec(tmp_path, {"slots": 2, "jobs": [{"name": "m", "command": counter(out, 25, 0.1)}]})
    state = tmp_path / "q.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    runner = subprocess.Popen(
        [PY, "-m", "autoglm_rt.cli", "queue", str(jobs), "--state", str(state)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 30, "job 'm' to run")
        with QueueStore(state) as store:
            before = store.job("m").devices
        target = [d for d in (0, 1) if d not in before]
        assert cli.main(["queue-migrate", "--state", str(state), "nope"]) == 1
        assert cli.main(["queue-migrate", "--state", str(state), "m", "--to", ",".join(map(str, target))]) == 0
        assert runner.wait(60) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
        output = runner.communicate()[0]
    assert "migrate m" in output
    steps = steps_by_job(out)["m"]
    assert [s for s, _, _ in steps] == list(range(1, 26))
    assert {slots for _, slots, a in steps if a == 2} == {",".join(map(str, target))}
    assert cli.main(["queue-migrate", "--state", str(tmp_path / "missing.db"), "m"]) == 2


@pytest.mark.parametrize("wrapper_started", [True, False])
def test_a_runner_that_died_while_starting_a_job_neither_loses_nor_repeats_it(
    tmp_path: Path, wrapper_started: bool
) -> None:
    marks = tmp_path / "marks"
    doc = {"slots": 1, "jobs": [{"name": "once", "command": ["sh", "-c", f"echo run >> {marks}"]}]}
    rc, store = run_queue(tmp_path, doc)
    assert rc == 0
    # Put the state back to where a runner that died right after spawning would have left it.
    job = store.job("once")
    store.update("once", job.started_at or 0.0, None, state="starting", pid=None, finished_at=None, exit_code=None)
    store.close()
    if not wrapper_started:
        (tmp_path / "q.db.d" / "once" / f"pid.{job.attempt}").unlink()
    rc, store = run_queue(tmp_path, doc)
    with store:
        again = store.job("once")
    assert rc == 0 and again.state == "succeeded"
    assert marks.read_text().split() == (["run"] if wrapper_started else ["run", "run"])
    assert again.attempt == (1 if wrapper_started else 2)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--quick"],
        ["--quick", "--seed", "7", "--memory", "3Gi", "--cores", "1.5"],
        ["--seed", "2", "--memory", "2147483648", "--cores", "3.25", "--tenant-weight", "50", "--request-passes", "3"],
        ["--quick", "--rounds", "3"],
    ],
)
def test_the_recorded_multi_tenant_command_runs_the_same_trace(argv: list[str]) -> None:
    import shlex

    from autoglm_rt import cli
    from autoglm_rt.jobqueue.multi_tenant import make_trace

    args = cli.build_parser().parse_args(["bench-multi-tenant", *argv])
    command = cli._multi_tenant_command(args)
    words = shlex.split(command)
    assert words[:2] == ["autoglm-rt", "bench-multi-tenant"]
    again = cli.build_parser().parse_args(words[1:])
    assert cli._multi_tenant_workload(again) == cli._multi_tenant_workload(args)
    assert make_trace(cli._multi_tenant_workload(again)) == make_trace(cli._multi_tenant_workload(args))
    assert again.rounds == args.rounds
