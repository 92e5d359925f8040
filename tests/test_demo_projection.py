"""autoglm_rt.demo.projection: the alpha-beta step-time table against hand-computed values and an
independent numpy evaluation of the formulas; its inputs from a run's records; the report's table;
and demo.step_costs, which measures those inputs."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt.ddp import TopKState, topk_hook
from autoglm_rt.demo.projection import (
    DEFAULT_GBITS,
    DEFAULT_LATENCY_S,
    DEFAULT_RANKS,
    NETNS_CHECK,
    inputs_from_run,
    projected_step_times,
    projection_document,
    relative_error,
)
from autoglm_rt.demo.report import projection_lines, render_markdown
from autoglm_rt.demo.step_costs import HookTimer, callback_seconds, compute_seconds, sign_callback_seconds

MEASURED = {"compute_s": 0.2, "compress_s": 0.01, "decompress_s": 0.001, "dense_bytes": 1e6, "message_bytes": 2e4}


def test_two_ranks_one_gbit_by_hand() -> None:
    (row,) = projected_step_times(**MEASURED, latency_s=0.0, gbits=[1.0], ranks=[2])
    # Ring all-reduce at P=2 moves 2*(1/2)*N bytes: 1e6 B / 1.25e8 B/s = 8 ms.
    assert row.allreduce_step_s == pytest.approx(0.2 + 0.008)
    # All-gather at P=2 moves one message: 2e4 / 1.25e8 = 0.16 ms; two scatter-adds of 1 ms.
    assert row.topk_step_s == pytest.approx(0.2 + 0.01 + 0.00016 + 0.002)
    (with_callbacks,) = projected_step_times(**MEASURED, callback_s=0.003, latency_s=0.0, gbits=[1.0], ranks=[2])
    assert with_callbacks.topk_step_s == pytest.approx(row.topk_step_s + 0.003)  # once per step, whatever P
    assert with_callbacks.allreduce_step_s == row.allreduce_step_s
    assert row.speedup == pytest.approx(row.allreduce_step_s / row.topk_step_s)


def test_latency_and_buckets_and_the_default_grid() -> None:
    rows = projected_step_times(**MEASURED, latency_s=1e-4, buckets=3)
    assert [(r.gbit_s, r.ranks) for r in rows] == [(g, p) for g in DEFAULT_GBITS for p in DEFAULT_RANKS]
    r = next(r for r in rows if r.gbit_s == 10.0 and r.ranks == 1024)
    bw = 10e9 / 8
    assert r.allreduce_step_s == pytest.approx(0.2 + 3 * 2 * 1023 * 1e-4 + 2 * 1023 / 1024 * 1e6 / bw)
    assert r.topk_step_s == pytest.approx(0.2 + 0.01 + 3 * 1023 * 1e-4 + 1023 * 2e4 / bw + 1024 * 0.001)
    # Fixed-k all-gather grows with P, ring all-reduce does not: the gain shrinks at scale.
    one_gbit = [r.speedup for r in rows if r.gbit_s == 1.0]
    assert one_gbit[0] > one_gbit[-1]


def test_bad_inputs_are_rejected() -> None:
    for bad in (
        {"compute_s": -1.0},
        {"dense_bytes": float("nan")},
        {"callback_s": -0.1},
        {"buckets": 0},
        {"ranks": [1]},
        {"gbits": [0.0]},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            projected_step_times(**(MEASURED | bad))  # type: ignore[arg-type]
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="measured_s"):
        relative_error(1.0, 0.0)


# -- the demo's projection from a run's own records ---------------------------------------------------
COSTS = {"compute_s": 0.05, "decompress_s": 0.0004, "callback_s": 0.0015, "dense_bytes": 1.6e6, "buckets": 2}


def _run_and_steps(n: int, dense_steps: int = 2, warmup_steps: int = 4) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = {"step_costs": dict(COSTS), "config": {"dense_steps": dense_steps, "warmup_steps": warmup_steps}}
    steps = [
        # Dense steps: a long hook (the all-reduce) and all the bytes; warm-up: falling; then settled.
        {"step": i, "hook_seconds": 0.5 if i < dense_steps else 0.01 + 0.001 * (i % 3),
         "bytes_communicated_step": 1.6e6 if i < dense_steps else (4e4 if i >= dense_steps + warmup_steps else 2e5)}
        for i in range(n)
    ]  # fmt: skip
    return run, steps


def reference_rows(m: dict[str, float], latency: float) -> np.ndarray:
    """[gbit, P, allreduce, topk] per grid point, straight from the alpha-beta formulas."""
    out = []
    for g in DEFAULT_GBITS:
        bw = g * 1e9 / 8
        for p in DEFAULT_RANKS:
            ar = m["compute_s"] + m["buckets"] * 2 * (p - 1) * latency + 2 * (p - 1) / p * m["dense_bytes"] / bw
            tk = (m["compute_s"] + m["compress_s"] + m["buckets"] * (p - 1) * latency
                  + (p - 1) * m["message_bytes"] / bw + m["callback_s"] + p * m["decompress_s"])  # fmt: skip
            out.append([g, p, ar, tk])
    return np.array(out)


def test_inputs_come_from_the_settled_compressed_steps() -> None:
    run, steps = _run_and_steps(12)
    got = inputs_from_run(run, steps)
    assert got is not None and got["settled"] and got["steps_used"] == 6  # steps 6..11
    settled = steps[6:]
    assert got["model"]["compress_s"] == np.median([s["hook_seconds"] for s in settled])
    assert got["model"]["message_bytes"] == 4e4
    assert {k: got["model"][k] for k in COSTS} == COSTS


def test_a_run_too_short_to_settle_uses_its_warm_up_steps_and_says_so() -> None:
    run, steps = _run_and_steps(5)
    got = inputs_from_run(run, steps)
    assert got is not None and not got["settled"] and got["steps_used"] == 3
    assert got["model"]["message_bytes"] == 2e5
    assert inputs_from_run(run, steps[:2]) is None  # dense steps only: nothing compressed to measure
    assert inputs_from_run({"config": run["config"]}, steps) is None  # no step costs (an older result)
    assert inputs_from_run({**run, "step_costs": None}, steps) is None


def test_projection_document_matches_the_formulas_on_the_whole_grid() -> None:
    run, steps = _run_and_steps(12)
    doc = projection_document(run, steps)
    assert doc is not None and doc["check"] == NETNS_CHECK and doc["latency_s"] == DEFAULT_LATENCY_S
    got = np.array([[r["gbit_s"], r["ranks"], r["allreduce_step_s"], r["topk_step_s"]] for r in doc["rows"]])
    ref = reference_rows(doc["model"], DEFAULT_LATENCY_S)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose([r["speedup"] for r in doc["rows"]], ref[:, 2] / ref[:, 3], rtol=1e-12)


def test_the_report_table_shows_every_projected_row() -> None:
    run, steps = _run_and_steps(12)
    doc = projection_document(run, steps)
    assert doc is not None
    lines = projection_lines(doc)
    assert lines[0] == "## Projected step time"
    text = "\n".join(lines)
    check = NETNS_CHECK
    errors = (
        f"all-reduce {check['allreduce_error']:+.1%}, 1-bit {check['onebit_error']:+.1%}, "
        f"top-k {check['topk_error']:+.1%}"
    )
    assert errors in text
    assert "after the density warm-up" in text and "50.0 ms" in text  # compute_s of this run
    ref = reference_rows(doc["model"], DEFAULT_LATENCY_S)
    table = [line for line in lines if re.match(r"^\| \d+ \|", line)]
    assert [int(line.split("|")[1]) for line in table] == list(DEFAULT_RANKS)
    for line in table:
        p = int(line.split("|")[1])
        cells = re.findall(r"([0-9.]+) / ([0-9.]+) \| ([0-9.]+)x", line)
        assert len(cells) == len(DEFAULT_GBITS)
        for g, (ar, tk, speedup) in zip(DEFAULT_GBITS, cells, strict=True):
            (row,) = ref[(ref[:, 0] == g) & (ref[:, 1] == p)]
            assert float(ar) == pytest.approx(row[2] * 1e3, abs=0.051)
            assert float(tk) == pytest.approx(row[3] * 1e3, abs=0.051)
            assert float(speedup) == pytest.approx(row[2] / row[3], abs=0.0051)
    short = projection_document(*_run_and_steps(5))
    assert short is not None and "still in the density warm-up" in "\n".join(projection_lines(short))


def test_markdown_has_the_projection_only_when_measured() -> None:
    run, steps = _run_and_steps(12)
    base = {"val_loss": 2.0, "bytes_communicated": 1, "wall_seconds": 1.0, "peak_memory_bytes": 1, "energy_joules": 0.0}
    doc: dict[str, Any] = {"runs": {"autoglm_rt": {**base, **run}}, "meta": {}}
    assert "Projected step time" not in render_markdown(doc)
    doc["projection"] = projection_document(run, steps)
    assert "## Projected step time" in render_markdown(doc)


# -- demo.step_costs: the measurements behind the inputs ----------------------------------------------
@pytest.mark.usefixtures("single_rank_group")
def test_hook_timer_and_compute_seconds_on_a_real_ddp_model() -> None:
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    timer = HookTimer(topk_hook)
    model.register_comm_hook(TopKState(density=0.1, start_iter=0), timer.hook)
    x = torch.randn(16, 64)

    def loss_fn(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        return m(xb).square().mean()

    loss_fn(model, x).backward()
    assert timer.take() > 0 and timer.take() == 0.0  # taken once
    numel = sum(p.numel() for p in model.parameters())
    assert sum(timer.bucket_numels.values()) == numel
    before = [p.detach().clone() for p in model.parameters()]
    seconds = compute_seconds(model, loss_fn, [x[:8], x[8:]], repeats=3)
    assert seconds > 0 and timer.take() == 0.0  # under no_sync the hook never ran
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_callback_seconds_times_both_parts_and_rejects_bad_input() -> None:
    fixed, per_rank = callback_seconds([10_000, 5_000], 0.01, repeats=2)
    assert fixed > 0 and per_rank > 0
    for numels, density in (([], 0.01), ([100], 0.0), ([100], 1.5)):
        with pytest.raises(ValueError, match="density"):
            callback_seconds(numels, density)
    with pytest.raises(ValueError, match="repeats"):
        compute_seconds(nn.Linear(2, 2), lambda m, b: m(b).sum(), [], repeats=1)
    fixed, per_rank = sign_callback_seconds([10_000, 5_000], 2048, repeats=2)
    assert fixed >= 0 and per_rank >= 0 and fixed + per_rank > 0  # the split of a real time
    for numels, chunk in (([], 2048), ([100], 0)):
        with pytest.raises(ValueError, match="chunk"):
            sign_callback_seconds(numels, chunk)


def test_the_report_names_the_hook_the_run_used() -> None:
    run, steps = _run_and_steps(12)
    topk = projection_document(run, steps)
    onebit = projection_document({**run, "config": {**run["config"], "compressor": "onebit"}}, steps)
    assert topk is not None and onebit is not None
    assert topk["hook"] == "top-k" and onebit["hook"] == "1-bit"
    assert onebit["rows"] == topk["rows"]  # the same fixed-size all-gather model
    text = "\n".join(projection_lines(onebit))
    assert "all-reduce / 1-bit (ms)" in text and "the 1-bit hook" in text
    assert "all-reduce / top-k (ms)" in "\n".join(projection_lines(topk))
