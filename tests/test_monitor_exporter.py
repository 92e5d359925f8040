"""The Prometheus exporter's output, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from autoglm_rt.monitor import (
    STEP_BUCKETS,
    HostProbe,
    MetricsExporter,
    NvmlProbe,
    Sampler,
    start_metrics_server,
)
from autoglm_rt.monitor.probes import hostname
from tests.monitor_reference import FakeGpu, FakeNvml, FakePsutil, ManualClock

ROOT = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

POOL = {
    "allocated_bytes": 3 * 2**30,
    "reserved_bytes": 4 * 2**30,
    "requested_bytes": 3 * 2**30 - 17,
    "peak_allocated_bytes": 5 * 2**30,
    "peak_reserved_bytes": 6 * 2**30,
    "peak_requested_bytes": 5 * 2**30 - 3,
    "limit_bytes": 12 * 2**30,
    "num_allocs": 1000,
    "num_frees": 990,
    "num_cache_hits": 900,
    "num_upstream_allocs": 100,
    "num_upstream_frees": 7,
    "num_ooms": 2,
    "num_trims": 3,
    "num_pressure_reclaims": 4,
    "pressure_reclaimed_bytes": 2**21,
    "num_trace_dropped": 9,
    "largest_free_block_bytes": 2**20,
    "fragmentation_ratio": 0.25,
    "num_segments": 12,
    "num_free_blocks": 5,
    "num_live_blocks": 10,
}
POOL_METRIC = {
    "num_allocs": "pool_allocs_total",
    "num_frees": "pool_frees_total",
    "num_cache_hits": "pool_cache_hits_total",
    "num_upstream_allocs": "pool_upstream_allocs_total",
    "num_upstream_frees": "pool_upstream_frees_total",
    "num_ooms": "pool_ooms_total",
    "num_trims": "pool_trims_total",
    "num_pressure_reclaims": "pool_pressure_reclaims_total",
    "pressure_reclaimed_bytes": "pool_pressure_reclaimed_bytes_total",
    "num_trace_dropped": "pool_trace_dropped_total",
    "num_segments": "pool_segments",
    "num_free_blocks": "pool_free_blocks",
    "num_live_blocks": "pool_live_blocks",
}


def parse(text: bytes | str) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} missing; have {sorted(n for n, _ in samples if n == name)}"
    return samples[key]


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def make_sampler() -> tuple[Sampler, FakePsutil, list[FakeGpu]]:
    ps = FakePsutil(cores=16)
    ps.cpu_percent_values = [42.0]
    ps.load = (8.0, 4.0, 2.0)
    gpus = [
        FakeGpu("GPU-0000", util=80, mem_util=40, mem_used=60 * 2**30, power_mw=500_000, energy_mj=9_000_000),
        FakeGpu("GPU-1111", util=20, mem_used=2**30, power_mw=120_250, energy_mj=None),
    ]
    clock = ManualClock()
    s = Sampler(host_probe=HostProbe(ps), gpu_probe=NvmlProbe(FakeNvml(gpus)), clock=clock)
    clock.advance(2.0)
    s.sample_once()
    return s, ps, gpus


COMPRESSION = {
    "bytes_sent": 1000,
    "dense_bytes": 100_000,
    "ratio": 100.0,
    "density": 0.01,
    "compressed_buckets": 30,
    "dense_buckets": 5,
    "residual_resets": 1,
    "nonfinite_resets": 0,
    "iterations": 12,
}


def full_exporter(**kw: Any) -> MetricsExporter:
    sampler, _, _ = make_sampler()
    e = MetricsExporter(sampler=sampler, rank=0, host_metrics=True, **kw)
    e.add_source("pool", lambda: POOL, labels={"device": "cuda:0"})
    e.add_source("stats", lambda: {"grad_norm": 1.5, "nonfinite_steps": 1, "nonfinite_elements": 12})
    e.add_source("compression", lambda: COMPRESSION)
    e.add_source(
        "policy",
        lambda: {
            "phase": "fine_tuning",
            "unstable": True,
            "micro_batch": 16,
            "accumulation": 4,
            "effective_batch": 512,
            "noise_scale": 1234.5,
            "steps": 40,
            "skipped_steps": 2,
            "ooms_recovered": 1,
            "actions": {("shrink_micro_batch", "true"): 3, ("migrate_task", "false"): 1},
        },
    )
    e.add_source(
        "offload",
        lambda: {"offloaded": True, "resident_bytes": 0, "state_bytes": 8192, "offloads": 2, "restores": 1},
    )
    e.add_source("energy", lambda: {"cpu_joules": 10.0, "cpu_estimated": True, "gpu_joules": 500.0, "co2e_grams": 0.07})
    e.observe_step(0.75)
    return e


def test_host_and_gpu_series_with_dcgm_labels() -> None:
    s = parse(full_exporter().render())
    host = {"Hostname": hostname()}
    assert value(s, "autoglm_rt_host_cpu_utilization_ratio", **host) == 0.42
    assert value(s, "autoglm_rt_host_load_per_core", **host) == 0.5
    assert value(s, "autoglm_rt_host_load1", **host) == 8.0
    assert value(s, "autoglm_rt_host_cpus", **host) == 16
    assert value(s, "autoglm_rt_host_memory_used_bytes", **host) == 16 * 2**30
    assert value(s, "autoglm_rt_host_memory_used_ratio", **host) == 0.25
    assert value(s, "autoglm_rt_host_cpu_utilization_ewma_ratio", **host) == 0.42  # one sample: EWMA = value
    assert value(s, "autoglm_rt_load_level", **host) == 0  # 42% and 0.5 per core: low
    assert value(s, "autoglm_rt_load_level_state", level="low", **host) == 1
    assert value(s, "autoglm_rt_load_level_state", level="high", **host) == 0
    g0 = {"gpu": "0", "UUID": "GPU-0000", "device": "nvidia0", "modelName": "NVIDIA H100 80GB HBM3", **host}
    g1 = {**g0, "gpu": "1", "UUID": "GPU-1111", "device": "nvidia1"}
    assert value(s, "autoglm_rt_gpu_utilization_ratio", **g0) == 0.8
    assert value(s, "autoglm_rt_gpu_utilization_ratio", **g1) == 0.2
    assert value(s, "autoglm_rt_gpu_memory_used_bytes", **g0) == 60 * 2**30
    assert value(s, "autoglm_rt_gpu_power_watts", **g1) == 120.25
    assert value(s, "autoglm_rt_gpu_energy_joules_total", **g0) == 9000.0
    assert ("autoglm_rt_gpu_energy_joules_total", frozenset(g1.items())) not in s  # unsupported: no series
    assert value(s, "autoglm_rt_gpu_sm_clock_hertz", **g0) == 1980e6
    assert value(s, "autoglm_rt_monitor_nvml_available", rank="0") == 1
    assert value(s, "autoglm_rt_monitor_samples_total", rank="0") == 1


def test_sources_become_metrics() -> None:
    s = parse(full_exporter().render())
    lab = {"rank": "0", "device": "cuda:0"}
    for key, raw in POOL.items():
        metric = "autoglm_rt_" + POOL_METRIC.get(key, "pool_" + key)
        assert value(s, metric, **lab) == raw, key
    r = {"rank": "0"}
    assert value(s, "autoglm_rt_grad_norm", **r) == 1.5
    assert value(s, "autoglm_rt_grad_nonfinite_steps_total", **r) == 1
    assert value(s, "autoglm_rt_grad_nonfinite_elements_total", **r) == 12
    assert value(s, "autoglm_rt_compression_sent_bytes_total", **r) == 1000
    assert value(s, "autoglm_rt_compression_dense_bytes_total", **r) == 100_000
    assert value(s, "autoglm_rt_compression_ratio", **r) == 100.0
    assert value(s, "autoglm_rt_training_phase", phase="fine_tuning", **r) == 1
    assert value(s, "autoglm_rt_training_phase", phase="initial", **r) == 0
    assert value(s, "autoglm_rt_training_unstable", **r) == 1
    assert value(s, "autoglm_rt_micro_batch_size", **r) == 16
    assert value(s, "autoglm_rt_accumulation_steps", **r) == 4
    assert value(s, "autoglm_rt_effective_batch_size", **r) == 512
    assert value(s, "autoglm_rt_gradient_noise_scale", **r) == 1234.5
    assert value(s, "autoglm_rt_compression_density_ratio", **r) == 0.01
    assert value(s, "autoglm_rt_compression_compressed_buckets_total", **r) == 30
    assert value(s, "autoglm_rt_compression_iterations_total", **r) == 12
    assert value(s, "autoglm_rt_optimizer_steps_total", **r) == 40
    assert value(s, "autoglm_rt_skipped_steps_total", **r) == 2
    assert value(s, "autoglm_rt_actions_total", action="shrink_micro_batch", applied="true", **r) == 3
    assert value(s, "autoglm_rt_actions_total", action="migrate_task", applied="false", **r) == 1
    assert value(s, "autoglm_rt_energy_gpu_joules_total", **r) == 500.0
    assert value(s, "autoglm_rt_energy_cpu_estimated", **r) == 1


def test_every_name_follows_design_conventions() -> None:
    text = full_exporter().render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        assert name.startswith("autoglm_rt_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if name.endswith("_total"):
            assert kind == "counter", name
    assert "autoglm_rt_gpu_energy_joules_total" in types


def test_step_histogram_matches_numpy() -> None:
    e = MetricsExporter(rank=2, host_metrics=False)
    rng = np.random.default_rng(0)
    durations = np.concatenate([rng.lognormal(-1.0, 1.5, 500), [0.0, 0.005, 700.0, 1e-9]])
    for d in durations:
        e.observe_step(float(d))
    s = parse(e.render())
    for le in STEP_BUCKETS:
        want = int(np.sum(durations <= le))
        assert value(s, "autoglm_rt_step_duration_seconds_bucket", rank="2", le=str(le)) == want
    assert value(s, "autoglm_rt_step_duration_seconds_bucket", rank="2", le="+Inf") == len(durations)
    assert value(s, "autoglm_rt_step_duration_seconds_sum", rank="2") == pytest.approx(float(np.sum(durations)))
    assert STEP_BUCKETS[-1] >= 600  # up to minutes
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="seconds"):
            e.observe_step(bad)
    with pytest.raises(TypeError, match="seconds"):
        e.observe_step("1")  # type: ignore[arg-type]
    assert value(parse(e.render()), "autoglm_rt_step_duration_seconds_count", rank="2") == len(durations)


def test_unlimited_pool_none_fields_and_derived_compression_ratio() -> None:
    e = MetricsExporter(rank=0, host_metrics=False)
    e.add_source("pool", lambda: {"limit_bytes": 2**64 - 1, "allocated_bytes": 5, "reserved_bytes": None})
    e.add_source("compression", lambda: {"bytes_sent": 25, "dense_bytes": 100})
    s = parse(e.render())
    assert "autoglm_rt_pool_limit_bytes" not in names(s)
    assert "autoglm_rt_pool_reserved_bytes" not in names(s)
    assert value(s, "autoglm_rt_pool_allocated_bytes", rank="0") == 5
    assert (
        value(s, "autoglm_rt_compression_ratio", rank="0") == 4.0
    )  # dense / sent: the one definition (ddp.TopKState.compression_ratio)


def test_broken_sources_are_counted_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    e = MetricsExporter(rank=0, host_metrics=False)
    e.add_source("pool", lambda: {"allocated_bytes": "lots", "reserved_bytes": 7, "mystery": 1})
    e.add_source("stats", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    e.add_source("compression", lambda: [1, 2])  # type: ignore[arg-type,return-value]
    e.add_source("policy", lambda: {"phase": "warmup", "micro_batch": 8, "nonsense": None})
    e.add_source("energy", lambda: {"cpu_joules": -5.0, "gpu_joules": float("nan"), "co2e_grams": 1.0})
    with caplog.at_level(logging.INFO, logger="autoglm_rt.monitor"):
        for _ in range(3):
            s = parse(e.render())
    assert value(s, "autoglm_rt_pool_reserved_bytes", rank="0") == 7  # the good field survives
    assert value(s, "autoglm_rt_micro_batch_size", rank="0") == 8
    assert value(s, "autoglm_rt_energy_co2e_grams_total", rank="0") == 1.0
    assert "autoglm_rt_training_phase" not in names(s)
    assert "autoglm_rt_energy_cpu_joules_total" not in names(s)  # a counter must be >= 0
    errors = {
        k: value(s, "autoglm_rt_monitor_source_errors_total", rank="0", source=k)
        for k in ("pool", "stats", "compression", "policy", "energy")
    }
    assert errors == {"pool": 3, "stats": 3, "compression": 3, "policy": 3, "energy": 6}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(set(warnings)) == 6  # each problem logged once
    assert sum("mystery" in r.getMessage() for r in caplog.records) == 1


def test_add_source_validation() -> None:
    e = MetricsExporter(rank=0)
    with pytest.raises(ValueError, match="kind"):
        e.add_source("gpu", dict)
    with pytest.raises(TypeError, match="fn"):
        e.add_source("pool", {"allocated_bytes": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label"):
        e.add_source("pool", dict, labels={"bad-name": "x"})
    with pytest.raises(ValueError, match="rank"):
        e.add_source("pool", dict, labels={"rank": "1"})
    e.add_source("pool", dict, labels={"device": "cuda:0"})
    e.add_source("pool", dict, labels={"device": "cuda:1"})
    with pytest.raises(ValueError, match="already registered"):
        e.add_source("pool", dict, labels={"device": "cuda:0"})
    assert e.remove_sources("pool") == 2
    with pytest.raises(ValueError, match="rank"):
        MetricsExporter(rank=-1)


def test_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    sampler, _, _ = make_sampler()
    e = MetricsExporter(sampler=sampler)
    assert e.rank == 5 and not e.host_metrics
    e.add_source("pool", lambda: {"allocated_bytes": 1})
    s = parse(e.render())
    assert value(s, "autoglm_rt_pool_allocated_bytes", rank="5") == 1
    assert not any(n.startswith(("autoglm_rt_host_", "autoglm_rt_gpu_")) for n in names(s))  # local rank 0's job
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert MetricsExporter(sampler=sampler).host_metrics


def test_http_endpoint_binds_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    e = full_exporter()
    with start_metrics_server(0, exporter=e) as server:
        assert server.addr == "127.0.0.1" and server.port > 0
        assert server._server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            body = resp.read()
        s = parse(body)
        assert value(s, "autoglm_rt_pool_ooms_total", rank="0", device="cuda:0") == 2
        assert value(s, "autoglm_rt_step_duration_seconds_count", rank="0") == 1
    with pytest.raises(ValueError, match="port"):
        start_metrics_server(70000, exporter=e)
    with pytest.raises(ValueError, match="addr"):
        start_metrics_server(0, addr="", exporter=e)


def test_port_offset_by_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as probe:  # find two free consecutive ports
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    monkeypatch.setenv("LOCAL_RANK", "1")
    try:
        server = start_metrics_server(base - 1, exporter=MetricsExporter(rank=1))
    except OSError:
        pytest.skip("the port next to a free one was taken meanwhile")
    with server:
        assert server.port == base


# -- names used by the alert rules and the dashboard exist in the exporter's output ---------------

_NAME = re.compile(r"\b(autoglm_rt(?:_[a-z0-9]+)+|autoglm_rt:[a-z0-9_:]+)\b")


def _exported_names() -> set[str]:
    """Sample names (``_bucket``, ``_count``...) plus family names (a counter with no sample yet,
    such as the source-error counter, still declares its family)."""
    text = full_exporter().render().decode()
    return names(parse(text)) | set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def _rule_docs() -> list[dict[str, Any]]:
    return yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]


def _recorded() -> set[str]:
    return {r["record"] for g in _rule_docs() for r in g["rules"] if "record" in r}


def _check_names(exprs: list[str], where: str) -> None:
    exported, recorded = _exported_names(), _recorded()
    used = {m for e in exprs for m in _NAME.findall(e)}
    assert used, f"no metric names found in {where}"
    missing = sorted(n for n in used if n not in exported and n not in recorded)
    assert not missing, f"{where} uses names the exporter does not produce: {missing}"


def test_alert_rules_use_only_exported_names() -> None:
    exprs = [r["expr"] for g in _rule_docs() for r in g["rules"]]
    _check_names(exprs, "alerts.yml")
    # the alerts the issue asks for are there
    alerts = {r["alert"] for g in _rule_docs() for r in g["rules"] if "alert" in r}
    assert {
        "AutoglmRtPoolMemoryNearLimit",
        "AutoglmRtPoolOutOfMemory",
        "AutoglmRtNonFiniteGradients",
        "AutoglmRtStepTimeRegression",
        "AutoglmRtSustainedHighLoad",
    } <= alerts


def test_dashboard_uses_only_exported_names() -> None:
    dash = json.loads((ROOT / "deploy/grafana/autoglm_rt.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    _check_names(exprs, "the Grafana dashboard")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_documented_metric_table_matches_exporter() -> None:
    doc = (ROOT / "docs/metrics.md").read_text()
    documented = set(re.findall(r"^\| `(autoglm_rt_[a-z0-9_]+)`", doc, re.M))
    text = full_exporter().render().decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    families = {n for n in families if not n.endswith("_created")}  # prometheus_client's own
    assert families - documented == set(), "exported but missing from docs/metrics.md"
    assert documented - families == set(), "documented but never exported"
