"""The hook's two ways to get a bucket's local squared norm: topk_compress(..., sq_norm_out=...)
(fused, one read of the bucket) vs topk_compress then torch.dot (a second read), side by side.

    PYTHONPATH=python python benches/topk_fused_sq_norm.py
"""

from __future__ import annotations

import functools
import os
import time

import torch

from autoglm_rt import ops


def _best(fn, repeat: int = 15) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 4]  # lower quartile: less noise from other jobs


def _separate(g: torch.Tensor, r: torch.Tensor, k: int, v: torch.Tensor, i: torch.Tensor, sq: torch.Tensor) -> None:
    ops.topk_compress(g, r, k, values_out=v, indices_out=i)
    sq.copy_(torch.dot(g, g).double().reshape(1))


def _fused(g: torch.Tensor, r: torch.Tensor, k: int, v: torch.Tensor, i: torch.Tensor, sq: torch.Tensor) -> None:
    ops.topk_compress(g, r, k, values_out=v, indices_out=i, sq_norm_out=sq)


def main() -> None:
    torch.manual_seed(0)
    print(f"load {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    print(f"{'numel':>10s} {'density':>8s} {'separate ms':>12s} {'fused ms':>9s} {'ratio':>6s}")
    for n in (1 << 18, 6_553_600):
        for density in (0.001, 0.01):
            g = torch.randn(n)
            r = torch.randn(n) * 0.1
            k = max(1, int(n * density))
            v = torch.empty(k)
            i = torch.empty(k, dtype=torch.int32)
            sq = torch.empty(1, dtype=torch.float64)

            separate = functools.partial(_separate, g, r, k, v, i, sq)
            fused = functools.partial(_fused, g, r, k, v, i, sq)

            a, b = [], []
            for _ in range(3):  # interleaved so both see the same load
                a.append(_best(separate, 5))
                b.append(_best(fused, 5))
            sa, sb = min(a), min(b)
            print(f"{n:10d} {density:8.3f} {1e3 * sa:12.3f} {1e3 * sb:9.3f} {sb / sa:6.2f}")


if __name__ == "__main__":
    main()
