"""An obviously-correct numpy Adam/AdamW step in torch's float32 rounding order.

Every float32 operation is one numpy float32 operation (IEEE, correctly rounded, sqrt included);
the fused multiply-adds torch's CPU build performs are computed exactly: the product of two
float32 values is exact in float64, the float64 sum's rounding error is recovered with TwoSum,
and the final rounding to float32 is corrected when the float64 sum sits on a float32 tie.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 a*b+c (elementwise)."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    prod = a * b  # exact: 24 + 24 bits
    s = prod + c
    bb = s - prod
    err = (prod - (s - bb)) + (c - bb)  # TwoSum: s + err == prod + c exactly
    r = s.astype(np.float32)
    # s is exact or rounding to float32 is not a tie: one rounding, correct. At a tie, the sign
    # of err says which way the exact value lies.
    back = r.astype(np.float64)
    other = np.where(s > back, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf)))
    tie = (err != 0) & np.isfinite(s) & (np.abs(s - back) == np.abs(other.astype(np.float64) - s))
    nudged = np.where(err > 0, np.nextafter(s, np.inf), np.nextafter(s, -np.inf)).astype(np.float32)
    return np.where(tie, nudged, r).astype(np.float32)


def adam_step(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New (param, exp_avg, exp_avg_sq) after one step; ``step`` counts this step (>= 1)."""
    p, g, m, v = (np.asarray(x, dtype=np.float32).copy() for x in (p, g, m, v))
    with np.errstate(all="ignore"):
        if maximize:
            g = -g
        if weight_decay != 0 and decoupled:
            p = p * f32(1 - lr * weight_decay)
        if weight_decay != 0 and not decoupled:
            g = fma32(p, np.full_like(p, f32(weight_decay)), g)
        w = f32(1 - beta1)
        # torch's vectorised lerp: the small-weight branch from m, the other from g.
        m = fma32(np.full_like(m, w), g - m, m) if abs(w) < 0.5 else fma32(np.full_like(m, w - f32(1)), g - m, g)
        v = fma32(f32(1 - beta2) * g, g, v * f32(beta2))
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        d = np.sqrt(v) / f32(bc2**0.5) + f32(eps)
        p = p + (f32(-(lr / bc1)) * m) / d
    return p.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
