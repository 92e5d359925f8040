"""A training job for the cgroup test: one large float32 parameter under AdamW, stepped with the
fused kernel, its state in RAM or offloaded to disk. Prints "ready" once parameters and
gradients exist, waits for a line on stdin (the test sets the memory limit then), steps, prints
"done"."""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from autoglm_rt.offload import OptimizerOffload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--directory", required=True)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--keep-page-cache", action="store_true")
    ap.add_argument("--block-bytes", default="4Mi")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Filled, not just allocated: a fresh allocation's pages are not resident until written.
    w = torch.nn.Parameter(torch.empty(args.numel).fill_(0.5))
    w.grad = torch.empty_like(w).fill_(0.0)
    opt = torch.optim.AdamW([w], lr=1e-3)
    drop = not args.keep_page_cache
    block = args.block_bytes
    off = OptimizerOffload(opt, tier="disk", directory=args.directory, block_bytes=block, drop_page_cache=drop)
    if args.offload:
        off.offload()
    print("ready", flush=True)
    sys.stdin.readline()
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        w.grad.uniform_(-1.0, 1.0, generator=gen)
        off.step()
    # No restore() at the end: the state would not fit in RAM under the limit (that is the point).
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kinds = _rss_kinds()
    print(
        f"done {float(w.detach()[:4].sum()):.6e} resident={off.resident_bytes()} peak_rss={peak} "
        f"rss_anon={kinds['RssAnon']} rss_file={kinds['RssFile']} seconds={seconds:.3f}",
        flush=True,
    )


def _rss_kinds() -> dict[str, int]:
    """This process's resident bytes now by kind (/proc/self/status: RssAnon, RssFile, RssShmem)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Rss"):
                out[key] = int(value.split()[0]) * 1024
    return out


if __name__ == "__main__":
    main()
