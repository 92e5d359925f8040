"""Fused top-k compression against the torch pipeline a user would otherwise write (GRACE-style:
add, abs, topk(sorted=False), gather, residual update), side by side, at one DDP bucket's size
and around it, for three densities."""

from __future__ import annotations

import torch

from autoglm_rt import benchmarking, ops

SIZES = (1_000_000, 6_553_600, 100_000_000)  # 6_553_600 float32 = one 25 MiB DDP bucket
DENSITIES = (0.001, 0.01, 0.1)


def torch_pipeline(grad: torch.Tensor, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    residual.add_(grad)
    indices = torch.topk(residual.abs(), k, sorted=False).indices
    values = residual[indices]
    residual[indices] = 0
    return values, indices


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    device = ctx.device
    sync = torch.cuda.synchronize if device == "cuda" else None
    sizes = SIZES[:2] if ctx.quick else SIZES
    bw = ctx.bandwidth["copy_gbps"]
    out = []
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        grad = torch.randn(n, generator=gen).to(device)
        res_case = (0.1 * torch.randn(n, generator=gen)).to(device)
        res_base = res_case.clone()
        big = n >= 50_000_000
        for density in DENSITIES:
            k = int(n * density)
            values = torch.empty(k, device=device)
            indices = torch.empty(k, dtype=torch.int32, device=device)
            cmp = benchmarking.compare(
                f"topk_compress n={n:.3g} density={density}",
                lambda grad=grad, res=res_case, k=k, values=values, indices=indices: ops.topk_compress(
                    grad, res, k, values_out=values, indices_out=indices
                ),
                lambda grad=grad, res=res_base, k=k: torch_pipeline(grad, res, k),
                baseline_label="torch add+abs+topk+gather+scatter",
                rounds=2 if (ctx.quick or big) else 5,
                min_time=0.0 if big else 0.05,
                bytes_read=12 * n,  # grad and residual read, residual written: the floor
                read_gbps=bw,
                sync=sync,
            )
            cmp.extra = {"n": n, "density": density, "bytes_moved": 12 * n, "fraction_is_of": "copy_gbps"}
            out.append(cmp)
    n = SIZES[1]
    k = n // 100
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(2 * k, generator=gen).to(device)  # two ranks' messages, each in index order
    indices = torch.cat([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(2)])
    indices = indices.to(torch.int32).to(device)
    dense = torch.zeros(n, device=device)
    out.append(
        benchmarking.compare(
            "topk_decompress 2 ranks x 1% of 6.55e6",
            lambda: ops.topk_decompress(values, indices, dense, scale=0.5),
            lambda: dense.index_add_(0, indices, values, alpha=0.5),
            baseline_label="torch index_add_",
            rounds=2 if ctx.quick else 5,
            sync=sync,
        )
    )
    return out
