"""The Runtime's optimizer-state tier: the last step of its memory escalation.

With ``MemoryConfig(offload=...)`` the Runtime steps its optimizer through an
:class:`~autoglm_rt.offload.OptimizerOffload` (the same fused kernel whether the state is resident
or not, so the trajectory does not depend on where the state lives) and, once per step, feeds
:class:`~autoglm_rt.offload.MemoryEscalation` the memory signal it already reads. The order under
pressure is: the batch controller shrinks the micro-batch (raising accumulation); at the smallest
micro-batch the state goes to the slower tier; with nothing left to move, the step reports that it
failed to relieve the pressure. The state comes back after ``calm_steps`` calm observations, and
only when it fits below ``low_ratio`` of the limit (hysteresis).

Every move is reported as an ``offload_optimizer_state`` action result (value True: offload,
False: restore) with ``applied=True`` only when state actually moved.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from autoglm_rt.offload import TIERS, EscalationConfig, MemoryEscalation, MemoryStep, OptimizerOffload
from autoglm_rt.policy.actuators import ActionResult
from autoglm_rt.policy.strategy_rules import Action
from autoglm_rt.runtime.config import BatchConfig, MemoryConfig
from autoglm_rt.runtime.observation import MemoryReading

log = logging.getLogger("autoglm_rt.runtime")

#: The ``strategy`` field of the actions this module reports (they come from no strategy rule).
SOURCE = "memory_escalation"
ACTION = "offload_optimizer_state"


class OffloadControl:
    """Owns the optimizer's placement for the Runtime (see the module docstring).

    ``offload``: an ``OptimizerOffload`` over ``optimizer``, or a tier name (``"disk"``: a file in
    a new temporary directory, removed when this object is collected; ``"host"``: pinned host
    memory, CUDA parameters only). ``escalation``: thresholds (default ``EscalationConfig()``);
    its ``min_micro_batch`` is replaced by ``min_micro_batch``, the batch controller's floor.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        offload: OptimizerOffload | str,
        *,
        escalation: EscalationConfig | None = None,
        min_micro_batch: int = 1,
    ) -> None:
        if isinstance(offload, str):
            if offload not in TIERS:
                raise ValueError(f"offload: expected an OptimizerOffload or one of {', '.join(TIERS)}, got {offload!r}")
            directory = tempfile.mkdtemp(prefix="autoglm_rt_offload_") if offload == "disk" else None
            if directory is not None:
                # The mapping outlives the file's name, so removing it early never loses state.
                weakref.finalize(self, shutil.rmtree, directory, True)
            offload = OptimizerOffload(optimizer, tier=offload, directory=directory)
        elif not isinstance(offload, OptimizerOffload):
            raise TypeError(
                f"offload: expected an OptimizerOffload or a tier name ({', '.join(TIERS)}), "
                f"got {type(offload).__name__}"
            )
        elif offload.optimizer is not optimizer:
            raise ValueError("offload: the OptimizerOffload manages another optimizer than the Runtime's")
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        if offload.tier == "host" and device.type != "cuda":
            raise ValueError(
                f"offload: tier 'host' moves state off a CUDA device, the parameters are on {device}; use 'disk'"
            )
        if escalation is not None and not isinstance(escalation, EscalationConfig):
            raise TypeError(f"escalation: expected an EscalationConfig, got {type(escalation).__name__}")
        cfg = replace(escalation if escalation is not None else EscalationConfig(), min_micro_batch=min_micro_batch)
        self.offload = offload
        self.escalation = MemoryEscalation(cfg, can_offload=True)
        self.offloads = 0
        self.restores = 0
        self._seen_ooms = 0
        self._failing = False
        self._after_move: Callable[[], object] | None = None

    # -- what the Runtime calls --------------------------------------------------------------------
    def step(self) -> None:
        """One optimizer step through the offload object (in place of ``optimizer.step()``)."""
        self.offload.step()

    def state_bytes(self) -> int:
        """Bytes of optimizer moments, wherever they live."""
        total = 0
        for group in self.offload.optimizer.param_groups:
            for p in group["params"]:
                state = self.offload.optimizer.state.get(p) or {}
                for key in ("exp_avg", "exp_avg_sq"):
                    t = state.get(key)
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    def observe(self, memory: MemoryReading, micro_batch: int, num_ooms: int, now: float) -> ActionResult | None:
        """Feeds one step's memory reading (its peak against the limit), the micro-batch the step
        ran at and the batch controller's OOM count; carries out the escalation's decision.
        Returns the action result of an offload, a restore or a failure to relieve pressure
        (reported once per episode), else None. A reading without statistics decides nothing."""
        oom = num_ooms > self._seen_ooms
        self._seen_ooms = num_ooms
        if not memory.stats or memory.step_peak_bytes is None:
            return None
        limit = None if memory.limit_bytes is None else int(memory.limit_bytes)
        decision = self.escalation.decide(
            usage_bytes=int(memory.step_peak_bytes),
            limit_bytes=limit,
            micro_batch=micro_batch,
            offloaded=self.offload.offloaded,
            state_bytes=self.state_bytes(),
            oom=oom,
        )
        evidence = {"step_peak_bytes": int(memory.step_peak_bytes), "limit_bytes": limit, "micro_batch": micro_batch}
        if decision.step is MemoryStep.FAIL:
            first = not self._failing
            self._failing = True
            if not first:
                return None
            log.warning("memory escalation exhausted: %s", decision.reason)
            return ActionResult(
                Action(ACTION, True, SOURCE, now, evidence), False, f"nothing left to relieve memory: {decision.reason}"
            )
        if decision.step is not MemoryStep.SHRINK_MICRO_BATCH:  # shrinking is the batch controller's
            self._failing = False
        if decision.step is MemoryStep.OFFLOAD:
            return self._move(True, decision.reason, Action(ACTION, True, SOURCE, now, evidence))
        if decision.step is MemoryStep.RESTORE:
            return self._move(False, decision.reason, Action(ACTION, False, SOURCE, now, evidence))
        return None

    def set_offloaded(self, on: bool) -> bool:
        """The strategy actuator's entry (``Actuators(offload=...)``): True when state moved. A
        request to offload also restarts the escalation's calm count, so the escalation does not
        restore what a rule keeps asking to hold offloaded."""
        if on:
            self.escalation.note_pressure()
        moved = self.offload.set_offloaded(on)
        if moved:
            self._count(on)
        return moved

    def _move(self, on: bool, reason: str, action: Action) -> ActionResult:
        try:
            moved = self.offload.set_offloaded(on)
        except OSError as exc:  # disk full, directory gone...: the optimizer is left as it was
            return ActionResult(action, False, f"{'offload' if on else 'restore'} failed ({exc}); {reason}")
        if not moved:
            return ActionResult(action, False, f"optimizer state already {'offloaded' if on else 'resident'}")
        self._count(on)
        where = f"offloaded to {self.offload.tier}" if on else "restored"
        what = f"optimizer state ({self.state_bytes()} bytes) {where}"
        log.info("%s: %s", what, reason)
        return ActionResult(action, True, f"{what}: {reason}")

    def watch(self, signal: Any) -> None:
        """After every move, resets ``signal``'s peak (when it has ``reset_peak_stats``): the next
        step's reading is then the step's own peak, not the move's copy of the state."""
        reset = getattr(signal, "reset_peak_stats", None)
        self._after_move = reset if callable(reset) else None

    def _count(self, on: bool) -> None:
        if self._after_move is not None:
            self._after_move()
        if on:
            self.offloads += 1
        else:
            self.restores += 1

    # -- metrics and checkpoints -------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """The ``offload`` source of ``autoglm_rt.monitor.MetricsExporter``."""
        return {
            "offloaded": self.offload.offloaded,
            "resident_bytes": self.offload.resident_bytes(),
            "state_bytes": self.state_bytes(),
            "offloads": self.offloads,
            "restores": self.restores,
        }

    def state_dict(self) -> dict[str, Any]:
        """The placement, the escalation's hysteresis and the counters (the optimizer's state is
        saved by its owner)."""
        return {
            "offloaded": self.offload.offloaded,
            "escalation": self.escalation.state_dict(),
            "offloads": self.offloads,
            "restores": self.restores,
            "seen_ooms": self._seen_ooms,
            "failing": self._failing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output. Load the optimizer's state first: whatever it
        loaded is then moved to the saved placement (offloaded or resident)."""
        offloaded = state["offloaded"]
        if not isinstance(offloaded, bool):
            raise ValueError(f"offload state: 'offloaded' must be a bool, got {offloaded!r}")
        counters = {key: int(state[key]) for key in ("offloads", "restores", "seen_ooms")}
        for key, value in counters.items():
            if value < 0:
                raise ValueError(f"offload state: {key!r} must be >= 0, got {value}")
        self.escalation.load_state_dict(state["escalation"])
        self.offload.resync()
        self.offload.set_offloaded(offloaded)
        self.offloads, self.restores = counters["offloads"], counters["restores"]
        self._seen_ooms = counters["seen_ooms"]
        self._failing = bool(state["failing"])


def build_offload_control(
    optimizer: torch.optim.Optimizer, memory: MemoryConfig, batch: BatchConfig, signal: Any
) -> OffloadControl | None:
    """The control of ``memory.offload`` with the floor of ``batch``, watching the Runtime's
    memory ``signal`` (its pool, or None); None when offload is not asked for."""
    if memory.offload is None:
        return None
    control = OffloadControl(
        optimizer, memory.offload, escalation=memory.escalation, min_micro_batch=batch.min_micro_batch
    )
    control.watch(signal)
    return control


__all__ = ["ACTION", "SOURCE", "OffloadControl", "build_offload_control"]
