"""What each rank runs in the two-rank Runtime test (module-level so spawned processes can import
it): a DDP model with the top-k hook, accumulation of two micro-batches, the Runtime reading the
hook's norms for the noise scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoglm_rt import ddp
from autoglm_rt.runtime import BatchConfig, Runtime
from autoglm_rt.stats import NoiseScale


def topk_runtime(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)  # the same initial model on both ranks
    net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    model = nn.parallel.DistributedDataParallel(net)
    state = ddp.TopKState(density=0.25, start_iter=1, min_numel=0)
    model.register_comm_hook(state, ddp.topk_hook)
    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        comm_state=state,
        precision_by_phase={},
        batch=BatchConfig(micro_batch=16),
    )
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    ref = NoiseScale()
    runtime_noise, ref_noise, norms = [], [], []
    for _ in range(8):
        x = torch.randn(32, 8, generator=g)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.5 * torch.randn(32, 1, generator=g)
        rt.forward_backward((x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        report = rt.step()
        n = state.norms()
        assert n is not None
        ref.update(n["mean_local_sq_norm"], 32, n["global_sq_norm"], 64)
        runtime_noise.append(report.noise_scale)
        ref_noise.append(ref.b_simple)
        norms.append(n)
    return {
        "runtime_noise": runtime_noise,
        "ref_noise": ref_noise,
        "accumulation": report.accumulation,
        "compressed_buckets": state.compressed_buckets,
        "params": [
            p.detach().double().flatten().tolist() for p in net.parameters()
        ],  # plain lists: tensors would travel as fds
    }
