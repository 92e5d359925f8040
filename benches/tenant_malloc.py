"""What glibc's malloc settings cost a training tenant: one ``tenant_job`` of a CATALOG kind, run
alone in a fresh cgroup (1-core quota) with the training environment of
``multi_tenant.tenant_envs`` (mmap threshold 128 KiB + ``glibc.malloc.hugetlb=1``) and without the
huge-page tunable, alternating; prints user and system CPU-seconds (``cpuacct.stat``), wall time
and the group's last-step peak. Needs a writable cgroup hierarchy.

    PYTHONPATH=python python benches/tenant_malloc.py [--kind cnn-m] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoglm_rt import resources
from autoglm_rt.jobqueue.multi_tenant import CATALOG, tenant_envs


def run_once(kind: str, env: dict[str, str], status: Path) -> dict[str, float]:
    group = resources.JobGroup.create(f"pid-{os.getpid()}-malloc", "job")
    try:
        group.set_cpu_quota(1.0)
        cmd = [sys.executable, "-m", "autoglm_rt.trainers.tenant_job", *CATALOG[kind].args, "--status", str(status)]
        t0 = time.monotonic()
        subprocess.run(cmd, env=env, check=True, capture_output=True, preexec_fn=lambda: group.add(os.getpid()))
        wall = time.monotonic() - t0
        fields = (group.dirs["cpuacct"] / "cpuacct.stat").read_text().split()  # user N system M (ticks)
        tick = os.sysconf("SC_CLK_TCK")
        return {
            "wall_s": wall,
            "user_s": int(fields[1]) / tick,
            "sys_s": int(fields[3]) / tick,
            "peak_mib": group.memory_peak() / 2**20,
        }
    finally:
        group.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(CATALOG), default="cnn-m")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    backend = resources.detect()
    if backend is None or backend.v2:
        print(f"tenant_malloc: needs cgroup v1 here ({resources.availability()[1] or 'v2'})", file=sys.stderr)
        return 1
    training, _ = tenant_envs(os.environ)
    without = {**training, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}
    runs: dict[str, list[dict[str, float]]] = {"hugetlb=1": [], "mmap threshold only": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for label, env in (("hugetlb=1", training), ("mmap threshold only", without)):
                runs[label].append(run_once(args.kind, env, Path(tmp) / "status.json"))
    summary = {label: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for label, rs in runs.items()}
    for label, s in summary.items():
        print(f"{args.kind} {label:>20}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    print(json.dumps({"kind": args.kind, "rounds": args.rounds, "median": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
