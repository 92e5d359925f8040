"""``autoglm_rt.Runtime``: wires a training loop to the statistics and the policies.

::

    runtime = autoglm_rt.Runtime(model, optimizer, strategy="strategy.yaml", pool=pool)
    for step, batch in runtime.batches(loader):          # effective batches, re-chunked
        loss = runtime.forward_backward(batch, loss_fn)  # micro-batches + accumulation, OOM-safe
        report = runtime.step()                          # stats -> phase -> policies -> actions

``loss_fn(model, micro_batch) -> loss`` returns the *mean* loss over the micro-batch's samples;
the runtime weights each micro-batch by its share of the batch, so the accumulated gradient is the
gradient of the batch's mean loss whatever the split. A batch is a tensor, or a tuple/list/dict of
tensors, whose first dimension is the sample.

What ``step()`` does, in order: fused gradient statistics (``autoglm_rt.ops.grad_stats``) ->
noise scale (``autoglm_rt.stats.NoiseScale``, from the DDP hook's per-rank vs averaged squared
norms, or on one process from the micro-batch gradients' squared norms vs the accumulated one) ->
the optimizer step (skipped, and counted, when a gradient is non-finite) ->
:class:`~autoglm_rt.policy.PhaseDetector` -> on a phase change :class:`MemoryPolicy` (pool limit,
threads) and the phase's precision -> :class:`BatchController` (memory pressure, goodput) ->
strategy rules -> actuators -> ``metrics_sink(report)``.

Out of memory inside ``forward_backward``: each micro-batch's gradient is computed with
``torch.autograd.grad`` and added to ``.grad`` only when it succeeded, so a micro-batch that fails
halfway leaves no trace; it is redone at half the size and no sample is lost or counted twice.
For a ``DistributedDataParallel`` model (whose reducer needs ``backward()``) the step is instead
restarted from zeroed gradients at the smaller size: every sample is still counted exactly once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoglm_rt.policy.actuators import ActionResult, Actuators, Scheduler
from autoglm_rt.policy.batch import BatchController, is_out_of_memory, run_step
from autoglm_rt.policy.control import PID
from autoglm_rt.policy.memory import MemoryPolicy, available_cores, default_thread_setter
from autoglm_rt.policy.phase import PhaseDetector, PhaseEvent
from autoglm_rt.policy.strategy import Action, Strategy

Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`Runtime.step` saw and did. ``step_seconds``: wall time from the end of the
    previous ``step()`` to the start of this one (None for the first). ``overhead_seconds``: the
    time ``step()`` itself took, without the optimizer's own step."""

    step: int
    loss: float | None
    step_seconds: float | None
    overhead_seconds: float
    grad_norm: float
    nonfinite: int
    skipped: bool
    noise_scale: float | None
    phase: str
    unstable: bool
    micro_batch: int
    accumulation: int
    effective_batch: int
    precision: str
    events: tuple[PhaseEvent, ...] = ()
    actions: tuple[ActionResult, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """See the module docstring.

    ``strategy``: a :class:`Strategy`, YAML text or a path. ``pool``: an
    ``autoglm_rt.memory.CachingPool`` (or anything with ``set_limit``/``stats``) whose limit the
    memory policy drives; ``capacity`` is the device memory its phase fractions refer to (default:
    the pool's current limit, else the CUDA device's or the host's total memory). ``comm_state``:
    the DDP hook state; when it has ``norms()`` (``autoglm_rt.ddp.TopKState``) and several ranks,
    the noise scale comes from its per-rank vs averaged squared norms. ``effective_batch``:
    samples per optimizer step (default: the first loader batch's size). ``metrics_source``:
    returns monitor metrics for the strategy (``gpu_utilization``, ``memory_usage``, ``cpu_usage``,
    ``load_1min`` ...). ``metrics_sink``: called with every :class:`StepReport`.
    ``precision_by_phase``: autocast dtype per phase (default: bfloat16 in fine-tuning where the
    device supports it); ``{}`` keeps full precision throughout. ``step_time_target`` (seconds):
    a :class:`~autoglm_rt.policy.PID` holds the step time there with as few CPU threads as it
    takes (1..``max_threads``, applied by ``thread_setter``), leaving the rest of the cores to other
    tenants; it then owns the thread count (the phase's thread setting is skipped).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: Strategy | str | Path | None = None,
        comm_state: Any = None,
        pool: Any = None,
        *,
        effective_batch: int | None = None,
        micro_batch: int | None = None,
        min_micro_batch: int = 1,
        capacity: int | str | None = None,
        memory_limits: Mapping[str, float | int | str] | None = None,
        threads_by_phase: Mapping[str, int] | bool | None = None,
        phase_detector: PhaseDetector | None = None,
        goodput: bool = False,
        max_effective_batch: int | None = None,
        lr_rule: str = "adascale",
        precision_by_phase: Mapping[str, str] | None = None,
        metrics_source: Callable[[], Mapping[str, Any]] | None = None,
        metrics_sink: Callable[[StepReport], None] | None = None,
        scheduler: Scheduler | None = None,
        alert: Callable[[Action], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        step_time_target: float | None = None,
        thread_setter: Callable[[int], None] | None = None,
        max_threads: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.comm_state = comm_state
        self.pool = pool
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: has no parameters that require gradients")
        self.device = self.params[0].device
        self.is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.strategy = strategy if isinstance(strategy, Strategy) or strategy is None else Strategy.from_yaml(strategy)
        self.phase_detector = phase_detector if phase_detector is not None else PhaseDetector()
        self.memory_policy: MemoryPolicy | None = None
        if pool is not None:
            kwargs: dict[str, Any] = {"capacity": capacity if capacity is not None else self._default_capacity(pool)}
            if memory_limits is not None:
                kwargs["limits"] = memory_limits
            if threads_by_phase is False:
                kwargs["thread_setter"] = None
            elif isinstance(threads_by_phase, Mapping):
                kwargs["threads"] = threads_by_phase
            self.memory_policy = MemoryPolicy(pool, **kwargs)
            # The limit of the phase the detector starts in holds from the start.
            self.memory_policy.apply(self.phase_detector.phase, threads=False)
        self._controller_args: dict[str, Any] = {
            "micro_batch": micro_batch,
            "min_micro_batch": min_micro_batch,
            "goodput": goodput,
            "max_effective_batch": max_effective_batch,
            "lr_rule": lr_rule,
        }
        self.batch_controller: BatchController | None = None
        if effective_batch is not None:
            self._make_controller(effective_batch)
        if precision_by_phase is None:
            precision_by_phase = {"fine_tuning": "bfloat16"}
        for phase, dtype in precision_by_phase.items():
            if dtype not in ("bfloat16", "float16", "float32"):
                raise ValueError(f"precision_by_phase[{phase!r}]: expected bfloat16, float16 or float32, got {dtype!r}")
        self.precision_by_phase = dict(precision_by_phase)
        self.precision = "float32"
        self.set_precision(self.precision_by_phase.get(self.phase_detector.phase, "float32"))
        self.metrics_source = metrics_source
        self.metrics_sink = metrics_sink
        self.alert = alert
        self.scheduler = scheduler
        self.clock = clock
        self.actuators = Actuators(
            memory=self.memory_policy,
            batch=self.batch_controller,
            threads=self.memory_policy.thread_setter if self.memory_policy is not None else None,
            precision=self.set_precision,
            scheduler=scheduler,
            alert=alert,
        )
        self._thread_pid: PID | None = None
        if step_time_target is not None:
            self._init_thread_control(step_time_target, thread_setter, max_threads)
        self._noise: Any = None
        self.step_count = 0
        self.skipped_steps = 0
        self.ooms_recovered = 0
        self._lr_factor = 1.0
        self._last_loss: float | None = None
        self._last_step_end: float | None = None
        self._micro_sqnorms: list[tuple[float, int]] = []
        self._samples_this_step = 0
        self._fb_seconds = 0.0

    # -- setup helpers ---------------------------------------------------------------------------

    @staticmethod
    def _default_capacity(pool: Any) -> int:
        limit = _limit_of(pool.stats())
        if limit:
            return int(limit)
        device = str(getattr(pool, "device", "cpu"))
        if device.startswith("cuda") and torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            return int(torch.cuda.get_device_properties(index).total_memory)
        import psutil

        return int(psutil.virtual_memory().total)

    def _make_controller(self, effective_batch: int) -> BatchController:
        args = dict(self._controller_args)
        micro = args.pop("micro_batch")
        self.batch_controller = BatchController(effective_batch, micro, **args)
        if hasattr(self, "actuators"):
            self.actuators.batch = self.batch_controller
        return self.batch_controller

    def _init_thread_control(
        self, target: float, setter: Callable[[int], None] | None, max_threads: int | None
    ) -> None:
        if (
            isinstance(target, bool)
            or not isinstance(target, (int, float))
            or not (math.isfinite(target) and target > 0)
        ):
            raise ValueError(f"step_time_target: expected a positive number of seconds, got {target!r}")
        cores = available_cores() if max_threads is None else max_threads
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError(f"max_threads: expected a positive int, got {max_threads!r}")
        self.step_time_target = float(target)
        self.max_threads = cores
        self._thread_setter = setter if setter is not None else default_thread_setter
        self.threads = min(max(torch.get_num_threads(), 1), cores)
        # Reverse-acting on the relative step time, one update per step: too slow -> more threads.
        self._thread_pid = PID(-1.0, ki=-0.5, setpoint=1.0, output_limits=(1.0, float(cores)))
        self._thread_pid.reset(integral=float(self.threads))

    def _control_threads(self, step_seconds: float) -> None:
        assert self._thread_pid is not None
        out = self._thread_pid.update(step_seconds / self.step_time_target, now=float(self.step_count))
        n = min(max(round(out), 1), self.max_threads)
        if n != self.threads:
            self._thread_setter(n)
            self.threads = n

    @property
    def controller(self) -> BatchController:
        if self.batch_controller is None:
            raise RuntimeError("the effective batch is not known yet: pass effective_batch= or call batches() first")
        return self.batch_controller

    def set_precision(self, precision: str) -> None:
        """Sets the autocast dtype of the next forward passes (float32: none). A dtype the device
        does not support falls back to the other half type, else to float32."""
        if precision not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"precision: expected bfloat16, float16 or float32, got {precision!r}")
        if precision != "float32" and not _autocast_supported(self.device.type, _DTYPES[precision]):
            other = "float16" if precision == "bfloat16" else "bfloat16"
            precision = other if _autocast_supported(self.device.type, _DTYPES[other]) else "float32"
        self.precision = precision

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    # -- the loop --------------------------------------------------------------------------------

    def batches(self, loader: Iterable[Batch]) -> Iterator[tuple[int, Batch]]:
        """Yields ``(step, batch)`` with batches of exactly the current effective batch (the
        loader's batches are split or joined as needed; the last batch may be smaller). With a
        loader whose batch size equals the effective batch, batches pass through untouched."""
        pending: list[Batch] = []
        pending_n = 0
        for item in loader:
            n = _batch_size(item)
            if self.batch_controller is None:
                self._make_controller(n)
            target = self.controller.effective_batch
            if not pending and n == target:
                yield self.step_count, item
                continue
            pending.append(item)
            pending_n += n
            while pending_n >= self.controller.effective_batch:
                target = self.controller.effective_batch
                joined = pending[0] if len(pending) == 1 else _concat(pending)
                yield self.step_count, _slice(joined, 0, target)
                rest = pending_n - target
                pending = [_slice(joined, target, pending_n)] if rest else []
                pending_n = rest
        if pending_n:
            yield self.step_count, pending[0] if len(pending) == 1 else _concat(pending)

    def forward_backward(self, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """Computes the gradient of the batch's mean loss into ``.grad`` (accumulating onto what
        is there), in micro-batches of the controller's size, recovering from OOM (see the module
        docstring). Returns the batch's mean loss (a detached scalar tensor)."""
        t0 = self.clock()
        n = _batch_size(batch)
        if n == 0:
            raise ValueError("batch: expected at least one sample, got an empty batch")
        controller = self.batch_controller or self._make_controller(n)
        ooms_before = controller.num_ooms
        if self.is_ddp:
            total = self._forward_backward_ddp(batch, n, loss_fn, controller)
        else:
            total = self._forward_backward_exact(batch, n, loss_fn, controller)
        self.ooms_recovered += controller.num_ooms - ooms_before
        self._samples_this_step += n
        self._last_loss = float(total)
        self._fb_seconds += self.clock() - t0
        return total

    def _forward_backward_exact(
        self, batch: Batch, n: int, loss_fn: LossFn, controller: BatchController
    ) -> torch.Tensor:
        params = self.params
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        want_norms = n > controller.micro_batch or bool(self._micro_sqnorms)
        sqnorms: list[tuple[float, int]] = []

        def process(start: int, stop: int) -> None:
            weight = (stop - start) / n
            whole = start == 0 and stop == n
            with self._autocast():
                loss = loss_fn(self.model, batch if whole else _slice(batch, start, stop))
            _check_loss(loss)
            # The micro-batch's own mean-loss gradient; its weight is applied when it is added.
            grads = torch.autograd.grad(loss.float(), params, allow_unused=True)
            # Only now, after the whole micro-batch succeeded, does it touch .grad.
            fresh: list[torch.Tensor] = []
            acc: list[torch.Tensor] = []
            add: list[torch.Tensor] = []
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    if not g.is_contiguous():
                        g = g.contiguous()  # e.g. the expanded gradient of p.sum(): own memory
                    p.grad = g
                    fresh.append(g)
                else:
                    acc.append(p.grad)
                    add.append(g)
            if want_norms:
                norms = torch.stack(torch._foreach_norm(fresh + add)) if fresh or add else None
                sqnorms.append((0.0 if norms is None else float(norms.double().square().sum()), stop - start))
            if not whole:
                if fresh:
                    torch._foreach_mul_(fresh, weight)
                if acc:
                    torch._foreach_add_(acc, add, alpha=weight)  # one fused call for all parameters
            elif acc:
                torch._foreach_add_(acc, add)
            total.add_(loss.detach(), alpha=weight)

        run_step(n, process, controller, limit_bytes=self._pool_limit)
        self._micro_sqnorms.extend(sqnorms)
        return total.float()

    def _forward_backward_ddp(self, batch: Batch, n: int, loss_fn: LossFn, controller: BatchController) -> torch.Tensor:
        saved = [None if p.grad is None else p.grad.clone() for p in self.params]
        while True:
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            chunks = controller.chunks(n)
            try:
                for i, (start, stop) in enumerate(chunks):
                    weight = (stop - start) / n
                    sync = contextlib.nullcontext() if i == len(chunks) - 1 else self.model.no_sync()  # type: ignore[operator]
                    with sync:
                        with self._autocast():
                            loss = loss_fn(self.model, _slice(batch, start, stop))
                        _check_loss(loss)
                        (loss.float() * weight).backward()
                    total = total + loss.detach().double() * weight
                return total.float()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                controller.on_oom(exc, limit_bytes=self._pool_limit())
                for p, s in zip(self.params, saved, strict=True):
                    p.grad = None if s is None else s.clone()

    def _pool_limit(self) -> float | None:
        return None if self.pool is None else _limit_of(self.pool.stats())

    def step(self) -> StepReport:
        """Statistics -> noise scale -> optimizer step -> phase -> policies -> actions -> metrics."""
        t_start = self.clock()
        controller = self.controller
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("step(): no gradients; call forward_backward() first")
        from autoglm_rt.ops import grad_stats

        total = grad_stats(grads).total
        sumsq, nonfinite, var = float(total.sumsq), int(total.nonfinite), float(total.var)
        noise_scale = self._update_noise(sumsq)

        skipped = nonfinite > 0
        t_opt = self.clock()
        if skipped:
            self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_seconds = self.clock() - t_opt

        batch = self._samples_this_step or controller.effective_batch
        state = self.phase_detector.update(
            loss=self._last_loss,
            grad_norm=math.sqrt(sumsq) if math.isfinite(sumsq) else math.inf,
            b_simple=noise_scale,
            batch=batch,
            nonfinite=nonfinite,
            grad_var=var,
        )
        for event in state.events:
            if event.kind == "phase":
                self._enter_phase(event.after)

        pool_stats: Mapping[str, Any] = self.pool.stats() if self.pool is not None else {}
        if pool_stats:
            # Pressure is judged on this step's peak (forward/backward included), not on what is
            # left allocated after zero_grad; the policy's floor keeps the all-time peak.
            step_peak = int(pool_stats.get("peak_allocated_bytes", pool_stats.get("allocated_bytes", 0)))
            if self.memory_policy is not None:
                self.memory_policy.observe_peak(step_peak)
            reset = getattr(self.pool, "reset_peak_stats", None)
            if callable(reset):
                reset()
            controller.observe_memory(float(step_peak), _limit_of(pool_stats))
        step_seconds = None if self._last_step_end is None else t_start - self._last_step_end
        if step_seconds is not None and step_seconds > 0:
            compute = min(self._fb_seconds, step_seconds)
            controller.observe_step_time(step_seconds, compute_seconds=compute)
            if self._thread_pid is not None:
                self._control_threads(step_seconds)
        if controller.propose(noise_scale) is not None or controller.effective_batch != controller.base_batch:
            self._apply_lr_factor(controller.lr_factor(noise_scale))

        metrics = self._strategy_metrics(state.phase, state.unstable, noise_scale, step_seconds, pool_stats)
        results: list[ActionResult] = []
        if self.strategy is not None:
            for action in self.strategy.evaluate(metrics, t_start):
                results.append(self.actuators.dispatch(action))

        self._samples_this_step = 0
        self._micro_sqnorms = []
        t_end = self.clock()
        report = StepReport(
            step=self.step_count,
            loss=self._last_loss,
            step_seconds=step_seconds,
            overhead_seconds=t_end - t_start - optimizer_seconds,
            grad_norm=math.sqrt(sumsq) if math.isfinite(sumsq) else math.inf,
            nonfinite=nonfinite,
            skipped=skipped,
            noise_scale=noise_scale,
            phase=state.phase,
            unstable=state.unstable,
            micro_batch=controller.micro_batch,
            accumulation=controller.accumulation,
            effective_batch=controller.effective_batch,
            precision=self.precision,
            events=state.events,
            actions=tuple(results),
            metrics=metrics,
        )
        self.step_count += 1
        self._fb_seconds = 0.0
        self._last_step_end = t_end
        if self.metrics_sink is not None:
            self.metrics_sink(report)
        return report

    def _noise_pair(self, global_sqnorm: float) -> tuple[float, float, float, float] | None:
        """(local_sqnorm, local_batch, global_sqnorm, global_batch) for the noise-scale estimator:
        from the DDP hook's per-rank vs averaged norms when there are several ranks, else from the
        micro-batch gradients vs their accumulated mean."""
        norms_fn = getattr(self.comm_state, "norms", None)
        norms = norms_fn() if callable(norms_fn) else None
        n = self._samples_this_step
        if norms and norms.get("world_size", 1) > 1 and n > 0:
            world = float(norms["world_size"])
            return float(norms["mean_local_sq_norm"]), float(n), float(norms["global_sq_norm"]), n * world
        records = self._micro_sqnorms
        if len(records) >= 2 and math.isfinite(global_sqnorm):
            local_batch = sum(b for _, b in records) / len(records)
            local_sqnorm = sum(s for s, _ in records) / len(records)
            return local_sqnorm, local_batch, global_sqnorm, float(sum(b for _, b in records))
        return None

    def _update_noise(self, global_sqnorm: float) -> float | None:
        pair = self._noise_pair(global_sqnorm)
        if pair is not None and all(math.isfinite(v) for v in pair) and pair[3] > pair[1]:
            if self._noise is None:
                from autoglm_rt.stats import NoiseScale

                self._noise = NoiseScale()
            self._noise.update(*pair)
        if self._noise is None:
            return None
        b = self._noise.b_simple
        return None if b is None else float(b)

    def _enter_phase(self, phase: str) -> None:
        if self.memory_policy is not None:
            # With a step-time target the PID owns the thread count, not the phase.
            own_threads = self.memory_policy.thread_setter is not None and self._thread_pid is None
            self.memory_policy.apply(phase, threads=own_threads)
        self.set_precision(self.precision_by_phase.get(phase, "float32"))

    def _apply_lr_factor(self, factor: float) -> None:
        if not math.isfinite(factor) or factor <= 0 or factor == self._lr_factor:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] / self._lr_factor * factor
        self._lr_factor = factor

    def _strategy_metrics(
        self,
        phase: str,
        unstable: bool,
        noise_scale: float | None,
        step_seconds: float | None,
        pool_stats: Mapping[str, Any],
    ) -> dict[str, Any]:
        # Monitor figures first; what the runtime measures itself (phase, step time, the pool's
        # own memory usage) takes precedence over the host-level view.
        metrics: dict[str, Any] = dict(self.metrics_source()) if self.metrics_source is not None else {}
        metrics["phase"] = phase
        metrics["unstable"] = unstable
        if noise_scale is not None:
            metrics["noise_scale"] = noise_scale
        if step_seconds is not None:
            metrics["step_time"] = step_seconds
        for key, value in pool_stats.items():
            metrics[f"pool.{key}"] = value
        limit = _limit_of(pool_stats)
        if limit:
            metrics["memory_usage"] = float(pool_stats.get("allocated_bytes", 0)) / limit
        return metrics

    def policy_metrics(self) -> dict[str, Any]:
        """The ``policy`` source of ``autoglm_rt.monitor.MetricsExporter``: phase, unstable,
        micro_batch, accumulation, effective_batch, noise_scale."""
        c = self.batch_controller
        noise = None if self._noise is None else self._noise.b_simple
        return {
            "phase": self.phase_detector.phase,
            "unstable": self.phase_detector.unstable,
            "micro_batch": None if c is None else c.micro_batch,
            "accumulation": None if c is None else c.accumulation,
            "effective_batch": None if c is None else c.effective_batch,
            "noise_scale": None if noise is None else float(noise),
        }


# -- batches -------------------------------------------------------------------------------------


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("batch: expected a tensor with a sample dimension, got a scalar")
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        sizes = {_batch_size(b) for b in batch}
    elif isinstance(batch, Mapping) and batch:
        sizes = {_batch_size(b) for b in batch.values()}
    else:
        raise TypeError(
            f"batch: expected a tensor or a non-empty tuple/list/dict of tensors, got {type(batch).__name__}"
        )
    if len(sizes) != 1:
        raise ValueError(f"batch: its parts disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, tuple):
        return tuple(_slice(b, start, stop) for b in batch)
    if isinstance(batch, list):
        return [_slice(b, start, stop) for b in batch]
    return {k: _slice(v, start, stop) for k, v in batch.items()}


def _concat(batches: list[Batch]) -> Batch:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, (tuple, list)):
        parts = [_concat([b[i] for b in batches]) for i in range(len(first))]
        return tuple(parts) if isinstance(first, tuple) else parts
    return {k: _concat([b[k] for b in batches]) for k in first}


def _limit_of(stats: Mapping[str, Any]) -> float | None:
    """The pool's limit in bytes, or None when it has none (None, 0, or SIZE_MAX-like values)."""
    limit = stats.get("limit_bytes")
    if not limit or limit >= 2**62:
        return None
    return float(limit)


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"loss_fn: expected a scalar tensor (the mean loss of the micro-batch), got "
            f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}"
        )


def _autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    if not torch.amp.is_autocast_available(device_type):
        return False
    if device_type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16)


__all__ = ["Runtime", "StepReport"]
