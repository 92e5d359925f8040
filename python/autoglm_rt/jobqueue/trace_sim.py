"""The multi-tenant policies at cluster scale, by simulation: the same
:func:`~autoglm_rt.policy.scheduler.static_plan.plan_static` /
:func:`~autoglm_rt.policy.scheduler.dynamic_plan.plan_dynamic`
the live benchmark uses, driven by a trace file over N simulated nodes.

Trace format (CSV with a header; one job per row; extra columns are ignored)::

    arrival_s,duration_s,cpus,memory_mib,gpus,qos,peak_memory_mib,peak_at

- ``arrival_s``: submission time; ``duration_s``: run time with its full request;
- ``cpus``, ``memory_mib``: what it requests (its static partition);
- ``gpus``: GPUs it needs, fractional for a shared GPU (0.25: a quarter); static rounds up to
  whole GPUs (exclusive devices), dynamic packs fractions (MIG/MPS-style sharing);
- ``qos``: ``latency`` (short, urgent: an inference request), ``guaranteed`` (urgent training)
  or ``best_effort``;
- ``peak_memory_mib`` (optional, default ``memory_mib``) reached from ``peak_at`` (fraction of
  the run, default 1.0: never).

Model: a job progresses at ``min(1, cpus given / cpus requested)`` per second, where the cores it
is given are what CFS would give it (:func:`share_cores`: the node's cores by weight, none above
its quota or its request). Static: a job whose
peak exceeds its partition is OOM-killed at ``peak_at`` (a failure). Dynamic: the peak is granted
when memory is free; otherwise the job adapts (smaller micro-batch, more accumulation) and runs
at ``adapt_speed`` until it is; a preempted job keeps its progress (checkpoint contract). Jobs go
to the first node that admits them (nodes in order), so both policies see the same placement rule.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_rt.policy.scheduler.dynamic_plan import plan_dynamic
from autoglm_rt.policy.scheduler.static_plan import plan_static
from autoglm_rt.policy.scheduler.tenants import PlannerConfig, TenantState

__all__ = ["SimJob", "generate_trace", "load_trace", "share_cores", "simulate"]

MiB = 1 << 20
_QOS_URGENCY = {"latency": 1.0, "guaranteed": 0.9, "best_effort": 0.3}


@dataclass
class SimJob:
    name: str
    arrival: float
    duration: float
    cpus: float
    memory: int
    gpus: float
    qos: str
    peak_memory: int
    peak_at: float
    done: float = 0.0  # seconds of work done (at full request)
    node: int | None = None
    state: str = "waiting"  # waiting | running | succeeded | failed
    finished_at: float | None = None
    oom: bool = False
    preemptions: int = 0
    limit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "service" if self.qos == "latency" else "training"

    def working_set(self) -> int:
        return self.peak_memory if self.done >= self.peak_at * self.duration else self.memory


def load_trace(path: str | Path) -> list[SimJob]:
    """Reads a trace CSV (see the module docstring). Raises ValueError naming the row and column."""
    jobs: list[SimJob] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"arrival_s", "duration_s", "cpus", "memory_mib", "gpus", "qos"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; expected {sorted(need)}")
        for i, row in enumerate(reader, start=2):

            def num(key: str, default: float | None = None, *, row: dict[str, str] = row, i: int = i) -> float:
                raw = row.get(key) or ""
                if raw == "" and default is not None:
                    return default
                try:
                    value = float(raw)
                except ValueError:
                    raise ValueError(f"{path}:{i}: {key} must be a number, got {raw!r}") from None
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{path}:{i}: {key} must be a finite number >= 0, got {raw!r}")
                return value

            qos = (row.get("qos") or "").strip()
            if qos not in _QOS_URGENCY:
                raise ValueError(f"{path}:{i}: qos must be one of {sorted(_QOS_URGENCY)}, got {qos!r}")
            memory = int(num("memory_mib") * MiB)
            duration, cpus = num("duration_s"), num("cpus")
            if duration <= 0 or cpus <= 0 or memory <= 0:
                raise ValueError(f"{path}:{i}: duration_s, cpus and memory_mib must be > 0")
            jobs.append(
                SimJob(
                    f"job{i - 1}",
                    num("arrival_s"),
                    duration,
                    cpus,
                    memory,
                    num("gpus"),
                    qos,
                    int(num("peak_memory_mib", memory / MiB) * MiB),
                    min(1.0, num("peak_at", 1.0)),
                )
            )
    if not jobs:
        raise ValueError(f"{path}: the trace has no jobs")
    return sorted(jobs, key=lambda j: (j.arrival, j.name))


def generate_trace(path: str | Path, jobs: int = 400, seed: int = 0, horizon: float = 3600.0) -> None:
    """Writes a synthetic trace with the shape of public GPU cluster traces (many short jobs, a
    long tail, fractional GPU requests, a quarter of latency-class requests, some jobs whose peak
    exceeds their request mid-run)."""
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "duration_s", "cpus", "memory_mib", "gpus", "qos", "peak_memory_mib", "peak_at"])
        for _ in range(jobs):
            at = rng.uniform(0, horizon)
            if rng.random() < 0.25:
                w.writerow([f"{at:.1f}", f"{rng.uniform(1, 10):.1f}", 1, 2048, 0.25, "latency", "", ""])
                continue
            mem = rng.choice([4096, 8192, 16384, 32768])
            grows = rng.random() < 0.3
            w.writerow(
                [
                    f"{at:.1f}",
                    f"{min(7200.0, rng.lognormvariate(6.0, 1.0)):.1f}",
                    rng.choice([2, 4, 8]),
                    mem,
                    rng.choice([0.5, 1, 1, 2, 4]),
                    "guaranteed" if rng.random() < 0.2 else "best_effort",
                    int(mem * rng.uniform(1.2, 1.6)) if grows else "",
                    f"{rng.uniform(0.2, 0.8):.2f}" if grows else "",
                ]
            )


def simulate(
    jobs: list[SimJob],
    mode: str,
    nodes: int = 4,
    node_cpus: float = 32.0,
    node_memory: int = 256 << 30,
    node_gpus: float = 8.0,
    dt: float = 5.0,
    adapt_speed: float = 0.8,
) -> dict[str, Any]:
    """Runs the trace under ``mode`` and returns the same figures as the live benchmark."""
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode: expected 'static' or 'dynamic', got {mode!r}")
    jobs = [SimJob(**{k: v for k, v in j.__dict__.items() if k != "extra"}) for j in jobs]  # fresh copies
    cfg = PlannerConfig(memory=node_memory, cores=node_cpus, max_running=10**6, service_cores_busy=1.0)
    now = 0.0
    busy_cpu = 0.0
    used_mem: list[float] = []
    gpu_busy = 0.0
    while any(j.state in ("waiting", "running") for j in jobs):
        for n in range(nodes):
            on_node = [j for j in jobs if j.node == n and j.state == "running"]
            waiting = [j for j in jobs if j.state == "waiting" and j.arrival <= now]
            gpus_used = sum(_gpu_need(j, mode) for j in on_node)
            free_gpus = node_gpus - gpus_used
            # GPUs are not in the planner: offer only jobs whose GPU share fits on this node.
            offer = [j for j in waiting if _gpu_need(j, mode) <= free_gpus + 1e-9]
            states = [_state(j, mode) for j in on_node] + [_state(j, mode) for j in offer]
            plan = plan_static(states, cfg) if mode == "static" else plan_dynamic(states, cfg, now)
            for name in plan.preempt:
                j = _by_name(jobs, name)
                j.state, j.node = "waiting", None
                j.preemptions += 1
            for name in plan.admit:
                j = _by_name(jobs, name)
                need = _gpu_need(j, mode)
                if need > free_gpus + 1e-9:
                    continue
                free_gpus -= need
                j.state, j.node = "running", n
            placed = [j for j in jobs if j.node == n and j.state == "running"]
            for j in placed:
                j.limit = plan.memory.get(j.name, j.memory)
            given = share_cores(
                {j.name: min(j.cpus, plan.cpus.get(j.name, j.cpus)) for j in placed},
                {j.name: plan.cpu_weights.get(j.name, 100) for j in placed},
                node_cpus,
            )
            for j in placed:
                j.extra["cpus"] = given[j.name]
        for j in jobs:
            if j.state != "running":
                continue
            ws = j.working_set()
            speed = min(1.0, j.extra.get("cpus", j.cpus) / j.cpus)
            if ws > j.limit:
                if mode == "static":
                    j.state, j.oom, j.finished_at, j.node = "failed", True, now, None
                    continue
                speed *= adapt_speed
            busy_cpu += dt * min(j.cpus, j.extra.get("cpus", j.cpus))
            gpu_busy += dt * _gpu_need(j, mode)
            j.done += dt * speed
            if j.done >= j.duration:
                j.state, j.finished_at, j.node = "succeeded", now + dt, None
        used_mem.append(sum(min(j.working_set(), j.limit) for j in jobs if j.state == "running"))
        now += dt
        if now > 10**7:
            raise RuntimeError("simulation did not finish in 10^7 simulated seconds")
    makespan = max(j.finished_at or 0.0 for j in jobs) - min(j.arrival for j in jobs)
    latency = sorted((j.finished_at or now) - j.arrival for j in jobs if j.qos == "latency" and j.state == "succeeded")
    return {
        "mean_response_seconds": statistics.fmean(latency) if latency else math.nan,
        "p95_response_seconds": latency[min(len(latency) - 1, int(0.95 * len(latency)))] if latency else math.nan,
        "cpu_utilization": busy_cpu / (nodes * node_cpus * makespan),
        "memory_utilization": statistics.fmean(used_mem) / (nodes * node_memory) if used_mem else 0.0,
        "gpu_utilization": gpu_busy / (nodes * node_gpus * makespan),
        "oom_kills": sum(j.oom for j in jobs),
        "jobs_failed": sum(j.state == "failed" for j in jobs),
        "jobs": len(jobs),
        "makespan_seconds": makespan,
        "preemptions": sum(j.preemptions for j in jobs),
    }


def share_cores(caps: dict[str, float], weights: dict[str, int], cores: float) -> dict[str, float]:
    """What CFS gives each job: ``cores`` divided in proportion to the weights, no job above its cap
    (its quota or what it can use), and what a capped job leaves goes to the others (water-filling)."""
    given = {n: 0.0 for n in caps}
    open_ = {n for n, c in caps.items() if c > 0}
    left = cores
    while open_ and left > 1e-9:
        total = sum(weights[n] for n in open_)
        step = {n: left * weights[n] / total for n in open_}
        capped = {n for n in open_ if given[n] + step[n] >= caps[n] - 1e-12}
        if not capped:
            for n in open_:
                given[n] += step[n]
            break
        for n in capped:
            left -= caps[n] - given[n]
            given[n] = caps[n]
        open_ -= capped
    return given


def _gpu_need(j: SimJob, mode: str) -> float:
    return float(math.ceil(j.gpus)) if mode == "static" else j.gpus


def _by_name(jobs: list[SimJob], name: str) -> SimJob:
    return next(j for j in jobs if j.name == name)


def _state(j: SimJob, mode: str) -> TenantState:
    running = j.state == "running"
    return TenantState(
        j.name,
        "training",
        _QOS_URGENCY[j.qos],
        j.memory,
        j.cpus,
        int(j.memory * 0.5),  # floor: the job's memory at its smallest micro-batch
        j.arrival,
        running=running,
        preemptible=j.qos == "best_effort",
        usage=min(j.working_set(), j.limit) if running else 0,
        peak=j.working_set() if running else 0,
        limit=j.limit if running else None,
        cpu_used=j.extra.get("cpus", 0.0) if running else 0.0,
        progress=min(1.0, j.done / j.duration) if running else None,
    )
