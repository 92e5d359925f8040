"""A real Runtime in a real cgroup whose memory limit is lowered mid-run below what the model and
its optimizer state hold: with ``MemoryConfig(offload=...)`` it moves the state to disk, reports
it, completes under the lowered hard limit and restores the state once the limit is raised again;
without it the kernel OOM-kills it.

The limit is lowered the way the multi-tenant scheduler does it: announced first (the group's
memory target), then enforced. cgroup v1 refuses a hard limit below what it cannot reclaim, so
where the job did not get under the announced limit the test takes the limit down as far as the
kernel lets it (the job's usage at that moment) -- which leaves no room for its next gradient."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autoglm_rt.resources import JobGroup, ResourceError

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


def _read(status: Path) -> dict[str, Any] | None:
    try:
        return json.loads(status.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _wait(cond: Callable[[], Any], timeout: float, what: str, job: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if job.poll() is not None:
            return None
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _run(tmp_path: Path, offload: bool) -> tuple[int, dict[str, Any], dict[str, Any], int, int]:
    """Returns (exit code, the last status, the status when the target was set, the target,
    OOM kills)."""
    group = JobGroup.create(f"pid-{os.getpid()}-test", "offload" if offload else "resident")
    status = tmp_path / "status.json"
    try:
        group.set_memory_limit(4 << 30)
        cmd = [sys.executable, str(ROOT / "tests" / "runtime_offload_job.py"), "--status", str(status)]
        cmd += ["--directory", str(tmp_path / "state")] + (["--offload"] if offload else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
        job = subprocess.Popen(cmd, env=env, preexec_fn=lambda: group.add(os.getpid()))
        try:
            before = _wait(lambda: (s := _read(status)) and s["step"] >= 1 and s, 120, "two steps", job)
            assert before is not None, f"the job ended before two steps: exit {job.wait()}"
            # Below the job's usage between steps (baseline + model + optimizer state) by a quarter
            # of the state; above what it needs with the state on disk.
            target = (before["usage_after_step"] - before["state_bytes"] // 4) // PAGE * PAGE
            group.set_memory_target(target)
            _wait(
                lambda: (
                    (s := _read(status))
                    and (s["step"] >= before["step"] + 3 or (s["offloaded"] and s["peak_bytes"] < target))
                ),
                120,
                "the job to react to the announced limit",
                job,
            )
            # Enforce: the target itself where the kernel accepts it, else as low as it goes.
            deadline = time.monotonic() + 60
            while job.poll() is None and time.monotonic() < deadline:
                try:
                    group.set_memory_limit(target)
                    break
                except ResourceError:
                    usage = group.memory_usage()
                    if usage < (group.memory_limit() or 0):
                        with contextlib.suppress(ResourceError):  # usage grew meanwhile
                            group.set_memory_limit(max(target, -(-usage // PAGE) * PAGE))
                time.sleep(0.005)
            if offload and job.poll() is None and group.memory_limit() == target:
                enforced = (_read(status) or {})["step"]
                _wait(
                    lambda: (s := _read(status)) and s["step"] >= enforced + 2 and s, 120, "steps under the limit", job
                )
                assert group.oom_kills() == 0 and job.poll() is None
                group.set_memory_limit(4 << 30)  # pressure ends
                group.set_memory_target(None)
            code = job.wait(timeout=180)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        return code, _read(status) or {}, before, target, group.oom_kills()
    finally:
        group.remove()


@pytest.mark.cgroup
@pytest.mark.slow
def test_runtime_offloads_under_a_lowered_limit_and_restores_when_it_is_raised(tmp_path: Path) -> None:
    code, last, before, target, kills = _run(tmp_path, offload=True)
    assert code == 0 and kills == 0, (code, kills, last)
    print(f"\nbefore: {before}\ntarget {target}\nlast: {last}")
    # the lowered limit is below what the job held between steps: baseline + model + state
    assert target < before["usage_after_step"] - before["state_bytes"] // 5
    moves = [(a["value"], a["applied"], a["limit_bytes"]) for a in last["actions"] if a["by"] == "memory_escalation"]
    # offloaded under the announced limit (nothing reported as failed), restored once it was lifted
    assert moves[:1] == [(True, True, target)] and len(moves) == 2, last["actions"]
    assert moves[1][:2] == (False, True) and moves[1][2] > target
    assert last["offloaded"] is False and last["resident_bytes"] == last["state_bytes"] > 0


@pytest.mark.cgroup
@pytest.mark.slow
def test_the_same_runtime_without_offload_is_oom_killed(tmp_path: Path) -> None:
    code, last, _before, _target, kills = _run(tmp_path, offload=False)
    assert kills >= 1 and code == -9, (code, kills, last)
    assert last["offloaded"] is None and last["actions"] == []
