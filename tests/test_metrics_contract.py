"""The metrics contract end to end: what the deploy files name is what a real run exports.

1. A real Runtime with the top-k hook on a 2-rank gloo group, registered with a MetricsExporter
   through ``Runtime(exporter=...)`` alone, trains 20 steps; a scrape of each rank must hold
   every ``autoglm_rt_`` series the alert rules and the Grafana dashboard use (the GPU-only ones
   excepted by the explicit list below), so the deploy files and the code cannot drift.
2. A real Prometheus loads ``deploy/prometheus/alerts.yml`` and scrapes a real training run; when
   the run's gradients turn non-finite, ``AutoglmRtNonFiniteGradients`` fires through
   Prometheus's own API.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from tests.ddp_harness import run_on_two_ranks
from tests.test_monitor_prometheus import _get, running_prometheus

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"\bautoglm_rt(?:_[a-z0-9]+)+\b")
#: Series only a machine with an NVIDIA GPU (NVML) produces.
GPU_ONLY = {
    "autoglm_rt_gpu_utilization_ratio",
    "autoglm_rt_gpu_utilization_ewma_ratio",
    "autoglm_rt_gpu_memory_used_bytes",
    "autoglm_rt_gpu_memory_total_bytes",
    "autoglm_rt_gpu_power_watts",
    "autoglm_rt_gpu_power_limit_watts",
    "autoglm_rt_gpu_energy_joules_total",
    "autoglm_rt_gpu_sm_clock_hertz",
    "autoglm_rt_gpu_memory_clock_hertz",
    "autoglm_rt_energy_gpu_joules_total",
}


def deploy_names() -> set[str]:
    """Every ``autoglm_rt_`` name in the alert and recording rules' expressions and in the
    dashboard's queries (recording rules' own ``autoglm_rt:`` outputs are not exported names)."""
    exprs: list[str] = []
    for path in sorted((ROOT / "deploy/prometheus").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc.get("groups", []) if isinstance(doc, dict) else []:
            exprs += [str(r["expr"]) for r in group["rules"]]
    for path in sorted((ROOT / "deploy/grafana").glob("*.json")):
        dash = json.loads(path.read_text())
        exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        exprs += [v["definition"] for v in dash.get("templating", {}).get("list", []) if "definition" in v]
    return {m for e in exprs for m in _NAME.findall(e)}


def _train_and_scrape(rank: int) -> str:
    import autoglm_rt as rt
    from autoglm_rt.memory import CachingPool
    from autoglm_rt.monitor import EnergyMeter, MetricsExporter, Sampler
    from autoglm_rt.runtime import BatchConfig, MemoryConfig, Runtime

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 32))  # buckets above min_numel
    model = nn.parallel.DistributedDataParallel(net)
    state = rt.ddp.TopKState(density=0.05, start_iter=2)
    model.register_comm_hook(state, rt.ddp.topk_hook)
    sampler = Sampler(period=0.5, gpus=False)
    sampler.sample_once()
    exporter = MetricsExporter(sampler, rank=rank, host_metrics=rank == 0)
    pool = CachingPool("cpu")
    runtime = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        strategy=rt.policy.bundled_strategy("dynamic_balance"),
        comm_state=state,
        pool=pool,
        precision_by_phase={},
        batch=BatchConfig(micro_batch=8),
        memory=MemoryConfig(capacity="64Mi", threads_by_phase=False),
        exporter=exporter,
    )
    meter = EnergyMeter(gpus=False).start()
    exporter.add_source("energy", meter.as_source)  # the energy meter is not the Runtime's own
    target = torch.randn(32, 32, generator=torch.Generator().manual_seed(7))  # a task with signal to learn
    g = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x = torch.randn(16, 32, generator=g)
        runtime.forward_backward((x, x @ target), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        runtime.step()
    sampler.sample_once()
    return exporter.render().decode()


@pytest.mark.distributed
def test_a_real_two_rank_run_exports_every_series_the_deploy_files_name() -> None:
    wanted = deploy_names() - GPU_ONLY
    assert len(wanted) > 30, wanted  # the extraction found the deploy files' names
    texts = run_on_two_ranks(_train_and_scrape, timeout=240)
    for rank, text in enumerate(texts):
        # Samples, and families declared without a sample yet (a counter no error has touched).
        samples = set(re.findall(r"^(autoglm_rt_[a-z0-9_]+)[{ ]", text, re.M))
        samples |= set(re.findall(r"^# TYPE (autoglm_rt_[a-z0-9_]+) ", text, re.M))
        # Host series come from local rank 0 only (one copy per host), by design.
        need = wanted if rank == 0 else {n for n in wanted if not _host_series(n)}
        missing = sorted(need - samples)
        assert not missing, f"rank {rank} does not export {missing}"
        assert f'autoglm_rt_optimizer_steps_total{{rank="{rank}"}} 20.0' in text
        ratio = float(re.search(r'^autoglm_rt_compression_ratio\{rank="\d"\} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
        assert ratio > 5.0  # dense / sent at 5% density after 2 dense steps


def _host_series(name: str) -> bool:
    return name.startswith(("autoglm_rt_host_", "autoglm_rt_load_level", "autoglm_rt_gpu_", "autoglm_rt_monitor_nvml"))


class _Run:
    """A real training loop (a small MLP, SGD) in this process, with its Runtime's metrics served
    on 127.0.0.1; ``poison`` makes the next steps' gradients non-finite."""

    def __init__(self) -> None:
        from autoglm_rt.monitor import MetricsExporter, start_metrics_server
        from autoglm_rt.runtime import Runtime

        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.exporter = MetricsExporter(rank=0, host_metrics=False)
        self.runtime = Runtime(
            self.model, torch.optim.SGD(self.model.parameters(), lr=0.05), precision_by_phase={}, exporter=self.exporter
        )
        self.server = start_metrics_server(0, exporter=self.exporter)
        self.poison = False
        self.g = torch.Generator().manual_seed(1)

    def step(self) -> None:
        x = torch.randn(16, 8, generator=self.g)
        scale = float("inf") if self.poison else 1.0
        self.runtime.forward_backward(
            (x, torch.sin(x.sum(1, keepdim=True))), lambda m, b: nn.functional.mse_loss(m(b[0]) * scale, b[1])
        )
        self.runtime.step()


@pytest.mark.slow
def test_non_finite_gradients_of_a_real_run_fire_the_alert_in_prometheus(tmp_path: Path) -> None:
    run = _Run()
    try:
        with running_prometheus(tmp_path, [f"127.0.0.1:{run.server.port}"]) as prom:

            def train_until(done: Any, timeout: float, what: str) -> Any:
                deadline = time.monotonic() + timeout
                while True:
                    prom.check_alive()
                    run.step()
                    if got := done():
                        return got
                    assert time.monotonic() < deadline, f"{what} within {timeout} s"
                    time.sleep(0.1)

            # Healthy training first: the counter is scraped at 0, and no alert is active.
            train_until(lambda: prom.query("autoglm_rt_grad_nonfinite_steps_total == 0"), 60, "a healthy scrape")
            alerts = _get(f"{prom.base}/api/v1/alerts")["data"]["alerts"]
            assert not [a for a in alerts if "NonFinite" in a["labels"]["alertname"]]
            skipped_before = run.runtime.skipped_steps
            run.poison = True

            def alert() -> list[dict[str, Any]]:
                alerts = _get(f"{prom.base}/api/v1/alerts")["data"]["alerts"]
                name = "AutoglmRtNonFiniteGradients"
                return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] in ("pending", "firing")]

            fired = train_until(alert, 60, "the non-finite alert")
            assert fired[0]["labels"]["rank"] == "0" and fired[0]["labels"]["severity"] == "critical"
            assert run.runtime.skipped_steps > skipped_before  # the Runtime skipped those steps as well
            elements = prom.query("autoglm_rt_grad_nonfinite_elements_total")
            assert float(elements[0]["value"][1]) > 0
    finally:
        run.server.close()


def test_deploy_names_are_found() -> None:
    names = deploy_names()
    assert "autoglm_rt_grad_nonfinite_steps_total" in names and "autoglm_rt_compression_ratio" in names
    assert not any(":" in n for n in names)
