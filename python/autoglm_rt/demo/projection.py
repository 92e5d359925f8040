"""Projected step time at other link speeds and rank counts, from measured figures and an
alpha-beta model of the two collectives the runs use.

- Dense: ring all-reduce of ``dense_bytes`` per step in ``buckets`` collectives:
  ``2 (P-1) alpha + 2 (P-1)/P * dense_bytes / B`` (bandwidth-optimal; Thakur et al. 2005).
- Top-k: ring all-gather of each rank's fixed-size message (``message_bytes`` per step):
  ``(P-1) alpha + (P-1) * message_bytes / B``, plus the scatter-add of the P gathered messages,
  which grows with P: ``P * decompress_s`` where ``decompress_s`` is the measured time to apply
  one rank's message. The compression kernel's time is paid once per step whatever P.

No overlap of communication with the backward pass is assumed (an upper bound on both). The
function is pure: numbers in, rows out, so the report and tests can call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_GBITS", "DEFAULT_RANKS", "ProjectionRow", "projected_step_times", "relative_error"]

DEFAULT_GBITS: tuple[float, ...] = (1.0, 10.0, 100.0)
DEFAULT_RANKS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ProjectionRow:
    gbit_s: float
    ranks: int
    allreduce_step_s: float  # compute + dense ring all-reduce
    topk_step_s: float  # compute + compression + all-gather + scatter-add
    speedup: float  # allreduce_step_s / topk_step_s


def _check(name: str, value: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return float(value)


def projected_step_times(
    *,
    compute_s: float,
    compress_s: float,
    decompress_s: float,
    dense_bytes: float,
    message_bytes: float,
    buckets: int = 1,
    latency_s: float = 50e-6,
    gbits: Sequence[float] = DEFAULT_GBITS,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> list[ProjectionRow]:
    """Rows of the projected step time, one per (link speed, rank count).

    compute_s: measured step time without communication (the ``no_comm`` floor).
    compress_s: measured top-k kernel time per step (all buckets). decompress_s: measured
    scatter-add time of one rank's message per step (all buckets). dense_bytes: gradient bytes
    per step. message_bytes: bytes one rank sends per step under top-k. buckets: collectives per
    step (each pays the latency). latency_s: per-message latency alpha. gbits: link speeds in
    Gbit/s. ranks: P values (>= 2). Raises ValueError on negative, NaN or empty inputs."""
    compute_s = _check("compute_s", compute_s)
    compress_s = _check("compress_s", compress_s)
    decompress_s = _check("decompress_s", decompress_s)
    dense_bytes = _check("dense_bytes", dense_bytes)
    message_bytes = _check("message_bytes", message_bytes)
    latency_s = _check("latency_s", latency_s)
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets: expected an int >= 1, got {buckets!r}")
    if not gbits or not ranks:
        raise ValueError("gbits/ranks: expected at least one value each")
    rows = []
    for g in gbits:
        bytes_per_s = _check("gbits", g, positive=True) * 1e9 / 8
        for p in ranks:
            if isinstance(p, bool) or not isinstance(p, int) or p < 2:
                raise ValueError(f"ranks: expected ints >= 2, got {p!r}")
            dense = buckets * 2 * (p - 1) * latency_s + 2 * (p - 1) / p * dense_bytes / bytes_per_s
            gather = buckets * (p - 1) * latency_s + (p - 1) * message_bytes / bytes_per_s
            allreduce_step = compute_s + dense
            topk_step = compute_s + compress_s + gather + p * decompress_s
            rows.append(ProjectionRow(float(g), p, allreduce_step, topk_step, allreduce_step / topk_step))
    return rows


def relative_error(projected_s: float, measured_s: float) -> float:
    """(projected - measured) / measured: how far the model is from a measurement."""
    return (_check("projected_s", projected_s) - _check("measured_s", measured_s, positive=True)) / measured_s
