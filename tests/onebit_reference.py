"""Obviously-correct numpy references for the 1-bit (sign) kernels.

Two references for the scales: ``scales_exact`` (math.fsum: the exactly rounded float64 mean,
the meaning of "mean of |c| summed in float64") and ``scales_in_documented_order`` (the float64
sum in the order autoglm_rt/kernels/onebit.h fixes, which the kernels must match bit for bit).
The two agree except, rarely, by one float32 ulp.
"""

from __future__ import annotations

import math

import numpy as np

SEGMENT = 2048  # kSignSegment
LANES = 32  # kSignLanes


def combined(x: np.ndarray, error: np.ndarray | None) -> np.ndarray:
    """c = x + error in float32 (x itself without error feedback), flattened."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if error is None:
        return x.copy()
    return (x + np.asarray(error, dtype=np.float32).reshape(-1)).astype(np.float32)


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]


def pack_signs(c: np.ndarray) -> np.ndarray:
    """Bit i % 8 of byte i // 8 is c[i] >= 0 (False for NaN, True for -0.0); padding bits 0."""
    with np.errstate(invalid="ignore"):
        return np.packbits(c >= 0, bitorder="little")


def unpack_signs(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), bitorder="little")[:n].astype(bool)


def scales_exact(c: np.ndarray, chunk: int) -> np.ndarray:
    """Per chunk: math.fsum(|c|) / length in float64, rounded to float32."""
    mags = np.abs(c.astype(np.float64))
    out = [math.fsum(mags[lo:hi]) / (hi - lo) for lo, hi in chunk_bounds(c.size, chunk)]
    return np.array(out, dtype=np.float64).astype(np.float32)


def _ordered_sums(mags: np.ndarray, length: int) -> np.ndarray:
    """Float64 sums of the rows of ``mags`` ([chunks, length]) in the documented order: segments
    of SEGMENT, lane l adding elements l, l + 32, ... in turn, the lane tree, segments in order.
    Zero padding changes nothing: every partial sum is >= +0.0 or NaN."""
    rows = mags.shape[0]
    total = np.zeros(rows)
    for s0 in range(0, length, SEGMENT):
        seg = mags[:, s0 : min(length, s0 + SEGMENT)]
        padded = np.zeros((rows, -(-seg.shape[1] // LANES) * LANES))
        padded[:, : seg.shape[1]] = seg
        lanes = np.zeros((rows, LANES))
        for t in range(padded.shape[1] // LANES):
            lanes = lanes + padded[:, t * LANES : (t + 1) * LANES]
        off = LANES // 2
        while off >= 1:
            lanes[:, :off] = lanes[:, :off] + lanes[:, off : 2 * off]
            off //= 2
        total = total + lanes[:, 0]
    return total


def scales_in_documented_order(c: np.ndarray, chunk: int) -> np.ndarray:
    n = c.size
    mags = np.abs(c.astype(np.float64))
    full = n // chunk
    out = []
    if full:
        sums = _ordered_sums(mags[: full * chunk].reshape(full, chunk), chunk)
        out.append((sums / chunk).astype(np.float32))
    if n % chunk:
        rest = mags[full * chunk :].reshape(1, -1)
        out.append((_ordered_sums(rest, rest.shape[1]) / rest.shape[1]).astype(np.float32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def decoded(bits: np.ndarray, scales: np.ndarray, n: int, chunk: int) -> np.ndarray:
    """d_i = +scales[i // chunk] where bit i is set, else -scales[i // chunk] (float32)."""
    s = np.repeat(np.asarray(scales, dtype=np.float32), chunk)[:n]
    return np.where(unpack_signs(bits, n), s, -s).astype(np.float32)


def compress_reference(
    x: np.ndarray, error: np.ndarray | None, chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bits, scales in the documented order, error after = c - d in float32)."""
    c = combined(x, error)
    bits = pack_signs(c)
    scales = scales_in_documented_order(c, chunk)
    with np.errstate(invalid="ignore"):
        after = (c - decoded(bits, scales, c.size, chunk)).astype(np.float32)
    return bits, scales, after


def decompress_reference(
    bits_rows: np.ndarray, scales_rows: np.ndarray, n: int, chunk: int, scale: float
) -> np.ndarray:
    """float32(scale) * (0 + d_0 + d_1 + ... + d_(W-1)), every step in float32, rows in order."""
    acc = np.zeros(n, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for bits, scales in zip(np.atleast_2d(bits_rows), np.atleast_2d(scales_rows), strict=True):
            acc = (acc + decoded(bits, scales, n, chunk)).astype(np.float32)
        return (np.float32(scale) * acc).astype(np.float32)


def adam_momentum(g: np.ndarray, denom: np.ndarray, u: np.ndarray, beta1: float) -> np.ndarray:
    """1-bit Adam's momentum before error feedback, flattened: float32(beta1) * u +
    float32(1 - beta1) * (g / denom), every operation in float32 and rounded once (numpy never
    fuses a multiply-add), 1 - beta1 computed in float64 first."""
    g32, d32, u32 = (np.asarray(a, dtype=np.float32).reshape(-1) for a in (g, denom, u))
    with np.errstate(all="ignore"):
        p = (g32 / d32).astype(np.float32)
        return ((np.float32(beta1) * u32).astype(np.float32) + (np.float32(1.0 - beta1) * p).astype(np.float32)).astype(
            np.float32
        )


def adam_decompress_reference(
    bits_rows: np.ndarray, scales_rows: np.ndarray, u: np.ndarray, n: int, chunk: int, scale: float, bias: float
) -> tuple[np.ndarray, np.ndarray]:
    """(out, u after) of the 1-bit Adam decompress: avg as decompress_reference; u = avg where avg is
    finite, else u as it was (bit for bit); out = avg * float32(bias) in float32."""
    avg = decompress_reference(bits_rows, scales_rows, n, chunk, scale)
    u_after = np.asarray(u, dtype=np.float32).reshape(-1).copy()
    finite = np.isfinite(avg)
    u_after[finite] = avg[finite]
    with np.errstate(invalid="ignore", over="ignore"):
        return (avg * np.float32(bias)).astype(np.float32), u_after
