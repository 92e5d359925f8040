"""Records the statistic streams the phase detector tests replay: real small CPU training runs.

    PYTHONPATH=python python tests/data/record_phase_streams.py

Writes ``tests/data/phase_<run>.csv`` with one row per optimizer step: ``step, loss, grad_norm,
grad_var, nonfinite, batch, small_batch, g2_small, g2_big, b_simple``. The gradient noise scale is
estimated as in McCandlish et al. (2018), appendix A: each step's batch of B samples is split into
m micro-batches of b = B/m; ``g2_small`` is the mean squared norm of the micro-batch gradients,
``g2_big`` the squared norm of their mean; unbiased |G|^2 and tr(Sigma) estimates from the two are
smoothed by bias-corrected EMAs (0.95) and ``b_simple = tr(Sigma)/|G|^2``. Seeds are fixed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def record(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    batch: int,
    micro: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    m = batch // micro
    ema_g = ema_s = 0.0
    beta, rows = 0.95, []
    for step in range(steps):
        x, y = sample(batch)
        grads = []
        losses = []
        for i in range(m):
            xs, ys = x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]
            loss = loss_fn(model(xs), ys)
            grads.append(torch.autograd.grad(loss, params))
            losses.append(loss.item())
        mean = [torch.stack([g[j] for g in grads]).mean(0) for j in range(len(params))]
        g2_small = sum(sum(float((gj.double() ** 2).sum()) for gj in g) for g in grads) / m
        g2_big = sum(float((gj.double() ** 2).sum()) for gj in mean)
        g2_est = (batch * g2_big - micro * g2_small) / (batch - micro)
        s_est = (g2_small - g2_big) / (1 / micro - 1 / batch)
        ema_g = beta * ema_g + (1 - beta) * g2_est
        ema_s = beta * ema_s + (1 - beta) * s_est
        corr = 1 - beta ** (step + 1)
        g_hat, s_hat = ema_g / corr, ema_s / corr
        b_simple = s_hat / g_hat if g_hat > 0 else math.nan
        flat = torch.cat([g.reshape(-1) for g in mean]).double()
        for p, g in zip(params, mean, strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        rows.append(
            {
                "step": step,
                "loss": sum(losses) / m,
                "grad_norm": math.sqrt(g2_big),
                "grad_var": float(flat.var(unbiased=False)),
                "nonfinite": int((~torch.isfinite(flat)).sum()),
                "batch": batch,
                "small_batch": micro,
                "g2_small": g2_small,
                "g2_big": g2_big,
                "b_simple": b_simple,
            }
        )
    out = HERE / f"phase_{name}.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {out} ({len(rows)} steps, final loss {rows[-1]['loss']:.4g}, b_simple {rows[-1]['b_simple']:.4g})")


def mlp_regression() -> None:
    """Teacher-student regression with label noise: fast descent, then a plateau at the noise floor."""
    torch.manual_seed(0)
    d = 32
    teacher = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 1))
    for p in teacher.parameters():
        p.requires_grad_(False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d)
        return x, teacher(x) + 0.3 * torch.randn(n, 1)

    model = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    record("mlp_regression", model, opt, sample, nn.functional.mse_loss, steps=800, batch=64, micro=16)


def cnn_classification() -> None:
    """A small CNN on synthetic 12x12 images (class-dependent templates plus noise), Adam with
    cosine decay: the loss falls, flattens, and the noise scale rises as the LR decays."""
    torch.manual_seed(1)
    classes = 6
    templates = torch.randn(classes, 1, 12, 12)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,))
        x = 0.6 * templates[y] + torch.randn(n, 1, 12, 12)
        return x, y

    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 9, classes),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=700)
    record(
        "cnn_classification",
        model,
        opt,
        sample,
        nn.functional.cross_entropy,
        steps=700,
        batch=64,
        micro=16,
        scheduler=sched,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    mlp_regression()
    cnn_classification()
