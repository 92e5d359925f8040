"""On a GPU: a real CUDA out-of-memory under a low limit of the pool behind torch's allocator,
recovered by the Runtime (every sample counted once: parameters match float64 full-batch SGD on
the CPU). Runs in a subprocess because the allocator must be installed before CUDA starts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cuda

SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    import autoglm_rt.memory as mem
    from autoglm_rt.runtime import Runtime

    mem.install_torch_allocator(limit="512Mi")
    torch.manual_seed(0)
    # 1024 -> 8192 -> 1: activations of a batch of 8192 need 8192*8192*4 B = 256 MiB per layer
    # output, several of them at once in backward: far above 512 MiB; 1024 samples fit. The
    # parameters stay small (33 MiB, and as much per gradient copy): a hidden 8192x8192 layer
    # would take 288 MiB for its weights and as much for each of the two gradient copies a
    # micro-batch step holds, more than the limit before any activation.
    net = nn.Sequential(nn.Linear(1024, 8192), nn.Tanh(), nn.Linear(8192, 1))
    ref = nn.Sequential(nn.Linear(1024, 8192), nn.Tanh(), nn.Linear(8192, 1))
    ref.load_state_dict(net.state_dict())
    ref.double()
    net.cuda()
    x = torch.randn(8192, 1024)
    y = torch.sin(x.sum(1, keepdim=True))
    rt = Runtime(net, torch.optim.SGD(net.parameters(), lr=1e-3), precision_by_phase={})
    rt.forward_backward((x.cuda(), y.cuda()), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    report = rt.step()
    assert rt.ooms_recovered >= 1, rt.ooms_recovered
    assert report.effective_batch == 8192 and report.micro_batch < 8192
    pool = mem.torch_pool(0)
    assert pool.stats()["num_ooms"] >= 1
    opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    nn.functional.mse_loss(ref(x.double()), y.double()).backward()
    opt.step()
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach(), rtol=1e-3, atol=1e-5)
    print("ok", rt.ooms_recovered, report.micro_batch)
    """
)


def test_real_cuda_oom_under_a_low_pool_limit_is_recovered() -> None:
    # The child inherits this process's environment (PYTHONPATH or the installed package).
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")
