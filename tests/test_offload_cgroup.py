"""Under a real cgroup v1 memory limit below parameters + gradients + optimizer state, a job
completes with its state offloaded to disk and is OOM-killed without offload."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NUMEL = 8 * 2**20  # 32 MiB per float32 tensor: params + grads 64 MiB, AdamW state 64 MiB
STATE_BYTES = 2 * NUMEL * 4
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def memory_cgroup(cgroup_memory_root: Path) -> Iterator[Path]:
    """A fresh memory cgroup, removed afterwards even on failure (its processes killed first)."""
    group = cgroup_memory_root / f"agrt_offload_test_{os.getpid()}"
    group.mkdir()
    try:
        yield group
    finally:
        for line in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _run_job(group: Path, directory: Path, offload: bool) -> tuple[int, str, int]:
    """Starts the job inside the group, limits the group to its usage + half the state once the
    job is ready, lets it step; returns (exit code, stdout, oom kills seen by the group)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO)]))
    cmd = [
        sys.executable,
        str(REPO / "tests" / "offload_memory_job.py"),
        "--numel",
        str(NUMEL),
        "--directory",
        str(directory),
    ] + (["--offload"] if offload else [])
    shell = f'echo $$ > {group / "cgroup.procs"} && exec "$0" "$@"'
    proc = subprocess.Popen(
        ["sh", "-c", shell, *cmd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        assert first.strip() == "ready", f"job did not start: {first!r} {proc.stderr.read() if proc.stderr else ''}"
        usage = int((group / "memory.usage_in_bytes").read_text())
        (group / "memory.limit_in_bytes").write_text(str(usage + STATE_BYTES // 2))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, _err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    oom_kills = 0
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            oom_kills = int(line.split()[1])
    return proc.returncode, first + out, oom_kills


@pytest.mark.slow
def test_offload_keeps_a_job_alive_under_a_memory_limit(memory_cgroup, tmp_path):
    code, out, kills = _run_job(memory_cgroup, tmp_path / "with", offload=True)
    assert code == 0 and "done" in out and "resident=0" in out, (code, out)
    assert kills == 0


@pytest.mark.slow
def test_the_same_job_without_offload_is_oom_killed(memory_cgroup, tmp_path):
    code, out, kills = _run_job(memory_cgroup, tmp_path / "without", offload=False)
    assert code == -signal.SIGKILL and "done" not in out, (code, out)
    assert kills >= 1
