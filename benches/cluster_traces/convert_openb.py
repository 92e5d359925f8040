"""Converts Alibaba's public GPU-sharing pod trace (``cluster-trace-gpu-v2023``, file
``csv/openb_pod_list_default.csv`` of https://github.com/alibaba/clusterdata, 8152 pods of a
production GPU cluster) into ``autoglm_rt.jobqueue.trace_sim``'s CSV format.

    python benches/cluster_traces/convert_openb.py IN.csv OUT.csv [--start 9960000] [--end 10200300]

Kept: pods that were scheduled (``scheduled_time`` set) and created in ``[start, end)`` seconds of
the trace (the default window is where the excerpt in this directory is dense: 2.8 days).
Mapping, one pod per row:

- ``arrival_s`` = ``creation_time - start``; ``duration_s`` = ``deletion_time - scheduled_time``
  (at least 1 s; a pod still running when the trace ends is cut there, its real length unknown);
- ``cpus`` = ``cpu_milli / 1000``; ``memory_mib`` = ``memory_mib``;
- ``gpus`` = ``gpu_milli / 1000`` for a one-GPU pod (a GPU-sharing fraction), else ``num_gpu``;
- ``qos``: ``LS`` -> ``latency``, ``Guaranteed`` -> ``guaranteed``, ``Burstable`` and ``BE``
  -> ``best_effort``;
- ``peak_memory_mib`` / ``peak_at``: left empty: the trace has requests, not usage, so no job
  outgrows its request here (static cannot OOM on this trace; only packing, GPU sharing and
  priorities differ between the policies).

Pods that never ran (``Pending``, no ``scheduled_time``) are dropped; ``Failed`` pods are kept
for the time they held resources.
"""

from __future__ import annotations

import argparse
import csv
import sys

QOS = {"LS": "latency", "Guaranteed": "guaranteed", "Burstable": "best_effort", "BE": "best_effort"}
COLUMNS = ["arrival_s", "duration_s", "cpus", "memory_mib", "gpus", "qos", "peak_memory_mib", "peak_at"]


def convert(rows: list[dict[str, str]], start: float, end: float) -> list[list[object]]:
    out: list[list[object]] = []
    for r in rows:
        if not r["scheduled_time"] or not start <= float(r["creation_time"]) < end:
            continue
        if r["qos"] not in QOS:
            raise ValueError(f"{r['name']}: unknown qos {r['qos']!r}; expected one of {sorted(QOS)}")
        num_gpu = int(r["num_gpu"])
        gpus = int(r["gpu_milli"]) / 1000 if num_gpu == 1 else num_gpu
        duration = max(1.0, float(r["deletion_time"]) - float(r["scheduled_time"]))
        out.append(
            [
                f"{float(r['creation_time']) - start:.0f}",
                f"{duration:.0f}",
                f"{int(r['cpu_milli']) / 1000:g}",
                r["memory_mib"],
                f"{gpus:g}",
                QOS[r["qos"]],
                "",
                "",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("dest")
    ap.add_argument("--start", type=float, default=9_960_000.0, help="window start (trace seconds)")
    ap.add_argument("--end", type=float, default=10_200_300.0, help="window end (trace seconds)")
    args = ap.parse_args(argv)
    with open(args.source, newline="") as f:
        rows = list(csv.DictReader(f))
    jobs = convert(rows, args.start, args.end)
    with open(args.dest, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(jobs)
    print(f"{args.dest}: {len(jobs)} jobs from {len(rows)} pods")
    return 0


if __name__ == "__main__":
    sys.exit(main())
