"""PhaseDetector on statistic streams recorded from real small training runs (tests/data, see
record_phase_streams.py) and on synthetic ones, including flapping inputs."""

from __future__ import annotations

import csv
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_rt.policy.phase import PhaseDetector

DATA = Path(__file__).resolve().parent / "data"
RUNS = ["mlp_regression", "cnn_classification"]


def load(run: str) -> dict[str, np.ndarray]:
    with (DATA / f"phase_{run}.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def feed(det: PhaseDetector, s: dict[str, np.ndarray]) -> list[str]:
    phases = []
    for i in range(len(s["loss"])):
        st_ = det.update(
            loss=float(s["loss"][i]),
            grad_norm=float(s["grad_norm"][i]),
            b_simple=float(s["b_simple"][i]),
            batch=int(s["batch"][i]),
            grad_var=float(s["grad_var"][i]),
            nonfinite=int(s["nonfinite"][i]),
        )
        phases.append(st_.phase)
    return phases


def reference_improvement(loss: np.ndarray, window: int, beta: float) -> np.ndarray:
    """Windowed geometric-mean improvement, EMA-smoothed (NaN until two windows are full)."""
    out = np.full(len(loss), np.nan)
    logs = np.log(loss.astype(np.float64))
    ema = None
    for t in range(2 * window - 1, len(loss)):
        old = logs[t - 2 * window + 1 : t - window + 1].mean()
        new = logs[t - window + 1 : t + 1].mean()
        raw = 1 - math.exp(new - old)
        ema = raw if ema is None else beta * ema + (1 - beta) * raw
        out[t] = ema
    return out


def smoothed_log_loss(loss: np.ndarray, window: int = 50) -> np.ndarray:
    return np.convolve(np.log(loss), np.ones(window) / window, mode="valid")


@pytest.mark.parametrize("run", RUNS)
def test_recorded_runs_go_initial_convergence_fine_tuning_once(run: str) -> None:
    s = load(run)
    det = PhaseDetector()
    feed(det, s)
    changes = det.phases
    assert [(e.before, e.after) for e in changes] == [("initial", "convergence"), ("convergence", "fine_tuning")]
    assert det.unstable is False

    # Independent check that the phases mean something: share of the run's total log-loss
    # improvement (smoothed start to smoothed end) achieved when each phase began.
    sm = smoothed_log_loss(s["loss"])
    total = sm[0] - sm[-1]
    assert total > 0
    done = {e.after: (sm[0] - sm[max(e.step - 50, 0)]) / total for e in changes}
    assert done["convergence"] >= 0.5, done
    assert done["fine_tuning"] >= 0.8, done


@pytest.mark.parametrize("run", RUNS)
def test_transition_evidence_matches_an_independent_recomputation(run: str) -> None:
    s = load(run)
    det = PhaseDetector()
    feed(det, s)
    ref = reference_improvement(s["loss"], det.window, det.signal_smoothing)
    for e in det.phases:
        assert e.evidence["improvement"] == pytest.approx(ref[e.step], rel=1e-9, abs=1e-12)
        assert set(e.evidence) >= {"improvement", "significance", "grad_change", "noise_ratio"}
        assert e.reason
    fine = det.phases[-1]
    assert fine.evidence["improvement"] < det.thresholds.plateau_improvement
    assert "plateau" in fine.reason


@pytest.mark.parametrize("run", RUNS)
def test_naive_variance_rule_depends_on_parameter_scale(run: str) -> None:
    # The same run with every gradient scaled by 10 (as for a loss scaled by 10): the
    # dimensionless detector sees the same phases, the variance rule does not.
    s = load(run)
    scaled = dict(s, grad_norm=s["grad_norm"] * 10, grad_var=s["grad_var"] * 100)
    a, b = PhaseDetector(), PhaseDetector()
    feed(a, s)
    feed(b, scaled)
    assert [(e.step, e.after) for e in a.phases] == [(e.step, e.after) for e in b.phases]
    big = dict(s, grad_var=s["grad_var"] * 1e3)
    va, vb = PhaseDetector(rule="variance"), PhaseDetector(rule="variance")
    pa, pb = feed(va, s), feed(vb, big)
    assert pa != pb


def synthetic_stream(rng: np.random.Generator, n: int = 1500, tau: float = 150.0, floor: float = 0.5) -> np.ndarray:
    """Exponential descent to a floor with multiplicative noise."""
    t = np.arange(n)
    return (floor + 2.0 * np.exp(-t / tau)) * np.exp(0.1 * rng.standard_normal(n))


def test_synthetic_descent_then_plateau() -> None:
    rng = np.random.default_rng(0)
    loss = synthetic_stream(rng)
    det = PhaseDetector()
    for x in loss:
        det.update(loss=float(x))
    assert [e.after for e in det.phases] == ["convergence", "fine_tuning"]
    # the true curve is within 1% of its floor after tau * ln(2/0.005) steps ~ 900
    fine = det.phases[-1].step
    assert 500 < fine < 1200


def test_flapping_inputs_do_not_flap_the_phase() -> None:
    # Every signal wanders back and forth across its thresholds: the gradient variance around
    # 0.1, the noise ratio around 1, the loss between improving and worsening windows.
    rng = np.random.default_rng(1)
    n = 3000
    det, naive = PhaseDetector(), PhaseDetector(rule="variance")
    for i in range(n):
        wave = math.sin(2 * math.pi * i / 40)
        kwargs = {
            "loss": math.exp(0.05 * math.sin(2 * math.pi * i / 160) + 0.05 * rng.standard_normal()),
            "grad_norm": 1.0 + 0.4 * wave,
            "b_simple": 64 * math.exp(0.5 * wave),
            "batch": 64,
            "grad_var": 0.1 * math.exp(wave + 0.2 * rng.standard_normal()),
        }
        det.update(**kwargs)
        naive.update(**kwargs)
    assert len(naive.phases) > 50  # the naive rule follows every swing
    assert len(det.phases) <= 0.1 * len(naive.phases)
    steps = [0] + [e.step for e in det.phases]
    assert all(b - a >= det.min_dwell for a, b in pairwise(steps))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=10.0), min_size=150, max_size=600), st.integers(0, 30))
def test_minimum_dwell_holds_on_any_stream(losses: list[float], dwell: int) -> None:
    det = PhaseDetector(window=10, confirm=3, min_dwell=dwell)
    for x in losses:
        det.update(loss=x, grad_norm=x)
    steps = [0] + [e.step for e in det.phases]
    assert all(b - a >= dwell for a, b in pairwise(steps))
    for e in det.phases:
        assert e.before != e.after


def test_unstable_on_nonfinite_and_spikes_clears_after_clean_steps() -> None:
    det = PhaseDetector(window=10, confirm=2, min_dwell=0, unstable_clear=5)
    rng = np.random.default_rng(2)
    for _ in range(40):
        det.update(loss=1.0 + 0.01 * rng.standard_normal(), grad_norm=1.0)
    phase = det.phase
    st_ = det.update(loss=1.0, grad_norm=1.0, nonfinite=3)
    assert st_.unstable and st_.events[0].kind == "unstable" and st_.events[0].evidence["nonfinite"] == 3.0
    for _ in range(4):
        assert det.update(loss=1.0, grad_norm=1.0).unstable
    st_ = det.update(loss=1.0, grad_norm=1.0)
    assert not st_.unstable and st_.events[-1].after is False
    # a 10x loss spike: unstable, and it does not enter the windows
    before = list(det._losses)
    st_ = det.update(loss=10.0, grad_norm=1.0)
    assert st_.unstable and "spike" in st_.events[0].reason
    assert list(det._losses) == before
    assert det.update(loss=math.nan).unstable
    assert det.phase == phase


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rule"):
        PhaseDetector(rule="magic")
    with pytest.raises(ValueError, match="window"):
        PhaseDetector(window=1)
    with pytest.raises(ValueError, match="hysteresis"):
        PhaseDetector(hysteresis=0.5)
    with pytest.raises(ValueError, match="initial_phase"):
        PhaseDetector(initial_phase="warmup")
