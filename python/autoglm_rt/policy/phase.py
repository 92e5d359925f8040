"""The phase of training (``initial``, ``convergence``, ``fine_tuning``) and an ``unstable`` flag,
from dimensionless statistics of the run, with hysteresis and a minimum dwell so it does not flap.

Signals (``rule="signals"``, the default), each computed over two adjacent windows of ``window``
steps (older and newer):

- ``improvement``: relative loss improvement between the windows' geometric means,
  ``1 - exp(mean_new(log L) - mean_old(log L))`` (arithmetic means, ``(mean_old - mean_new) /
  |mean_old|``, when a loss is <= 0): robust to the heavy tail of per-step losses and to scale;
- ``significance``: that drop over its standard error, ``drop / sqrt(var_old/W + var_new/W)``
  (on the same log scale) -- a plateau is an improvement that is small *or* not significant;
- ``grad_change``: relative change of the mean gradient norm between the windows;
- ``noise_ratio``: the gradient noise scale relative to the batch, ``b_simple / batch``, smoothed
  by an EMA (steps without an estimate are skipped).

The first three are also smoothed by an EMA (``signal_smoothing``) across steps.

``policy.phase_rules`` turns the signals into a candidate phase (thresholds, with hysteresis). A
different candidate must persist for ``confirm`` consecutive steps, and the current phase must
have lasted ``min_dwell`` steps, before the phase changes. Until two windows are full the phase
stays ``initial_phase``.

``unstable`` is raised at once by a non-finite gradient or loss, or a loss spike (above the
running mean by ``spike_sigmas`` running standard deviations and by ``spike_ratio`` relatively);
it clears after ``unstable_clear`` clean steps. Spikes do not enter the windows, and the phase does
not change while unstable.

``rule="variance"`` is the naive rule (EMA of the gradient variance: > 0.1 initial, < 0.01
fine-tuning, else convergence; no hysteresis, no dwell), kept for comparison only: it depends on
the scale of the parameters and flaps on noisy input.

The constructor's threshold keywords become ``detector.thresholds`` (a ``PhaseThresholds``).

Every change (phase or flag) is a :class:`PhaseEvent` with the evidence that caused it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from autoglm_rt.constants import PHASES
from autoglm_rt.policy.phase_rules import PhaseThresholds, signals_phase, variance_phase
from autoglm_rt.policy.phase_signals import LossSpikes, window_signals
from autoglm_rt.stateful import Stateful


@dataclass(frozen=True)
class PhaseEvent:
    """A phase change (``kind="phase"``) or an unstable-flag change (``kind="unstable"``) at
    ``step``, from ``before`` to ``after``, with ``reason`` and the signals (``evidence``)."""

    step: int
    kind: str
    before: Any
    after: Any
    reason: str
    evidence: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseState:
    """What :meth:`PhaseDetector.update` returns: the phase, the flag, the current signals and the
    events of this update."""

    step: int
    phase: str
    unstable: bool
    signals: dict[str, float | None]
    events: tuple[PhaseEvent, ...] = ()


class PhaseDetector(Stateful):
    """See the module docstring. ``update`` is O(window) and allocation-light; not thread-safe."""

    _state_fields = (
        "phase",
        "unstable",
        "step",
        "events",
        "_losses",
        "_norms",
        "_noise_ema",
        "_noise_updates",
        "_var_ema",
        "_spikes",
        "_peak_improvement",
        "_smoothed",
        "_candidate",
        "_candidate_count",
        "_phase_since",
        "_clean_steps",
        "signals",
    )

    def __init__(
        self,
        *,
        rule: str = "signals",
        window: int = 50,
        hysteresis: float = 1.5,
        confirm: int = 20,
        min_dwell: int = 50,
        initial_improvement: float = 0.2,
        initial_fraction: float = 0.5,
        initial_grad_change: float = 0.3,
        plateau_improvement: float = 0.05,
        plateau_significance: float = 2.0,
        fine_tuning_noise_ratio: float = 1.0,
        noise_smoothing: float = 0.95,
        signal_smoothing: float = 0.9,
        spike_sigmas: float = 6.0,
        spike_ratio: float = 0.5,
        unstable_clear: int = 10,
        variance_high: float = 0.1,
        variance_low: float = 0.01,
        initial_phase: str = "initial",
    ) -> None:
        if rule not in ("signals", "variance"):
            raise ValueError(f"rule: expected 'signals' or 'variance', got {rule!r}")
        if initial_phase not in PHASES:
            raise ValueError(f"initial_phase: expected one of {', '.join(PHASES)}, got {initial_phase!r}")
        for name, value in (
            ("window", window),
            ("confirm", confirm),
            ("min_dwell", min_dwell),
            ("unstable_clear", unstable_clear),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "window" else 0):
                raise ValueError(f"{name}: expected an integer >= {2 if name == 'window' else 0}, got {value!r}")
        self.thresholds = PhaseThresholds(
            hysteresis=hysteresis,
            initial_improvement=initial_improvement,
            initial_fraction=initial_fraction,
            initial_grad_change=initial_grad_change,
            plateau_improvement=plateau_improvement,
            plateau_significance=plateau_significance,
            fine_tuning_noise_ratio=fine_tuning_noise_ratio,
            variance_high=variance_high,
            variance_low=variance_low,
        )
        for name, beta in (("noise_smoothing", noise_smoothing), ("signal_smoothing", signal_smoothing)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}: expected 0 <= beta < 1, got {beta}")
        self.rule = rule
        self.window = window
        self.confirm = confirm
        self.min_dwell = min_dwell
        self.noise_smoothing = noise_smoothing
        self.signal_smoothing = signal_smoothing
        self.spike_sigmas = spike_sigmas
        self.spike_ratio = spike_ratio
        self.unstable_clear = unstable_clear

        self.phase = initial_phase
        self.unstable = False
        self.step = -1
        self.events: list[PhaseEvent] = []
        self._losses: deque[float] = deque(maxlen=2 * window)
        self._norms: deque[float] = deque(maxlen=2 * window)
        self._noise_ema = 0.0
        self._noise_updates = 0
        self._var_ema: float | None = None
        self._spikes = LossSpikes(spike_sigmas, spike_ratio)
        self._peak_improvement = 0.0
        self._smoothed: dict[str, float] = {}
        self._candidate: str | None = None
        self._candidate_count = 0
        self._phase_since = 0
        self._clean_steps = 0
        self.signals: dict[str, float | None] = {}

    @property
    def phases(self) -> list[PhaseEvent]:
        """The phase changes so far (events of kind ``phase``)."""
        return [e for e in self.events if e.kind == "phase"]

    def update(
        self,
        *,
        loss: float | None = None,
        grad_norm: float | None = None,
        b_simple: float | None = None,
        batch: int | None = None,
        nonfinite: int = 0,
        grad_var: float | None = None,
        step: int | None = None,
    ) -> PhaseState:
        """Feeds the statistics of one optimizer step; any may be None (unknown). Returns the state
        after it. ``nonfinite``: count of non-finite gradient elements this step."""
        self.step = self.step + 1 if step is None else int(step)
        events: list[PhaseEvent] = []
        bad = (
            nonfinite > 0
            or (loss is not None and not math.isfinite(loss))
            or (grad_norm is not None and not math.isfinite(grad_norm))
        )
        spike = not bad and loss is not None and self._spikes.is_spike(loss)
        if bad or spike:
            self._clean_steps = 0
            if not self.unstable:
                self.unstable = True
                reason = "non-finite gradient or loss" if bad else "loss spike"
                events.append(
                    PhaseEvent(
                        self.step,
                        "unstable",
                        False,
                        True,
                        reason,
                        {
                            "loss": loss,
                            "grad_norm": grad_norm,
                            "nonfinite": float(nonfinite),
                            **self._spikes.evidence(),
                        },
                    )
                )
        else:
            if loss is not None:
                self._losses.append(float(loss))
                self._spikes.track(float(loss))
            if grad_norm is not None:
                self._norms.append(float(grad_norm))
            if b_simple is not None and batch and math.isfinite(b_simple) and b_simple > 0:
                beta = self.noise_smoothing
                self._noise_ema = beta * self._noise_ema + (1 - beta) * (b_simple / batch)
                self._noise_updates += 1
            if grad_var is not None and math.isfinite(grad_var):
                self._var_ema = grad_var if self._var_ema is None else 0.9 * self._var_ema + 0.1 * grad_var
            if self.unstable:
                self._clean_steps += 1
                if self._clean_steps >= self.unstable_clear:
                    self.unstable = False
                    events.append(
                        PhaseEvent(self.step, "unstable", True, False, f"{self._clean_steps} clean steps", {})
                    )

        self.signals = self._compute_signals()
        if not self.unstable:
            target, reason = self._target()
            event = self._advance(target, reason)
            if event is not None:
                events.append(event)
        self.events.extend(events)
        return PhaseState(self.step, self.phase, self.unstable, dict(self.signals), tuple(events))

    # -- internals -------------------------------------------------------------------------------

    def _compute_signals(self) -> dict[str, float | None]:
        sig: dict[str, float | None] = {
            **window_signals(list(self._losses), list(self._norms), self.window),
            "noise_ratio": None,
            "grad_var": self._var_ema,
        }
        if self._noise_updates:
            sig["noise_ratio"] = self._noise_ema / (1 - self.noise_smoothing**self._noise_updates)
        for key in ("improvement", "significance", "grad_change"):
            raw = sig[key]
            if raw is not None and math.isfinite(raw):
                prev = self._smoothed.get(key)
                value = raw if prev is None else self.signal_smoothing * prev + (1 - self.signal_smoothing) * raw
                sig[key] = self._smoothed[key] = value
        return sig

    def _target(self) -> tuple[str, str]:
        if self.rule == "variance":
            return variance_phase(self.signals["grad_var"], self.phase, self.thresholds)
        improvement = self.signals["improvement"]
        if improvement is not None:
            self._peak_improvement = max(self._peak_improvement, improvement)
        return signals_phase(self.signals, self.phase, self._peak_improvement, self.thresholds)

    def _advance(self, target: str, reason: str) -> PhaseEvent | None:
        if target == self.phase:
            self._candidate, self._candidate_count = None, 0
            return None
        if target != self._candidate:
            self._candidate, self._candidate_count = target, 0
        self._candidate_count += 1
        dwell = self.step - self._phase_since
        confirm, min_dwell = (1, 0) if self.rule == "variance" else (self.confirm, self.min_dwell)
        if self._candidate_count < max(confirm, 1) or dwell < min_dwell:
            return None
        event = PhaseEvent(
            self.step,
            "phase",
            self.phase,
            target,
            f"{reason}; held {self._candidate_count} steps",
            dict(self.signals),
        )
        self.phase = target
        self._phase_since = self.step
        self._candidate, self._candidate_count = None, 0
        return event
