"""A PID controller for holding a measured quantity (step time, memory headroom) at a target.

The textbook parallel form with the three refinements that make it usable on a noisy plant:

- a *sample time*: calls that come sooner than ``sample_time`` after the last computed update
  return the previous output unchanged, so the gains mean the same whatever the caller's rate;
- *derivative on measurement*: the D term acts on ``-d(measurement)/dt``, not on the error, so a
  change of the setpoint causes no derivative kick;
- *anti-windup* by conditional integration: while the output is saturated, errors that would push
  it further into saturation are not integrated, and the integral (stored already multiplied by
  ``ki``, so changing ``ki`` causes no bump) is clamped to the output limits. After a long
  saturation the output leaves the limit as soon as the error says so, without a wound-up overshoot.
"""

from __future__ import annotations

import math
import numbers
import time

from autoglm_rt.stateful import Stateful


class PID(Stateful):
    """```output = kp * e + integral(ki * e dt) - kd * d(measurement)/dt``, with ``e = setpoint -
    measurement``, clamped to ``output_limits``. Negative gains make it reverse-acting (more
    output when the measurement is above the setpoint, e.g. threads when steps are too slow).

    ``update(measurement, now=None)`` returns the output; ``now`` (seconds, monotonic) defaults to
    ``time.monotonic()``. The first update has no derivative term (nothing to differentiate yet)
    and integrates over ``sample_time`` (or nothing when ``sample_time`` is None). Non-finite
    measurements raise ValueError and leave the controller's state untouched.
    """

    _state_fields = ("_integral", "_last_time", "_last_measurement", "_last_output", "terms")

    def __init__(
        self,
        kp: float,
        ki: float = 0.0,
        kd: float = 0.0,
        *,
        setpoint: float,
        sample_time: float | None = None,
        output_limits: tuple[float | None, float | None] = (None, None),
    ) -> None:
        for name, gain in (("kp", kp), ("ki", ki), ("kd", kd)):
            _check_finite(name, gain)
        _check_finite("setpoint", setpoint)
        if sample_time is not None:
            _check_finite("sample_time", sample_time)
            if sample_time <= 0:
                raise ValueError(f"sample_time: expected a positive number of seconds or None, got {sample_time}")
        low, high = output_limits
        if low is not None:
            _check_finite("output_limits[0]", low)
        if high is not None:
            _check_finite("output_limits[1]", high)
        if low is not None and high is not None and low > high:
            raise ValueError(f"output_limits: expected (low, high) with low <= high, got {output_limits}")
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.setpoint = float(setpoint)
        self.sample_time = sample_time
        self.output_limits = (low, high)
        self.reset()

    def reset(self, integral: float = 0.0) -> None:
        """Forgets the last measurement and output and sets the integral term (default 0; set it
        to the actuator's current value for a bumpless start), clamped to the output limits."""
        _check_finite("integral", integral)
        self._integral = self._clamp(float(integral))
        self._last_time: float | None = None
        self._last_measurement: float | None = None
        self._last_output: float | None = None
        self.terms = (0.0, 0.0, 0.0)

    @property
    def last_output(self) -> float | None:
        """The output of the latest computed update (None before the first)."""
        return self._last_output

    def _clamp(self, value: float) -> float:
        low, high = self.output_limits
        if high is not None and value > high:
            return high
        if low is not None and value < low:
            return low
        return value

    def update(self, measurement: float, now: float | None = None) -> float:
        """Feeds one measurement and returns the controller output (see the class docstring)."""
        _check_finite("measurement", measurement)
        t = time.monotonic() if now is None else float(now)
        _check_finite("now", t)
        if self._last_time is not None:
            dt = t - self._last_time
            if dt < 0:
                raise ValueError(f"now: time went backwards ({t} < {self._last_time})")
            if self._last_output is not None and (
                dt == 0 or (self.sample_time is not None and dt < self.sample_time * (1 - 1e-9))
            ):
                return self._last_output
        else:
            dt = self.sample_time or 0.0

        error = self.setpoint - measurement
        proportional = self.kp * error
        derivative = 0.0
        if self._last_measurement is not None and dt > 0:
            derivative = -self.kd * (measurement - self._last_measurement) / dt
        # Conditional integration: while the output is saturated, integrate only errors that
        # pull it back inside the limits, so the integral holds what the plant needs, not the
        # whole history of the saturation.
        integral = self._clamp(self._integral + self.ki * error * dt)
        unclamped = proportional + integral + derivative
        if (
            self._clamp(unclamped) != unclamped
            and (integral - self._integral) * (unclamped - self._clamp(unclamped)) > 0
        ):
            integral = self._clamp(self._integral)
        self._integral = integral
        output = self._clamp(proportional + integral + derivative)

        self.terms = (proportional, self._integral, derivative)
        self._last_time = t
        self._last_measurement = float(measurement)
        self._last_output = output
        return output


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value}")
