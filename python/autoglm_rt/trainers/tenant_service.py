"""A latency-sensitive inference tenant: loads a model once, then answers requests read from
stdin (one line: the request id) with a forward pass, writing the id back on stdout when done.

    python -m autoglm_rt.trainers.tenant_service --width 96 --batch 8 --seq 96

Each request is real work (a no-grad forward of CharGPT on ``--batch`` sequences), so its
response time reflects the CPU the service is given. A request's passes are independent: they
are split over one worker per core the cgroup's CPU quota reaches into (:func:`quota_workers`; at
most ``--passes``; ``--threads N`` fixes it), read when the request arrives, so a quota raised for
a burst is used at once. Each worker runs one intra-op thread: this model's ops are too short for
intra-op threads to pay (``benches/service_workers.py``; figures in benches/RESULTS.md). Exits at
end of input.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from autoglm_rt import resources
from autoglm_rt.demo.model import CharGPT, GPTConfig

__all__ = ["answer", "build_service", "forward_passes", "main", "quota_workers", "split_passes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--passes", type=int, default=2, help="forward passes per request")
    ap.add_argument(
        "--threads", type=int, default=0, help="workers per request; 0: one per core the CPU quota reaches into"
    )
    args = ap.parse_args(argv)
    if args.passes < 1 or args.threads < 0:
        ap.error(f"--passes must be >= 1 and --threads >= 0, got {args.passes} and {args.threads}")
    model, x = build_service(args.width, args.batch, args.seq)
    forward_passes(model, x, 1)  # warm-up: the first pass allocates
    print("ready", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1)) as helpers:
        for line in sys.stdin:
            rid = line.strip()
            if not rid:
                continue
            workers = args.threads if args.threads > 0 else quota_workers(resources.cpu_quota_cores())
            answer(model, x, split_passes(args.passes, workers), helpers)
            print(rid, flush=True)
    return 0


def build_service(width: int, batch: int, seq: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The service's model (CharGPT, 2 layers, seeded, eval mode) and its request input."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CharGPT(GPTConfig(block_size=max(64, seq), n_layer=2, n_head=4, n_embd=width)).eval()
    return model, torch.randint(0, 128, (batch, seq))


def forward_passes(model: torch.nn.Module, x: torch.Tensor, passes: int, threads: int = 1) -> None:
    """``passes`` no-grad forwards of ``x`` in the calling thread on ``threads`` intra-op threads
    (OpenMP keeps the count per thread, so each worker sets its own)."""
    torch.set_num_threads(threads)
    with torch.no_grad():
        for _ in range(passes):
            model(x)


def answer(model: torch.nn.Module, x: torch.Tensor, parts: list[int], helpers: ThreadPoolExecutor) -> None:
    """One request: ``parts[0]`` passes in the calling thread, each other part on ``helpers``;
    returns when all are done (a helper's exception is raised here)."""
    first, *rest = parts
    pending = [helpers.submit(forward_passes, model, x, n) for n in rest]
    forward_passes(model, x, first)
    for done in pending:
        done.result()


def split_passes(passes: int, workers: int) -> list[int]:
    """``passes`` split over ``min(passes, workers)`` workers (at least 1): the counts sum to
    ``passes`` and differ by at most one, larger first."""
    n = max(1, min(passes, workers))
    return [passes // n + (i < passes % n) for i in range(n)]


def quota_workers(quota: float | None) -> int:
    """Workers for a request under a CPU quota of ``quota`` cores: every core it reaches into,
    ``ceil(quota)``, at least 1 and at most the machine's cores (every core without a quota).
    The workers share nothing until the request's end, so a throttled one holds no other back: a
    1.5-core quota gives two workers 1.5 cores of work, one worker only 1 (unlike intra-op
    threads, which wait for each other at every op: :func:`~autoglm_rt.runtime.cpu_quota.cores_cap`)."""
    cores = os.cpu_count() or 1
    if quota is None or not math.isfinite(quota) or quota <= 0:
        return cores
    return max(1, min(cores, math.ceil(quota - 1e-6)))


if __name__ == "__main__":
    sys.exit(main())
