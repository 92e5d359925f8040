"""The 1-bit Adam hook (autoglm_rt.onebit): its formulas step by step on 2 ranks against
tests/onebit_adam_reference.py, non-finite gradients, exact resume under DDP, accuracy on real text
against dense AdamW, and bad settings."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
import torch

from autoglm_rt import hook_support, onebit
from tests import onebit_adam_reference as ref
from tests import onebit_scenarios
from tests.ddp_harness import run_on_two_ranks
from tests.test_ddp_compression import METRIC_KEYS
from tests.test_ddp_topk import FakeBucket

SIZES = [math.prod(s) for s in onebit_scenarios.SHAPES]
N = sum(SIZES)


def _rank_state(tables_before: dict[str, dict[int, np.ndarray]]) -> ref.RankState | None:
    tables = {name: t[0].astype(np.float64) for name, t in tables_before.items() if t}
    if "v" not in tables:
        return None
    return ref.RankState(tables.get("m"), tables["v"], tables["denom"], tables["u"], tables["e"])


def _close(got: np.ndarray, want: np.ndarray, scale: float, mask: np.ndarray | None = None) -> bool:
    keep = np.ones(got.shape, dtype=bool) if mask is None else ~mask
    return bool(np.allclose(got[keep], want[keep], rtol=1e-4, atol=1e-5 * scale, equal_nan=True))


@pytest.mark.distributed
@pytest.mark.parametrize("bits", [8, 32])
def test_the_hook_follows_the_1bit_adam_formulas_step_by_step(bits: int) -> None:
    by_rank = run_on_two_ranks(functools.partial(onebit_scenarios.steps, dense_bits=bits), timeout=120)
    b1, b2, eps, chunk, start, first = 0.9, 0.99, 1e-8, 256, 2, 4
    dense = ref.dense_steps(start, first, len(by_rank[0]))
    assert dense == {0, 1, 4, 8, 16}
    assert [onebit.OneBitAdam(start_iter=start, refresh_first=first).is_dense(t) for t in range(18)] == [
        t in dense for t in range(18)
    ]
    last_dense = -1
    ambiguous_total = 0
    for t in range(len(by_rank[0])):
        r0, r1 = by_rank[0][t], by_rank[1][t]
        # Every rank applies the same update, bit for bit.
        assert np.array_equal(r0["delivered"].view(np.int32), r1["delivered"].view(np.int32)), t
        grads = [onebit_scenarios.gradient(t, r).double().numpy() for r in (0, 1)]
        states = [_rank_state(r["before"]) for r in (r0, r1)]
        if t == 0:
            states = [ref.RankState(None, np.zeros(N), np.zeros(N), np.zeros(N), np.zeros(N))] * 2
        assert all(s is not None for s in states)
        rank_states: list[ref.RankState] = states  # type: ignore[assignment]
        poisoned = t in (onebit_scenarios.NAN_STEP, onebit_scenarios.INF_STEP)
        with np.errstate(invalid="ignore" if poisoned else "raise", over="ignore" if poisoned else "raise"):
            if t in dense:
                want, after = ref.dense_step(
                    rank_states, grads, t, last_dense, start, SIZES, chunk=chunk, bits=bits, beta1=b1, beta2=b2, eps=eps
                )
                ambiguous = np.zeros(N, dtype=bool)
                last_dense = t
            else:
                want, after, ambiguous = ref.sign_step(rank_states, grads, t, SIZES, chunk=chunk, beta1=b1)
        ambiguous_total += int(ambiguous.sum())
        got = r0["delivered"].astype(np.float64)
        scale = float(np.nanmax(np.abs(want[np.isfinite(want)])))
        if t in (onebit_scenarios.NAN_STEP, onebit_scenarios.INF_STEP):
            # Non-finite on one rank: delivered non-finite where it was, the shared state kept.
            assert not np.isfinite(got).all(), t
            nxt = [_rank_state(r["before"]) for r in (by_rank[0][t + 1], by_rank[1][t + 1])]
            for name in ("v", "denom"):
                assert np.array_equal(getattr(nxt[0], name), getattr(states[0], name)), (t, name)
            if t == onebit_scenarios.INF_STEP:  # a dense step keeps u whole
                assert np.array_equal(nxt[0].u, states[0].u), t
            else:  # a sign step keeps u only where the average is non-finite
                bad_u = ~np.isfinite(after[0].u)
                assert bad_u.any() and not bad_u.all(), t
                assert np.array_equal(nxt[0].u[bad_u], states[0].u[bad_u]), t
                assert _close(nxt[0].u[~bad_u], after[0].u[~bad_u], scale, ambiguous[~bad_u]), t
            bad = 1 if t == onebit_scenarios.NAN_STEP else None
            if bad is not None:  # the sign step's offending rank clears its error feedback
                assert not nxt[bad].e.any() and by_rank[bad][t]["metrics"]["nonfinite_resets"] == 1
                assert _close(nxt[0].e, after[0].e, scale, ambiguous)
            if t == onebit_scenarios.INF_STEP:
                last_dense = t  # v keeps its value but this was still the dense step
            continue
        assert _close(got, want, scale, ambiguous), (t, np.abs(got - want).max(), scale)
        if t + 1 < len(by_rank[0]):
            for r in (0, 1):
                nxt = _rank_state(by_rank[r][t + 1]["before"])
                assert nxt is not None
                for name in ("v", "denom", "u", "e"):
                    assert _close(getattr(nxt, name), getattr(after[r], name), scale, ambiguous), (t, r, name)
        # Norms: the ranks' own, their mean, and the averaged gradient's (sketched on sign steps).
        n0, n1 = r0["norms"], r1["norms"]
        assert n0["mean_local_sq_norm"] == n1["mean_local_sq_norm"] and n0["global_sq_norm"] == n1["global_sq_norm"]
        local = [float(np.sum(g * g)) for g in grads]
        assert n0["local_sq_norm"] == pytest.approx(local[0], rel=1e-6)
        assert n0["mean_local_sq_norm"] == pytest.approx(sum(local) / 2, rel=1e-6)
        if t in dense:
            avg = np.mean([g if bits == 32 else ref.int8_roundtrip(g, chunk, SIZES) for g in grads], axis=0)
            assert n0["global_sq_norm"] == pytest.approx(float(np.sum(avg * avg)), rel=1e-5)
        else:
            at = hook_support.sketch_indices(N, t, 0, torch.device("cpu")).numpy()
            sketch = np.mean([g[at] for g in grads], axis=0)
            est = float(np.sum(sketch * sketch)) * N / hook_support.SKETCH_SIZE
            assert n0["global_sq_norm"] == pytest.approx(est, rel=1e-5)
    # Near-zero ties are rare: they must not hide a wrong formula.
    assert ambiguous_total < N * len(by_rank[0]) * 0.001, ambiguous_total
    # Bytes: what each message holds, counted independently.
    nbytes = sum((size + 7) // 8 for size in SIZES)
    nchunks = len(ref.chunks(SIZES, chunk))
    sign_msg = 8 + 4 * hook_support.SKETCH_SIZE + 4 * nchunks + nbytes
    dense_msg = 8 + 4 * nchunks + N if bits == 8 else 4 * N + 8
    m = by_rank[0][-1]["metrics"]
    assert set(m) == METRIC_KEYS
    n_steps = len(by_rank[0])
    assert m["bytes_sent"] == len(dense) * dense_msg + (n_steps - len(dense)) * sign_msg
    assert m["dense_bytes"] == n_steps * 4 * N and m["iterations"] == n_steps
    assert m["dense_buckets"] == len(dense) and m["compressed_buckets"] == n_steps - len(dense)


@pytest.mark.distributed
def test_resume_continues_bit_exactly() -> None:
    r0, r1 = run_on_two_ranks(onebit_scenarios.resume, timeout=120)
    for r in (r0, r1):
        assert r["params_equal"] and r["tables_equal"], r
        assert r["metrics_full"] == r["metrics_resumed"]
        assert r["table_sizes"]["m"] == 0 and r["table_sizes"]["u"] > 0  # m is dropped after the start
    assert all(np.array_equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))  # same replicas


@pytest.mark.distributed
def test_1bit_adam_matches_dense_adamw_accuracy_on_real_text() -> None:
    r0, r1 = run_on_two_ranks(onebit_scenarios.char_accuracy, timeout=240)
    assert r0 == r1 and r0["replicas_equal"] == 1.0
    assert r0["onebit_accuracy"] >= r0["dense_accuracy"] - 0.01, r0
    assert r0["ratio"] >= 20, r0
    assert r0["dense_accuracy"] > 3 * r0["chance"], r0  # the task is learnt at all


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_iter": 0}, "start_iter: expected an int >= 1"),
        ({"start_iter": True}, "start_iter: expected an int >= 1"),
        ({"chunk": 0}, "chunk: expected an int >= 1"),
        ({"chunk": 2.5}, "chunk: expected an int >= 1"),
        ({"refresh_first": -1}, "refresh_first: expected an int >= 0"),
        ({"start_iter": 5, "refresh_first": 3}, r"refresh_first: expected 0 or >= start_iter \(5\)"),
        ({"dense_bits": 16}, "dense_bits: expected 8 or 32"),
        ({"beta1": 1.0}, r"beta1: expected a number in \[0, 1\)"),
        ({"beta2": float("nan")}, r"beta2: expected a number in \[0, 1\)"),
        ({"eps": 0.0}, "eps: expected a finite number > 0"),
        ({"eps": float("inf")}, "eps: expected a finite number > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        onebit.OneBitAdam(**kwargs)


def test_refresh_schedule() -> None:
    cfg = onebit.OneBitAdam(start_iter=5)
    assert {t for t in range(400) if cfg.is_dense(t)} == ref.dense_steps(5, 10, 400)
    frozen = onebit.OneBitAdam(start_iter=3, refresh_first=0)
    assert {t for t in range(100) if frozen.is_dense(t)} == {0, 1, 2}


@pytest.mark.usefixtures("single_rank_group")
def test_bad_buckets_and_state_dicts_are_refused_and_change_nothing() -> None:
    state = onebit.OneBitAdamState(onebit.OneBitAdam(start_iter=1))
    with pytest.raises(TypeError, match="config: expected a OneBitAdam"):
        onebit.OneBitAdamState({"start_iter": 1})  # type: ignore[arg-type]
    half = FakeBucket(torch.ones(5000, dtype=torch.float16), 0, [(5000,)])
    with pytest.raises(TypeError, match=r"expected float32 gradients, got torch\.float16"):
        onebit.onebit_adam_hook(state, half)  # type: ignore[arg-type]
    assert state.iter == 0 and state.bytes_sent == 0 and state.dense_bytes == 0
    for _ in range(3):
        onebit.onebit_adam_hook(state, FakeBucket(torch.randn(5000), 0, [(5000,)])).wait()  # type: ignore[arg-type]
    before = state.state_dict()
    for bad, match in [
        ({"iteration": 1}, "expected keys"),
        ([1, 2], "expected keys"),
        ({**before, "tables": {"u": {}}}, "expected tables"),
    ]:
        with pytest.raises(ValueError, match=match):
            state.load_state_dict(bad)  # type: ignore[arg-type]
    after = state.state_dict()
    assert after["iteration"] == before["iteration"] == 3
    assert all(torch.equal(before["tables"][k][0]["tensor"], after["tables"][k][0]["tensor"]) for k in ("v", "u", "e"))


@pytest.mark.usefixtures("single_rank_group")
def test_state_dict_is_refused_during_an_iteration() -> None:
    state = onebit.OneBitAdamState(onebit.OneBitAdam(start_iter=1))
    first = FakeBucket(torch.randn(5000), 0, [(5000,)], last=False)
    onebit.onebit_adam_hook(state, first).wait()  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="during an iteration"):
        state.state_dict()
    onebit.onebit_adam_hook(state, FakeBucket(torch.randn(100), 1, [(100,)])).wait()  # type: ignore[arg-type]
    assert state.state_dict()["iteration"] == 1
