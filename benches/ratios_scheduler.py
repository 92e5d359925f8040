"""The scheduler against what a user would otherwise do: split the machine into fixed slots
(static partitions, first come first served). One mixed workload, both ways, same arrivals;
ratios are static / dynamic for times (above 1: the scheduler is faster) and dynamic / static
for utilisation (in ``extra``)."""

from __future__ import annotations

import tempfile

from autoglm_rt import benchmarking
from autoglm_rt.jobqueue.multi_tenant import Workload, run_comparison


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    workload = Workload(request_window=6.0, training_work=3.0) if ctx.quick else Workload()
    rounds = 1 if ctx.quick else 2
    with tempfile.TemporaryDirectory(prefix="agrt-mt-") as tmp:
        doc = run_comparison(workload, tmp, rounds=rounds)
    s, d = doc["summary"]["static"], doc["summary"]["dynamic"]
    extra = {
        "utilisation_static": s["utilisation"],
        "utilisation_dynamic": d["utilisation"],
        "failure_rate_static": s["failure_rate"],
        "failure_rate_dynamic": d["failure_rate"],
        "workload": doc["workload"],
    }
    out = []
    for key, label in [
        ("mean_response_s", "multi-tenant mean request response"),
        ("mean_response_all_s", "multi-tenant mean response, failed included"),
        ("p95_response_s", "multi-tenant p95 request response"),
        ("training_makespan_s", "multi-tenant training makespan"),
    ]:
        out.append(
            benchmarking.Comparison(
                name=label,
                case_label="priority scheduler",
                baseline_label="static slots",
                case_seconds=d[key],
                baseline_seconds=s[key],
                ratio=s[key] / d[key],
                rounds=rounds,
                extra=extra,
            )
        )
    return out
