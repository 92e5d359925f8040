"""pytest-benchmark: one sample, one scrape render (CI runs these once with --benchmark-disable)."""

from __future__ import annotations

import psutil
from prometheus_client.parser import text_string_to_metric_families

from autoglm_rt.monitor import MetricsExporter, Sampler


def test_sample_once(benchmark) -> None:  # type: ignore[no-untyped-def]
    sampler = Sampler(gpus=False)
    snap = benchmark(sampler.sample_once)
    assert snap.host is not None
    assert snap.host.cpu_count == psutil.cpu_count(logical=True)
    assert 0.0 <= snap.ewma["cpu_ratio"] <= 1.0


def test_render_scrape(benchmark) -> None:  # type: ignore[no-untyped-def]
    sampler = Sampler(gpus=False)
    sampler.sample_once()
    exporter = MetricsExporter(sampler=sampler, rank=0, host_metrics=True)
    exporter.add_source("pool", lambda: {"allocated_bytes": 123, "num_ooms": 4})
    exporter.observe_step(0.5)
    text = benchmark(exporter.render).decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["autoglm_rt_pool_allocated_bytes"] == 123
    assert values["autoglm_rt_pool_ooms_total"] == 4
    assert values["autoglm_rt_step_duration_seconds_count"] == 1
