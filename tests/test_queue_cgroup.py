"""Queue jobs in their own cgroups: the spec's ``memory:``/``cpus:`` reach the kernel, an OOM kill
is reported as such, and no group outlives its job (also across a runner killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from autoglm_rt import resources
from autoglm_rt.jobqueue import QueueRunner, QueueSpecError, QueueStore, load_queue_spec, parse_queue_spec
from autoglm_rt.jobqueue.placement import CgroupPlacement

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]

REPORT_LIMITS = textwrap.dedent(
    """
    import sys
    from autoglm_rt import resources
    g = resources.group_of_pid()
    open(sys.argv[1], "w").write(f"{g.memory_limit()} {resources.cpu_quota_cores()}")
    """
)
HOG = "chunks = []\nwhile True: chunks.append(bytearray(8 << 20))"


def _run(tmp_path: Path, jobs: list[dict[str, object]]) -> tuple[int, QueueStore, list[str]]:
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump({"slots": 2, "jobs": jobs}))
    lines: list[str] = []
    runner = QueueRunner(
        load_queue_spec(tmp_path / "jobs.yaml"),
        tmp_path / "q.db",
        log=lines.append,
        env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
    )
    try:
        rc = runner.run(timeout=60)
        scope = runner.placement.scope
    finally:
        runner.close()
    backend = resources.detect()
    assert backend is not None
    assert not (backend.bases["memory"] / scope).exists() or not any((backend.bases["memory"] / scope).iterdir())
    return rc, QueueStore(tmp_path / "q.db"), lines


@pytest.mark.cgroup
def test_limits_reach_the_job_and_an_oom_kill_is_reported_as_such(tmp_path: Path) -> None:
    out = tmp_path / "limits"
    rc, store, lines = _run(
        tmp_path,
        [
            {"name": "fits", "command": [PY, "-c", REPORT_LIMITS, str(out)], "memory": "256Mi", "cpus": 0.5},
            {"name": "hog", "command": [PY, "-c", HOG], "memory": "64Mi"},
        ],
    )
    assert rc == 1
    assert out.read_text() == f"{256 << 20} 0.5"
    rows = {j.name: j for j in store.jobs()}
    assert rows["fits"].state == "succeeded"
    assert rows["hog"].state == "failed" and rows["hog"].exit_code == -signal.SIGKILL
    assert rows["hog"].message is not None and "OOM killer" in rows["hog"].message
    assert f"at its memory limit of {64 << 20} bytes" in rows["hog"].message
    assert any("FAILED hog (killed by the kernel's OOM killer" in line for line in lines)


@pytest.mark.cgroup
def test_a_killed_runners_empty_groups_are_removed_by_the_next_runner(tmp_path: Path) -> None:
    state = tmp_path / "q.db"
    placement = CgroupPlacement(state, lambda _l: None)
    spec = parse_queue_spec({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "memory": "32Mi"}]}).jobs[0]
    env = placement.env_for(spec, 1)
    # A job that died while its runner was dead (SIGKILL): it joined the group and ended.
    subprocess.run(
        [
            PY,
            "-c",
            "import os,sys\nfor p in sys.argv[1].split(':'): open(p,'w').write(str(os.getpid()))",
            env["AUTOGLM_RT_CGROUP_PROCS"],
        ],
        check=True,
    )
    group = resources.JobGroup(placement.backend, f"{placement.scope}/a.1")  # type: ignore[arg-type]
    assert group.exists() and group.memory_limit() == 32 << 20
    lines: list[str] = []
    CgroupPlacement(state, lines.append)
    assert not group.exists()
    assert lines == [f"removed stale cgroup {placement.scope}/a.1"]


@pytest.mark.parametrize(
    ("job", "match"),
    [
        ({"memory": "lots"}, "memory"),
        ({"memory": -5}, "memory"),
        ({"memory": 1000}, "memory must be at least 1Mi"),
        ({"cpus": 0}, "cpus: expected a finite number >= 0.01"),
        ({"cpus": float("nan")}, "cpus"),
        ({"cpus": True}, "cpus"),
    ],
)
def test_bad_memory_and_cpus_name_the_field(job: dict[str, object], match: str) -> None:
    with pytest.raises(QueueSpecError, match=match):
        parse_queue_spec({"slots": 1, "jobs": [{"name": "a", "command": ["true"], **job}]})


def test_memory_and_cpus_parse_and_survive_the_state_file(tmp_path: Path) -> None:
    spec = parse_queue_spec({"slots": 1, "jobs": [{"name": "a", "command": ["true"], "memory": "1.5Gi", "cpus": 1.5}]})
    assert (spec.jobs[0].memory, spec.jobs[0].cpus) == (3 << 29, 1.5)
    store = QueueStore(tmp_path / "s.db")
    store.add_missing(spec.jobs, time.time())
    assert store.jobs()[0].spec == spec.jobs[0]
    store.close()
