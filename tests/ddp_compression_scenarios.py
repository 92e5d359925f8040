"""What each rank runs in the compression tests (module-level so spawned processes can import it):
exact resume, rank-consistent regime-aware density, DGC momentum correction against its formula,
and accuracy of regime-aware density with momentum correction on real text."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt import ddp, hook_support
from autoglm_rt.policy.compression import DensityController, DensityControllerConfig


def _mlp(seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), act(), nn.Linear(128, 128), act(), nn.Linear(128, 10))


def _state(adam: bool = False) -> ddp.TopKState:
    controller = DensityController(DensityControllerConfig(floor=0.01, ceiling=0.2, interval=3, threshold=0.05))
    if adam:
        return ddp.TopKState(start_iter=2, min_numel=0, controller=controller, adam=ddp.AdamUpdate(variance="local"))
    return ddp.TopKState(start_iter=2, min_numel=0, controller=controller, momentum=0.9)


def _train(model: DDP, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(16, 64, generator=g) * (1 + rank)  # uneven gradients across ranks
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def resume(rank: int, adam: bool = False) -> dict[str, Any]:
    """12 steps in one go vs 7 steps, state saved through bytes, a fresh model/optimizer/state
    loaded, 5 more steps: parameters, hook state and metrics must be identical. The resumed DDP's
    first bucket lists the parameters in model order, the saved one in gradient-ready order: the
    residuals and velocities must be carried over per parameter. ``adam``: with AdamUpdate (local
    variance) instead of momentum correction, so Adam's moments must be carried too; with tanh
    units, since a dead ReLU unit's first gradient is sign-like under Adam's normalisation (equal
    magnitudes), and the resumed first iteration's different layout breaks such ties differently."""
    act = nn.Tanh if adam else nn.ReLU
    full = DDP(_mlp(0, act))
    full_state = _state(adam)
    full.register_comm_hook(full_state, ddp.topk_hook)
    full_opt = torch.optim.SGD(full.parameters(), lr=0.05)
    _train(full, full_opt, rank, range(12))

    first = DDP(_mlp(0, act))
    first_state = _state(adam)
    first.register_comm_hook(first_state, ddp.topk_hook)
    first_opt = torch.optim.SGD(first.parameters(), lr=0.05)
    _train(first, first_opt, rank, range(7))
    buf = io.BytesIO()
    torch.save(
        {"model": first.module.state_dict(), "opt": first_opt.state_dict(), "comm": first_state.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    resumed = DDP(_mlp(1, act))  # different initial weights: everything must come from the checkpoint
    resumed.module.load_state_dict(saved["model"])
    resumed_state = _state(adam)
    resumed_state.load_state_dict(saved["comm"])
    resumed.register_comm_hook(resumed_state, ddp.topk_hook)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed, resumed_opt, rank, range(7, 12))

    return {
        "params_equal": all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters(), strict=True)),
        "metrics_full": full_state.metrics(),
        "metrics_resumed": resumed_state.metrics(),
        "densities_seen": full_state.controller.critical_windows_seen if full_state.controller else -1,
        "residuals_equal": all(
            torch.equal(a.tensor, b.tensor)
            for table in ("_residuals", "_velocities", "_adam_m", "_adam_v")
            for a, b in zip(getattr(full_state, table).values(), getattr(resumed_state, table).values(), strict=True)
        ),
        "tables": [len(t) for t in (full_state._velocities, full_state._adam_m, full_state._adam_v)],
    }


def consistency(rank: int) -> list[float]:
    """Densities chosen per iteration under very uneven gradients (rank 1's are 100x larger and
    change scale mid-run), with a critical window forced from rank 0 alone near the end."""
    model = DDP(_mlp(2))
    controller = DensityController(DensityControllerConfig(floor=0.01, ceiling=0.1, interval=2, threshold=0.3))
    state = ddp.TopKState(start_iter=1, min_numel=0, controller=controller)
    model.register_comm_hook(state, ddp.topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # fixed weights: the norm follows the data
    chosen = []
    for step in range(18):
        g = torch.Generator().manual_seed(step * 7 + rank)
        scale = (100.0 if rank == 1 else 1.0) * (10.0 if 8 <= step < 10 else 1.0)
        x = torch.randn(64, 64, generator=g) * scale
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        chosen.append(state.last_density)
        if step == 12 and rank == 0:
            controller.mark_critical()  # on one rank only: the all-reduced decision still agrees
    return chosen


def momentum_reference(rank: int) -> dict[str, Any]:
    """The hook with momentum correction against DGC's formulas in plain torch, step by step:
    u = m u + g; v = v + u; send top-k(|v|); v, u cleared where sent; average of the sparse
    tensors. Returns the largest difference between the delivered gradients."""
    m, density, world = 0.9, 0.1, dist.get_world_size()
    torch.manual_seed(5)
    net = nn.Linear(64, 32, bias=False)  # one parameter: the bucket's layout never changes
    model = DDP(net)
    state = ddp.TopKState(density=density, start_iter=0, min_numel=0, momentum=m)
    model.register_comm_hook(state, ddp.topk_hook)
    numel = sum(p.numel() for p in net.parameters())
    k = int(np.ceil(density * numel))
    u = torch.zeros(numel)
    v = torch.zeros(numel)
    worst = 0.0
    exact = True
    for step in range(6):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(8, 64, generator=g)
        ref = nn.Linear(64, 32, bias=False)
        ref.load_state_dict(net.state_dict())
        ref(x).square().mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        # The reference, on every rank's data (gathered).
        u = m * u + grad
        acc = v + u
        idx = torch.topk(acc.abs(), k).indices
        sent = torch.zeros(numel)
        sent[idx] = acc[idx]
        v = acc.clone()
        v[idx] = 0
        u[idx] = 0
        gathered = [torch.zeros(numel) for _ in range(world)]
        dist.all_gather(gathered, sent)
        expected = torch.zeros(numel)
        for s in gathered:
            nz = s != 0
            expected[nz] += s[nz] / world
        # The hook.
        model.zero_grad()
        model(x).square().mean().backward()
        delivered = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        worst = max(worst, float((delivered - expected).abs().max()))
        exact = exact and torch.equal(delivered, expected)
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
    return {"worst": worst, "exact": exact, "scale": float(expected.abs().max())}


def adam_reference(rank: int, variance: str = "frozen", momentum: str = "local") -> dict[str, Any]:
    """The hook under AdamUpdate against its formulas in plain torch, step by step, on two ranks
    whose gradients differ 3x in scale: during the dense start the delivered tensor must be
    AdamW's direction (and the parameters those of torch.optim.AdamW on the averaged gradient);
    afterwards the preconditioned, error-fed, masked top-k average divided by 1 - beta1^t (or,
    under global momentum, the momentum of the average). Returns the largest differences and the
    final parameters (which must be the same on both ranks)."""
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 0.01, 0.1
    density, start, world = 0.1, 3, dist.get_world_size()
    torch.manual_seed(5)
    net = nn.Linear(64, 32, bias=False)  # one parameter: the bucket's layout never changes
    adamw_net = nn.Linear(64, 32, bias=False)
    adamw_net.load_state_dict(net.state_dict())
    adamw = torch.optim.AdamW(adamw_net.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    model = DDP(net)
    adam = ddp.AdamUpdate(beta1=b1, beta2=b2, eps=eps, variance=variance, momentum=momentum)
    state = ddp.TopKState(density=density, start_iter=start, min_numel=0, adam=adam)
    model.register_comm_hook(state, ddp.topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    numel = net.weight.numel()
    k = int(np.ceil(density * numel))
    m, v, u, e = (torch.zeros(numel) for _ in range(4))
    ref_w = net.weight.detach().reshape(-1).clone()
    worst = {"start": 0.0, "compressed": 0.0, "adamw_params": 0.0, "params": 0.0}
    scale = 0.0
    for step in range(10):
        t = step + 1
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank)) * (1 + 2 * rank)
        probe = nn.Linear(64, 32, bias=False)
        probe.weight.data.copy_(ref_w.reshape(32, 64))
        probe(x).square().mean().backward()
        g = probe.weight.grad.reshape(-1).clone()
        grads = [torch.zeros(numel) for _ in range(world)]
        dist.all_gather(grads, g)
        if step < start:  # AdamW on the averaged gradient
            avg = sum(grads) / world
            m = b1 * m + (1 - b1) * avg
            v = b2 * v + (1 - b2) * avg * avg
            expected = (m / (1 - b1**t)) / (v.sqrt() / np.sqrt(1 - b2**t) + eps)
            adamw_net.weight.grad = avg.reshape(32, 64).clone()
            adamw.step()
        else:
            if variance == "local":  # from this rank's own gradient, started from the global v
                v = b2 * v + (1 - b2) * g * g
                denom = v.sqrt() / np.sqrt(1 - b2**t) + eps
            else:
                if step == start:  # unmeasured entries (none here) take the measured mean
                    v = torch.where(v == 0, v[v > 0].mean(), v)
                denom = v.sqrt() / np.sqrt(1 - b2**start) + eps
            if momentum == "local":
                if step == start:
                    u = m / denom
                u = b1 * u + (1 - b1) * g / denom
                acc = e + u
            else:
                if step == start:
                    m = m / denom
                acc = e + g / denom
            idx = torch.topk(acc.abs(), k).indices
            sent = torch.zeros(numel)
            sent[idx] = acc[idx]
            e = acc.clone()
            e[idx] = 0
            if momentum == "local":
                u[idx] = 0
            gathered = [torch.zeros(numel) for _ in range(world)]
            dist.all_gather(gathered, sent)
            average = sum(gathered) / world
            if momentum == "global":
                m = b1 * m + (1 - b1) * average
                average = m
            expected = average / (1 - b1**t)
            # The norm estimate: the averaged gradient at the shared sketch positions.
            at = hook_support.sketch_indices(numel, step, 0, torch.device("cpu"))
            sketch_sq = float((sum(grads) / world)[at].double().square().sum()) * numel / at.numel()
            true_sq = float((sum(grads) / world).double().square().sum())
        # The hook.
        opt.zero_grad()
        model(x).square().mean().backward()
        delivered = net.weight.grad.reshape(-1).clone()
        opt.step()
        ref_w = ref_w - lr * (expected + wd * ref_w)
        key = "start" if step < start else "compressed"
        worst[key] = max(worst[key], float((delivered - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
        worst["params"] = max(worst["params"], float((net.weight.detach().reshape(-1) - ref_w).abs().max()))
        if step == start - 1:
            worst["adamw_params"] = float((net.weight.detach() - adamw_net.weight.detach()).abs().max())
    return {
        "worst": worst,
        "scale": scale,
        "params": net.weight.detach().reshape(-1).tolist(),
        "norms": state.norms(),
        "sketch_sq": sketch_sq,
        "true_sq": true_sq,
    }


ADAM_VARIANTS = (("frozen", "local"), ("local", "local"), ("frozen", "global"))


def adam_reference_variants(rank: int) -> dict[str, dict[str, Any]]:
    """:func:`adam_reference` for every (variance, momentum) pair, in one pair of processes."""
    return {f"{v}-{m}": adam_reference(rank, v, m) for v, m in ADAM_VARIANTS}


def _char_data(corpus: Any, n: int, context: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = corpus.train if split == "train" else corpus.val
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, data.size - context - 1, size=n)
    x = np.stack([data[s : s + context] for s in starts]).astype(np.int64)
    y = data[starts + context].astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def char_train(
    model: DDP,
    opt: torch.optim.Optimizer,
    corpus: Any,
    context: int,
    steps: int,
    rank: int,
    val: tuple[torch.Tensor, torch.Tensor],
    seed: int = 0,
) -> float:
    """Trains ``model`` on ``steps`` batches of 64 windows (this rank's own; ``seed`` picks another
    data order) and returns its next-character accuracy on ``val``."""
    for step in range(steps):
        x, y = _char_data(corpus, 64, context, 1000 * step + rank + 7919 * seed, "train")
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float((model.module(val[0]).argmax(1) == val[1]).float().mean())


class _CharMLP(nn.Module):
    def __init__(self, context: int, seed: int = 11) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(128, 16)
        self.net = nn.Sequential(nn.Linear(16 * context, 256), nn.ReLU(), nn.Linear(256, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(self.emb(x).flatten(1))
        return out


def char_accuracy(rank: int, seeds: int = 1) -> list[dict[str, float]]:
    """Next-character accuracy on held-out standard-library source (real text), 2 ranks, SGD
    with momentum 0.9: dense allreduce vs regime-aware top-k with DGC momentum correction, once
    per seed (seed k: another initialisation and data order; seed 0 is the original run)."""
    from autoglm_rt.demo.corpus import load_corpus

    context, steps = 6, 600
    corpus = load_corpus(400_000)
    xv, yv = _char_data(corpus, 4000, context, 7, "val")
    runs: list[dict[str, float]] = []
    for seed in range(seeds):
        out: dict[str, float] = {}
        for name in ("dense", "regime"):
            model = DDP(_CharMLP(context, seed=11 + 97 * seed))
            if name == "dense":
                model.register_comm_hook(None, allreduce_hook)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                state = None
            else:
                config = DensityControllerConfig(floor=0.01, ceiling=0.05, interval=20)
                controller = DensityController(config)
                state = ddp.TopKState(start_iter=2, min_numel=0, controller=controller, momentum=0.9)
                model.register_comm_hook(state, ddp.topk_hook)
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
            out[f"{name}_accuracy"] = char_train(model, opt, corpus, context, steps, rank, (xv, yv), seed=seed)
            if state is not None:
                out["ratio"] = state.compression_ratio
                out["critical_windows"] = float(state.controller.critical_windows_seen) if state.controller else -1.0
        runs.append(out)
    return runs
