"""Projected step time at other link speeds and rank counts, from measured figures and an
alpha-beta model of the two collectives the runs use.

- Dense: ring all-reduce of ``dense_bytes`` per step in ``buckets`` collectives:
  ``2 (P-1) alpha + 2 (P-1)/P * dense_bytes / B`` (bandwidth-optimal; Thakur et al. 2005).
- Top-k: ring all-gather of each rank's fixed-size message (``message_bytes`` per step):
  ``(P-1) alpha + (P-1) * message_bytes / B``, plus the hook's callbacks: a fixed part paid once
  per step whatever P (``callback_s``: zeroing each bucket before the scatter-add) and the
  scatter-add and norm gather of the P gathered messages, which grow with P: ``P * decompress_s``
  where ``decompress_s`` is the measured time to apply one rank's message. The compression
  kernel's time is paid once per step whatever P.

No overlap of communication with the backward pass is assumed (an upper bound on both). The
function is pure: numbers in, rows out, so the report and tests can call it directly.

``NETNS_CHECK`` is the model's error at P = 2 against a measured step across a shaped link
(``benches/projection_check.py``; the figures and their command are in ``benches/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any

__all__ = [
    "DEFAULT_GBITS",
    "DEFAULT_RANKS",
    "NETNS_CHECK",
    "ProjectionRow",
    "inputs_from_run",
    "projected_step_times",
    "projection_document",
    "relative_error",
]

DEFAULT_GBITS: tuple[float, ...] = (1.0, 10.0, 100.0)
DEFAULT_RANKS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_LATENCY_S = 50e-6


#: The model against ``benches/ddp_netns.py`` at P = 2, 1 Gbit/s (2 gloo ranks in network
#: namespaces, 67 MB of gradients): relative error (projected - measured) / measured per collective,
#: with the hook's callbacks (bucket zeroing, scatter-add, norm gather) timed and modelled.
NETNS_CHECK: dict[str, float | str] = {
    "ranks": 2,
    "gbit_s": 1.0,
    "allreduce_error": -0.055,
    "onebit_error": 0.077,
    "topk_error": -0.122,
    "command": "PYTHONPATH=python python benches/projection_check.py --rate 1gbit --hook onebit|topk",
    "note": (
        "Measured on one quiet run (load 0.4); earlier runs gave top-k -33.4% and, on a busier machine "
        "(load 7 on 2 cores), -3.2%: at P = 2 the compressed figures are uncertain by tens of percent."
    ),
}


@dataclass(frozen=True)
class ProjectionRow:
    gbit_s: float
    ranks: int
    allreduce_step_s: float  # compute + dense ring all-reduce
    topk_step_s: float  # compute + compression + all-gather + callbacks (fixed + P scatter-adds)
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
    callback_s: float = 0.0,
    buckets: int = 1,
    latency_s: float = DEFAULT_LATENCY_S,
    gbits: Sequence[float] = DEFAULT_GBITS,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> list[ProjectionRow]:
    """Rows of the projected step time, one per (link speed, rank count).

    compute_s: measured step time without communication (the ``no_comm`` floor).
    compress_s: measured top-k kernel time per step (all buckets). decompress_s: measured
    scatter-add time of one rank's message per step (all buckets). dense_bytes: gradient bytes
    per step. message_bytes: bytes one rank sends per step under top-k. callback_s: measured
    fixed callback time per step (zeroing the buckets), whatever P. buckets: collectives per
    step (each pays the latency). latency_s: per-message latency alpha. gbits: link speeds in
    Gbit/s. ranks: P values (>= 2). Raises ValueError on negative, NaN or empty inputs."""
    compute_s = _check("compute_s", compute_s)
    compress_s = _check("compress_s", compress_s)
    decompress_s = _check("decompress_s", decompress_s)
    dense_bytes = _check("dense_bytes", dense_bytes)
    message_bytes = _check("message_bytes", message_bytes)
    callback_s = _check("callback_s", callback_s)
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
            topk_step = compute_s + compress_s + gather + callback_s + p * decompress_s
            rows.append(ProjectionRow(float(g), p, allreduce_step, topk_step, allreduce_step / topk_step))
    return rows


def relative_error(projected_s: float, measured_s: float) -> float:
    """(projected - measured) / measured: how far the model is from a measurement."""
    return (_check("projected_s", projected_s) - _check("measured_s", measured_s, positive=True)) / measured_s


#: The keys of ``step_costs`` in the autoglm_rt run's result.json (``demo.step_costs``).
STEP_COST_KEYS = ("compute_s", "decompress_s", "callback_s", "dense_bytes", "buckets")


def inputs_from_run(run: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``{"model": kwargs, "steps_used": n, "settled": bool}``: keyword arguments of
    :func:`projected_step_times` from a top-k run's result ``step_costs`` (measured after
    training) and, over its compressed steps, the median time in the hook (``hook_seconds``, the
    compression) and bytes sent per step. Only the ``n`` steps after the density warm-up count
    when there are any (``settled``). None when the run has no step costs or no compressed step."""
    costs = run.get("step_costs")
    if not isinstance(costs, Mapping) or any(k not in costs for k in STEP_COST_KEYS):
        return None
    cfg = run.get("config", {})
    dense_steps = int(cfg.get("dense_steps", 0))
    settled_from = dense_steps + int(cfg.get("warmup_steps", 0))
    compressed = [r for r in steps if r["step"] >= dense_steps and "hook_seconds" in r]
    settled = [r for r in compressed if r["step"] >= settled_from]
    used = settled or compressed
    if not used:
        return None
    model = {
        "compute_s": float(costs["compute_s"]),
        "compress_s": median(float(r["hook_seconds"]) for r in used),
        "decompress_s": float(costs["decompress_s"]),
        "callback_s": float(costs["callback_s"]),
        "dense_bytes": float(costs["dense_bytes"]),
        "message_bytes": median(float(r["bytes_communicated_step"]) for r in used),
        "buckets": int(costs["buckets"]),
    }
    return {"model": model, "steps_used": len(used), "settled": bool(settled)}


def projection_document(run: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the demo's report shows: :func:`inputs_from_run`'s inputs, the hook's name ("1-bit" or
    "top-k"; both send a fixed-size message per rank), the latency assumed, the rows of
    :func:`projected_step_times` on the default grid as dicts, and ``NETNS_CHECK`` (measured with
    both hooks)."""
    inputs = inputs_from_run(run, steps)
    if inputs is None:
        return None
    rows = projected_step_times(**inputs["model"])
    hook = "1-bit" if run.get("config", {}).get("compressor") == "onebit" else "top-k"
    return {
        **inputs,
        "hook": hook,
        "latency_s": DEFAULT_LATENCY_S,
        "rows": [asdict(r) for r in rows],
        "check": dict(NETNS_CHECK),
    }
