"""EWMA and sliding window against explicit references, including jittered periods and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_rt.monitor import Ewma, SlidingWindow
from tests.monitor_reference import ewma_reference

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
maybe_bad = st.one_of(finite, st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(maybe_bad, st.floats(0.0, 30.0)), min_size=1, max_size=40),
    st.floats(0.1, 100.0),
)
def test_ewma_matches_weighted_sum(points: list[tuple[float, float]], halflife: float) -> None:
    values = [v for v, _ in points]
    times = list(np.cumsum([dt for _, dt in points]) + 5.0)
    e = Ewma(halflife)
    for v, t in zip(values, times, strict=True):
        e.update(v, float(t))
    expected = ewma_reference(values, [float(t) for t in times], halflife)
    if expected is None:
        assert e.value is None
    else:
        assert e.value is not None
        assert e.value == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert e.skipped == sum(not math.isfinite(v) for v in values)


def test_ewma_step_reaches_half_after_one_halflife_whatever_the_period() -> None:
    for period in (0.5, 2.0, 5.0):
        e = Ewma(10.0)
        e.update(0.0, 0.0)
        t = 0.0
        while t < 10.0 - 1e-9:
            t += period
            e.update(1.0, t)
        assert e.value == pytest.approx(0.5, abs=1e-12)


def test_ewma_ignores_nan_and_keeps_value() -> None:
    e = Ewma(1.0)
    assert e.update(float("nan"), 0.0) is None
    assert e.update(3.0, 1.0) == 3.0
    assert e.update(float("inf"), 2.0) == 3.0
    assert e.skipped == 2


def test_ewma_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="halflife"):
        Ewma(0)
    with pytest.raises(ValueError, match="halflife"):
        Ewma(float("nan"))
    with pytest.raises(TypeError, match="halflife"):
        Ewma("10")  # type: ignore[arg-type]
    e = Ewma(1.0)
    e.update(1.0, 5.0)
    with pytest.raises(ValueError, match="backwards"):
        e.update(2.0, 4.0)
    with pytest.raises(ValueError, match="finite timestamp"):
        e.update(2.0, float("nan"))
    assert e.value == 1.0  # nothing lost


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(maybe_bad, st.floats(0.0, 20.0)), min_size=1, max_size=60), st.floats(1.0, 100.0))
def test_window_holds_exactly_the_last_length_seconds(points: list[tuple[float, float]], length: float) -> None:
    w = SlidingWindow(length)
    times = np.cumsum([dt for _, dt in points])
    for (v, _), t in zip(points, times, strict=True):
        w.add(v, float(t))
    now = float(times[-1])
    inside = [v for (v, _), t in zip(points, times, strict=True) if t >= now - length and math.isfinite(v)]
    assert w.values() == inside
    s = w.stats()
    if not inside:
        assert s is None
    else:
        assert s is not None
        assert s.count == len(inside)
        assert s.mean == pytest.approx(float(np.mean(np.array(inside, dtype=np.float64))), rel=1e-12, abs=1e-9)
        assert (s.minimum, s.maximum, s.last) == (min(inside), max(inside), inside[-1])


def test_window_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="length"):
        SlidingWindow(-1)
    with pytest.raises(TypeError, match="length"):
        SlidingWindow(None)  # type: ignore[arg-type]
    w = SlidingWindow(10)
    w.add(1.0, 3.0)
    with pytest.raises(ValueError, match="backwards"):
        w.add(1.0, 2.0)
    assert w.values() == [1.0]
