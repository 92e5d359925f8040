"""The multi-tenant comparison measures what it says: its figures agree with the queue's own
records, requests that miss their deadline fail for real, and the work task keeps the checkpoint
contract."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoglm_rt.jobqueue import multi_tenant as mt

TASK = Path(mt.__file__).resolve().parents[1] / "trainers" / "work_task.py"


def test_arrivals_are_seeded_poisson_with_the_training_jobs_first() -> None:
    w = mt.Workload(request_rate=50.0, request_window=20.0, seed=3)
    a = mt.make_arrivals(w)
    assert a == mt.make_arrivals(w)
    assert [x.kind for x in a[: w.training_jobs]] == ["training"] * w.training_jobs
    requests = [x for x in a if x.kind == "request"]
    # 1000 expected arrivals: within 5 standard deviations of the Poisson count.
    assert abs(len(requests) - 1000) < 5 * math.sqrt(1000)
    assert all(0 < x.at <= w.request_window for x in requests)
    assert all(w.request_work[0] <= x.work <= w.request_work[1] for x in requests)
    assert mt.make_arrivals(mt.Workload(seed=4)) != mt.make_arrivals(mt.Workload(seed=3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"static_request_slots": 4}, "static_request_slots"),
        ({"request_rate": 0.0}, "request_rate"),
        ({"request_slo": math.nan}, "request_slo"),
        ({"request_work": (0.5, 0.1)}, "request_work"),
    ],
)
def test_workload_rejects_bad_fields(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mt.Workload(**kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_both_modes_run_every_task_and_report_consistent_figures(tmp_path: Path) -> None:
    # Two slots: one request slot in static mode. Requests of 0.3-0.4 s arriving ~4/s with a
    # 0.25 s deadline cannot all make it: failures must show up, in the records and the figures.
    w = mt.Workload(
        slots=2,
        static_request_slots=1,
        training_jobs=1,
        training_work=1.0,
        request_rate=4.0,
        request_window=2.0,
        request_work=(0.3, 0.4),
        request_slo=0.25,
        seed=1,
    )
    arrivals = mt.make_arrivals(w)
    for mode in ("static", "dynamic"):
        r = mt.run_mode(mode, w, tmp_path)
        assert r.tasks == len(arrivals)
        assert r.failed >= 1 and r.failure_rate == pytest.approx(r.failed / r.tasks)
        assert all(x >= w.request_work[0] for x in r.responses)  # nobody finishes faster than its work
        assert r.mean_response_all_s > 0 and math.isfinite(r.mean_response_all_s)
        assert 0.0 < r.utilisation <= 1.0
        assert r.training_makespan_s >= w.training_work
        if mode == "static":
            assert r.preemptions == 0


def test_work_task_checkpoints_on_sigterm_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOGLM_RT_CHECKPOINT_DIR": str(tmp_path)}
    p = subprocess.Popen([sys.executable, str(TASK), "--work", "30", "--step", "0.05"], env=env)
    deadline = time.monotonic() + 20
    while not (tmp_path / "progress").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    done = float((tmp_path / "progress").read_text())
    assert 0 < done < 30
    (tmp_path / "progress").write_text(repr(29.9))
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(TASK), "--work", "30", "--step", "0.05"], env=env, timeout=20)
    assert r.returncode == 0 and time.monotonic() - t < 10
    assert float((tmp_path / "progress").read_text()) == pytest.approx(30.0)


def test_work_task_fails_after_its_deadline(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(TASK), "--work", "5", "--deadline", f"{time.time() + 0.2}"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 2 and "deadline" in r.stderr
