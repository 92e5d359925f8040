"""What each rank runs in the DDP tests (module-level so spawned processes can import it)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt import ddp


def _mlp(seed: int, width: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


class _Recorder:
    """Wraps the collectives the hook calls and sums the bytes of the tensors passed in."""

    def __init__(self) -> None:
        self.bytes = 0
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._reduce = dist.all_reduce
        self._names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]

    def __enter__(self) -> _Recorder:
        def gather(output: torch.Tensor, input: torch.Tensor, *a: Any, **kw: Any) -> Any:
            self.bytes += input.numel() * input.element_size()
            return self._gather(output, input, *a, **kw)

        def reduce(tensor: torch.Tensor, *a: Any, **kw: Any) -> Any:
            self.bytes += tensor.numel() * tensor.element_size()
            return self._reduce(tensor, *a, **kw)

        for name in self._names:
            setattr(dist, name, gather)
        dist.all_reduce = reduce
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self._names:
            setattr(dist, name, self._gather)
        dist.all_reduce = self._reduce


def hooks(rank: int) -> dict[str, Any]:
    """Density 1.0 against allreduce_hook, byte counters, norms, a non-finite bucket."""
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(100 + rank)

    # 1. density 1.0 (compressed path from the first step) gives allreduce_hook's gradients.
    ref = DDP(_mlp(0), bucket_cap_mb=0.02)
    ref.register_comm_hook(None, allreduce_hook)
    model = DDP(_mlp(0), bucket_cap_mb=0.02)
    state = ddp.TopKState(density=1.0, start_iter=0, min_numel=0)
    model.register_comm_hook(state, ddp.topk_hook)
    diffs = []
    for _ in range(4):
        x = torch.randn(16, 64, generator=gen)
        for m in (ref, model):
            m.zero_grad()
            m(x).square().mean().backward()
        diffs.append(max((a - b).abs().max().item() for a, b in zip(_grads(ref), _grads(model), strict=True)))
        with torch.no_grad():
            for p, q in zip(ref.parameters(), model.parameters(), strict=True):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
    out["density1_max_diff"] = max(diffs)
    out["density1_compressed_buckets"] = state.compressed_buckets
    out["density1_dense_buckets"] = state.dense_buckets
    out["density1_buckets_per_step"] = len({i for i in state.bucket_density})

    # 2. density 0.01: bytes counted == bytes handed to the collectives; norms.
    model = DDP(_mlp(1, width=256), bucket_cap_mb=0.1)
    state = ddp.TopKState(density=0.01, start_iter=2, min_numel=1000)
    model.register_comm_hook(state, ddp.topk_hook)
    norms = []
    with _Recorder() as rec:
        for _ in range(5):
            x = torch.randn(16, 64, generator=gen)
            model.zero_grad()
            model(x).square().mean().backward()
            n = state.norms()
            assert n is not None
            n["grad_sq_norm"] = float(sum(g.double().square().sum().item() for g in _grads(model)))
            norms.append(n)
    out["recorded_bytes"] = rec.bytes
    out["counted_bytes"] = state.bytes_sent
    out["dense_bytes"] = state.dense_bytes
    out["compressed_buckets"] = state.compressed_buckets
    out["dense_buckets"] = state.dense_buckets
    out["bucket_density"] = dict(state.bucket_density)
    out["norms"] = norms
    out["iter"] = state.iter

    # 3. A NaN on rank 1 only: nobody hangs, rank 1's residual is reset, the next step is finite.
    model = DDP(_mlp(2), bucket_cap_mb=0.02)
    state = ddp.TopKState(density=0.05, start_iter=0, min_numel=0)
    model.register_comm_hook(state, ddp.topk_hook)
    finite = []
    for step in range(3):
        x = torch.randn(16, 64, generator=gen)
        if step == 1 and rank == 1:
            x[0, 0] = float("nan")
        model.zero_grad()
        model(x).square().mean().backward()
        finite.append(all(bool(torch.isfinite(g).all()) for g in _grads(model)))
    out["nan_finite_per_step"] = finite
    out["nan_resets"] = state.nonfinite_resets
    out["nan_residuals_finite"] = all(bool(torch.isfinite(r.tensor).all()) for r in state._residuals.values())
    return out


def _teacher_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    w1 = torch.randn(64, 32, generator=torch.Generator().manual_seed(7)) / 8
    w2 = torch.randn(32, 10, generator=torch.Generator().manual_seed(8)) / 4
    y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(n, 10, generator=g)
    return x, y


def training(rank: int) -> dict[str, float]:
    """The same short run (MLP regression, SGD) under dense allreduce and top-k 1% with and
    without error feedback; returns each run's validation loss."""
    x, y = _teacher_data(1000 + rank, 4096)
    xv, yv = _teacher_data(5, 2048)
    results: dict[str, float] = {}
    configs: dict[str, Any] = {
        "dense": None,
        "topk_ef": ddp.TopKState(density=0.01, start_iter=2, min_numel=1000),
        "topk_no_ef": ddp.TopKState(density=0.01, start_iter=2, min_numel=1000, error_feedback=False),
    }
    for name, state in configs.items():
        model = DDP(_mlp(3, width=256))
        if state is None:
            model.register_comm_hook(None, allreduce_hook)
        else:
            model.register_comm_hook(state, ddp.topk_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            idx = torch.randint(0, x.shape[0], (32,), generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            results[name] = float(nn.functional.mse_loss(model.module(xv), yv))
    return results


STEPS = 300
