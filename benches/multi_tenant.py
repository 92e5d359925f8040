"""The mission's multi-tenant comparison (static slots vs. autoglm_rt's scheduler), measured on
this machine with real processes, written to benches/results/multi_tenant_cpu[_quick].json.

    PYTHONPATH=python python benches/multi_tenant.py [--quick] [--rounds N]

Same as ``autoglm-rt bench-multi-tenant``; see autoglm_rt/jobqueue/multi_tenant.py for the
workload and what each figure means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoglm_rt import cli

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    out = HERE / "results" / f"multi_tenant_cpu{'_quick' if args.quick else ''}.json"
    cmd = ["bench-multi-tenant", "--rounds", str(args.rounds), "--json", str(out)]
    return cli.main([*cmd, "--quick"] if args.quick else cmd)


if __name__ == "__main__":
    sys.exit(main())
