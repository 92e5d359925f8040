"""PID step responses on simulated first-order plants, against closed-form and naive references."""

from __future__ import annotations

import math

import pytest

from autoglm_rt.policy import PID


def simulate(
    pid: PID,
    *,
    gain: float,
    tau: float,
    dt: float,
    steps: int,
    y0: float = 0.0,
    u_limits: tuple[float, float] = (-math.inf, math.inf),
    disturbance=lambda t: 0.0,
):  # type: ignore[no-untyped-def]
    """First-order plant ``tau * dy/dt = gain * u + d(t) - y`` integrated exactly over each dt."""
    y, ys, us = y0, [], []
    a = math.exp(-dt / tau)
    for k in range(steps):
        t = k * dt
        u = pid.update(y, now=t)
        u = min(max(u, u_limits[0]), u_limits[1])
        target = gain * u + disturbance(t)
        y = target + (y - target) * a
        ys.append(y)
        us.append(u)
    return ys, us


def test_p_only_settles_at_the_closed_form_offset() -> None:
    kp, gain = 2.0, 1.5
    pid = PID(kp, setpoint=1.0, sample_time=0.01)
    ys, _ = simulate(pid, gain=gain, tau=0.2, dt=0.01, steps=2000)
    expected = gain * kp / (1 + gain * kp)  # y = K * kp * (sp - y)
    assert ys[-1] == pytest.approx(expected, rel=1e-6)


def test_pi_removes_the_offset_and_does_not_oscillate_wildly() -> None:
    pid = PID(1.0, ki=5.0, setpoint=2.0, sample_time=0.01)
    ys, _ = simulate(pid, gain=1.0, tau=0.3, dt=0.01, steps=1500)
    assert ys[-1] == pytest.approx(2.0, rel=1e-4)
    assert max(ys) < 2.0 * 1.3  # overshoot bounded
    first = next(i for i, y in enumerate(ys) if abs(y - 2.0) < 0.02 * 2.0)
    assert all(abs(y - 2.0) < 0.05 * 2.0 for y in ys[first + 100 :])


def test_derivative_acts_on_measurement_so_a_setpoint_step_has_no_kick() -> None:
    pid = PID(1.0, ki=0.0, kd=10.0, setpoint=0.0, sample_time=0.1)
    for k in range(5):
        pid.update(0.5, now=0.1 * k)
    pid.setpoint = 1.0
    out = pid.update(0.5, now=0.5)
    d = pid.terms[2]
    assert d == 0.0 and out == pytest.approx(0.5)  # kp * (1.0 - 0.5); an error-derivative would add 5.0
    out = pid.update(0.6, now=0.6)
    assert pid.terms[2] == pytest.approx(-10.0 * 0.1 / 0.1)


def naive_pid_step(
    state: dict[str, float], kp: float, ki: float, sp: float, y: float, dt: float, lo: float, hi: float
) -> float:
    """Textbook PI without anti-windup: the integral grows while the output is saturated."""
    e = sp - y
    state["i"] += e * dt
    return min(max(kp * e + ki * state["i"], lo), hi)


def test_anti_windup_limits_overshoot_after_saturation() -> None:
    # A disturbance pins the plant below the setpoint for 5 s; then it goes away.
    kp, ki, lo, hi, dt = 0.5, 2.0, 0.0, 2.0, 0.01
    dist = lambda t: -3.0 if t < 5.0 else 0.0  # noqa: E731
    pid = PID(kp, ki=ki, setpoint=1.0, sample_time=dt, output_limits=(lo, hi))
    ys, us = simulate(pid, gain=1.0, tau=0.2, dt=dt, steps=1500, u_limits=(lo, hi), disturbance=dist)
    assert max(us[:400]) > hi - 1e-3  # saturated during the disturbance
    assert lo <= pid.terms[1] <= hi

    state = {"i": 0.0}
    y, naive = 0.0, []
    a = math.exp(-dt / 0.2)
    for k in range(1500):
        u = naive_pid_step(state, kp, ki, 1.0, y, dt, lo, hi)
        target = u + dist(k * dt)
        y = target + (y - target) * a
        naive.append(y)
    after = slice(500, 1500)
    overshoot = max(ys[after]) - 1.0
    naive_overshoot = max(naive[after]) - 1.0
    assert naive_overshoot > 0.5  # the reference really winds up
    assert overshoot < 0.25 * naive_overshoot
    assert ys[-1] == pytest.approx(1.0, rel=1e-3)


def test_sample_time_makes_faster_callers_equivalent() -> None:
    slow = PID(1.0, ki=1.0, kd=0.1, setpoint=1.0, sample_time=0.1)
    fast = PID(1.0, ki=1.0, kd=0.1, setpoint=1.0, sample_time=0.1)
    meas = lambda t: 0.3 + 0.1 * math.sin(t)  # noqa: E731
    slow_out = [slow.update(meas(0.1 * k), now=0.1 * k) for k in range(50)]
    fast_out = []
    for k in range(500):
        t = 0.01 * k
        # feed the same measurement the slow caller saw at its sample instants
        fast_out.append(fast.update(meas(0.1 * round(t / 0.1)) if k % 10 == 0 else 123.0, now=t))
    assert [fast_out[10 * k] for k in range(50)] == pytest.approx(slow_out)
    assert fast_out[11] == fast_out[10]  # between samples the output is held (123.0 ignored)


def test_bad_input_is_rejected_and_leaves_state_untouched() -> None:
    pid = PID(1.0, ki=1.0, setpoint=1.0, sample_time=0.1)
    pid.update(0.0, now=0.0)
    ref = PID(1.0, ki=1.0, setpoint=1.0, sample_time=0.1)
    ref.update(0.0, now=0.0)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="measurement"):
            pid.update(bad, now=0.2)
    with pytest.raises(TypeError, match="measurement"):
        pid.update("0.5", now=0.2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backwards"):
        pid.update(0.5, now=-1.0)
    assert pid.update(0.5, now=0.2) == ref.update(0.5, now=0.2)
    with pytest.raises(ValueError, match="output_limits"):
        PID(1.0, setpoint=0.0, output_limits=(1.0, 0.0))
    with pytest.raises(ValueError, match="sample_time"):
        PID(1.0, setpoint=0.0, sample_time=0.0)
    with pytest.raises(TypeError, match="kp"):
        PID("1", setpoint=0.0)  # type: ignore[arg-type]


def test_reset_with_an_integral_starts_bumplessly_and_reverse_gains_act_in_reverse() -> None:
    pid = PID(-1.0, ki=-0.5, setpoint=1.0, output_limits=(1.0, 8.0))
    pid.reset(integral=3.0)
    assert pid.update(1.0, now=0.0) == 3.0  # on target: the output is the actuator's current value
    assert pid.update(2.0, now=1.0) > 3.0  # measurement above the setpoint: more output
    pid.reset(integral=50.0)
    assert pid.update(1.0, now=2.0) == 8.0  # the integral is clamped to the limits
    with pytest.raises(ValueError, match="integral"):
        pid.reset(integral=math.nan)
