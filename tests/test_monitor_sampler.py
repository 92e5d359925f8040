"""The sampler with fake psutil/pynvml (exact values), with the real psutil, and without NVML."""

from __future__ import annotations

import logging
import threading
import time

import psutil
import pynvml
import pytest

from autoglm_rt.monitor import HostProbe, LoadLevel, NvmlProbe, Sampler, strategy_metrics
from tests.monitor_reference import FakeGpu, FakeNvml, FakePsutil, ManualClock, ewma_reference, level_reference


def _sampler(ps: FakePsutil, nv: FakeNvml | None = None, **kw: object) -> tuple[Sampler, ManualClock]:
    clock = ManualClock()
    gpu = NvmlProbe(nv) if nv is not None else None
    s = Sampler(2.0, host_probe=HostProbe(ps), gpu_probe=gpu, gpus=nv is not None, clock=clock, **kw)  # type: ignore[arg-type]
    return s, clock


def test_host_reading_from_fake_psutil() -> None:
    ps = FakePsutil(cores=8)
    probe = HostProbe(ps)
    assert ps.cpu_percent_calls == 1  # primed once at construction
    ps.cpu_percent_values = [37.5]
    ps.load = (6.0, 3.0, 1.5)
    r = probe.read()
    assert r.cpu_ratio == 0.375
    assert r.load_per_core == 6.0 / 8
    assert r.memory_used_bytes == ps.total - ps.available
    assert r.memory_used_ratio == (ps.total - ps.available) / ps.total
    assert (r.load1, r.load5, r.load15) == (6.0, 3.0, 1.5)


def test_sampler_smooths_and_classifies() -> None:
    ps = FakePsutil(cores=4)
    s, clock = _sampler(ps, halflife=2.0, window=6.0)
    cpu = [20.0, 95.0, 95.0, 95.0, 95.0, 95.0, 30.0, 30.0]
    loads = [0.4, 0.4, 6.0, 6.0, 6.0, 0.4, 0.4, 0.4]
    ps.cpu_percent_values = list(cpu)
    times, snaps = [], []
    for load in loads:
        ps.load = (load, 0.0, 0.0)
        clock.advance(2.0)
        times.append(clock.t)
        snaps.append(s.sample_once())
    last = snaps[-1]
    ratios = [c / 100 for c in cpu]
    per_core = [x / 4 for x in loads]
    assert last.series["cpu_ratio"] == 0.30
    assert last.ewma["cpu_ratio"] == pytest.approx(ewma_reference(ratios, times, 2.0), rel=1e-12)
    assert last.ewma["load_per_core"] == pytest.approx(ewma_reference(per_core, times, 2.0), rel=1e-12)
    # window of 6 s at t: samples at t-6, t-4, t-2, t
    assert last.window["cpu_ratio"].count == 4
    assert last.window["cpu_ratio"].mean == pytest.approx(sum(ratios[-4:]) / 4)
    assert [x.index for x in snaps] == list(range(len(cpu)))
    assert s.latest() is last
    assert s.samples == len(cpu)
    # the level follows the EWMA through the table with hysteresis and a dwell of 2
    smoothed = [
        (ewma_reference(ratios[: i + 1], times[: i + 1], 2.0), ewma_reference(per_core[: i + 1], times[: i + 1], 2.0))
        for i in range(len(cpu))
    ]
    expected = level_reference(smoothed, dwell=2)  # type: ignore[arg-type]
    assert [int(x.level) for x in snaps] == expected
    assert expected[0] == LoadLevel.LOW and LoadLevel.HIGH in expected  # the run does cross the table


def test_gpu_series_from_fake_nvml_with_unsupported_energy_counter() -> None:
    ps = FakePsutil()
    ps.cpu_percent_values = [50.0]
    gpus = [
        FakeGpu("GPU-aaaa", util=75, mem_util=30, mem_used=20 * 2**30, power_mw=350_500, energy_mj=123_456_789),
        FakeGpu("GPU-bbbb", name="Tesla T4", util=10, energy_mj=None),
    ]
    nv = FakeNvml(gpus)
    s, clock = _sampler(ps, nv)
    clock.advance(2.0)
    snap = s.sample_once()
    a, b = snap.gpus
    assert (a.info.index, a.info.uuid, a.info.name) == (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3")  # bytes decoded
    assert a.utilization_ratio == 0.75 and a.memory_utilization_ratio == 0.30
    assert a.memory_used_bytes == 20 * 2**30 and a.memory_total_bytes == 80 * 2**30
    assert a.power_watts == 350.5 and a.power_limit_watts == 700.0
    assert a.energy_joules == 123_456.789
    assert a.sm_clock_hertz == 1980e6 and a.memory_clock_hertz == 2619e6 and a.temperature_celsius == 40
    assert b.info.name == "Tesla T4" and b.energy_joules is None and b.utilization_ratio == 0.10
    assert snap.series["gpu0_memory_used_ratio"] == 0.25
    assert snap.series["gpu1_power_watts"] == 100.0
    # an unsupported query is not asked again
    ps.cpu_percent_values = [50.0]
    clock.advance(2.0)
    s.sample_once()
    assert gpus[1].calls["energy"] == 1
    assert gpus[0].calls["energy"] == 2
    s.stop()
    assert nv.shutdowns == 0  # stop() keeps NVML for a restart
    s.close()
    assert nv.shutdowns == 1


@pytest.mark.parametrize(
    "error",
    [
        pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
        pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED),
        OSError("x"),
    ],
)
def test_no_nvml_means_no_gpu_series_and_one_log_line(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    ps.cpu_percent_values = [10.0, 10.0, 10.0]
    with caplog.at_level(logging.INFO, logger="autoglm_rt.monitor"):
        s, clock = _sampler(ps, FakeNvml([FakeGpu("GPU-x")], init_error=error))
        for _ in range(3):
            clock.advance(2.0)
            snap = s.sample_once()
    assert snap.gpus == ()
    assert not any(k.startswith("gpu") for k in snap.series)
    assert s.gpu_reason is not None and "NVML unavailable" in s.gpu_reason
    assert len([r for r in caplog.records if "NVML" in r.getMessage()]) == 1


def test_real_nvml_probe_never_raises() -> None:
    probe = NvmlProbe()
    readings = probe.read()
    if probe.available and probe.gpus:
        assert len(readings) == len(probe.gpus)
        assert all(r.memory_total_bytes for r in readings)
    else:
        assert readings == [] and probe.reason
    probe.close()


def test_broken_readings_and_listeners_do_not_stop_sampling(caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    ps.cpu_percent_values = [10.0]  # the second read raises IndexError: a broken host reading
    s, clock = _sampler(ps)
    seen: list[int] = []
    s.add_listener(lambda snap: seen.append(snap.index))
    s.add_listener(lambda snap: 1 / 0)  # type: ignore[func-returns-value]
    with caplog.at_level(logging.WARNING, logger="autoglm_rt.monitor"):
        clock.advance(2.0)
        first = s.sample_once()
        clock.advance(2.0)
        second = s.sample_once()
    assert first.host is not None and second.host is None
    assert second.ewma["cpu_ratio"] == 0.10  # the smoothed view survives the gap
    assert seen == [0, 1]
    assert any("host reading failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="fn"):
        s.add_listener(42)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    for kw, exc in (({"period": 0}, ValueError), ({"window": -1}, ValueError), ({"halflife": "x"}, TypeError)):
        with pytest.raises(exc, match=next(iter(kw))):
            Sampler(host_probe=HostProbe(FakePsutil()), gpus=False, **kw)  # type: ignore[arg-type]


def test_thread_with_real_psutil() -> None:
    got = threading.Event()
    s = Sampler(0.05, gpus=False)
    s.add_listener(lambda snap: got.set() if snap.index >= 3 else None)
    with s:
        assert s.running
        assert got.wait(10.0)
    assert not s.running
    snap = s.latest()
    assert snap is not None and snap.host is not None
    assert 0.0 <= snap.host.cpu_ratio <= 1.0
    assert snap.host.cpu_count == psutil.cpu_count(logical=True)
    vm = psutil.virtual_memory()
    assert snap.host.memory_total_bytes == vm.total
    assert abs(snap.host.memory_used_bytes - (vm.total - vm.available)) < 0.2 * vm.total
    assert snap.host.load1 == pytest.approx(psutil.getloadavg()[0], abs=2.0 * snap.host.cpu_count)
    n = s.samples
    time.sleep(0.2)
    assert s.samples == n  # stopped means stopped
    assert s.total_sample_seconds > 0


def test_strategy_metrics_names_the_smoothed_figures() -> None:
    ps = FakePsutil(cores=4)
    ps.cpu_percent_values = [40.0, 80.0]
    ps.load = (3.0, 0.0, 0.0)
    gpus = [FakeGpu("GPU-a", util=30, mem_used=40 * 2**30), FakeGpu("GPU-b", util=90, mem_used=8 * 2**30)]
    s, clock = _sampler(ps, FakeNvml(gpus), halflife=2.0)
    clock.advance(2.0)
    s.sample_once()
    gpus[1].util = 10
    clock.advance(2.0)
    m = strategy_metrics(s.sample_once())
    assert m["cpu_usage"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.8)  # one half-life between samples
    assert m["load_1min"] == 3.0
    assert m["gpu_utilization"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.1)  # GPU b's EWMA is the highest
    assert m["gpu_memory_usage"] == m["memory_usage"] == 0.5
    assert m["host_memory_usage"] == 0.25
    host_only, hclock = _sampler(FakePsutil(), None)
    host_only.host_probe._ps.cpu_percent_values = [10.0]  # type: ignore[attr-defined]
    hclock.advance(2.0)
    h = strategy_metrics(host_only.sample_once())
    assert "gpu_utilization" not in h and h["memory_usage"] == h["host_memory_usage"]
