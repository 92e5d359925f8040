"""Carrying out one step's :class:`~autoglm_rt.runtime.pipeline.Decision`, in the pipeline's
order: a phase entered (its memory limit and threads, its precision), an LR factor change (every
parameter group rescaled), a critical regime for the DDP hook's density controller, a new thread
count, then the strategy's actions (each carried out or said not to be, by ``Actuators``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from autoglm_rt.policy.actuators import ActionResult, Actuators
from autoglm_rt.policy.memory import MemoryPolicy
from autoglm_rt.runtime.pipeline import Decision
from autoglm_rt.runtime.precision import Precision


@dataclass
class Actuation:
    """What a Runtime's decisions act on. ``comm_state``: the DDP hook state; when it has a
    ``controller`` with ``mark_critical()`` (``policy.compression.DensityController``), an LR
    change or an unstable step makes its next window critical (dense-ish)."""

    optimizer: torch.optim.Optimizer
    precision: Precision
    memory: MemoryPolicy | None
    comm_state: Any
    set_threads: Callable[[int], None]
    actuators: Actuators

    def carry_out(self, decision: Decision) -> tuple[ActionResult, ...]:
        """Carries out ``decision``; returns the strategy actions' results."""
        if decision.entered_phase is not None:
            if self.memory is not None:
                self.memory.apply(decision.entered_phase, threads=self.memory.thread_setter is not None)
            self.precision.for_phase(decision.entered_phase)
        if decision.lr_change is not None:
            before, after = decision.lr_change
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] / before * after
        if decision.lr_change is not None or decision.state.unstable:
            # A regime where compression costs accuracy: the hook's density controller (when it
            # has one) runs its next window at its ceiling.
            mark_critical = getattr(getattr(self.comm_state, "controller", None), "mark_critical", None)
            if callable(mark_critical):
                mark_critical()
        if decision.threads is not None:
            self.set_threads(decision.threads)
        return tuple(self.actuators.dispatch(action) for action in decision.actions)


__all__ = ["Actuation"]
