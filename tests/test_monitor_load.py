"""Load level: the table, hysteresis and dwell, against an explicit reference state machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_rt.monitor import LoadClassifier, LoadLevel, LoadThresholds, classify
from tests.monitor_reference import level_reference

L, M, H = LoadLevel.LOW, LoadLevel.MEDIUM, LoadLevel.HIGH


@pytest.mark.parametrize(
    ("cpu", "load", "level"),
    [
        (0.10, 0.10, L),
        (0.59, 0.69, L),
        (0.60, 0.10, M),  # CPU 60..85%: medium
        (0.10, 0.70, M),  # load 0.7..1.2 per core: medium
        (0.85, 1.20, M),  # the upper boundaries are still medium ("above": high)
        (0.86, 0.10, H),
        (0.10, 1.21, H),  # one dimension high is enough
        (0.70, 1.50, H),
    ],
)
def test_table(cpu: float, load: float, level: LoadLevel) -> None:
    assert classify(cpu, load) == level


def test_hovering_at_a_threshold_does_not_flap() -> None:
    c = LoadClassifier(dwell=1)
    seq = [0.90, 0.84, 0.86, 0.83, 0.88, 0.81]  # around 85%, never below 80%
    assert [c.update(v, 0.1) for v in seq] == [H] * len(seq)
    assert c.update(0.79, 0.1) == M  # below 85% - 5%: leaves high
    assert [c.update(v, 0.1) for v in (0.58, 0.56, 0.61, 0.555)] == [M, M, M, M]  # >= 55%: stays medium
    assert c.update(0.54, 0.1) == L
    assert c.transitions == 2


def test_without_hysteresis_the_same_signal_would_flap() -> None:
    seq = [0.90, 0.84, 0.86, 0.83, 0.88, 0.81]
    raw = [classify(v, 0.1) for v in seq]
    assert raw == [H, M, H, M, H, M]  # what the hysteresis above prevents


def test_dwell_needs_consecutive_proposals() -> None:
    c = LoadClassifier(dwell=3)
    assert c.update(0.1, 0.1) == L
    assert [c.update(0.9, 0.1) for _ in range(2)] == [L, L]
    assert c.update(0.1, 0.1) == L  # interrupted: the count starts again
    assert [c.update(0.9, 0.1) for _ in range(3)] == [L, L, H]


def test_first_observation_sets_level_and_nan_keeps_it() -> None:
    c = LoadClassifier(dwell=5)
    assert c.level == L
    assert c.update(float("nan"), 0.1) == L
    assert c.update(0.95, 0.1) == H  # first finite observation: straight from the table
    assert c.update(float("nan"), float("inf")) == H


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.floats(0.0, 1.0), st.just(float("nan"))),
            st.one_of(st.floats(0.0, 3.0), st.just(float("inf"))),
        ),
        max_size=60,
    ),
    st.integers(1, 4),
)
def test_matches_reference(obs: list[tuple[float, float]], dwell: int) -> None:
    c = LoadClassifier(dwell=dwell)
    assert [int(c.update(cpu, load)) for cpu, load in obs] == level_reference(obs, dwell)


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="dwell"):
        LoadClassifier(dwell=0)
    with pytest.raises(ValueError, match="cpu_medium"):
        LoadThresholds(cpu_medium=0.9, cpu_high=0.8)
    with pytest.raises(ValueError, match="load_margin"):
        LoadThresholds(load_margin=float("nan"))
