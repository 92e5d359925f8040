"""Runtime wired to the monitor: the sampler's smoothed figures feed the strategy, the exporter
publishes the runtime's policy state, pool stats and step durations."""

from __future__ import annotations

import torch
from torch import nn

from autoglm_rt.memory import CachingPool
from autoglm_rt.monitor.exporter import MetricsExporter
from autoglm_rt.monitor.sampler import Sampler, strategy_metrics
from autoglm_rt.policy import Strategy
from autoglm_rt.runtime import BatchConfig, Hooks, MemoryConfig, Runtime


def test_sampler_feeds_the_strategy_and_the_exporter_publishes_the_runtime() -> None:
    sampler = Sampler(period=1.0, gpus=False)
    snapshots = []

    def source() -> dict[str, float]:
        snap = sampler.sample_once()
        snapshots.append(snap)
        return strategy_metrics(snap)

    strategy = Strategy.from_yaml(
        """
strategy:
  name: host-seen
  trigger: {cpu_usage: ">=0%", load_1min: ">=0", host_memory_usage: ">0%"}
  actions: [{alert: "host figures arrived"}]
"""
    )
    pool = CachingPool("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    exporter = MetricsExporter(rank=0, host_metrics=False)
    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        strategy=strategy,
        pool=pool,
        batch=BatchConfig(micro_batch=8),
        memory=MemoryConfig(capacity="64Mi", threads_by_phase=False),
        hooks=Hooks(metrics_source=source, metrics_sink=lambda r: exporter.observe_step(r.step_seconds or 0.0)),
    )
    exporter.add_source("policy", rt.policy_metrics)
    exporter.add_source("pool", pool.stats)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    fired = []
    for _ in range(3):
        rt.forward_backward((x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        report = rt.step()
        fired += [r.action.value for r in report.actions]
    assert fired == ["host figures arrived"]
    assert report.metrics["cpu_usage"] == strategy_metrics(snapshots[-1])["cpu_usage"]
    # the pool's own ratio wins over the host's memory figure
    assert report.metrics["memory_usage"] == pool.stats()["allocated_bytes"] / pool.limit
    text = exporter.render().decode()
    assert 'autoglm_rt_training_phase{phase="initial",rank="0"} 1.0' in text
    assert 'autoglm_rt_micro_batch_size{rank="0"} 8.0' in text
    assert 'autoglm_rt_accumulation_steps{rank="0"} 2.0' in text
    assert 'autoglm_rt_step_duration_seconds_count{rank="0"} 3.0' in text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert values['autoglm_rt_pool_limit_bytes{rank="0"}'] == pool.limit == int(0.9 * 64 * 2**20)
