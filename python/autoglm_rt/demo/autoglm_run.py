"""The demo's ``autoglm_rt`` run: everything on.

Per rank: the top-k hook with error feedback (density warm-up after a dense start), the Runtime
(fused statistics, noise scale from the hook's local/global squared norms, phase detection,
memory policy over a pool, batch controller), the bundled dynamic-balance strategy on the
sampler's smoothed load, a Prometheus endpoint on 127.0.0.1 (rank r on a port of its own).

On CPU the pool is a host ``CachingPool`` whose limit the memory policy drives (torch's CPU
allocator is not pluggable, so the model's tensors do not live in it); on GPU it is the pool
installed as torch's CUDA allocator, and the limit binds the model.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt.demo.train import DemoConfig, loss_fn

CPU_POOL_CAPACITY = "1Gi"  # the nominal device memory the phase fractions of a CPU run refer to


def bundled_strategy() -> str:
    return resources.files("autoglm_rt.policy").joinpath("strategies/dynamic_balance.yaml").read_text()


class AutoglmRun:
    def __init__(self, model: DDP, optimizer: torch.optim.Optimizer, cfg: DemoConfig, device: torch.device, rank: int):
        from autoglm_rt.ddp import TopKState, topk_hook
        from autoglm_rt.memory import CachingPool, torch_pool
        from autoglm_rt.monitor import MetricsExporter, Sampler, start_metrics_server, strategy_metrics
        from autoglm_rt.runtime import BatchConfig, Hooks, MemoryConfig, Runtime

        self.cfg = cfg
        controller = None
        if cfg.density_floor is not None:
            from autoglm_rt.policy.compression import DensityController, DensityControllerConfig

            config = DensityControllerConfig(floor=cfg.density_floor, ceiling=cfg.density_ceiling, interval=10)
            controller = DensityController(config)
        self.comm = TopKState(
            density=cfg.density, start_iter=cfg.dense_steps, warmup=cfg.warmup_steps, controller=controller
        )
        model.register_comm_hook(self.comm, topk_hook)
        if device.type == "cuda":
            self.pool = torch_pool(device.index or 0)
            capacity: Any = None
        else:
            self.pool = CachingPool("cpu")
            capacity = CPU_POOL_CAPACITY
        self.sampler = Sampler(period=1.0, gpus=device.type == "cuda").start()
        self.exporter = MetricsExporter(self.sampler, rank=rank)
        self.server = start_metrics_server(cfg.metrics_port, exporter=self.exporter)
        self.phases: list[dict[str, Any]] = []
        self.actions: list[str] = []

        def metrics() -> dict[str, float]:
            snap = self.sampler.latest()
            return strategy_metrics(snap) if snap is not None else {}

        self.runtime = Runtime(
            model,
            optimizer,
            strategy=bundled_strategy(),
            comm_state=self.comm,
            pool=self.pool,
            batch=BatchConfig(effective_batch=cfg.batch),
            # threads_by_phase=False: each rank keeps its one thread (2 ranks on 2 cores)
            memory=MemoryConfig(capacity=capacity, threads_by_phase=False),
            hooks=Hooks(metrics_source=metrics),
            exporter=self.exporter,
        )

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        loss = self.runtime.forward_backward(batch, loss_fn)
        report = self.runtime.step()
        if report.step_seconds is not None:
            self.exporter.observe_step(report.step_seconds)
        for ev in report.events:
            self.phases.append({"step": report.step, "event": str(ev)})
        self.actions += [str(a) for a in report.actions]
        sent, dense = self.comm.bytes_sent, self.comm.dense_bytes
        return float(loss), {
            "micro_batch": report.micro_batch,
            "accumulation": report.accumulation,
            "phase": report.phase,
            "unstable": report.unstable,
            "noise_scale": report.noise_scale,
            "grad_norm": report.grad_norm,
            "memory_limit_bytes": self.pool.limit,
            "bytes_communicated_total": sent,
            "bytes_saved_ratio": 1 - sent / dense if dense else 0.0,
        }

    # What a resumed run needs beyond model and optimizer: the hook's residuals and counters (so
    # error feedback continues exactly), and the runtime's statistics-driven state.
    _COMM_FIELDS = (
        "iter",
        "_residuals",
        "bytes_sent",
        "dense_bytes",
        "compressed_buckets",
        "dense_buckets",
        "residual_resets",
        "bucket_density",
    )
    _RUNTIME_FIELDS = ("step_count", "skipped_steps", "ooms_recovered", "phase_detector", "_noise")

    def state(self) -> dict[str, Any]:
        return {
            "comm": {k: getattr(self.comm, k) for k in self._COMM_FIELDS},
            "runtime": {k: getattr(self.runtime, k) for k in self._RUNTIME_FIELDS},
            "phases": self.phases,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for k, v in state["comm"].items():
            setattr(self.comm, k, v)
        for k, v in state["runtime"].items():
            setattr(self.runtime, k, v)
        self.phases = state["phases"]

    def summary(self) -> dict[str, Any]:
        return {
            "bytes_communicated": self.comm.bytes_sent,
            "dense_bytes": self.comm.dense_bytes,
            "phases": self.phases,
            "actions": self.actions[-50:],
            "metrics_url": self.server.url,
            "notes": [
                f"top-k density {self.cfg.density:.3g} with error feedback after {self.cfg.dense_steps} dense steps",
                "pool: "
                + (
                    "torch's CUDA allocator"
                    if self.pool.device.startswith("cuda")
                    else "a host pool driven by the memory policy (torch's CPU tensors do not live in it)"
                ),
            ],
        }

    def close(self) -> None:
        self.server.close()
        self.sampler.close()
