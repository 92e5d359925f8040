"""The demo's ``autoglm_rt`` run: everything on.

Per rank: the compression hook (by default 1-bit Adam, ``autoglm_rt.onebit``; or the top-k hook
with error feedback compressing AdamW's preconditioned update, ``ddp.AdamUpdate``; either way the
optimizer is SGD on the delivered step), the Runtime
(fused statistics, noise scale from the hook's local/global squared norms, phase detection, batch
controller), the demo strategy (``policy/strategies/demo.yaml``: the phase halves the micro-batch),
a Prometheus endpoint on 127.0.0.1 (rank r on a port of its own) with every source the Runtime
has (``Runtime.attach``, with the energy meter on rank 0). The hook is timed (``hook_seconds``
per step) and, after training, the step's compute without communication and the hook's callback
costs are measured on this model (``step_costs``): the inputs of the report's projected step
times (``demo.projection``).

On GPU the memory policy drives the pool installed as torch's CUDA allocator. On CPU there is no
pool: torch's CPU allocator is not pluggable, so a pool would hold none of the model's tensors and
a limit on it would limit nothing; the activation memory is measured instead (``activations``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt.demo.activations import ActivationMeter
from autoglm_rt.demo.model import loss_fn
from autoglm_rt.demo.step_costs import HookTimer, callback_seconds, compute_seconds, sign_callback_seconds

DEMO_STRATEGY = "demo"  # policy/strategies/demo.yaml


class RunSettings(Protocol):
    """What this run reads of ``train.DemoConfig`` (not imported: train imports this module)."""

    @property
    def batch(self) -> int: ...
    @property
    def density(self) -> float: ...
    @property
    def dense_steps(self) -> int: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def metrics_port(self) -> int: ...
    @property
    def density_floor(self) -> float | None: ...
    @property
    def density_ceiling(self) -> float: ...
    @property
    def compress_update(self) -> str: ...
    @property
    def compressor(self) -> str: ...
    @property
    def lr(self) -> float: ...


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: RunSettings, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW, or under ``compress_update`` "frozen"/"local" SGD with AdamW's lr and weight decay:
    the hook then delivers AdamW's direction, and SGD's L2 term on a momentum-free step is
    AdamW's decoupled decay, so the pair steps as AdamW does."""
    if cfg.compressor not in ("onebit", "topk"):
        raise ValueError(f"compressor: expected 'onebit' or 'topk', got {cfg.compressor!r}")
    if cfg.compress_update not in ("frozen", "local", "off"):
        raise ValueError(f"compress_update: expected 'frozen', 'local' or 'off', got {cfg.compress_update!r}")
    if cfg.compressor == "topk" and cfg.compress_update == "off":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=weight_decay)


def _hook_for(cfg: RunSettings) -> tuple[Any, Any]:
    """The DDP hook state and hook ``cfg.compressor`` names."""
    if cfg.compressor == "onebit":
        from autoglm_rt.onebit import OneBitAdam, OneBitAdamState, onebit_adam_hook

        return OneBitAdamState(OneBitAdam(start_iter=cfg.dense_steps)), onebit_adam_hook
    from autoglm_rt.ddp import AdamUpdate, TopKState, topk_hook

    controller = None
    if cfg.density_floor is not None:
        from autoglm_rt.policy.compression import DensityController, DensityControllerConfig

        config = DensityControllerConfig(floor=cfg.density_floor, ceiling=cfg.density_ceiling, interval=10)
        controller = DensityController(config)
    adam = None if cfg.compress_update == "off" else AdamUpdate(variance=cfg.compress_update)
    state = TopKState(
        density=cfg.density, start_iter=cfg.dense_steps, warmup=cfg.warmup_steps, controller=controller, adam=adam
    )
    return state, topk_hook


class AutoglmRun:
    def __init__(
        self,
        model: DDP,
        optimizer: torch.optim.Optimizer,
        cfg: RunSettings,
        device: torch.device,
        rank: int,
        *,
        energy: Any = None,
    ) -> None:
        """``energy``: the run's ``EnergyMeter`` (rank 0 meters the machine; None elsewhere),
        exported with the Runtime's sources."""
        from autoglm_rt.memory import torch_pool
        from autoglm_rt.monitor import MetricsExporter, Sampler, start_metrics_server, strategy_metrics
        from autoglm_rt.policy import bundled_strategy
        from autoglm_rt.runtime import BatchConfig, Hooks, Runtime

        self.cfg = cfg
        self.comm, hook = _hook_for(cfg)
        self.hook_timer = HookTimer(hook)
        model.register_comm_hook(self.comm, self.hook_timer.hook)
        self.model = model
        self._last: tuple[tuple[torch.Tensor, torch.Tensor], int] | None = None  # batch, micro-batch
        self.pool: Any = torch_pool(device.index or 0) if device.type == "cuda" else None
        self.sampler = Sampler(period=1.0, gpus=device.type == "cuda").start()
        self.exporter = MetricsExporter(self.sampler, rank=rank)
        self.server = start_metrics_server(cfg.metrics_port, exporter=self.exporter)
        self.activations = ActivationMeter(model.parameters())
        self.loss_fn = self.activations.wrap(loss_fn)

        def metrics() -> dict[str, float]:
            snap = self.sampler.latest()
            return strategy_metrics(snap) if snap is not None else {}

        self.runtime = Runtime(
            model,
            optimizer,
            strategy=bundled_strategy(DEMO_STRATEGY),
            comm_state=self.comm,
            pool=self.pool,
            batch=BatchConfig(effective_batch=cfg.batch),
            hooks=Hooks(metrics_source=metrics),
        )
        self.runtime.attach(self.exporter, energy=energy)
        # What happened, for the report (saved in checkpoints, so a resumed run's report is whole).
        self.phases: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        loss = self.runtime.forward_backward(batch, self.loss_fn)
        report = self.runtime.step()
        self._last = (batch, report.micro_batch)
        for ev in report.events:
            self.phases.append({"step": report.step, "kind": ev.kind, "before": ev.before, "after": ev.after,
                                "reason": ev.reason})  # fmt: skip
        actions = [
            {
                "step": report.step,
                "rule": r.action.strategy,
                "action": r.action.name,
                "value": r.action.value,
                "applied": r.applied,
                "detail": r.detail,
            }
            for r in report.actions
        ]
        self.actions += actions
        metrics = self.comm.metrics()
        record: dict[str, Any] = {
            "micro_batch": report.micro_batch,
            "accumulation": report.accumulation,
            "phase": report.phase,
            "unstable": report.unstable,
            "noise_scale": report.noise_scale,
            "grad_norm": report.grad_norm,
            "precision": report.precision,
            "activation_bytes": self.activations.take_step_peak(),
            "bytes_communicated_total": int(metrics["bytes_sent"]),
            "hook_seconds": self.hook_timer.take(),
            "bytes_saved_ratio": 1 - metrics["bytes_sent"] / metrics["dense_bytes"] if metrics["dense_bytes"] else 0.0,
        }
        if self.pool is not None:
            record["memory_limit_bytes"] = self.pool.limit
        if actions:
            record["actions"] = actions
        return float(loss), record

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond model, optimizer and RNG: the Runtime's and the hook's
        state and the report's history."""
        return {
            "runtime": self.runtime.state_dict(),
            "comm": self.comm.state_dict(),
            "phases": list(self.phases),
            "actions": list(self.actions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runtime.load_state_dict(state["runtime"])
        self.comm.load_state_dict(state["comm"])
        self.phases = list(state["phases"])
        self.actions = list(state["actions"])

    def step_costs(self) -> dict[str, float] | None:
        """Measured after training (the weights and optimizer are not touched): forward/backward
        of the last step's batch in its micro-batches without communication, and the top-k
        callbacks' costs on this model's buckets at the final density. None before any step."""
        if self._last is None or not self.hook_timer.bucket_numels:
            return None
        (x, y), micro = self._last
        chunks = [(x[i : i + micro], y[i : i + micro]) for i in range(0, x.shape[0], micro)]
        numels = list(self.hook_timer.bucket_numels.values())
        if self.cfg.compressor == "onebit":
            fixed, per_rank = sign_callback_seconds(numels, self.comm.config.chunk)
        else:
            fixed, per_rank = callback_seconds(numels, self.cfg.density)
        element = next(self.model.parameters()).element_size()
        return {
            "compute_s": compute_seconds(self.model, loss_fn, chunks),
            "decompress_s": per_rank,
            "callback_s": fixed,
            "dense_bytes": float(sum(numels) * element),
            "buckets": len(numels),
        }

    def summary(self) -> dict[str, Any]:
        metrics = self.comm.metrics()
        return {
            "step_costs": self.step_costs(),
            "bytes_communicated": int(metrics["bytes_sent"]),
            "dense_bytes": int(metrics["dense_bytes"]),
            "phases": self.phases,
            "actions": self.actions,
            "strategy": DEMO_STRATEGY,
            "metrics_url": self.server.url,
            "pool": None if self.pool is None else "torch's CUDA allocator, limit driven by the memory policy",
            "notes": [
                self._hook_note(),
                f"strategy: the bundled {DEMO_STRATEGY!r} (policy/strategies/{DEMO_STRATEGY}.yaml)",
            ],
        }

    def _hook_note(self) -> str:
        cfg = self.cfg
        if cfg.compressor == "onebit":
            return (
                f"1-bit Adam (autoglm_rt.onebit): {cfg.dense_steps} dense AdamW steps (int8), then each rank's "
                "momentum in AdamW's preconditioned space as 1 bit per entry with a scale per chunk and error "
                "feedback; v refreshed by dense int8 steps at 2x the start and its doublings; SGD applies the step"
            )
        return (
            f"top-k density {cfg.density:.3g} with error feedback after {cfg.dense_steps} dense steps "
            f"and a {cfg.warmup_steps}-step warm-up, compressing "
            + (
                "the raw gradient (AdamW steps on the sparse average)"
                if cfg.compress_update == "off"
                else f"AdamW's preconditioned update ({cfg.compress_update} second moment; SGD applies it)"
            )
        )

    def close(self) -> None:
        self.server.close()
        self.sampler.close()
