"""What each rank runs in the 1-bit Adam tests (module-level so spawned processes can import it):
the hook step by step on known gradients, an exact resume under DDP, and accuracy on real text."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt import onebit
from tests.ddp_compression_scenarios import _char_data, _CharMLP, _mlp, _train, char_train
from tests.test_ddp_topk import FakeBucket

SHAPES = [(40, 50), (300,), (7,)]  # 2307 entries: partial last chunk and byte
NAN_STEP, INF_STEP = 6, 8  # a sign step and a refresh (with first_refresh=4, start 2)


def gradient(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s gradient at ``step``: uneven across ranks; entries 0-99 are zero during the
    start (never measured); rank 1 has a NaN at NAN_STEP and rank 0 an Inf at INF_STEP."""
    g = torch.randn(2307, generator=torch.Generator().manual_seed(31 * step + rank)) * (1 + 3 * rank)
    if step < 2:
        g[:100] = 0
    if step == NAN_STEP and rank == 1:
        g[5] = float("nan")
    if step == INF_STEP and rank == 0:
        g[2000] = float("inf")
    return g


def steps(rank: int, dense_bits: int = 8) -> list[dict[str, Any]]:
    """The hook on one fake bucket for 18 iterations (start 2, v refreshed at 4, 8, 16, chunk 256):
    per iteration the state before, what was delivered, the norms and the metrics after."""
    cfg = onebit.OneBitAdam(start_iter=2, refresh_first=4, chunk=256, dense_bits=dense_bits, beta2=0.99)
    state = onebit.OneBitAdamState(cfg)
    out = []
    for step in range(18):
        # Tables as numpy arrays: tensors would travel through shared memory the rank frees on exit.
        before = {
            name: {i: e["tensor"].numpy() for i, e in t.items()} for name, t in state.state_dict()["tables"].items()
        }
        bucket = FakeBucket(gradient(step, rank), 0, SHAPES)
        delivered = onebit.onebit_adam_hook(state, bucket).wait().numpy().copy()  # type: ignore[arg-type]
        out.append({"before": before, "delivered": delivered, "norms": state.norms(), "metrics": state.metrics()})
    return out


def resume(rank: int) -> dict[str, Any]:
    """14 steps in one go vs 9 steps, everything saved through bytes, a fresh model, optimizer and
    state loaded, 5 more steps (the refresh at 10 among them): parameters and hook state must be
    identical. The resumed DDP buckets its parameters afresh, so the state moves per parameter."""
    cfg = onebit.OneBitAdam(start_iter=2, chunk=64)

    def build(seed: int) -> tuple[DDP, onebit.OneBitAdamState, torch.optim.Optimizer]:
        model = DDP(_mlp(seed, nn.Tanh))
        state = onebit.OneBitAdamState(cfg)
        model.register_comm_hook(state, onebit.onebit_adam_hook)
        return model, state, torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.01)

    full, full_state, full_opt = build(0)
    _train(full, full_opt, rank, range(14))
    first, first_state, first_opt = build(0)
    _train(first, first_opt, rank, range(9))
    buf = io.BytesIO()
    torch.save(
        {"model": first.module.state_dict(), "opt": first_opt.state_dict(), "comm": first_state.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed, resumed_state, resumed_opt = build(1)  # other initial weights: all must come from the file
    resumed.module.load_state_dict(saved["model"])
    resumed_state.load_state_dict(saved["comm"])
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed, resumed_opt, rank, range(9, 14))
    a, b = full_state.state_dict(), resumed_state.state_dict()
    return {
        "params_equal": all(torch.equal(x, y) for x, y in zip(full.parameters(), resumed.parameters(), strict=True)),
        "tables_equal": all(
            torch.equal(x["tensor"], y["tensor"])
            for name in a["tables"]
            for x, y in zip(a["tables"][name].values(), b["tables"][name].values(), strict=True)
        ),
        "table_sizes": {name: len(t) for name, t in a["tables"].items()},
        "metrics_full": full_state.metrics(),
        "metrics_resumed": resumed_state.metrics(),
        "params": [p.detach().numpy().copy() for p in full.parameters()],
    }


def char_accuracy(rank: int) -> dict[str, float]:
    """Next-character accuracy on held-out standard-library source (real text), 2 ranks, AdamW:
    dense allreduce vs the 1-bit hook (SGD on the delivered step)."""
    from autoglm_rt.demo.corpus import load_corpus

    context, n_steps, lr, wd = 6, 600, 3e-3, 0.01
    corpus = load_corpus(400_000)
    xv, yv = _char_data(corpus, 4000, context, 7, "val")
    out: dict[str, float] = {}
    for name in ("dense", "onebit"):
        model = DDP(_CharMLP(context))
        state = None
        if name == "dense":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        else:
            state = onebit.OneBitAdamState(onebit.OneBitAdam())
            model.register_comm_hook(state, onebit.onebit_adam_hook)
            opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
        out[f"{name}_accuracy"] = char_train(model, opt, corpus, context, n_steps, rank, (xv, yv))
        if state is not None:
            out["ratio"] = state.compression_ratio
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    out["replicas_equal"] = float(all(torch.equal(gathered[0], g) for g in gathered))
    out["chance"] = float(1 / max(1, int(np.unique(yv.numpy()).size)))
    return out
