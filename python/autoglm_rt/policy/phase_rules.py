"""Which phase the signals point to: the thresholds of the phase detector and the two rules that
turn one step's signals into a candidate phase with its reason. Pure functions over numbers; the
detector (``policy.phase``) adds smoothing, confirmation, dwell and the unstable flag.

``signals`` rule: the candidate is ``initial`` while the loss still falls fast (``improvement >
initial_improvement`` and more than ``initial_fraction`` of the best window's improvement so
far) or the gradient norm still moves a lot (``|grad_change| > initial_grad_change``);
``fine_tuning`` once the loss is on a plateau and the noise dominates the batch (``noise_ratio >=
fine_tuning_noise_ratio``, when known); ``convergence`` between. Entering a plateau needs an
improvement that is small (``< plateau_improvement``) and not significant (``<
plateau_significance``); leaving it needs one that is large and significant (both thresholds
times ``hysteresis``). The ``initial`` thresholds are likewise divided by ``hysteresis`` while in
``initial``.

``variance`` rule, the naive one kept for comparison: the gradient variance's EMA > ``variance_high``
is initial, < ``variance_low`` fine-tuning, else convergence (no hysteresis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseThresholds:
    """The thresholds of both rules (see the module docstring). ``hysteresis`` must be >= 1."""

    hysteresis: float = 1.5
    initial_improvement: float = 0.2
    initial_fraction: float = 0.5
    initial_grad_change: float = 0.3
    plateau_improvement: float = 0.05
    plateau_significance: float = 2.0
    fine_tuning_noise_ratio: float = 1.0
    variance_high: float = 0.1
    variance_low: float = 0.01

    def __post_init__(self) -> None:
        if not self.hysteresis >= 1.0:
            raise ValueError(f"hysteresis: expected a factor >= 1, got {self.hysteresis}")
        object.__setattr__(self, "hysteresis", float(self.hysteresis))


def variance_phase(grad_var: float | None, current: str, t: PhaseThresholds) -> tuple[str, str]:
    """``(candidate, reason)`` under the ``variance`` rule; ``current`` while no variance is known."""
    if grad_var is None:
        return current, "no gradient variance yet"
    if grad_var > t.variance_high:
        return "initial", f"gradient variance {grad_var:.3g} > {t.variance_high}"
    if grad_var < t.variance_low:
        return "fine_tuning", f"gradient variance {grad_var:.3g} < {t.variance_low}"
    return "convergence", f"gradient variance {grad_var:.3g} between {t.variance_low} and {t.variance_high}"


def signals_phase(
    signals: Mapping[str, float | None], current: str, peak_improvement: float, t: PhaseThresholds
) -> tuple[str, str]:
    """``(candidate, reason)`` under the ``signals`` rule from the smoothed ``improvement``,
    ``significance``, ``grad_change`` and ``noise_ratio`` (each may be None), the phase now and
    the best improvement seen so far (this step's included); ``current`` until a window is full."""
    imp, sig_, change, noise = (
        signals["improvement"],
        signals["significance"],
        signals["grad_change"],
        signals["noise_ratio"],
    )
    if imp is None and change is None:
        return current, "windows not full yet"
    h = t.hysteresis
    # A phase's own thresholds are relaxed by h while it is the current phase.
    relax_init = h if current == "initial" else 1.0
    relax_fine = h if current == "fine_tuning" else 1.0
    if imp is not None:
        fast = t.initial_fraction * peak_improvement / relax_init
        if imp > t.initial_improvement / relax_init and imp > fast:
            return "initial", (
                f"loss improved {imp:.1%} between windows (> {t.initial_improvement / relax_init:.1%} and "
                f"> {fast:.1%}, {t.initial_fraction:.0%} of the best window)"
            )
    if change is not None and abs(change) > t.initial_grad_change / relax_init:
        return "initial", f"gradient norm changed {change:+.1%} between windows"
    # Entering a plateau needs a small improvement that is also not significant (or negligible
    # outright: a very clean loss makes even a tiny improvement significant); leaving it needs
    # an improvement that is both large and significant -- hysteresis in both signals.
    if imp is None:
        plateau = False
    elif current == "fine_tuning":
        plateau = imp < t.plateau_improvement * h or (sig_ is not None and sig_ < t.plateau_significance * h)
    else:
        plateau = imp < t.plateau_improvement and (
            (sig_ is not None and sig_ < t.plateau_significance) or imp < 0.1 * t.plateau_improvement
        )
    noisy = noise is None or noise >= t.fine_tuning_noise_ratio / relax_fine
    if plateau and noisy:
        noise_txt = "unknown" if noise is None else f"{noise:.3g}"
        return (
            "fine_tuning",
            f"loss plateau (improvement {imp:.1%}, significance {sig_:.2f}), noise ratio {noise_txt}",
        )
    return "convergence", f"loss improving {imp:.1%}" if imp is not None else "gradient norm steady"


__all__ = ["PhaseThresholds", "signals_phase", "variance_phase"]
