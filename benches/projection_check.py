"""Checks demo/projection.py's alpha-beta model at P = 2 against the netns measurement, then
prints the projected step-time table for the same model.

    PYTHONPATH=python python benches/projection_check.py [--rate 1gbit] [--hook topk|onebit]

Inputs from ``benches/results/ddp_netns.json`` (run ``benches/ddp_netns.py`` first): the
``no_comm`` step (compute floor), the hook's synchronous time (compression), bytes per step of
allreduce and of the hook (``autoglm_topk_1pct`` or ``autoglm_onebit``). The hook's callback
costs (top-k: zeroing each bucket, scatter-add and norm gather of one rank's message; 1-bit:
decoding one rank's message) are timed here on one thread on the same buckets (16.8 M float32 in
DDP's 25 MiB buckets: 1, 2 and 1 layers; top-k at 1%), since the netns run does not separate
them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from autoglm_rt.demo.projection import projected_step_times, relative_error
from autoglm_rt.demo.step_costs import callback_seconds, sign_callback_seconds

HERE = Path(__file__).resolve().parent
NUMEL = 4 * (2048 * 2048 + 2048)  # benches/ddp_netns.py's model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--latency", type=float, default=100e-6, help="alpha per message, seconds")
    ap.add_argument("--hook", default="topk", choices=("topk", "onebit"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # as each netns rank
    rows = json.loads((HERE / "results" / "ddp_netns.json").read_text())["rates"][args.rate]
    gbit = float(args.rate.removesuffix("gbit"))
    no_comm = rows["no_comm"]["step_seconds_median"]
    topk = rows["autoglm_topk_1pct" if args.hook == "topk" else "autoglm_onebit"]
    dense_bytes = rows["allreduce"]["bytes_per_step"]
    layer = NUMEL // 4
    buckets = [layer, 2 * layer, layer]
    if args.hook == "topk":
        fixed, per_rank = callback_seconds(buckets, 0.01)
    else:
        fixed, per_rank = sign_callback_seconds(buckets, 2048)
    inputs = {
        "compute_s": no_comm,
        "compress_s": topk["hook_sync_seconds_median"],
        "decompress_s": per_rank,
        "callback_s": fixed,
        "dense_bytes": dense_bytes,
        "message_bytes": topk["bytes_per_step"],
        "buckets": 3,  # 67 MB in DDP's 25 MiB buckets
        "latency_s": args.latency,
    }
    (p2,) = projected_step_times(**inputs, gbits=[gbit], ranks=[2])
    measured_ar = rows["allreduce"]["step_seconds_median"]
    measured_tk = topk["step_seconds_median"]
    print(f"inputs: {json.dumps(inputs)}")
    print(
        f"P=2 at {args.rate}: allreduce projected {p2.allreduce_step_s * 1e3:.1f} ms, measured "
        f"{measured_ar * 1e3:.1f} ms, error {relative_error(p2.allreduce_step_s, measured_ar):+.1%}"
    )
    print(
        f"P=2 at {args.rate}: {args.hook} projected {p2.topk_step_s * 1e3:.1f} ms, measured "
        f"{measured_tk * 1e3:.1f} ms, error {relative_error(p2.topk_step_s, measured_tk):+.1%}"
    )
    print(f"{args.hook} step / no_comm floor, measured: {measured_tk / no_comm:.2f}x")
    print(f"\n| Gbit/s | P | allreduce step ms | {args.hook} step ms | speedup |\n|---:|---:|---:|---:|---:|")
    for r in projected_step_times(**inputs):
        if r.ranks in (2, 8, 64, 1024):
            print(
                f"| {r.gbit_s:g} | {r.ranks} | {r.allreduce_step_s * 1e3:.1f} | {r.topk_step_s * 1e3:.1f} "
                f"| {r.speedup:.2f} |"
            )


if __name__ == "__main__":
    main()
