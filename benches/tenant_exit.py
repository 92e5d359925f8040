"""What a tenant job's objects cost the collector: one ``tenant_job`` of each CATALOG kind
(``--fixed``, the training environment of ``multi_tenant.tenant_envs``) run to its end in a child
interpreter, which then exits normally, with what the job froze (``gc.freeze()`` before its first
step) left frozen or put back (``gc.unfreeze()``: as before the freeze); alternating, pinned to one
core with ``taskset`` where it exists. Prints the child's whole CPU time and the part after the
job returned (its exit), medians.

    PYTHONPATH=python python benches/tenant_exit.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from autoglm_rt.jobqueue.multi_tenant import CATALOG, tenant_envs

CHILD = """
import gc, resource, sys
from autoglm_rt.trainers import tenant_job
rc = tenant_job.main(sys.argv[3:])
if sys.argv[2] == "unfrozen":
    gc.unfreeze()
ru = resource.getrusage(resource.RUSAGE_SELF)
with open(sys.argv[1], "w") as f:
    f.write(repr(ru.ru_utime + ru.ru_stime))
sys.exit(rc)
"""


def run_once(kind: str, variant: str, env: dict[str, str], mark: Path) -> tuple[float, float]:
    """(whole CPU-seconds, CPU-seconds after the job returned) of one child."""
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [*pin, sys.executable, "-c", CHILD, str(mark), variant, *CATALOG[kind].args, "--fixed"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    whole = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return whole, whole - float(mark.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    training, _ = tenant_envs(os.environ)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mark = Path(tmp) / "cpu"
        for _ in range(args.rounds):
            for kind in sorted(CATALOG):
                for variant in ("frozen", "unfrozen"):
                    runs.setdefault((kind, variant), []).append(run_once(kind, variant, training, mark))
    print(f"{'kind':6} {'frozen: CPU / exit':>20} {'unfrozen: CPU / exit':>22} {'CPU ratio':>10}")
    for kind in sorted(CATALOG):
        f, u = runs[(kind, "frozen")], runs[(kind, "unfrozen")]
        fc, fe = statistics.median(c for c, _ in f), statistics.median(e for _, e in f)
        uc, ue = statistics.median(c for c, _ in u), statistics.median(e for _, e in u)
        print(f"{kind:6} {fc:12.2f} / {fe:.2f} s {uc:14.2f} / {ue:.2f} s {fc / uc:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
