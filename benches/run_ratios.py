"""Runs the side-by-side ratio suites and writes benches/results/<suite>.json.

    python benches/run_ratios.py [SUITE ...] [--quick] [--device cpu|cuda] [--out DIR] [--json]

A suite is a module ``benches/ratios_<name>.py`` with ``run(ctx) -> list[Comparison]``; ``ctx``
carries the bandwidth measured at the start of the run, so every kernel figure can be stated as a
fraction of it. With no SUITE, all suites run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from autoglm_rt import benchmarking

HERE = Path(__file__).resolve().parent


@dataclass
class Context:
    device: str
    quick: bool
    bandwidth: dict[str, float]


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("ratios_"): p for p in sorted(HERE.glob("ratios_*.py"))}


def load(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    suites = discover()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="*", choices=[*suites, []], help="suites to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few rounds (smoke run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = ap.parse_args(argv)
    say = (lambda *a, **k: None) if args.json else print
    report: dict[str, object] = {"device": args.device, "suites": {}}

    if args.device == "cuda":
        bw = benchmarking.measure_cuda_bandwidth(nbytes=(256 if args.quick else 2048) * 2**20)
    else:
        bw = benchmarking.measure_bandwidth(nbytes=(64 if args.quick else 512) * 2**20)
    say(f"bandwidth ({args.device}): read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s")
    report["bandwidth"] = bw
    ctx = Context(device=args.device, quick=args.quick, bandwidth=bw)
    for name in args.suite or list(suites):
        comparisons = load(suites[name]).run(ctx)
        say(f"\n== {name} ({args.device}) ==")
        say(benchmarking.format_table(comparisons))
        suffix = "_quick" if args.quick else ""
        out = Path(args.out) / f"{name}_{args.device}{suffix}.json"
        benchmarking.write_results(out, name, comparisons, bandwidth=bw, device=args.device)
        say(f"wrote {out}")
        report["suites"][name] = [asdict(c) for c in comparisons]  # type: ignore[index]
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
