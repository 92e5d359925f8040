"""The monitor against what a user would otherwise run, side by side:

- one sample (psutil reads + EWMA + window + level) vs the bare psutil reads;
- a scrape rendered by the exporter (sources called at scrape time) vs the same series kept in
  ordinary prometheus_client Gauges/Counters that the loop sets, then rendered;
- an HTTP scrape of ``start_metrics_server`` vs prometheus_client's ``start_http_server`` serving
  those ordinary metrics.

Plus the end-to-end overhead of the sampling thread at the default 2 s period, as a fraction of
one core (process CPU time while only the sampler runs; target <= 1%).
"""

from __future__ import annotations

import os
import time
import urllib.request
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from autoglm_rt import benchmarking
from autoglm_rt.monitor import MetricsExporter, Sampler, start_metrics_server
from autoglm_rt.monitor.sampler import DEFAULT_PERIOD

POOL = {
    "allocated_bytes": 3 << 30,
    "reserved_bytes": 4 << 30,
    "requested_bytes": 3 << 30,
    "peak_allocated_bytes": 5 << 30,
    "peak_reserved_bytes": 6 << 30,
    "peak_requested_bytes": 5 << 30,
    "limit_bytes": 12 << 30,
    "num_allocs": 1000,
    "num_frees": 990,
    "num_cache_hits": 900,
    "num_upstream_allocs": 100,
    "num_upstream_frees": 7,
    "num_ooms": 0,
    "num_trims": 3,
    "largest_free_block_bytes": 1 << 20,
    "fragmentation_ratio": 0.25,
}
POLICY = {"phase": "convergence", "micro_batch": 16, "accumulation": 4, "noise_scale": 1234.5}


def _sampler_thread_overhead(seconds: float) -> dict[str, float]:
    """Process CPU seconds per wall second while the sampler thread runs at the default period
    and the main thread sleeps; the same measured with no sampler is subtracted."""

    def cpu_per_second(run: bool) -> float:
        sampler = Sampler(DEFAULT_PERIOD)
        c0, t0 = time.process_time(), time.perf_counter()
        if run:
            sampler.start()
        time.sleep(seconds)
        if run:
            sampler.close()
        return (time.process_time() - c0) / (time.perf_counter() - t0)

    idle = cpu_per_second(False)
    busy = cpu_per_second(True)
    return {"fraction_of_core": max(busy - idle, 0.0), "idle_process_fraction": idle, "seconds": seconds}


def _plain_registry(exporter_text: str) -> tuple[CollectorRegistry, Any]:
    """The same families as ordinary prometheus_client metrics, and a function that sets them all
    (what a training loop would do each step without the exporter)."""
    reg = CollectorRegistry()
    setters: list[Any] = []
    for fam in text_string_to_metric_families(exporter_text):
        if fam.type not in ("gauge", "counter") or fam.name.endswith("_created"):
            continue
        labelnames = sorted({k for s in fam.samples for k in s.labels})
        cls = Counter if fam.type == "counter" else Gauge
        metric = cls(fam.name, fam.documentation or fam.name, labelnames=labelnames, registry=reg)
        for s in fam.samples:
            child = metric.labels(**s.labels) if labelnames else metric
            if fam.type == "counter":
                setters.append(lambda c=child, v=s.value: c._value.set(v))
            else:
                setters.append(lambda c=child, v=s.value: c.set(v))

    def set_all() -> None:
        for fn in setters:
            fn()

    return reg, set_all


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    rounds = 3 if ctx.quick else 7
    min_time = 0.05 if ctx.quick else 0.2
    out = []

    # steady state at the default period: the clock moves 2 s per sample, so the 60 s window
    # holds 30 samples as it would in a run (a tight loop would otherwise fill it with thousands)
    ticks = iter(range(10**9))
    sampler = Sampler(gpus=True, clock=lambda: next(ticks) * DEFAULT_PERIOD)
    for _ in range(40):
        sampler.sample_once()

    def bare_psutil() -> None:
        psutil.cpu_percent(interval=None)
        psutil.virtual_memory()
        os.getloadavg()

    cmp = benchmarking.compare(
        "one sample (steady state) vs bare psutil reads",
        sampler.sample_once,
        bare_psutil,
        baseline_label="psutil reads",
        rounds=rounds,
        min_time=min_time,
    )
    overhead = _sampler_thread_overhead(6.0 if ctx.quick else 30.0)
    cmp.extra.update(
        sample_cpu_seconds=sampler.total_sample_seconds / max(sampler.samples, 1),
        thread_overhead_fraction_of_core=overhead["fraction_of_core"],
        overhead_measured_seconds=overhead["seconds"],
        gpus=len(sampler.gpu_probe.gpus) if sampler.gpu_probe is not None else 0,
    )
    out.append(cmp)

    exporter = MetricsExporter(sampler=sampler, rank=0, host_metrics=True)
    exporter.add_source("pool", lambda: POOL, labels={"device": "cpu"})
    exporter.add_source("policy", lambda: POLICY)
    exporter.add_source("compression", lambda: {"bytes_sent": 10, "dense_bytes": 1000})
    for d in (0.1, 0.2, 0.4):
        exporter.observe_step(d)
    text = exporter.render().decode()
    reg, set_all = _plain_registry(text)

    def plain_render() -> bytes:
        set_all()
        return generate_latest(reg)

    cmp = benchmarking.compare(
        "scrape render vs plain prometheus_client",
        exporter.render,
        plain_render,
        baseline_label="Gauges set + generate_latest",
        rounds=rounds,
        min_time=min_time,
    )
    cmp.extra["series"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    out.append(cmp)

    server = start_metrics_server(0, exporter=exporter, offset_by_local_rank=False)
    plain_server, plain_thread = start_http_server(0, addr="127.0.0.1", registry=reg)
    plain_url = f"http://127.0.0.1:{plain_server.server_port}/metrics"
    try:
        cmp = benchmarking.compare(
            "HTTP scrape latency vs prometheus_client server",
            lambda: urllib.request.urlopen(server.url, timeout=10).read(),
            lambda: (set_all(), urllib.request.urlopen(plain_url, timeout=10).read()),
            baseline_label="start_http_server",
            rounds=rounds,
            min_time=min_time,
        )
        cmp.extra["scrape_ms"] = cmp.case_seconds * 1e3
        out.append(cmp)
    finally:
        server.close()
        plain_server.shutdown()
        plain_server.server_close()
        plain_thread.join(5)
    sampler.close()
    return out
