"""The policy pipeline of one step, in plain Python over numbers:

noise scale -> phase -> memory pressure -> batch (step time, goodput) -> LR factor -> threads ->
strategy. :meth:`PolicyPipeline.decide` takes an :class:`Observation` and returns a
:class:`Decision`; it touches no tensor, device or process group, and carries nothing out (the
Runtime's actuation does). Its parts' state is saved by :meth:`state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.control import PID
from autoglm_rt.policy.memory import MemoryPolicy
from autoglm_rt.policy.phase import PhaseDetector, PhaseState
from autoglm_rt.policy.strategy import Strategy
from autoglm_rt.policy.strategy_rules import Action
from autoglm_rt.runtime.observation import Observation
from autoglm_rt.stats import NoiseScale


@dataclass(frozen=True)
class Decision:
    """What the pipeline decided for one step. ``entered_phase``: the phase entered this step
    (None: no change). ``lr_change``: ``(before, after)`` LR factors when it changed. ``threads``: the new
    thread count when it changed. ``actions``: the strategy's actions, to dispatch."""

    noise_scale: float | None
    state: PhaseState
    entered_phase: str | None
    lr_change: tuple[float, float] | None
    threads: int | None
    strategy_metrics: dict[str, Any] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()


class ThreadControl:
    """Holds the step time at ``target`` seconds with as few threads as it takes (1..``max_threads``):
    a reverse-acting PI loop on the relative step time, one update per step (the step index is its
    clock, so it behaves the same at any wall-clock speed)."""

    def __init__(self, target: float, max_threads: int, threads: int) -> None:
        if (
            isinstance(target, bool)
            or not isinstance(target, (int, float))
            or not (math.isfinite(target) and target > 0)
        ):
            raise ValueError(f"step_time_target: expected a positive number of seconds, got {target!r}")
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads: expected a positive int, got {max_threads!r}")
        self.target = float(target)
        self.max_threads = max_threads
        self.high = max_threads
        self.threads = min(max(threads, 1), max_threads)
        self.pid = PID(-1.0, ki=-0.5, setpoint=1.0, output_limits=(1.0, float(max_threads)))
        self.pid.reset(integral=float(self.threads))

    def limit(self, cap: int | None) -> None:
        """Narrows the loop's range to ``1..min(max_threads, cap)`` (None: back to
        ``max_threads``), e.g. to a CPU quota's cores; a thread count above it comes down to it."""
        self.high = self.max_threads if cap is None else max(1, min(self.max_threads, cap))
        self.pid.output_limits = (1.0, float(self.high))
        self.threads = min(self.threads, self.high)

    def update(self, step_seconds: float, step: int) -> int | None:
        """The new thread count, or None when it stays."""
        out = self.pid.update(step_seconds / self.target, now=float(step))
        n = min(max(round(out), 1), self.high)
        if n == self.threads:
            return None
        self.threads = n
        return n

    def state_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "pid": self.pid.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pid.load_state_dict(state["pid"])
        self.threads = int(state["threads"])


class PolicyPipeline:
    """The policy parts of one Runtime, in the order they decide. ``batch`` may be attached later
    (when the first batch tells the effective batch); ``memory``, ``strategy`` and ``threads`` are
    optional."""

    def __init__(
        self,
        phase: PhaseDetector,
        *,
        batch: BatchController | None = None,
        memory: MemoryPolicy | None = None,
        strategy: Strategy | None = None,
        threads: ThreadControl | None = None,
    ) -> None:
        self.phase = phase
        self.batch = batch
        self.memory = memory
        self.strategy = strategy
        self.threads = threads
        self.noise: NoiseScale | None = None
        self.lr_factor = 1.0

    @property
    def noise_scale(self) -> float | None:
        b = None if self.noise is None else self.noise.b_simple
        return None if b is None else float(b)

    def decide(self, obs: Observation) -> Decision:
        controller = self.batch
        if controller is None:
            raise RuntimeError("the effective batch is not known yet: pass effective_batch= or call batches() first")
        grads = obs.gradients
        noise_scale = self._update_noise(obs.noise_pair)
        state = self.phase.update(
            loss=obs.loss,
            grad_norm=grads.norm,
            b_simple=noise_scale,
            batch=obs.samples or controller.effective_batch,
            nonfinite=grads.nonfinite,
            grad_var=grads.var,
        )
        entered = next((e.after for e in reversed(state.events) if e.kind == "phase"), None)

        mem = obs.memory
        if mem.stats:
            # Pressure is judged on this step's peak (forward/backward included), not on what is
            # left allocated after zero_grad; the memory policy's floor keeps the all-time peak.
            if self.memory is not None and mem.step_peak_bytes is not None:
                self.memory.observe_peak(mem.step_peak_bytes)
            controller.observe_memory(float(mem.step_peak_bytes or 0), mem.limit_bytes)

        threads: int | None = None
        if obs.step_seconds is not None and obs.step_seconds > 0:
            controller.observe_step_time(obs.step_seconds, compute_seconds=min(obs.compute_seconds, obs.step_seconds))
            if self.threads is not None:
                threads = self.threads.update(obs.step_seconds, obs.step)

        lr_change: tuple[float, float] | None = None
        if controller.propose(noise_scale) is not None or controller.effective_batch != controller.base_batch:
            factor = controller.lr_factor(noise_scale)
            if math.isfinite(factor) and factor > 0 and factor != self.lr_factor:
                lr_change = (self.lr_factor, factor)
                self.lr_factor = factor

        metrics = self.strategy_metrics(obs, state, noise_scale)
        actions = tuple(self.strategy.evaluate(metrics, obs.now)) if self.strategy is not None else ()
        return Decision(noise_scale, state, entered, lr_change, threads, metrics, actions)

    def _update_noise(self, pair: tuple[float, float, float, float] | None) -> float | None:
        if pair is not None and all(math.isfinite(v) for v in pair) and pair[3] > pair[1]:
            if self.noise is None:
                self.noise = NoiseScale()
            self.noise.update(*pair)
        return self.noise_scale

    @staticmethod
    def strategy_metrics(obs: Observation, state: PhaseState, noise_scale: float | None) -> dict[str, Any]:
        """The figures strategy triggers read. Monitor figures first; what the runtime measures
        itself (phase, step time, its memory signal's usage) takes precedence over the host view."""
        metrics: dict[str, Any] = dict(obs.monitor)
        metrics["phase"] = state.phase
        metrics["unstable"] = state.unstable
        if noise_scale is not None:
            metrics["noise_scale"] = noise_scale
        if obs.step_seconds is not None:
            metrics["step_time"] = obs.step_seconds
        for key, value in obs.memory.stats.items():
            metrics[f"pool.{key}"] = value
        if obs.memory.limit_bytes:
            metrics["memory_usage"] = float(obs.memory.stats.get("allocated_bytes", 0)) / obs.memory.limit_bytes
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Every part's state (None for a part that is absent)."""
        return {
            "phase": self.phase.state_dict(),
            "batch": None if self.batch is None else self.batch.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "strategy": None if self.strategy is None else self.strategy.state_dict(),
            "threads": None if self.threads is None else self.threads.state_dict(),
            "noise": None if self.noise is None else self.noise.state_dict(),
            "lr_factor": self.lr_factor,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output into parts built the same way. Raises ValueError
        when a part is present on one side only."""
        for name in ("batch", "memory", "strategy", "threads"):
            if (state.get(name) is None) != (getattr(self, name) is None):
                have = "has" if getattr(self, name) is not None else "has no"
                raise ValueError(f"load_state_dict: this runtime {have} a {name} part, the saved state does not match")
        self.phase.load_state_dict(state["phase"])
        for name in ("batch", "memory", "strategy", "threads"):
            part = getattr(self, name)
            if part is not None:
                part.load_state_dict(state[name])
        if state.get("noise") is None:
            self.noise = None
        else:
            self.noise = NoiseScale()
            self.noise.load_state_dict(state["noise"])
        self.lr_factor = float(state["lr_factor"])


__all__ = ["Decision", "PolicyPipeline", "ThreadControl"]
