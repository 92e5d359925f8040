"""pytest-benchmark: the fused AdamW step, torch's AdamW and the disk tier (CI runs these once
with --benchmark-disable)."""

from __future__ import annotations

import pytest
import torch

from autoglm_rt.offload import OptimizerOffload, fused_adam_step

SHAPES = [(1024, 1024)] * 4 + [(1024,)] * 8  # 4.2M parameters


def _optimizer(foreach: bool | None = None) -> torch.optim.AdamW:
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        p = torch.randn(shape, generator=g).requires_grad_(True)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=foreach)


def test_fused_adamw(benchmark) -> None:  # type: ignore[no-untyped-def]
    opt = _optimizer()
    benchmark(fused_adam_step, opt)
    assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("foreach", [True, False])
def test_torch_adamw_baseline(benchmark, foreach) -> None:  # type: ignore[no-untyped-def]
    opt = _optimizer(foreach)
    benchmark(opt.step)
    assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_offload_step(benchmark, tier, tmp_path) -> None:  # type: ignore[no-untyped-def]
    off = OptimizerOffload(_optimizer(), tier="disk", directory=tmp_path, block_bytes="8Mi")
    if tier == "disk":
        off.offload()
    benchmark(off.step)
    assert off.resident_bytes() == (0 if tier == "disk" else sum(2 * 4 * torch.Size(s).numel() for s in SHAPES))
    off.close()
