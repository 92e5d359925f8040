"""Where the cores went in a multi-tenant run: per mode, the training and service CPU-seconds and
the idle core-seconds from the first arrival to the end of the makespan, from the timeline in a
``bench-multi-tenant --json`` file (cpuacct samples every control period).

    PYTHONPATH=python python benches/multi_tenant_accounting.py [benches/results/multi_tenant_cpu.json]

Each period between two samples counts ``cpu_used x dt`` for every job and the service, and
``max(0, cores - all of it) x dt`` as idle. Sampling makes the sums approximate (periods of about
0.5 s); the ratio between modes is what matters.

``work bound``: the earliest the mode's own training work could have ended, for any schedule on
``cores`` cores: ``max over arrivals a of (a + CPU-seconds of the jobs arriving at or after a /
cores)`` (a job cannot start before it arrives; the service's work is left out, so the bound only
gets higher with it). Each job's work is what its groups used in this run (``job_runs``; files
written before it existed: the timeline's rates). A dynamic bound above static's measured
makespan means no dynamic schedule of that work could have matched static in that run.

A ``--rounds`` file is read for its first round: the one whose timelines it keeps.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parent / "results" / "multi_tenant_cpu.json"


def periods(doc: dict[str, Any], mode: str) -> Iterator[tuple[float, float, dict[str, Any]]]:
    """``(t, dt, sample)`` for every sample after the first: the period ending at ``t`` and the
    rates the sample holds for it."""
    prev: float | None = None
    for sample in doc["timeline"][mode]:
        t = float(sample["t"])
        if prev is not None:
            yield t, t - prev, sample
        prev = t


def timed_figures(doc: dict[str, Any], mode: str) -> dict[str, Any]:
    """``mode``'s figures of the run whose timeline ``doc`` keeps (with ``--rounds``: the first
    round's; ``doc[mode]`` then holds medians)."""
    return doc["rounds"][0][mode] if "rounds" in doc else doc[mode]


def account(doc: dict[str, Any], mode: str) -> dict[str, float]:
    """CPU-seconds of training and of the service, and idle core-seconds, over the makespan."""
    cores = float(doc["workload"]["cores"])
    end = float(timed_figures(doc, mode)["makespan_seconds"])
    train = service = idle = 0.0
    for t, dt, sample in periods(doc, mode):
        if t <= end + 0.5:
            used = sum(float(j["cpu_used"]) for j in sample["jobs"].values())
            svc = float(sample.get("service_cpu_used", 0.0))
            train += used * dt
            service += svc * dt
            idle += max(0.0, cores - used - svc) * dt
    return {
        "makespan_seconds": end,
        "training_cpu_seconds": train,
        "service_cpu_seconds": service,
        "idle_core_seconds": idle,
    }


def job_cpu_seconds(doc: dict[str, Any], mode: str) -> dict[str, float]:
    """Each training job's CPU-seconds in ``mode``, from the timeline's rates."""
    out: dict[str, float] = {}
    for _, dt, sample in periods(doc, mode):
        for name, j in sample["jobs"].items():
            out[name] = out.get(name, 0.0) + float(j["cpu_used"]) * dt
    return out


def job_work(doc: dict[str, Any], mode: str) -> dict[str, float]:
    """Each training job's CPU-seconds in ``mode``: its groups' accounting where the file has
    ``job_runs``, else :func:`job_cpu_seconds` (which misses each job's last period)."""
    runs = timed_figures(doc, mode).get("job_runs")
    if runs is None:
        return job_cpu_seconds(doc, mode)
    return {r["name"]: float(r["cpu_seconds"]) for r in runs}


def work_bound(arrivals: dict[str, float], work: dict[str, float], cores: float) -> float:
    """``max over arrival times a of (a + sum of work[j] for jobs arriving at or after a) / cores``:
    no schedule on ``cores`` cores ends the jobs' work sooner (see the module docstring)."""
    if cores <= 0:
        raise ValueError(f"cores must be > 0, got {cores}")
    return max(
        (a + sum(w for j, w in work.items() if arrivals[j] >= a) / cores for a in set(arrivals.values())),
        default=0.0,
    )


def arrivals_of(doc: dict[str, Any]) -> dict[str, float]:
    """The training jobs' arrival times, from the run's seeded workload."""
    from autoglm_rt.jobqueue.multi_tenant import Workload, make_trace

    return {a.name: a.at for a in make_trace(Workload(**doc["workload"])) if a.kind != "request"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT
    doc = json.loads(path.read_text())
    arrivals = arrivals_of(doc)
    cores = float(doc["workload"]["cores"])
    head = f"{'mode':8s} {'makespan s':>10s} {'training CPU-s':>15s} {'service CPU-s':>14s} {'idle core-s':>12s}"
    print(head + f" {'work bound s':>13s}")
    for mode in ("static", "dynamic"):
        a = account(doc, mode)
        bound = work_bound(arrivals, job_work(doc, mode), cores)
        print(
            f"{mode:8s} {a['makespan_seconds']:10.1f} {a['training_cpu_seconds']:15.1f}"
            f" {a['service_cpu_seconds']:14.1f} {a['idle_core_seconds']:12.1f} {bound:13.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
