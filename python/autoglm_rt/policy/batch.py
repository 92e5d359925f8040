"""Micro-batch size and accumulation steps: kept at a constant effective batch under memory
pressure, grown by goodput when the gradient noise scale says it pays, with the matching LR rule.

- Memory pressure (an OOM, or the pool above ``pressure_high`` of its limit) halves the
  micro-batch; accumulation follows as ``ceil(effective / micro)``, so the effective batch (samples
  per optimizer step) never changes. Once usage stays below ``pressure_low`` for ``grow_after``
  observations, the micro-batch doubles back towards the size the user asked for, but not to a
  size that failed or was under pressure at the current limit (a raised limit forgets those).
- Goodput mode: the effective batch moves to the best power-of-two multiple of the base batch (up
  to ``max_effective_batch``) by predicted goodput, only when it beats the current one by
  ``goodput_margin`` (1.05, Pollux's hysteresis). The efficiency, step-time model and LR rules
  (``linear``, ``sqrt``, ``adascale``) are ``policy.goodput``'s; with the time spent in
  forward/backward measured (as the Runtime does), the step-time model is read off directly
  instead of fitted.

What happens on an out-of-memory error in the middle of a step is ``policy.oom``'s job.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from autoglm_rt.policy import goodput
from autoglm_rt.policy.goodput import LR_RULES, StepTiming
from autoglm_rt.stateful import Stateful


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is split: ``micro_batch`` samples per forward/backward,
    ``accumulation`` micro-batches (the last may be smaller), ``effective_batch`` samples in all."""

    micro_batch: int
    accumulation: int
    effective_batch: int


@dataclass(frozen=True)
class BatchChange:
    """A change the controller made and why (``reason``: oom, pressure, memory_freed, goodput)."""

    reason: str
    before: BatchPlan
    after: BatchPlan
    detail: str = ""


class BatchController(Stateful):
    """Holds the micro-batch plan (see the module docstring). Not thread-safe."""

    _state_fields = (
        "base_batch",
        "effective_batch",
        "micro_batch",
        "preferred_micro_batch",
        "changes",
        "num_ooms",
        "_calm",
        "_failed_micro",
        "_failed_limit",
        "_timings",
    )

    def __init__(
        self,
        effective_batch: int,
        micro_batch: int | None = None,
        *,
        min_micro_batch: int = 1,
        pressure_high: float = 0.9,
        pressure_low: float = 0.6,
        grow_after: int = 20,
        goodput: bool = False,
        max_effective_batch: int | None = None,
        goodput_margin: float = 1.05,
        lr_rule: str = "adascale",
    ) -> None:
        _positive_int("effective_batch", effective_batch)
        micro = effective_batch if micro_batch is None else micro_batch
        _positive_int("micro_batch", micro)
        _positive_int("min_micro_batch", min_micro_batch)
        _positive_int("grow_after", grow_after)
        if micro > effective_batch:
            raise ValueError(f"micro_batch: expected at most effective_batch ({effective_batch}), got {micro}")
        if min_micro_batch > micro:
            raise ValueError(f"min_micro_batch: expected at most micro_batch ({micro}), got {min_micro_batch}")
        if not 0 < pressure_low < pressure_high <= 1:
            raise ValueError(
                f"pressure_low, pressure_high: expected 0 < low < high <= 1, got {pressure_low}, {pressure_high}"
            )
        if max_effective_batch is not None:
            _positive_int("max_effective_batch", max_effective_batch)
            if max_effective_batch < effective_batch:
                raise ValueError(
                    f"max_effective_batch: expected at least effective_batch ({effective_batch}), "
                    f"got {max_effective_batch}"
                )
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule: expected one of {', '.join(LR_RULES)}, got {lr_rule!r}")
        if not goodput_margin >= 1:
            raise ValueError(f"goodput_margin: expected a factor >= 1, got {goodput_margin}")
        self.base_batch = effective_batch
        self.effective_batch = effective_batch
        self.micro_batch = micro
        self.preferred_micro_batch = micro
        self.min_micro_batch = min_micro_batch
        self.pressure_high = pressure_high
        self.pressure_low = pressure_low
        self.grow_after = grow_after
        self.goodput_mode = goodput
        self.max_effective_batch = max_effective_batch or effective_batch
        self.goodput_margin = goodput_margin
        self.lr_rule = lr_rule
        self.changes: list[BatchChange] = []
        self.num_ooms = 0
        self._calm = 0
        self._failed_micro: int | None = None  # smallest micro-batch that failed under _failed_limit
        self._failed_limit: float | None = None
        self._timings: deque[StepTiming] = deque(maxlen=64)

    @property
    def accumulation(self) -> int:
        return -(-self.effective_batch // self.micro_batch)

    @property
    def plan(self) -> BatchPlan:
        return BatchPlan(self.micro_batch, self.accumulation, self.effective_batch)

    def chunks(self, n: int | None = None) -> list[tuple[int, int]]:
        """``[start, stop)`` bounds of the micro-batches of a step of ``n`` samples (default: the
        effective batch) at the current micro-batch size; the last may be smaller."""
        n = self.effective_batch if n is None else n
        return [(s, min(s + self.micro_batch, n)) for s in range(0, n, self.micro_batch)]

    def _change(self, reason: str, before: BatchPlan, detail: str) -> BatchChange:
        change = BatchChange(reason, before, self.plan, detail)
        self.changes.append(change)
        return change

    def shrink(self, reason: str = "pressure", detail: str = "") -> BatchChange | None:
        """Halves the micro-batch (not below ``min_micro_batch``); None when already there."""
        if self.micro_batch <= self.min_micro_batch:
            return None
        before = self.plan
        self.micro_batch = max(self.min_micro_batch, self.micro_batch // 2)
        self._calm = 0
        return self._change(reason, before, detail)

    def grow(self, reason: str = "memory_freed", detail: str = "") -> BatchChange | None:
        """Doubles the micro-batch, up to the preferred size and below a size that failed under the
        current limit; None when it cannot grow."""
        new = min(self.preferred_micro_batch, self.effective_batch, self.micro_batch * 2)
        if new <= self.micro_batch or (self._failed_micro is not None and new >= self._failed_micro):
            return None
        before = self.plan
        self.micro_batch = new
        return self._change(reason, before, detail)

    def on_oom(self, exc: BaseException | None = None, *, limit_bytes: float | None = None) -> BatchChange:
        """Records an OOM at the current micro-batch and halves it. Raises ``exc`` (or a
        MemoryError) when the micro-batch is already at ``min_micro_batch``: nothing smaller to try."""
        self.num_ooms += 1
        failed = self.micro_batch
        change = self.shrink("oom", f"out of memory at micro-batch {failed}")
        if change is None:
            if exc is not None:
                raise exc
            raise MemoryError(f"out of memory at the smallest micro-batch ({self.micro_batch}); nothing smaller to try")
        self._remember_failure(failed, limit_bytes)
        return change

    def _remember_failure(self, micro: int, limit_bytes: float | None) -> None:
        self._failed_micro = micro if self._failed_micro is None else min(self._failed_micro, micro)
        self._failed_limit = limit_bytes

    def observe_memory(self, used_bytes: float, limit_bytes: float | None) -> BatchChange | None:
        """Feeds the memory in use against its limit (None: no limit). Shrinks above
        ``pressure_high``; grows back after ``grow_after`` observations below ``pressure_low``. A
        raised limit forgets the sizes that failed under the old one."""
        if limit_bytes is None or limit_bytes <= 0:
            self._calm += 1
            return self._maybe_grow(None)
        if self._failed_limit is not None and limit_bytes > self._failed_limit:
            self._failed_micro, self._failed_limit = None, None
        usage = used_bytes / limit_bytes
        if usage > self.pressure_high:
            pressured = self.micro_batch
            change = self.shrink("pressure", f"memory usage {usage:.0%} of the limit > {self.pressure_high:.0%}")
            if change is not None:
                # Growing back into the size that was under pressure would only flap: halving
                # roughly halves usage, which crosses pressure_low as well.
                self._remember_failure(pressured, limit_bytes)
            return change
        if usage < self.pressure_low:
            self._calm += 1
            return self._maybe_grow(usage)
        self._calm = 0
        return None

    def _maybe_grow(self, usage: float | None) -> BatchChange | None:
        if self._calm < self.grow_after or self.micro_batch >= self.preferred_micro_batch:
            return None
        self._calm = 0
        where = "no limit" if usage is None else f"memory usage {usage:.0%} < {self.pressure_low:.0%}"
        return self.grow("memory_freed", f"{where} for {self.grow_after} observations")

    # -- goodput ---------------------------------------------------------------------------------

    def observe_step_time(
        self, seconds: float, accumulation: int | None = None, *, compute_seconds: float | None = None
    ) -> None:
        """Records the wall time of one optimizer step made of ``accumulation`` micro-batches, and
        optionally the part spent in the micro-batches' forward/backward (``compute_seconds``); the
        rest (optimizer, communication, data loading) is the step's fixed cost."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds: expected a positive finite step time, got {seconds}")
        if compute_seconds is not None and not (math.isfinite(compute_seconds) and compute_seconds >= 0):
            raise ValueError(f"compute_seconds: expected a finite time >= 0, got {compute_seconds}")
        acc = self.accumulation if accumulation is None else accumulation
        self._timings.append((acc, float(seconds), compute_seconds))

    def step_time_model(self) -> tuple[float, float] | None:
        """``(t_micro, t_fixed)`` from the recorded steps (see ``policy.goodput.step_time_model``);
        None without step timings."""
        return goodput.step_time_model(self._timings)

    def predicted_goodput(self, batch: int, noise_scale: float) -> float | None:
        """Predicted goodput (statistically efficient samples per second) at effective batch
        ``batch`` with the current micro-batch; None without step timings."""
        model = self.step_time_model()
        if model is None:
            return None
        return goodput.predicted_goodput(batch, self.micro_batch, self.base_batch, model, noise_scale)

    def propose(self, noise_scale: float | None) -> BatchChange | None:
        """Goodput mode: moves the effective batch to the best candidate when it beats the current
        one by ``goodput_margin``. Does nothing outside goodput mode or without a noise scale."""
        if not self.goodput_mode or noise_scale is None or not math.isfinite(noise_scale) or noise_scale < 0:
            return None
        current = self.predicted_goodput(self.effective_batch, noise_scale)
        if current is None:
            return None
        best, best_g = self.effective_batch, current
        candidate = self.base_batch
        while candidate <= self.max_effective_batch:
            g = self.predicted_goodput(candidate, noise_scale)
            if g is not None and g > best_g:
                best, best_g = candidate, g
            candidate *= 2
        if best == self.effective_batch or best_g < self.goodput_margin * current:
            return None
        before = self.plan
        self.effective_batch = best
        self.micro_batch = min(self.micro_batch, best)
        return self._change(
            "goodput", before, f"goodput {best_g:.4g} vs {current:.4g} samples/s at noise scale {noise_scale:.4g}"
        )

    def lr_factor(self, noise_scale: float | None = None) -> float:
        """The LR factor for the current effective batch under ``lr_rule`` (``goodput.lr_factor``)."""
        return goodput.lr_factor(self.lr_rule, self.effective_batch, self.base_batch, noise_scale)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
