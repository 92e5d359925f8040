"""The fused CPU Adam/AdamW step: one native call, one pass over memory, for a whole optimizer.

:func:`fused_adam_step` steps a ``torch.optim.Adam`` or ``torch.optim.AdamW`` in place with the
native kernel instead of torch's per-op loop. The optimizer's state keeps torch's layout
(``step`` as a float32 0-d tensor, ``exp_avg``, ``exp_avg_sq``), so state dicts, checkpoints and
``optimizer.step()`` can be mixed freely.

Numerics: torch's rounding order (see ``csrc/include/autoglm_rt/kernels/adamw.h``).
``exp_avg``/``exp_avg_sq`` are bit-identical with torch's CPU step (``foreach=False`` and
``True``); a parameter may differ by 1 ulp per step because torch's CPU float32 ``sqrt`` is not
correctly rounded (about 20% of its results are 1 ulp off) while the kernel's is. The kernel's
own results do not depend on the thread count or on AVX2 versus the scalar path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autoglm_rt._native import _C

_UNSUPPORTED_FLAGS = ("amsgrad", "capturable", "differentiable")


@dataclass(frozen=True)
class AdamHyper:
    """One parameter group's hyper-parameters as the kernel takes them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool

    @classmethod
    def of_group(cls, group: dict[str, Any], decoupled_default: bool) -> AdamHyper:
        """Reads a torch Adam/AdamW param group; ValueError for options the kernel lacks."""
        for flag in _UNSUPPORTED_FLAGS:
            if group.get(flag, False):
                raise ValueError(f"fused_adam_step: {flag}=True is not supported; expected {flag}=False")
        beta1, beta2 = group["betas"]
        return cls(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", decoupled_default)),
            maximize=bool(group.get("maximize", False)),
        )


def check_adam(optimizer: Any) -> bool:
    """True for AdamW semantics, False for Adam; TypeError for any other optimizer."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"expected a torch.optim.Adam or torch.optim.AdamW, got {type(optimizer).__qualname__}")
    return isinstance(optimizer, torch.optim.AdamW)


def init_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any]:
    """The parameter's state, created as torch's Adam creates it on its first step, except that
    a bfloat16 parameter gets float32 moments."""
    state = optimizer.state[param]
    if len(state) == 0:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
    return state


def params_with_grad(group: dict[str, Any], *, cuda_ok: bool = False) -> list[torch.Tensor]:
    """The group's parameters that have a gradient, in group order, checked before anything is
    changed: dense float32 parameter and gradient of one shape, on the CPU (or CUDA when
    ``cuda_ok``: the host tier stages those). TypeError/ValueError otherwise."""
    out = []
    for i, p in enumerate(group["params"]):
        grad = p.grad
        if grad is None:
            continue
        name = f"params[{i}]"
        if grad.is_sparse:
            raise TypeError(f"{name}: sparse gradients are not supported; expected dense gradients")
        if p.dtype not in (torch.float32, torch.bfloat16) or grad.dtype != p.dtype:
            raise TypeError(
                f"{name}: expected float32 or bfloat16 parameter and a gradient of the same dtype, "
                f"got {p.dtype} and {grad.dtype}"
            )
        if grad.shape != p.shape:
            raise ValueError(
                f"{name}: gradient shape {tuple(grad.shape)} differs from the parameter's {tuple(p.shape)}"
            )
        if p.device.type != "cpu" and not (cuda_ok and p.is_cuda):
            raise TypeError(f"{name}: expected a CPU parameter, got one on {p.device}")
        if not p.is_contiguous():
            raise TypeError(f"{name}: expected a contiguous parameter (it is updated in place)")
        out.append(p)
    return out


def step_params(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    hyper: AdamHyper,
    *,
    host_params: Sequence[torch.Tensor] | None = None,
    host_grads: Sequence[torch.Tensor] | None = None,
    scalar: bool = False,
) -> None:
    """Advances ``state["step"]`` and applies one native step to ``params`` (which must already
    have state). ``host_params``/``host_grads`` replace the parameters and gradients the kernel
    reads and writes (the host tier's staging copies of CUDA tensors)."""
    if not params:
        return
    states = [optimizer.state[p] for p in params]
    # The counts after this step, in float32 as torch keeps them; stored only once the kernel ran.
    after = [s["step"] + 1 for s in states]
    steps = [float(t) for t in after]
    apply_step(
        list(host_params) if host_params is not None else [p.detach() for p in params],
        list(host_grads) if host_grads is not None else [p.grad.contiguous() for p in params],  # type: ignore[union-attr]
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        steps,
        hyper,
        scalar=scalar,
    )
    for s, t in zip(states, after, strict=True):
        s["step"].copy_(t)


def apply_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[float],
    hyper: AdamHyper,
    *,
    scalar: bool = False,
) -> None:
    """The native kernel on explicit tensors (pieces of parameters are fine: every element is
    updated by itself); ``steps`` are the counts after this step; ``scalar`` forces the portable
    oracle path."""
    _C.adam_step(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(steps),
        hyper.lr,
        hyper.beta1,
        hyper.beta2,
        hyper.eps,
        hyper.weight_decay,
        hyper.decoupled_weight_decay,
        hyper.maximize,
        scalar,
    )


def fused_adam_step(optimizer: Any, *, scalar: bool = False) -> None:
    """One Adam/AdamW step of ``optimizer`` with the native kernel (CPU tensors; parameters
    float32, or bfloat16 with float32 moments computed in float32 and rounded once per step).

    Raises TypeError for another optimizer, other dtypes, CUDA or sparse tensors, ValueError for
    ``amsgrad``/``capturable``/``differentiable``. ``scalar=True`` runs the scalar oracle path.
    Steps are taken under ``torch.no_grad()``.
    """
    decoupled = check_adam(optimizer)
    # Every group is checked before any is stepped, so bad input changes nothing.
    plan = [(params_with_grad(g), AdamHyper.of_group(g, decoupled)) for g in optimizer.param_groups]
    with torch.no_grad():
        for params, hyper in plan:
            for p in params:
                init_state(optimizer, p)
            step_params(optimizer, params, hyper, scalar=scalar)
