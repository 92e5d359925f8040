"""Fakes and obviously-correct references for the monitor tests.

- ``FakePsutil``/``FakeNvml``: stand-ins for the psutil and pynvml modules whose readings the
  test sets.
- ``ewma_reference``: the EWMA as an explicit weighted sum over all past values (float64 numpy),
  not the recursive update the library uses.
- ``level_reference``: the load table with hysteresis written as explicit enter/leave thresholds
  per level.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np
import pynvml

VirtualMemory = namedtuple("VirtualMemory", "total available percent used free")
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


class ManualClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class FakePsutil:
    """The part of psutil the monitor reads; attributes are the next readings."""

    def __init__(self, cores: int = 8) -> None:
        self.cores = cores
        self.cpu_percent_values: list[float] = []
        self.cpu_percent_calls = 0
        self.total = 64 * 2**30
        self.available = 48 * 2**30
        self.load = (1.0, 0.5, 0.25)
        self.busy_seconds = 0.0  # spread over user/system below
        self.idle_seconds = 0.0
        self.guest_seconds = 0.0

    def cpu_count(self, logical: bool = True) -> int:
        return self.cores

    def cpu_percent(self, interval: float | None = None) -> float:
        assert interval is None, "the sampler must never block in cpu_percent"
        self.cpu_percent_calls += 1
        if self.cpu_percent_calls == 1:
            return 0.0  # psutil's meaningless first answer
        return self.cpu_percent_values.pop(0)

    def virtual_memory(self) -> VirtualMemory:
        used = self.total - self.available
        return VirtualMemory(self.total, self.available, 100.0 * used / self.total, used, self.available)

    def getloadavg(self) -> tuple[float, float, float]:
        return self.load

    def cpu_times(self) -> CpuTimes:
        b = self.busy_seconds
        # guest time is already inside user on Linux; the meter must not count it twice
        return CpuTimes(0.6 * b, 0.0, 0.4 * b, self.idle_seconds, 0.0, 0.0, 0.0, 0.0, self.guest_seconds, 0.0)


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util: int = 0  # percent
    mem_util: int = 0
    mem_used: int = 0
    mem_total: int = 80 * 2**30
    power_mw: int = 100_000
    limit_mw: int = 700_000
    energy_mj: int | None = 0  # None: the GPU has no energy counter (NOT_SUPPORTED)
    sm_mhz: int = 1980
    mem_mhz: int = 2619
    temp: int = 40
    calls: dict[str, int] = field(default_factory=dict)


@dataclass
class _Util:
    gpu: int
    memory: int


@dataclass
class _Mem:
    total: int
    used: int
    free: int


class FakeNvml:
    """The part of pynvml the monitor calls, over a list of FakeGpu; raises pynvml's own errors."""

    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.initialised = False
        self.shutdowns = 0

    def _gpu(self, h: int, what: str) -> FakeGpu:
        assert self.initialised
        g = self.gpus[h]
        g.calls[what] = g.calls.get(what, 0) + 1
        return g

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._gpu(h, "uuid").uuid

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self._gpu(h, "name").name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Util:
        g = self._gpu(h, "util")
        return _Util(g.util, g.mem_util)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Mem:
        g = self._gpu(h, "mem")
        return _Mem(g.mem_total, g.mem_used, g.mem_total - g.mem_used)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._gpu(h, "power").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self._gpu(h, "limit").limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        g = self._gpu(h, "energy")
        if g.energy_mj is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return g.energy_mj

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        g = self._gpu(h, f"clock{kind}")
        return g.sm_mhz if kind == self.NVML_CLOCK_SM else g.mem_mhz

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return self._gpu(h, "temp").temp


def ewma_reference(values: list[float], times: list[float], halflife: float) -> float | None:
    """EWMA as an explicit weighted sum: the first finite value has weight prod(keep) over all
    later gaps, each later value x_i weight (1 - keep_i) * prod(keep_j for j > i)."""
    pts = [(t, float(v)) for v, t in zip(values, times, strict=True) if math.isfinite(v)]
    if not pts:
        return None
    t = np.array([p[0] for p in pts], dtype=np.float64)
    x = np.array([p[1] for p in pts], dtype=np.float64)
    keep = 0.5 ** (np.diff(t) / halflife)  # keep[i-1]: weight of the old average at point i
    n = len(x)
    w = np.empty(n)
    for i in range(n):
        later = np.prod(keep[i:]) if i < n - 1 else 1.0
        w[i] = later if i == 0 else (1.0 - keep[i - 1]) * later
    return float(np.dot(w, x))


_ENTER = {"cpu": (0.60, 0.85), "load": (0.7, 1.2)}  # enter medium at >=, high at >
_MARGIN = {"cpu": 0.05, "load": 0.1}


def _dim_reference(prev: int, v: float, dim: str) -> int:
    med, high = _ENTER[dim]
    m = _MARGIN[dim]
    target = 2 if v > high else 1 if v >= med else 0
    if target >= prev:
        return target
    # leaving downwards: high is left only at v <= high - m, medium only at v < med - m
    if prev == 2 and v > high - m:
        return 2
    if prev >= 1 and v >= med - m:
        return 1
    return 0


def level_reference(observations: list[tuple[float, float]], dwell: int) -> list[int]:
    """The expected level after each (cpu_ratio, load_per_core) observation."""
    out = []
    level, cpu_l, load_l = 0, 0, 0
    pending, count = None, 0
    first = True
    for cpu, load in observations:
        if not (math.isfinite(cpu) and math.isfinite(load)):
            out.append(level)
            continue
        if first:
            first = False
            cpu_l = 2 if cpu > 0.85 else 1 if cpu >= 0.60 else 0
            load_l = 2 if load > 1.2 else 1 if load >= 0.7 else 0
            level = max(cpu_l, load_l)
            out.append(level)
            continue
        c = _dim_reference(cpu_l, cpu, "cpu")
        lo = _dim_reference(load_l, load, "load")
        proposed = max(c, lo)
        if proposed == level:
            pending, count = None, 0
            cpu_l, load_l = c, lo
        else:
            count = count + 1 if proposed == pending else 1
            pending = proposed
            if count >= dwell:
                level, cpu_l, load_l = proposed, c, lo
                pending, count = None, 0
        out.append(level)
    return out
