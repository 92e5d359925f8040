"""The mission's multi-tenant comparison with real training tenants under live cgroup limits
(static partitions vs. the dynamic policy), written to benches/results/multi_tenant_cpu[_quick].json
with a PNG timeline beside it; and the same policies at cluster scale by simulation.

    PYTHONPATH=python python benches/multi_tenant.py [--quick] [--rounds N]
    PYTHONPATH=python python benches/multi_tenant.py --simulate TRACE.csv [--nodes N]
    PYTHONPATH=python python benches/multi_tenant.py --simulate generate [--nodes N]
    PYTHONPATH=python python benches/multi_tenant.py --simulate benches/cluster_traces/openb_trace_sim.csv \
        --nodes 4 --node-cpus 96 --node-memory-gib 768 --node-gpus 8 --dt 60 --out multi_tenant_sim_openb.json

The live run is ``autoglm-rt bench-multi-tenant``; see autoglm_rt/jobqueue/multi_tenant.py for
the workload and figures, autoglm_rt/jobqueue/trace_sim.py for the trace format and model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from autoglm_rt import cli

HERE = Path(__file__).resolve().parent


def simulate(trace: str, nodes: int, node: dict[str, float], out_name: str) -> int:
    from autoglm_rt.jobqueue import trace_sim

    with tempfile.TemporaryDirectory() as tmp:
        if trace == "generate":
            path = Path(tmp) / "trace.csv"
            trace_sim.generate_trace(path, jobs=400, seed=0)
        else:
            path = Path(trace)
        jobs = trace_sim.load_trace(path)
        sizes = {
            "node_cpus": node["cpus"],
            "node_memory": int(node["memory_gib"] * (1 << 30)),
            "node_gpus": node["gpus"],
            "dt": node["dt"],
        }
        doc = {mode: trace_sim.simulate(jobs, mode, nodes=nodes, **sizes) for mode in ("static", "dynamic")}
    doc["trace"] = {"source": trace, "jobs": len(jobs), "nodes": nodes, **node}  # type: ignore[assignment]
    keys = [k for k in doc["static"] if isinstance(doc["static"][k], int | float)]
    print(f"{'figure':<24} {'static':>12} {'dynamic':>12}")
    for k in keys:
        print(f"{k:<24} {doc['static'][k]:>12.3f} {doc['dynamic'][k]:>12.3f}")
    out = HERE / "results" / out_name
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="live run: both modes N times, medians (see the CLI)")
    ap.add_argument("--simulate", metavar="TRACE", default=None, help="a trace CSV, or 'generate'")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--node-cpus", type=float, default=32.0, help="simulated cores per node")
    ap.add_argument("--node-memory-gib", type=float, default=256.0, help="simulated memory per node (GiB)")
    ap.add_argument("--node-gpus", type=float, default=8.0, help="simulated GPUs per node")
    ap.add_argument("--dt", type=float, default=5.0, help="simulation step (seconds)")
    ap.add_argument("--out", default="multi_tenant_sim.json", help="file name under benches/results/")
    args = ap.parse_args(argv)
    if args.simulate:
        node = {"cpus": args.node_cpus, "memory_gib": args.node_memory_gib, "gpus": args.node_gpus, "dt": args.dt}
        return simulate(args.simulate, args.nodes, node, args.out)
    stem = HERE / "results" / f"multi_tenant_cpu{'_quick' if args.quick else ''}"
    cmd = ["bench-multi-tenant", "--json", f"{stem}.json", "--png", f"{stem}.png", "--rounds", str(args.rounds)]
    return cli.main([*cmd, "--quick"] if args.quick else cmd)


if __name__ == "__main__":
    sys.exit(main())
