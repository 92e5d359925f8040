"""Runtime over a DistributedDataParallel model (gloo, one process on 127.0.0.1): accumulation
through no_sync and OOM recovery by restarting the step, against float64 full-batch SGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoglm_rt.runtime import BatchConfig, Runtime

pytestmark = pytest.mark.distributed


class FailsAbove(nn.Module):
    """An MLP whose forward pass fails like an allocator when a micro-batch exceeds ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 1)
        self.limit = limit
        self.failures = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.failures += 1
            raise MemoryError(f"{x.shape[0]} samples > {self.limit}")
        return self.b(torch.tanh(self.a(x)))


def test_ddp_accumulation_and_oom_restart_match_full_batch_sgd(single_rank_group: None) -> None:
    net = FailsAbove(limit=20)
    ref = FailsAbove(limit=10**9)
    ref.load_state_dict(net.state_dict())
    ref.double()
    model = nn.parallel.DistributedDataParallel(net)
    rt = Runtime(
        model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={}, batch=BatchConfig(micro_batch=32)
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64 * 4, 8, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    for _, batch in rt.batches(batches):
        rt.forward_backward(batch, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        report = rt.step()
    assert rt.ooms_recovered == 1 and net.failures == 1
    assert report.micro_batch == 16 and report.accumulation == 4 and report.effective_batch == 64
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in batches:
        opt.zero_grad()
        nn.functional.mse_loss(ref(xb.double()), yb.double()).backward()
        opt.step()
    for p, r in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)
