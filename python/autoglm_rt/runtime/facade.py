"""``autoglm_rt.Runtime``: a small facade that wires a training loop to the runtime's parts.

::

    runtime = autoglm_rt.Runtime(model, optimizer, strategy="strategy.yaml", pool=pool)
    for step, batch in runtime.batches(loader):          # effective batches, re-chunked
        loss = runtime.forward_backward(batch, loss_fn)  # micro-batches + accumulation, OOM-safe
        report = runtime.step()                          # stats -> phase -> policies -> actions

The parts, one module each: ``batching`` (re-batching), ``accumulation`` (micro-batches, OOM
recovery), ``precision`` (autocast per phase), ``observation`` (one reading of the device per
step), ``pipeline`` (the policies, plain Python over numbers), ``actuation`` (a decision carried
out; ``policy.actuators``: actions carried out or said not to be), ``cpu_quota`` (threads within
the CPU quota), ``offloading`` (optimizer state to a slower tier as the last memory step),
``metrics`` (counters and exporter sources), ``views`` (what users read).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from autoglm_rt.constants import limit_or_none
from autoglm_rt.policy.actuators import Actuators, Scheduler, scheduler_from_environment
from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.memory import default_thread_setter
from autoglm_rt.policy.phase import PhaseDetector
from autoglm_rt.policy.strategy import Strategy
from autoglm_rt.runtime.accumulation import Accumulator, LossFn
from autoglm_rt.runtime.actuation import Actuation
from autoglm_rt.runtime.assembly import build_memory_policy, build_thread_control
from autoglm_rt.runtime.batching import Batch, batch_size, rebatch
from autoglm_rt.runtime.config import BatchConfig, Hooks, MemoryConfig, ThreadConfig
from autoglm_rt.runtime.cpu_quota import follow_cpu_quota
from autoglm_rt.runtime.metrics import RuntimeMetrics, attach
from autoglm_rt.runtime.observation import Observation, noise_pair, read_gradients, read_memory
from autoglm_rt.runtime.offloading import OffloadControl, build_offload_control
from autoglm_rt.runtime.pipeline import PolicyPipeline
from autoglm_rt.runtime.precision import Precision
from autoglm_rt.runtime.report import StepReport
from autoglm_rt.runtime.views import RuntimeViews


class Runtime(RuntimeViews):
    """See the module docstring. ``strategy``: a :class:`Strategy`, YAML text or a path.
    ``comm_state``: the DDP hook state (``autoglm_rt.ddp.TopKState``: its per-rank vs averaged
    squared norms give the noise scale on several ranks; its ``metrics()`` is exported).
    ``pool``: the memory signal the memory policy drives: an ``autoglm_rt.memory.CachingPool``,
    or anything with ``stats()``/``set_limit()`` (e.g. a cgroup's memory). ``scheduler``: carries
    out ``scale_*_replicas``/``migrate_task`` (default: the queue or elastic job this process runs
    under, found from the environment; else none, and those actions say they were not applied).
    ``exporter``: a ``MetricsExporter`` to register every metrics source with (see
    :meth:`attach`). Not thread-safe: drive it from the training loop."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: Strategy | str | Path | None = None,
        comm_state: Any = None,
        pool: Any = None,
        *,
        batch: BatchConfig | None = None,
        memory: MemoryConfig | None = None,
        precision_by_phase: Mapping[str, str] | None = None,
        threads: ThreadConfig | None = None,
        phase_detector: PhaseDetector | None = None,
        scheduler: Scheduler | None = None,
        exporter: Any = None,
        hooks: Hooks | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.comm_state, self.pool = model, optimizer, comm_state, pool
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: has no parameters that require gradients")
        self.device = self.params[0].device
        self.batch_config = batch if batch is not None else BatchConfig()
        self.hooks = hooks if hooks is not None else Hooks()
        self.precision_policy = Precision(self.device.type, precision_by_phase)

        detector = phase_detector if phase_detector is not None else PhaseDetector()
        memory_config = memory if memory is not None else MemoryConfig()
        memory_policy = build_memory_policy(pool, memory_config, threads)
        # Optimizer-state offload, the escalation's last step (None unless memory.offload is set).
        self.offloading: OffloadControl | None = build_offload_control(
            optimizer, memory_config, self.batch_config, pool
        )
        if memory_policy is not None:
            memory_policy.apply(detector.phase, threads=False)  # the starting phase's limit holds from the start
        self.pipeline = PolicyPipeline(
            detector,
            memory=memory_policy,
            strategy=strategy if isinstance(strategy, Strategy) or strategy is None else Strategy.from_yaml(strategy),
            threads=build_thread_control(threads),
        )
        self._thread_setter = (threads.setter if threads is not None else None) or default_thread_setter
        self.cpu_quota = follow_cpu_quota(
            self.hooks.cpu_quota, self._thread_setter, self.pipeline.threads, memory_policy, self.hooks.clock()
        )
        if self.cpu_quota is not None:
            self._thread_setter = self.cpu_quota.set
        if self.batch_config.effective_batch is not None:
            self._make_controller(self.batch_config.effective_batch)
        self.precision_policy.for_phase(detector.phase)
        self.accumulator = Accumulator(model, self.params, self.precision_policy.autocast, self._limit_bytes)
        self.actuators = Actuators(
            memory=memory_policy,
            batch=self.pipeline.batch,
            threads=memory_policy.thread_setter if memory_policy is not None else None,
            precision=self.set_precision,
            scheduler=scheduler if scheduler is not None else scheduler_from_environment(os.environ),
            alert=self.hooks.alert,
            offload=self.offloading.set_offloaded if self.offloading is not None else None,
        )
        self.actuation = Actuation(
            optimizer, self.precision_policy, memory_policy, comm_state, self._thread_setter, self.actuators
        )
        self.metrics = RuntimeMetrics()
        if exporter is not None:
            self.attach(exporter)
        self.step_count = 0
        self._loss: float | None = None
        self._samples = 0
        self._compute_seconds = 0.0
        self._last_step_end: float | None = None

    def _make_controller(self, effective_batch: int) -> BatchController:
        controller = BatchController(
            effective_batch, self.batch_config.micro_batch, **self.batch_config.controller_kwargs()
        )
        self.pipeline.batch = controller
        if hasattr(self, "actuators"):
            self.actuators.batch = controller
        return controller

    # -- what users change and attach ----------------------------------------------------------
    def set_precision(self, precision: str) -> None:
        """Sets the autocast dtype of the next forward passes (see :class:`Precision`)."""
        self.precision_policy.set(precision)

    def policy_metrics(self) -> dict[str, Any]:
        """The ``policy`` source of ``autoglm_rt.monitor.MetricsExporter``."""
        return self.metrics.policy()

    def attach(self, exporter: Any, *, energy: Any = None) -> None:
        """Registers every metrics source of this runtime, its ``comm_state`` and its ``pool``
        (and ``energy``, an ``EnergyMeter``, when given) with ``exporter``; step durations go to
        its histogram from the next step on."""
        attach(
            exporter, self.metrics, comm_state=self.comm_state, pool=self.pool, energy=energy, offload=self.offloading
        )

    # -- the loop ----------------------------------------------------------------------------------
    def batches(self, loader: Iterable[Batch]) -> Iterator[tuple[int, Batch]]:
        """Yields ``(step, batch)`` with batches of exactly the current effective batch (the
        loader's batches are split or joined as needed; the last batch may be smaller). With a
        loader whose batch size equals the effective batch, batches pass through untouched."""

        def target(n: int) -> int:
            return (self.pipeline.batch or self._make_controller(n)).effective_batch

        for item in rebatch(loader, target):
            yield self.step_count, item

    def forward_backward(self, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """Computes the gradient of the batch's mean loss into ``.grad`` (accumulating onto what
        is there), in micro-batches of the controller's size, recovering from OOM (see
        ``runtime.accumulation``). Returns the batch's mean loss (a detached scalar tensor)."""
        t0 = self.hooks.clock()
        n = batch_size(batch)
        if n == 0:
            raise ValueError("batch: expected at least one sample, got an empty batch")
        controller = self.pipeline.batch or self._make_controller(n)
        total = self.accumulator.run(batch, n, loss_fn, controller)
        self._samples += n
        self._loss = float(total)
        self._compute_seconds += self.hooks.clock() - t0
        return total

    def step(self) -> StepReport:
        """Statistics -> noise scale -> optimizer step (skipped, and counted, when a gradient is
        non-finite) -> phase -> policies -> actions -> metrics."""
        clock = self.hooks.clock
        t_start = clock()
        controller = self.controller
        if self.cpu_quota is not None:
            self.cpu_quota.poll(t_start)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("step(): no gradients; call forward_backward() first")
        gradients = read_gradients(grads)
        norms_fn = getattr(self.comm_state, "norms", None)
        pair = noise_pair(
            norms_fn() if callable(norms_fn) else None, self._samples, self.accumulator.take_sqnorms(), gradients.sqnorm
        )
        skipped = gradients.nonfinite > 0
        t_opt = clock()
        if not skipped:
            (self.offloading.step if self.offloading is not None else self.optimizer.step)()
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_seconds = clock() - t_opt

        obs = Observation(
            step=self.step_count,
            now=t_start,
            loss=self._loss,
            samples=self._samples,
            gradients=gradients,
            noise_pair=pair,
            step_seconds=None if self._last_step_end is None else t_start - self._last_step_end,
            compute_seconds=self._compute_seconds,
            memory=read_memory(self.pool),
            monitor=dict(self.hooks.metrics_source()) if self.hooks.metrics_source is not None else {},
        )
        micro_batch_run = controller.micro_batch  # before the pipeline may shrink it
        decision = self.pipeline.decide(obs)
        results = self.actuation.carry_out(decision)
        if self.offloading is not None:  # escalation after the batch controller: offload, restore
            escalated = self.offloading.observe(obs.memory, micro_batch_run, controller.num_ooms, t_start)
            results += () if escalated is None else (escalated,)

        t_end = clock()
        report = StepReport(
            step=self.step_count,
            loss=self._loss,
            step_seconds=obs.step_seconds,
            overhead_seconds=t_end - t_start - optimizer_seconds,
            grad_norm=gradients.norm,
            nonfinite=gradients.nonfinite,
            skipped=skipped,
            noise_scale=decision.noise_scale,
            phase=decision.state.phase,
            unstable=decision.state.unstable,
            micro_batch=controller.micro_batch,
            accumulation=controller.accumulation,
            effective_batch=controller.effective_batch,
            precision=self.precision,
            events=decision.state.events,
            actions=results,
            optimizer_offloaded=None if self.offloading is None else self.offloading.offload.offloaded,
            metrics=decision.strategy_metrics,
        )
        self.step_count += 1
        self._samples, self._compute_seconds, self._last_step_end = 0, 0.0, t_end
        self.metrics.record(report, controller.num_ooms)
        if self.hooks.metrics_sink is not None:
            self.hooks.metrics_sink(report)
        return report

    def _limit_bytes(self) -> float | None:
        if self.pool is None:
            return None
        limit = limit_or_none(self.pool.stats().get("limit_bytes"))
        return None if limit is None else float(limit)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the Runtime needs to continue exactly where it was (the policies with the
        LR factor, precision, counters); the model, optimizer (whose groups carry the scaled LR)
        and hook state are saved by their owners."""
        return {
            "step": self.step_count,
            "pipeline": self.pipeline.state_dict(),
            "precision": self.precision_policy.state_dict(),
            "metrics": self.metrics.state_dict(),
            "offload": None if self.offloading is None else self.offloading.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output into a Runtime built the same way (with
        ``memory.offload``: after the optimizer's own state, see ``OffloadControl``)."""
        if (state.get("offload") is None) != (self.offloading is None):
            raise ValueError(
                "load_state_dict: memory.offload is set on one side only (the saved state and this runtime)"
            )
        saved_batch = state["pipeline"].get("batch")
        if saved_batch is not None and self.pipeline.batch is None:
            self._make_controller(int(saved_batch["base_batch"]))
        self.pipeline.load_state_dict(state["pipeline"])
        self.precision_policy.load_state_dict(state["precision"])
        self.metrics.load_state_dict(state["metrics"])
        if self.offloading is not None:
            self.offloading.load_state_dict(state["offload"])
        self.step_count = int(state["step"])
        if self.cpu_quota is not None:
            self.cpu_quota.follow()  # the saved loop state, within the quota that holds now
        self._last_step_end = None  # the first step after a resume has no step time


__all__ = ["Runtime"]
