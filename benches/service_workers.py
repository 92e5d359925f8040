"""How the multi-tenant bench's inference service should use two cores for one request: its
passes split over two workers (one intra-op thread each: ``tenant_service.answer``) against the
same passes on two intra-op threads and on one thread, in this process, alternating
(``benchmarking.compare``), by wall time and by CPU time.

    PYTHONPATH=python OMP_NUM_THREADS=1 python benches/service_workers.py [--passes 8] [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from autoglm_rt.benchmarking import compare, machine_description
from autoglm_rt.trainers import tenant_service


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    cores = min(2, os.cpu_count() or 1)
    if cores < 2:
        print("service_workers: needs 2 cores", file=sys.stderr)
        return 1
    model, x = tenant_service.build_service(width=96, batch=8, seq=96)
    helpers = ThreadPoolExecutor(max_workers=1)

    def workers() -> None:
        tenant_service.answer(model, x, tenant_service.split_passes(args.passes, cores), helpers)

    def threads(n: int) -> None:  # every forward_passes call sets its thread's own count
        tenant_service.forward_passes(model, x, args.passes, threads=n)

    rows = []
    for label, baseline in (("2 intra-op threads", lambda: threads(2)), ("1 thread", lambda: threads(1))):
        for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
            c = compare(
                f"8 passes, {clock_name}",
                workers,
                baseline,
                case_label="2 workers",
                baseline_label=label,
                rounds=args.rounds,
                min_time=0.2,
                clock=clock,
            )
            rows.append(
                {
                    "clock": clock_name,
                    "case": c.case_label,
                    "baseline": c.baseline_label,
                    "case_ms": round(c.case_seconds * 1e3, 1),
                    "baseline_ms": round(c.baseline_seconds * 1e3, 1),
                    "ratio": round(c.ratio, 2),
                }
            )
            print(
                f"{clock_name:>4}: 2 workers {c.case_seconds * 1e3:6.1f} ms, {label} "
                f"{c.baseline_seconds * 1e3:6.1f} ms, ratio {c.ratio:.2f}x"
            )
    helpers.shutdown()
    print(json.dumps({"passes": args.passes, "rows": rows, "machine": machine_description()["cpu"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
