"""The dynamic multi-tenant policy against what a user would otherwise do: fixed partitions sized
by each job's request, first come first served. One seeded trace of real training tenants and
inference requests, both ways, under live cgroup limits; ratios are static / dynamic for times
(above 1: dynamic is faster), utilisation and failures in ``extra``. Needs a writable cgroup
hierarchy (see autoglm_rt.resources); without one it reports nothing."""

from __future__ import annotations

import tempfile

from autoglm_rt import benchmarking
from autoglm_rt.jobqueue.multi_tenant import Workload, run_comparison


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    workload = Workload(training_jobs=5, request_window=25.0) if ctx.quick else Workload(training_jobs=8)
    with tempfile.TemporaryDirectory(prefix="agrt-mt-") as tmp:
        doc = run_comparison(workload, tmp)
    if doc["enforcement"] == "none":
        return []
    s, d = doc["static"], doc["dynamic"]
    extra = {
        "enforcement": doc["enforcement"],
        **{
            f"{k}_{m}": doc[m][k]
            for m in ("static", "dynamic")
            for k in ("cpu_utilization", "oom_kills", "jobs_failed")
        },
        "workload": doc["workload"],
    }
    out = []
    for key, label in [
        ("mean_response_seconds", "multi-tenant mean request response"),
        ("p95_response_seconds", "multi-tenant p95 request response"),
        ("makespan_seconds", "multi-tenant training makespan"),
    ]:
        out.append(
            benchmarking.Comparison(
                name=label,
                case_label="dynamic cgroup limits",
                baseline_label="static partitions",
                case_seconds=d[key],
                baseline_seconds=s[key],
                ratio=s[key] / d[key],
                rounds=1,
                extra=extra,
            )
        )
    return out
