"""1-bit Adam as the formulas say it, one step at a time, in numpy float64 (the int8 wire format in
float32, as it is specified), for the tests of the hook ``autoglm_rt.onebit``. Obviously correct,
not fast. (The sign kernels' own reference is ``tests/onebit_reference.py``.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RankState:
    """One rank's hook state before or after a step (flat arrays over the bucket)."""

    m: np.ndarray | None
    v: np.ndarray
    denom: np.ndarray
    u: np.ndarray
    e: np.ndarray


def dense_steps(start_iter: int, first_refresh: int, steps: int) -> set[int]:
    """The iterations that send dense: the start, then first_refresh * 2^k (none when 0)."""
    out = set(range(min(start_iter, steps)))
    if first_refresh:
        t = first_refresh
        while t < steps:
            out.add(t)
            t *= 2
    return out


def chunks(sizes: list[int], chunk: int) -> list[slice]:
    """The chunks of a bucket of parameters of ``sizes`` elements: they restart at every parameter."""
    out, at = [], 0
    for size in sizes:
        out += [slice(a, min(at + size, a + chunk)) for a in range(at, at + size, chunk)]
        at += size
    return out


def int8_roundtrip(g: np.ndarray, chunk: int, sizes: list[int]) -> np.ndarray:
    """What one rank's int8 message decodes to: q = round(g / s), s = max|g| / 127 per chunk,
    computed in float32 as the wire format is; returned as q * s in float64 (NaN for a chunk that
    holds NaN or Inf)."""
    g32 = g.astype(np.float32)
    out = np.empty(g.size, dtype=np.float64)
    for piece in chunks(sizes, chunk):
        c = g32[piece]
        if not np.isfinite(c).all():  # a chunk with NaN or Inf decodes as NaN
            out[piece] = np.nan
            continue
        s = np.maximum(np.abs(c).max() / np.float32(127), np.finfo(np.float32).tiny).astype(np.float32)
        out[piece] = np.round(c / s).astype(np.float64) * float(s)
    return out


def fill(v: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Entries never measured (v == 0) take the mean of their parameter's measured entries."""
    v = v.copy()
    measured_all = v[v > 0]
    at = 0
    for size in sizes:
        piece = v[at : at + size]
        seen = piece > 0
        if not seen.all() and measured_all.size:
            piece[~seen] = piece[seen].mean() if seen.any() else measured_all.mean()
        at += size
    return v


def denominator(v: np.ndarray, sizes: list[int], t: int, beta2: float, eps: float) -> np.ndarray:
    return np.sqrt(fill(v, sizes) / (1 - beta2**t)) + eps


def dense_step(
    states: list[RankState],
    grads: list[np.ndarray],
    t: int,
    last_dense: int,
    start_iter: int,
    sizes: list[int],
    *,
    chunk: int,
    bits: int,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[np.ndarray, list[RankState]]:
    """(delivered, states after) of a dense step at iteration t (0-based)."""
    sent = [g if bits == 32 else int8_roundtrip(g, chunk, sizes) for g in grads]
    g = np.mean(sent, axis=0)
    s = states[0]  # m, v, denom and u are identical on every rank
    if t < start_iter:
        m = (np.zeros_like(g) if s.m is None else s.m) * beta1 + (1 - beta1) * g
        v = beta2 * s.v + (1 - beta2) * g * g
        denom = denominator(v, sizes, t + 1, beta2, eps)
        u = m / denom
        out = [RankState(m, v, denom, u, np.zeros_like(g)) for _ in states]
    else:
        keep = beta2 ** (t - last_dense)
        v = keep * s.v + (1 - keep) * g * g
        denom = denominator(v, sizes, t + 1, beta2, eps)
        u = s.u * s.denom / denom * beta1 + (1 - beta1) * g / denom
        out = [RankState(None, v, denom, u, r.e * s.denom / denom) for r in states]
    return u / (1 - beta1 ** (t + 1)), out


def sign_step(
    states: list[RankState], grads: list[np.ndarray], t: int, sizes: list[int], *, chunk: int, beta1: float
) -> tuple[np.ndarray, list[RankState], np.ndarray]:
    """(delivered, states after, ambiguous): ``ambiguous`` marks entries where some rank's c is
    so close to 0 that float32 rounding may pick the other sign (compare them separately)."""
    decoded, after, ambiguous = [], [], np.zeros(grads[0].size, dtype=bool)
    for s, g in zip(states, grads, strict=True):
        c = beta1 * s.u + (1 - beta1) * g / s.denom + s.e
        d = np.empty_like(c)
        for at in chunks(sizes, chunk):
            piece = c[at]
            scale = np.abs(piece).mean()
            d[at] = np.where(piece >= 0, scale, -scale)
            ambiguous[at] |= np.abs(piece) < 1e-5 * scale
        decoded.append(d)
        after.append(RankState(None, s.v, s.denom, np.zeros(0), c - d))
    u = np.mean(decoded, axis=0)
    for s in after:
        s.u = u
    return u / (1 - beta1 ** (t + 1)), after, ambiguous
