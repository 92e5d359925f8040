"""A latency-sensitive inference tenant: loads a model once, then answers requests read from
stdin (one line: the request id) with a forward pass, writing the id back on stdout when done.

    python -m autoglm_rt.trainers.tenant_service --width 96 --batch 8 --seq 96

Each request is real work (a no-grad forward of CharGPT on ``--batch`` sequences), so its
response time reflects the CPU the service is given. Each request runs on as many intra-op
threads as ``cores_cap`` of its cgroup's CPU quota grants (at least 1; every core without a quota;
``--threads N`` fixes it), read when the request arrives, so a quota raised for a burst is used at
once. Exits at end of input.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from autoglm_rt import resources
from autoglm_rt.demo.model import CharGPT, GPTConfig
from autoglm_rt.runtime.cpu_quota import cores_cap

__all__ = ["main", "quota_threads"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--passes", type=int, default=2, help="forward passes per request")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: cores_cap of the CPU quota")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CharGPT(GPTConfig(block_size=max(64, args.seq), n_layer=2, n_head=4, n_embd=args.width)).eval()
    x = torch.randint(0, 128, (args.batch, args.seq))
    with torch.no_grad():
        model(x)  # warm-up: the first pass allocates
    print("ready", flush=True)
    for line in sys.stdin:
        rid = line.strip()
        if not rid:
            continue
        torch.set_num_threads(args.threads if args.threads > 0 else quota_threads(resources.cpu_quota_cores()))
        with torch.no_grad():
            for _ in range(args.passes):
                model(x)
        print(rid, flush=True)
    return 0


def quota_threads(quota: float | None) -> int:
    """Whole cores of a CPU quota (cores; None: no quota, every core), at least 1."""
    cores = os.cpu_count() or 1
    return min(cores, cores_cap(quota) or cores)


if __name__ == "__main__":
    sys.exit(main())
