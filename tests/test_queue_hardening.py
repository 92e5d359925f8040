"""The queue under misuse: two runners on one state file, jobs that cannot start, a killed wrapper,
requests past their deadline, rerunning a finished queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from autoglm_rt.jobqueue import QueueRunner, QueueSpecError, QueueStore, load_queue_spec, parse_queue_spec
from autoglm_rt.jobqueue.store import RunnerLock, StateLockedError

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def spec_of(tmp_path: Path, jobs: list[dict[str, Any]], slots: int = 1) -> Any:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"slots": slots, "grace_period": 2, "jobs": jobs}))
    return load_queue_spec(path)


# ---------------------------------------------------------------- item 2: one runner per state file


def test_a_second_runner_on_the_same_state_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, [{"name": "a", "command": ["true"]}])
    first = QueueRunner(spec, tmp_path / "q.db", log=lambda _l: None)
    try:
        with pytest.raises(StateLockedError, match=rf"q\.db is held by pid {os.getpid()} on "):
            QueueRunner(spec, tmp_path / "q.db", log=lambda _l: None)
        assert first.run(timeout=20) == 0  # the refused runner left nothing behind
        assert first.store.job("a").attempt == 1
    finally:
        first.close()
    second = QueueRunner(spec, tmp_path / "q.db", log=lambda _l: None)  # free again after close()
    second.close()


def test_a_lock_left_by_a_dead_runner_is_taken_over(tmp_path: Path) -> None:
    state = tmp_path / "q.db"
    code = f"from autoglm_rt.jobqueue.store import RunnerLock; RunnerLock({str(state)!r}); import time; time.sleep(60)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    holder = subprocess.Popen([PY, "-c", code], env=env)
    lock_file = Path(f"{state}.lock")
    deadline = time.monotonic() + 30
    while not (lock_file.exists() and lock_file.read_text().startswith(f"{holder.pid} ")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(StateLockedError, match=f"held by pid {holder.pid}"):
        RunnerLock(state)
    holder.kill()
    holder.wait()
    assert lock_file.read_text().startswith(f"{holder.pid} ")  # the dead holder's record is still there
    lock = RunnerLock(state)
    assert lock_file.read_text().split()[0] == str(os.getpid())
    lock.release()


# ---------------------------------------------------------------- item 3: a bad job fails alone


@pytest.mark.parametrize(
    ("job", "match"),
    [
        ({"name": "a\0b", "command": ["true"]}, "control characters"),
        ({"name": "a\nb", "command": ["true"]}, "control characters"),
        ({"name": "x" * 256, "command": ["true"]}, "256 bytes; at most 255"),
        ({"name": "é" * 128, "command": ["true"]}, "256 bytes"),
        ({"name": "a", "command": ["echo", "x\0y"]}, "argument 1 contains a NUL byte"),
        ({"name": "a", "command": [""]}, "program"),
    ],
)
def test_hostile_names_and_commands_are_rejected_at_load(job: dict[str, Any], match: str) -> None:
    with pytest.raises(QueueSpecError, match=match):
        parse_queue_spec({"slots": 1, "jobs": [job]})


def test_a_name_of_255_bytes_is_fine() -> None:
    assert parse_queue_spec({"slots": 1, "jobs": [{"name": "x" * 255, "command": ["true"]}]}).jobs[0].name


def test_a_job_that_cannot_be_started_fails_alone_and_the_queue_goes_on(tmp_path: Path) -> None:
    # Stored by an older version that did not validate: the runner must survive it, every restart.
    spec = spec_of(tmp_path, [{"name": "ok", "command": ["true"]}, {"name": "after", "command": ["true"]}])
    state = tmp_path / "q.db"
    with QueueStore(state) as store:
        bad = spec.jobs[0].__class__("bad", ("echo", "x\0y"))
        store.add_missing((bad,), time.time())
    lines: list[str] = []
    from dataclasses import replace

    spec = replace(spec, jobs=(bad, *spec.jobs))
    runner = QueueRunner(spec, state, log=lines.append)
    try:
        assert runner.run(timeout=20) == 1
        assert runner.store.job("bad").state == "failed"
        assert "cannot start 'bad'" in (runner.store.job("bad").message or "")
        assert runner.store.job("ok").state == runner.store.job("after").state == "succeeded"
    finally:
        runner.close()
    assert any(line.startswith("FAILED bad (cannot start") for line in lines)


def test_a_missing_program_shows_why_on_the_console(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, [{"name": "x", "command": ["/nonexistent/agrt-prog"]}])
    lines: list[str] = []
    runner = QueueRunner(spec, tmp_path / "q.db", log=lines.append)
    try:
        assert runner.run(timeout=20) == 1
        assert runner.store.job("x").exit_code == 127
    finally:
        runner.close()
    failed = [line for line in lines if line.startswith("FAILED x")]
    assert failed == ["FAILED x (exit 127: cannot start '/nonexistent/agrt-prog': No such file or directory)"]


# ---------------------------------------------------------------- item 4: the process group is the job


def test_killing_the_printed_pid_stops_the_command_and_frees_the_slot_only_then(tmp_path: Path) -> None:
    pid_file = tmp_path / "cmd.pid"
    sleeper = [PY, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]
    spec = spec_of(tmp_path, [{"name": "long", "command": sleeper}, {"name": "next", "command": ["true"]}])
    lines: list[str] = []
    runner = QueueRunner(spec, tmp_path / "q.db", log=lines.append)
    try:
        runner.step()
        wrapper = runner.store.job("long").pid
        assert wrapper is not None
        assert f"(process group {wrapper}: kill -- -{wrapper} stops it)" in lines[-1]
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        command = psutil.Process(int(pid_file.read_text()))
        os.kill(wrapper, signal.SIGKILL)  # the user kills the pid the runner printed
        runner.step()  # reaps the wrapper, sees the command, kills the group; the slot stays taken
        assert runner.store.job("next").state == "pending"
        assert runner.run(timeout=20) == 1
        assert not command.is_running() or command.status() == psutil.STATUS_ZOMBIE
        assert runner.store.job("long").state == "failed"
        assert runner.store.job("next").state == "succeeded"
    finally:
        runner.close()
    assert any("still run; SIGKILL" in line for line in lines)


# ---------------------------------------------------------------- item 5: requests expire


def test_a_request_past_its_deadline_is_never_carried_out(tmp_path: Path) -> None:
    state = tmp_path / "q.db"
    with QueueStore(state) as store:
        now = time.time()
        late = store.request("migrate", "a", None, now, expires_at=now + 0.01)
        withdrawn = store.request("migrate", "a", None, now, expires_at=now + 60)
        taken = store.request("migrate", "a", None, now, expires_at=now + 60)
        assert store.cancel_request(withdrawn, now)
        assert store.claim_request(taken, now)
        assert not store.cancel_request(taken, now)  # the runner took it: it will answer
        assert not store.claim_request(late, now + 1)
        assert store.get_request(late).answered and store.get_request(late).ok is False
        assert "expired" in (store.get_request(late).answer or "")
        assert not store.claim_request(withdrawn, now)
        assert [r.id for r in store.open_requests()] == [taken]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    env.pop("AUTOGLM_RT_DEBUG", None)
    return subprocess.run([PY, "-m", "autoglm_rt.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_queue_migrate_without_a_runner_leaves_no_request_behind(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, [{"name": "a", "command": [PY, "-c", "import time; time.sleep(30)"]}], slots=2)
    state = tmp_path / "q.db"
    runner = QueueRunner(spec, state, log=lambda _l: None)
    runner.step()
    runner.close()  # no runner now; the job keeps running
    try:
        r = run_cli("queue-migrate", "--state", str(state), "a", "--wait", "0.3")
        assert r.returncode == 1 and "no answer" in r.stderr
        runner = QueueRunner(spec, state, log=lambda _l: None)
        runner.step()
        assert runner.store.job("a").state == "running"  # not migrated: the request had expired
        assert not any(e[2] == "migrate" for e in runner.store.events("a"))
    finally:
        job = QueueStore(state).job("a")
        if job.pid:
            os.killpg(job.pid, signal.SIGKILL)
        runner.close()
        runner.placement.finished("a", job.attempt)  # its cgroup, which a closed runner leaves


@pytest.mark.parametrize("wait", ["nan", "inf", "-1"])
def test_queue_migrate_rejects_a_wait_that_is_not_a_finite_positive_number(tmp_path: Path, wait: str) -> None:
    QueueStore(tmp_path / "q.db").close()
    r = run_cli("queue-migrate", "--state", str(tmp_path / "q.db"), "a", "--wait", wait)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--wait" in r.stderr


# ---------------------------------------------------------------- item 15: rerunning a finished queue


def test_rerunning_a_finished_queue_says_so_and_retry_failed_runs_the_failed_again(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    flaky = [PY, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 3)"]
    spec = spec_of(tmp_path, [{"name": "good", "command": ["true"]}, {"name": "flaky", "command": flaky}])
    state = tmp_path / "q.db"
    runner = QueueRunner(spec, state, log=lambda _l: None)
    assert runner.run(timeout=20) == 1
    runner.close()
    lines: list[str] = []
    runner = QueueRunner(spec, state, log=lines.append)
    assert runner.run(timeout=20) == 1
    runner.close()
    assert any("2 job(s) finished before are not run again (1 failed; --retry-failed" in line for line in lines)
    flag.write_text("")
    lines.clear()
    runner = QueueRunner(spec, state, log=lines.append, retry_failed=True)
    try:
        assert runner.run(timeout=20) == 0
        assert runner.store.job("flaky").attempt == 2 and runner.store.job("good").attempt == 1
    finally:
        runner.close()
    assert "retry flaky" in lines


def test_submit_applies_the_queue_file_checks(tmp_path: Path) -> None:
    from autoglm_rt.jobqueue import JobSpec

    spec = spec_of(tmp_path, [{"name": "a", "command": ["true"]}])
    runner = QueueRunner(spec, tmp_path / "q.db", log=lambda _l: None)
    try:
        with pytest.raises(QueueSpecError, match="NUL byte"):
            runner.submit(JobSpec("b", ("echo", "\0")))
        with pytest.raises(QueueSpecError, match="at most 255"):
            runner.submit(JobSpec("n" * 300, ("true",)))
        assert [j.name for j in runner.store.jobs()] == ["a"]
    finally:
        runner.close()
