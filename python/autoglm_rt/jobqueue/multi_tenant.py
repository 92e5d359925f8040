"""The mission's multi-tenant comparison, measured with real processes on this machine: a mixed
workload (training jobs and short request-like tasks arriving at random) run twice on the same
slots, with the same arrival trace:

- **static**: fixed partitions (``static_request_slots`` slots for requests, the rest for
  training), first come first served in each, no preemption: how a shared box is often split.
- **dynamic**: one queue over every slot under :class:`~autoglm_rt.policy.scheduler.PriorityScheduler`:
  requests are urgent and preempt training, which checkpoints (SIGTERM -> save -> exit 0),
  requeues and fills whatever slots are idle.

Each task is ``autoglm_rt/trainers/work_task.py``: it sleeps its work in steps, so the figures
measure scheduling, not this (shared, noisy) machine's CPU. A request fails if it is not done
``request_slo`` seconds after it arrived (the task gives up: exit 2), like a client timeout.

Figures per mode: mean and p95 response time of the requests that succeeded (arrival to
completion, including process start-up), the mean over every request (a failed one counted until
it gave up), device utilisation (seconds of useful work done by
successful tasks over slots x makespan; work redone after a preemption does not count), task
failure rate (failed / all tasks) and the training makespan.
"""

from __future__ import annotations

import math
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoglm_rt.jobqueue.runner import QueueRunner
from autoglm_rt.jobqueue.spec import JobSpec, QueueSpec

__all__ = ["Arrival", "ModeResult", "Workload", "format_comparison", "make_arrivals", "run_comparison", "run_mode"]

_TASK = Path(__file__).resolve().parents[1] / "trainers" / "work_task.py"


@dataclass(frozen=True)
class Workload:
    """The mixed workload. Times in seconds; arrivals are a seeded Poisson process."""

    slots: int = 4
    static_request_slots: int = 2
    training_jobs: int = 4
    training_work: float = 5.0
    request_rate: float = 3.0
    request_window: float = 15.0
    request_work: tuple[float, float] = (0.2, 0.8)
    request_slo: float = 2.5
    step: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.static_request_slots < self.slots:
            raise ValueError(f"static_request_slots must be in 1..{self.slots - 1}, got {self.static_request_slots}")
        for name in ("training_work", "request_rate", "request_window", "request_slo", "step"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        lo, hi = self.request_work
        if not 0 < lo <= hi:
            raise ValueError(f"request_work must be (low, high) with 0 < low <= high, got {self.request_work}")


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    name: str
    kind: str  # "training" | "request"
    work: float


@dataclass
class ModeResult:
    mode: str
    mean_response_s: float
    p95_response_s: float
    mean_response_all_s: float  # every request, a failed one counted until it gave up
    utilisation: float
    failure_rate: float
    training_makespan_s: float
    makespan_s: float
    tasks: int
    failed: int
    preemptions: int
    responses: list[float] = field(default_factory=list)


def make_arrivals(w: Workload) -> list[Arrival]:
    """Training jobs at time 0, then requests as a Poisson process over ``request_window``."""
    rng = random.Random(w.seed)
    arrivals = [Arrival(0.0, f"train{i}", "training", w.training_work) for i in range(w.training_jobs)]
    t, i = 0.0, 0
    while True:
        t += rng.expovariate(w.request_rate)
        if t > w.request_window:
            break
        arrivals.append(Arrival(round(t, 3), f"req{i}", "request", round(rng.uniform(*w.request_work), 2)))
        i += 1
    return arrivals


def _job(a: Arrival, w: Workload, t0: float, mode: str) -> JobSpec:
    cmd = [sys.executable, str(_TASK), "--work", f"{a.work}", "--step", f"{w.step}"]
    if a.kind == "request":
        cmd += ["--deadline", f"{t0 + a.at + w.request_slo:.3f}"]
        return JobSpec(a.name, tuple(cmd), urgency=1.0 if mode == "dynamic" else 0.5, preemptible=False)
    return JobSpec(a.name, tuple(cmd), urgency=0.2 if mode == "dynamic" else 0.5, preemptible=mode == "dynamic")


def run_mode(mode: str, w: Workload, work_dir: str | Path, log: Callable[[str], None] | None = None) -> ModeResult:
    """Runs the workload in ``mode`` ("static" or "dynamic") and measures it."""
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode: expected 'static' or 'dynamic', got {mode!r}")
    work_dir = Path(work_dir) / mode
    shutil.rmtree(work_dir, ignore_errors=True)
    quiet = log or (lambda _line: None)

    def queue(slots: int, name: str, aging: float) -> QueueRunner:
        spec = QueueSpec(tuple(range(slots)), False, (), grace_period=5.0, poll_interval=0.02, aging_rate=aging)
        return QueueRunner(spec, work_dir / f"{name}.db", log=quiet)

    if mode == "static":
        train_q = queue(w.slots - w.static_request_slots, "training", 0.0)
        req_q = queue(w.static_request_slots, "requests", 0.0)
        runners = [train_q, req_q]

        def route(a: Arrival) -> QueueRunner:
            return req_q if a.kind == "request" else train_q
    else:
        shared = queue(w.slots, "shared", 0.01)
        runners = [shared]

        def route(a: Arrival) -> QueueRunner:
            return shared

    arrivals = sorted(make_arrivals(w), key=lambda a: a.at)
    kinds = {a.name: a for a in arrivals}
    t0 = time.time()
    try:
        pending = list(arrivals)
        while True:
            now = time.time() - t0
            while pending and pending[0].at <= now:
                a = pending.pop(0)
                route(a).submit(_job(a, w, t0, mode))
            finished = [r.step() for r in runners]
            if not pending and all(finished):
                break
            time.sleep(0.02)
        rows = [j for r in runners for j in r.store.jobs()]
    finally:
        for r in runners:
            r.close()
    end = max(j.finished_at or t0 for j in rows)
    makespan = end - t0
    ok = [j for j in rows if j.state == "succeeded"]
    responses = sorted((j.finished_at or 0.0) - j.submitted_at for j in ok if kinds[j.name].kind == "request")
    every_request = [(j.finished_at or end) - j.submitted_at for j in rows if kinds[j.name].kind == "request"]
    useful = sum(kinds[j.name].work * j.spec.gpus for j in ok)
    training_end = max((j.finished_at or t0) for j in rows if kinds[j.name].kind == "training")
    failed = len(rows) - len(ok)
    return ModeResult(
        mode=mode,
        mean_response_s=statistics.fmean(responses) if responses else math.nan,
        p95_response_s=responses[min(len(responses) - 1, int(0.95 * len(responses)))] if responses else math.nan,
        mean_response_all_s=statistics.fmean(every_request) if every_request else math.nan,
        utilisation=useful / (w.slots * makespan),
        failure_rate=failed / len(rows),
        training_makespan_s=training_end - t0,
        makespan_s=makespan,
        tasks=len(rows),
        failed=failed,
        preemptions=sum(j.preemptions for j in rows),
        responses=responses,
    )


def run_comparison(w: Workload, work_dir: str | Path, rounds: int = 1) -> dict[str, Any]:
    """Runs static and dynamic alternately ``rounds`` times; returns every round and the medians."""
    results: dict[str, list[ModeResult]] = {"static": [], "dynamic": []}
    for r in range(rounds):
        for mode in ("static", "dynamic") if r % 2 == 0 else ("dynamic", "static"):
            results[mode].append(run_mode(mode, w, work_dir))
    summary = {}
    for mode, runs in results.items():
        summary[mode] = {
            key: statistics.median(getattr(x, key) for x in runs)
            for key in (
                "mean_response_s",
                "p95_response_s",
                "mean_response_all_s",
                "utilisation",
                "failure_rate",
                "training_makespan_s",
            )
        }
    return {
        "workload": asdict(w),
        "rounds": {mode: [asdict(x) for x in runs] for mode, runs in results.items()},
        "summary": summary,
    }


def format_comparison(doc: dict[str, Any]) -> str:
    """The side-by-side table, with the mission's claimed figures for reference."""
    s, d = doc["summary"]["static"], doc["summary"]["dynamic"]
    rows = [
        (
            "mean response time (requests)",
            f"{s['mean_response_s'] * 1e3:.0f} ms",
            f"{d['mean_response_s'] * 1e3:.0f} ms",
            "412 ms / 203 ms",
        ),
        (
            "mean response, failed included",
            f"{s['mean_response_all_s'] * 1e3:.0f} ms",
            f"{d['mean_response_all_s'] * 1e3:.0f} ms",
            "",
        ),
        (
            "p95 response time (requests)",
            f"{s['p95_response_s'] * 1e3:.0f} ms",
            f"{d['p95_response_s'] * 1e3:.0f} ms",
            "",
        ),
        ("device utilisation", f"{s['utilisation']:.0%}", f"{d['utilisation']:.0%}", "63% / 89%"),
        ("task failure rate", f"{s['failure_rate']:.1%}", f"{d['failure_rate']:.1%}", "4.2% / 0.7%"),
        ("training makespan", f"{s['training_makespan_s']:.1f} s", f"{d['training_makespan_s']:.1f} s", ""),
    ]
    head = f"{'figure':<32} {'static':>10} {'dynamic':>10}   mission claim (static / dynamic)"
    lines = [head, "-" * len(head)]
    lines += [f"{a:<32} {b:>10} {c:>10}   {m}" for a, b, c, m in rows]
    return "\n".join(lines)
