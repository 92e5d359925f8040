"""Where the cores went in a multi-tenant run: per mode, the training and service CPU-seconds and
the idle core-seconds from the first arrival to the end of the makespan, from the timeline in a
``bench-multi-tenant --json`` file (cpuacct samples every control period).

    PYTHONPATH=python python benches/multi_tenant_accounting.py [benches/results/multi_tenant_cpu.json]

Each period between two samples counts ``cpu_used x dt`` for every job and the service, and
``max(0, cores - all of it) x dt`` as idle. Sampling makes the sums approximate (periods of about
0.5 s); the ratio between modes is what matters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parent / "results" / "multi_tenant_cpu.json"


def account(doc: dict[str, Any], mode: str) -> dict[str, float]:
    """CPU-seconds of training and of the service, and idle core-seconds, over the makespan."""
    cores = float(doc["workload"]["cores"])
    end = float(doc[mode]["makespan_seconds"])
    train = service = idle = 0.0
    prev: float | None = None
    for sample in doc["timeline"][mode]:
        t = float(sample["t"])
        if prev is not None and t <= end + 0.5:
            dt = t - prev
            used = sum(float(j["cpu_used"]) for j in sample["jobs"].values())
            svc = float(sample.get("service_cpu_used", 0.0))
            train += used * dt
            service += svc * dt
            idle += max(0.0, cores - used - svc) * dt
        prev = t
    return {
        "makespan_seconds": end,
        "training_cpu_seconds": train,
        "service_cpu_seconds": service,
        "idle_core_seconds": idle,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT
    doc = json.loads(path.read_text())
    print(f"{'mode':8s} {'makespan s':>10s} {'training CPU-s':>15s} {'service CPU-s':>14s} {'idle core-s':>12s}")
    for mode in ("static", "dynamic"):
        a = account(doc, mode)
        print(
            f"{mode:8s} {a['makespan_seconds']:10.1f} {a['training_cpu_seconds']:15.1f}"
            f" {a['service_cpu_seconds']:14.1f} {a['idle_core_seconds']:12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
