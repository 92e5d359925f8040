"""EnergyMeter: NVML counter deltas, power integration, RAPL (with wraparound) and the estimate,
kWh / CO2e / FLOP per joule against hand-computed references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoglm_rt.monitor import EnergyMeter, NvmlProbe, RaplReader
from tests.monitor_reference import FakeGpu, FakeNvml, FakePsutil, ManualClock


def fake_rapl(root: Path, packages: dict[int, tuple[int, int]]) -> RaplReader:
    """``packages``: index -> (energy_uj, max_energy_range_uj); adds a core sub-domain that must
    not be counted."""
    for i, (energy, max_range) in packages.items():
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True)
        (d / "name").write_text(f"package-{i}\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{max_range}\n")
        sub = root / f"intel-rapl:{i}:0"
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("999999999\n")
        (sub / "max_energy_range_uj").write_text(f"{max_range}\n")
    return RaplReader(root)


def set_rapl(root: Path, i: int, energy: int) -> None:
    (root / f"intel-rapl:{i}" / "energy_uj").write_text(f"{energy}\n")


def test_gpu_counter_delta_and_power_integral(tmp_path: Path) -> None:
    gpus = [FakeGpu("GPU-a", energy_mj=5_000_000, power_mw=300_000), FakeGpu("GPU-b", energy_mj=None, power_mw=100_000)]
    clock = ManualClock()
    ps = FakePsutil()
    meter = EnergyMeter(
        gpu_probe=NvmlProbe(FakeNvml(gpus)), rapl=RaplReader(tmp_path / "none"), psutil_module=ps, clock=clock
    )
    meter.start()
    # GPU b: 100 W for 10 s, ramps to 300 W over the next 10 s, then 300 W for 10 s
    powers = [(10.0, 100_000), (10.0, 300_000), (10.0, 300_000)]
    for dt, p in powers:
        clock.advance(dt)
        gpus[1].power_mw = p
        meter.poll()
    gpus[0].energy_mj = 5_000_000 + 9_876_543  # the counter moved 9876.543 J
    r = meter.read(flops=3e15)
    assert r.seconds == 30.0
    assert r.gpu_sources == {0: "nvml_energy_counter", 1: "nvml_power_integral"}
    assert r.gpu_joules[0] == pytest.approx(9876.543)
    assert r.gpu_joules[1] == pytest.approx(100 * 10 + 200 * 10 + 300 * 10)  # trapezoid
    assert r.cpu_estimated and r.cpu_source.startswith("estimate")
    total = r.gpu_joules[0] + r.gpu_joules[1] + (r.cpu_joules or 0.0)
    assert r.total_joules == pytest.approx(total)
    assert r.kwh == pytest.approx(total / 3.6e6)
    assert r.co2e_grams == pytest.approx(total / 3.6e6 * 475.0)  # default intensity, PUE 1
    assert r.flop_per_joule == pytest.approx(3e15 / total)
    assert r.average_watts == pytest.approx(total / 30.0)
    assert "nvml_power_integral" in r.describe() and "estimate" in r.describe()


def test_rapl_counts_packages_only_and_handles_wraparound(tmp_path: Path) -> None:
    rng = 2**32
    rapl = fake_rapl(tmp_path, {0: (rng - 1_000_000, rng - 1), 1: (0, rng - 1)})
    assert rapl.available and len(rapl.domains) == 2
    clock = ManualClock()
    meter = EnergyMeter(gpus=False, rapl=rapl, psutil_module=FakePsutil(), clock=clock, carbon_intensity=300, pue=1.5)
    meter.start()
    clock.advance(5.0)
    set_rapl(tmp_path, 0, 2_000_000)  # wrapped: 1 J before the wrap + 2 J after
    set_rapl(tmp_path, 1, 4_000_000)
    meter.poll()
    clock.advance(5.0)
    set_rapl(tmp_path, 0, 3_000_000)
    r = meter.read()
    assert r.cpu_source == "rapl" and not r.cpu_estimated
    assert r.cpu_joules == pytest.approx(3.0 + 1.0 + 4.0)
    assert r.facility_kwh == pytest.approx(8.0 / 3.6e6 * 1.5)
    assert r.co2e_grams == pytest.approx(8.0 / 3.6e6 * 1.5 * 300)


def test_unreadable_rapl_falls_back_to_a_labelled_estimate(tmp_path: Path) -> None:
    rapl = fake_rapl(tmp_path, {0: (0, 2**32)})
    (tmp_path / "intel-rapl:0" / "energy_uj").chmod(0)
    if os.access(tmp_path / "intel-rapl:0" / "energy_uj", os.R_OK):
        rapl = RaplReader(tmp_path / "missing")  # root can read anything: use a missing tree
    else:
        rapl = RaplReader(tmp_path)
    assert not rapl.available and rapl.reason
    ps = FakePsutil(cores=4)
    clock = ManualClock()
    meter = EnergyMeter(gpus=False, rapl=rapl, psutil_module=ps, clock=clock, cpu_watts_per_core=12.5)
    meter.start()
    clock.advance(10.0)
    ps.busy_seconds += 25.0  # 2.5 of 4 cores busy for 10 s
    ps.idle_seconds += 15.0
    ps.guest_seconds += 7.0  # inside user time already: not counted again
    r = meter.read()
    assert r.cpu_joules == pytest.approx(25.0 * 12.5)
    assert r.cpu_estimated and "12.5 W" in r.cpu_source and rapl.reason in r.cpu_source
    assert meter.as_source()["cpu_estimated"] is True


def test_windows_nest_and_report_after_the_block(tmp_path: Path) -> None:
    gpus = [FakeGpu("GPU-a", energy_mj=0)]
    clock = ManualClock()
    meter = EnergyMeter(
        gpu_probe=NvmlProbe(FakeNvml(gpus)), rapl=RaplReader(tmp_path), psutil_module=FakePsutil(), clock=clock
    )
    meter.start()
    gpus[0].energy_mj = 1_000_000
    with pytest.raises(RuntimeError, match="boom"), meter.window("failing epoch") as w:
        clock.advance(4.0)
        gpus[0].energy_mj = 3_000_000
        w.flops = 4e12
        raise RuntimeError("boom")
    assert w.report is not None
    assert w.report.seconds == 4.0
    assert w.report.gpu_joules[0] == pytest.approx(2000.0)
    assert w.report.flop_per_joule == pytest.approx(4e12 / w.report.total_joules)
    total = meter.read()
    assert total.gpu_joules[0] == pytest.approx(3000.0)


def test_bad_arguments(tmp_path: Path) -> None:
    ps = FakePsutil()
    rapl = RaplReader(tmp_path)
    with pytest.raises(ValueError, match="pue"):
        EnergyMeter(gpus=False, rapl=rapl, psutil_module=ps, pue=0.9)
    with pytest.raises(ValueError, match="carbon_intensity"):
        EnergyMeter(gpus=False, rapl=rapl, psutil_module=ps, carbon_intensity=float("nan"))
    with pytest.raises(TypeError, match="cpu_watts_per_core"):
        EnergyMeter(gpus=False, rapl=rapl, psutil_module=ps, cpu_watts_per_core="10")  # type: ignore[arg-type]
    meter = EnergyMeter(gpus=False, rapl=rapl, psutil_module=ps)
    with pytest.raises(RuntimeError, match="start"):
        meter.read()
    meter.poll()  # not started: nothing to do, no error
    meter.start()
    with pytest.raises(ValueError, match="flops"):
        meter.read(flops=-1)
    with pytest.raises(ValueError, match="flops"):
        meter.read(flops=float("inf"))


def test_real_machine_meter_runs() -> None:
    meter = EnergyMeter().start()
    r = meter.read()
    assert r.seconds >= 0 and r.cpu_joules is not None and r.cpu_joules >= 0
    assert r.cpu_source == "rapl" or r.cpu_source.startswith("estimate")


def test_attached_meter_integrates_power_at_each_sample(tmp_path: Path) -> None:
    from autoglm_rt.monitor import HostProbe, Sampler

    gpus = [FakeGpu("GPU-old", energy_mj=None, power_mw=200_000)]
    probe = NvmlProbe(FakeNvml(gpus))
    clock = ManualClock()
    ps = FakePsutil()
    ps.cpu_percent_values = [10.0] * 10
    sampler = Sampler(2.0, host_probe=HostProbe(ps), gpu_probe=probe, clock=clock)
    meter = EnergyMeter(gpu_probe=probe, rapl=RaplReader(tmp_path), psutil_module=ps, clock=clock).start()
    meter.attach(sampler)
    for watts in (200, 400, 400, 0):  # samples 2 s apart
        clock.advance(2.0)
        gpus[0].power_mw = watts * 1000
        sampler.sample_once()
    r = meter.read()
    # trapezoid over (0 s, 200 W) (2, 200) (4, 400) (6, 400) (8, 0)
    assert r.gpu_sources == {0: "nvml_power_integral"}
    assert r.gpu_joules[0] == pytest.approx(2 * 200 + 2 * 300 + 2 * 400 + 2 * 200)
    sampler.close()
