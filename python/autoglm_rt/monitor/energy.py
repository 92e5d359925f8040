"""Energy of a training run: GPU energy from NVML's energy counter (or, where a GPU has none,
its power integrated over time), CPU energy from RAPL (``/sys/class/powercap``) where readable,
otherwise an estimate that says it is one; kWh, CO2-equivalent and FLOP per joule.

    meter = EnergyMeter(carbon_intensity=475, pue=1.2).start()
    with meter.window("epoch 1") as w:
        train_one_epoch()
    print(w.report.kwh, w.report.co2e_grams, w.report.describe())

Call :meth:`EnergyMeter.poll` (or :meth:`EnergyMeter.attach` it to a sampler) every few seconds
when a GPU has no energy counter or RAPL's counter may wrap within a window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from autoglm_rt.monitor.probes import GpuReading, NvmlProbe

log = logging.getLogger("autoglm_rt.monitor")

JOULES_PER_KWH = 3.6e6
DEFAULT_CARBON_INTENSITY = 475.0  # g CO2e per kWh (world average electricity, IEA)
DEFAULT_PUE = 1.0
DEFAULT_CPU_WATTS_PER_CORE = 10.0
_RAPL_PACKAGE = re.compile(r"^[a-z-]*rapl:\d+$")


class RaplReader:
    """The RAPL package-domain energy counters under ``root`` (default ``/sys/class/powercap``).

    Only top-level domains (``intel-rapl:0``, ...) are read, so cores/DRAM sub-domains are not
    counted twice. ``available`` is False, with ``reason``, when no counter can be read (missing
    directory, or ``energy_uj`` readable by root only, as on recent kernels).
    """

    def __init__(self, root: str | os.PathLike[str] = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self.domains: dict[str, tuple[Path, int]] = {}  # name -> (energy_uj path, wrap range in uJ)
        self.reason: str | None = None
        try:
            entries = sorted(p for p in self.root.iterdir() if _RAPL_PACKAGE.match(p.name))
        except OSError as exc:
            self.reason = f"no RAPL at {self.root} ({exc.strerror or exc})"
            return
        problems = []
        for d in entries:
            energy = d / "energy_uj"
            try:
                int(energy.read_text().strip())
                max_range = int((d / "max_energy_range_uj").read_text().strip())
            except (OSError, ValueError) as exc:
                problems.append(f"{energy}: {getattr(exc, 'strerror', None) or exc}")
                continue
            name = (d / "name").read_text().strip() if (d / "name").exists() else d.name
            self.domains[f"{d.name}:{name}"] = (energy, max_range)
        if not self.domains:
            self.reason = "no readable RAPL package counter" + (f" ({'; '.join(problems)})" if problems else "")

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read(self) -> dict[str, int]:
        """Current counter of each domain, in microjoules."""
        return {name: int(path.read_text().strip()) for name, (path, _) in self.domains.items()}

    def delta_joules(self, before: dict[str, int], after: dict[str, int]) -> float:
        """Joules between two readings, summed over domains; a counter that went down wrapped
        once (its range comes from ``max_energy_range_uj``)."""
        total_uj = 0
        for name, (_, max_range) in self.domains.items():
            d = after[name] - before[name]
            if d < 0:
                d += max_range + 1
            total_uj += d
        return total_uj / 1e6


@dataclass(frozen=True)
class EnergyReport:
    """Energy over one interval. ``gpu_joules``/``gpu_sources`` are per GPU index; a source is
    ``nvml_energy_counter`` or ``nvml_power_integral``. ``cpu_source`` says where the CPU figure
    comes from (``rapl``, or ``estimate: ...`` with the assumption); ``co2e_grams`` =
    ``kwh * pue * carbon_intensity``."""

    seconds: float
    gpu_joules: dict[int, float]
    gpu_sources: dict[int, str]
    cpu_joules: float | None
    cpu_source: str
    carbon_intensity: float
    pue: float
    flops: float | None = None

    @property
    def cpu_estimated(self) -> bool:
        return self.cpu_source != "rapl"

    @property
    def total_gpu_joules(self) -> float:
        return math.fsum(self.gpu_joules.values())

    @property
    def total_joules(self) -> float:
        """IT energy: GPUs plus CPU (before PUE)."""
        return self.total_gpu_joules + (self.cpu_joules or 0.0)

    @property
    def kwh(self) -> float:
        return self.total_joules / JOULES_PER_KWH

    @property
    def facility_kwh(self) -> float:
        """kWh drawn by the facility: IT energy times PUE."""
        return self.kwh * self.pue

    @property
    def co2e_grams(self) -> float:
        return self.facility_kwh * self.carbon_intensity

    @property
    def average_watts(self) -> float:
        return self.total_joules / self.seconds if self.seconds > 0 else float("nan")

    @property
    def flop_per_joule(self) -> float | None:
        """FLOPs / IT joules when FLOPs were given (None otherwise, NaN with no energy)."""
        if self.flops is None:
            return None
        return self.flops / self.total_joules if self.total_joules > 0 else float("nan")

    def describe(self) -> str:
        gpu = ", ".join(f"gpu{i}: {j:.1f} J ({self.gpu_sources[i]})" for i, j in sorted(self.gpu_joules.items()))
        cpu = "n/a" if self.cpu_joules is None else f"{self.cpu_joules:.1f} J"
        text = (
            f"{self.seconds:.1f} s, {self.total_joules:.1f} J = {self.kwh:.6g} kWh "
            f"(x PUE {self.pue:g} = {self.facility_kwh:.6g} kWh), {self.co2e_grams:.2f} g CO2e "
            f"at {self.carbon_intensity:g} g/kWh; CPU {cpu} [{self.cpu_source}]"
        )
        if gpu:
            text += f"; {gpu}"
        fpj = self.flop_per_joule
        if fpj is not None:
            text += f"; {fpj:.3g} FLOP/J"
        return text


@dataclass
class _GpuTrack:
    counter_start: float | None
    last_power: float | None
    last_time: float
    integral: float = 0.0
    counter_last: float | None = None


@dataclass
class _State:
    start: float
    gpus: dict[int, _GpuTrack]
    rapl_joules: float = 0.0
    rapl_last: dict[str, int] = field(default_factory=dict)
    cpu_busy: float = 0.0  # core-seconds busy (estimate path)
    cpu_last: float | None = None  # busy core-seconds at the last poll


def _busy_seconds(ps: Any) -> float:
    """Busy core-seconds since boot, summed over cores; guest time is already inside user/nice
    on Linux, so it is not added again."""
    ct = ps.cpu_times()._asdict()
    return math.fsum(float(v) for k, v in ct.items() if k not in ("idle", "iowait", "guest", "guest_nice"))


class EnergyMeter:
    """Meters energy from :meth:`start` on; :meth:`read` reports the interval so far and
    :meth:`window` one block of code. Thread-safe.

    - ``carbon_intensity``: g CO2e per kWh (default 475); ``pue``: power usage effectiveness
      (>= 1, default 1.0).
    - ``cpu_watts_per_core``: the estimate used when RAPL is unreadable: busy fraction x logical
      cores x this (default 10 W); reports say ``estimate`` whenever it is used.
    - ``gpu_probe``/``rapl``/``psutil_module``/``clock`` are injectable; ``gpus=False`` skips NVML.
    """

    def __init__(
        self,
        *,
        carbon_intensity: float = DEFAULT_CARBON_INTENSITY,
        pue: float = DEFAULT_PUE,
        cpu_watts_per_core: float = DEFAULT_CPU_WATTS_PER_CORE,
        gpu_probe: NvmlProbe | Any | None = None,
        gpus: bool = True,
        rapl: RaplReader | None = None,
        psutil_module: ModuleType | Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value, lo in (
            ("carbon_intensity", carbon_intensity, 0.0),
            ("pue", pue, 1.0),
            ("cpu_watts_per_core", cpu_watts_per_core, 0.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= lo):
                raise ValueError(f"{name}: expected a finite number >= {lo:g}, got {value}")
        self.carbon_intensity = float(carbon_intensity)
        self.pue = float(pue)
        self.cpu_watts_per_core = float(cpu_watts_per_core)
        if gpu_probe is None and gpus:
            gpu_probe = NvmlProbe()
        self.gpu_probe = gpu_probe
        self.rapl = rapl if rapl is not None else RaplReader()
        if psutil_module is None:
            import psutil

            psutil_module = psutil
        self._ps: Any = psutil_module
        self._cores = int(self._ps.cpu_count(logical=True) or os.cpu_count() or 1)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: _State | None = None
        self._children: list[EnergyMeter] = []  # open windows, polled along with this meter
        if self.rapl.available:
            self.cpu_source = "rapl"
        else:
            self.cpu_source = (
                f"estimate: busy fraction x {self._cores} logical cores x {self.cpu_watts_per_core:g} W "
                f"({self.rapl.reason})"
            )

    def _gpu_readings(self) -> list[GpuReading]:
        if self.gpu_probe is None:
            return []
        try:
            return list(self.gpu_probe.read())
        except Exception as exc:
            log.warning("autoglm_rt.monitor: GPU reading for energy failed: %s", exc)
            return []

    def start(self) -> EnergyMeter:
        """(Re)starts metering from now; returns self."""
        t = self._clock()
        gpus = {
            g.info.index: _GpuTrack(g.energy_joules, g.power_watts, t, counter_last=g.energy_joules)
            for g in self._gpu_readings()
        }
        st = _State(start=t, gpus=gpus)
        if self.rapl.available:
            st.rapl_last = self.rapl.read()
        else:
            st.cpu_last = _busy_seconds(self._ps)
        with self._lock:
            self._state = st
        return self

    def _require(self) -> _State:
        if self._state is None:
            raise RuntimeError("EnergyMeter: call start() first")
        return self._state

    def poll(self) -> None:
        """Folds a reading in: integrates GPU power, accumulates RAPL (catching wraps) or CPU
        busy time, for this meter (once started) and its open windows. Cheap; call it every few
        seconds for long windows."""
        with self._lock:
            started = self._state is not None
            children = list(self._children)
        if started:
            self._poll_self()
        for child in children:
            child.poll()

    def _poll_self(self) -> None:
        t = self._clock()
        readings = self._gpu_readings()
        rapl_now = self.rapl.read() if self.rapl.available else None
        cpu_now = None if self.rapl.available else _busy_seconds(self._ps)
        with self._lock:
            st = self._require()
            for g in readings:
                tr = st.gpus.get(g.info.index)
                if tr is None:
                    continue
                if g.power_watts is not None and tr.last_power is not None:
                    tr.integral += 0.5 * (g.power_watts + tr.last_power) * (t - tr.last_time)
                tr.last_power, tr.last_time = g.power_watts, t
                if g.energy_joules is not None:
                    tr.counter_last = g.energy_joules
            if rapl_now is not None:
                st.rapl_joules += self.rapl.delta_joules(st.rapl_last, rapl_now)
                st.rapl_last = rapl_now
            if cpu_now is not None and st.cpu_last is not None:
                # psutil.cpu_times() sums every core, so this is busy core-seconds
                st.cpu_busy += max(cpu_now - st.cpu_last, 0.0)
                st.cpu_last = cpu_now

    def read(self, flops: float | None = None) -> EnergyReport:
        """The energy since :meth:`start` (polls first). ``flops``: work done in the interval,
        for ``flop_per_joule``."""
        if flops is not None and (
            isinstance(flops, bool) or not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops < 0
        ):
            raise ValueError(f"flops: expected a finite number >= 0, got {flops!r}")
        self._require()
        self._poll_self()
        with self._lock:
            st = self._require()
            now = self._clock()
            seconds = now - st.start
            gpu_j: dict[int, float] = {}
            gpu_src: dict[int, str] = {}
            for i, tr in st.gpus.items():
                if tr.counter_start is not None and tr.counter_last is not None:
                    gpu_j[i] = max(tr.counter_last - tr.counter_start, 0.0)
                    gpu_src[i] = "nvml_energy_counter"
                elif tr.last_power is not None:
                    gpu_j[i] = tr.integral
                    gpu_src[i] = "nvml_power_integral"
            if self.rapl.available:
                cpu_j: float | None = st.rapl_joules
            else:
                cpu_j = st.cpu_busy * self.cpu_watts_per_core
            return EnergyReport(
                seconds=seconds,
                gpu_joules=gpu_j,
                gpu_sources=gpu_src,
                cpu_joules=cpu_j,
                cpu_source=self.cpu_source,
                carbon_intensity=self.carbon_intensity,
                pue=self.pue,
                flops=None if flops is None else float(flops),
            )

    @contextlib.contextmanager
    def window(self, name: str = "window", flops: float | None = None) -> Iterator[EnergyWindow]:
        """Meters the enclosed block with its own meter state; the report is on the yielded
        object's ``report`` after the block (also if it raised). Set ``w.flops`` inside the block
        if the work is known only then."""
        sub = EnergyMeter(
            carbon_intensity=self.carbon_intensity,
            pue=self.pue,
            cpu_watts_per_core=self.cpu_watts_per_core,
            gpu_probe=self.gpu_probe,
            gpus=False,
            rapl=self.rapl,
            psutil_module=self._ps,
            clock=self._clock,
        ).start()
        w = EnergyWindow(name=name, flops=flops, meter=sub)
        with self._lock:
            self._children.append(sub)
        try:
            yield w
        finally:
            with self._lock:
                self._children.remove(sub)
            w.report = sub.read(flops=w.flops)

    def as_source(self) -> dict[str, float | bool]:
        """The fields of the exporter's ``energy`` source (cumulative since :meth:`start`)."""
        r = self.read()
        return {
            "cpu_joules": r.cpu_joules if r.cpu_joules is not None else 0.0,
            "cpu_estimated": r.cpu_estimated,
            "gpu_joules": r.total_gpu_joules,
            "co2e_grams": r.co2e_grams,
        }

    def attach(self, sampler: Any) -> None:
        """Polls after each of ``sampler``'s samples (its listener mechanism)."""
        sampler.add_listener(lambda _snap: self.poll())


@dataclass
class EnergyWindow:
    """A block metered by :meth:`EnergyMeter.window`; ``report`` is set when the block ends."""

    name: str
    flops: float | None
    meter: EnergyMeter
    report: EnergyReport | None = None
