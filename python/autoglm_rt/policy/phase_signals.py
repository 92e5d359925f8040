"""The statistics the phase detector reads: window signals of the loss and gradient norm, and a
running loss mean/variance that flags spikes. Plain functions and one small stateful tracker."""

from __future__ import annotations

import math

from autoglm_rt.stateful import Stateful


def window_signals(losses: list[float], norms: list[float], window: int) -> dict[str, float | None]:
    """``improvement``, ``significance`` and ``grad_change`` between the older and the newer of two
    adjacent windows of ``window`` steps (None until both are full); see ``policy.phase``."""
    w = window
    sig: dict[str, float | None] = {"improvement": None, "significance": None, "grad_change": None}
    if len(losses) == 2 * w:
        if min(losses) > 0:
            # On the log of the loss: a ratio of geometric means, robust to the heavy upper tail
            # of per-step losses (a few hard batches) and to the loss's scale.
            logs = [math.log(v) for v in losses]
            (m_old, v_old), (m_new, v_new) = mean_var(logs[:w]), mean_var(logs[w:])
            drop = m_old - m_new
            sig["improvement"] = 1.0 - math.exp(-drop)
        else:
            (m_old, v_old), (m_new, v_new) = mean_var(losses[:w]), mean_var(losses[w:])
            drop = m_old - m_new
            sig["improvement"] = drop / abs(m_old) if m_old != 0 else 0.0
        se = math.sqrt(v_old / w + v_new / w)
        sig["significance"] = drop / se if se > 0 else (math.inf if drop > 0 else 0.0)
    if len(norms) == 2 * w:
        old_n, new_n = sum(norms[:w]) / w, sum(norms[w:]) / w
        sig["grad_change"] = (new_n - old_n) / old_n if old_n > 0 else 0.0
    return sig


class LossSpikes(Stateful):
    """A running (EMA, alpha 0.05) mean and variance of the loss; a loss above the mean by
    ``sigmas`` standard deviations and by ``ratio`` relatively is a spike (never before 10 losses)."""

    _state_fields = ("mean", "var", "count")

    def __init__(self, sigmas: float, ratio: float) -> None:
        self.sigmas, self.ratio = sigmas, ratio
        self.mean: float | None = None
        self.var = 0.0
        self.count = 0

    def is_spike(self, loss: float) -> bool:
        if self.mean is None or self.count < 10:
            return False
        limit = self.mean + self.sigmas * math.sqrt(max(self.var, 0.0))
        return loss > limit and loss > self.mean * (1 + self.ratio)

    def track(self, loss: float) -> None:
        self.count += 1
        if self.mean is None:
            self.mean = loss
            return
        alpha = 0.05
        diff = loss - self.mean
        self.mean += alpha * diff
        self.var = (1 - alpha) * (self.var + alpha * diff * diff)

    def evidence(self) -> dict[str, float | None]:
        return {"loss_mean": self.mean, "loss_std": math.sqrt(max(self.var, 0.0))}


def mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and population variance (two-pass, float64)."""
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / len(values)


__all__ = ["LossSpikes", "mean_var", "window_signals"]
