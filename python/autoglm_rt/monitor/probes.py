"""Readers of the machine's figures: the host through psutil, GPUs through NVML (pynvml).

Both take the module they read through as an argument (default: the real one), so they can be
driven by fakes in tests. A GPU reader never raises because NVML is missing: without the library
or a driver it reports no GPUs and logs one line saying why.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger("autoglm_rt.monitor")


@dataclass(frozen=True)
class HostReading:
    """One reading of the host. ``cpu_ratio`` is system-wide utilization since the previous
    reading (0..1); ``load_per_core`` is the 1-minute load average divided by logical cores."""

    cpu_ratio: float
    cpu_count: int
    memory_total_bytes: int
    memory_used_bytes: int
    memory_available_bytes: int
    load1: float
    load5: float
    load15: float

    @property
    def memory_used_ratio(self) -> float:
        return self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else float("nan")

    @property
    def load_per_core(self) -> float:
        return self.load1 / self.cpu_count if self.cpu_count else float("nan")


class HostProbe:
    """Reads CPU utilization, virtual memory and load average through psutil.

    ``cpu_percent`` is primed once at construction (psutil's first non-blocking call has nothing
    to compare with), so the first :meth:`read` already measures the interval since then.
    Memory "used" is ``total - available`` (what other processes can no longer get), not psutil's
    ``used`` field, which excludes caches differently on each OS.
    """

    def __init__(self, psutil_module: ModuleType | Any | None = None) -> None:
        if psutil_module is None:
            import psutil

            psutil_module = psutil
        self._ps: Any = psutil_module
        self._cpu_count = int(self._ps.cpu_count(logical=True) or os.cpu_count() or 1)
        self._ps.cpu_percent(interval=None)

    def read(self) -> HostReading:
        cpu = float(self._ps.cpu_percent(interval=None)) / 100.0
        vm = self._ps.virtual_memory()
        load1, load5, load15 = (float(x) for x in self._ps.getloadavg())
        total = int(vm.total)
        available = int(vm.available)
        return HostReading(
            cpu_ratio=cpu,
            cpu_count=self._cpu_count,
            memory_total_bytes=total,
            memory_used_bytes=max(total - available, 0),
            memory_available_bytes=available,
            load1=load1,
            load5=load5,
            load15=load15,
        )


@dataclass(frozen=True)
class GpuInfo:
    """What identifies a GPU, with the label names the DCGM exporter uses."""

    index: int
    uuid: str
    name: str


@dataclass(frozen=True)
class GpuReading:
    """One reading of one GPU. A field is None where the GPU or driver does not support it."""

    info: GpuInfo
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None  # NVML's counter: joules since the driver was loaded
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    temperature_celsius: float | None = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class NvmlProbe:
    """Reads every visible GPU through NVML.

    Construction never raises for a missing library, driver or GPU: ``available`` is then False,
    ``reason`` says why (also logged once at INFO) and :meth:`read` returns an empty list. A
    query a GPU does not support (e.g. the energy counter before Volta) is not asked again and its
    field stays None. ``close()`` shuts NVML down.
    """

    nvml: ModuleType | Any | None = None
    available: bool = field(default=False, init=False)
    reason: str | None = field(default=None, init=False)
    gpus: list[GpuInfo] = field(default_factory=list, init=False)
    _handles: list[Any] = field(default_factory=list, init=False, repr=False)
    _unsupported: set[tuple[int, str]] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
            self.nvml.nvmlInit()
            count = int(self.nvml.nvmlDeviceGetCount())
            for i in range(count):
                h = self.nvml.nvmlDeviceGetHandleByIndex(i)
                self._handles.append(h)
                self.gpus.append(
                    GpuInfo(i, _text(self.nvml.nvmlDeviceGetUUID(h)), _text(self.nvml.nvmlDeviceGetName(h)))
                )
        except Exception as exc:  # any NVML failure means "no GPU series", never an exception
            self.reason = f"NVML unavailable ({type(exc).__name__}: {exc}); no GPU metrics"
            self._handles.clear()
            self.gpus.clear()
            log.info("autoglm_rt.monitor: %s", self.reason)
            return
        self.available = True
        if not self.gpus:
            self.reason = "NVML reports no GPU"
            log.info("autoglm_rt.monitor: %s; no GPU metrics", self.reason)

    def _query(self, index: int, what: str, fn: Any, *args: Any) -> Any:
        if (index, what) in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self._unsupported.add((index, what))
            log.info("autoglm_rt.monitor: GPU %d: %s not available (%s); not asked again", index, what, exc)
            return None

    def read(self) -> list[GpuReading]:
        if not self._handles:
            return []
        nv = self.nvml
        assert nv is not None
        out: list[GpuReading] = []
        for info, h in zip(self.gpus, self._handles, strict=True):
            i = info.index
            util = self._query(i, "utilization", nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._query(i, "memory", nv.nvmlDeviceGetMemoryInfo, h)
            power_mw = self._query(i, "power", nv.nvmlDeviceGetPowerUsage, h)
            limit_mw = self._query(i, "power limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
            energy_mj = self._query(i, "energy counter", nv.nvmlDeviceGetTotalEnergyConsumption, h)
            sm_mhz = self._query(i, "SM clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            mem_mhz = self._query(i, "memory clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
            temp = self._query(i, "temperature", nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            out.append(
                GpuReading(
                    info=info,
                    utilization_ratio=None if util is None else float(util.gpu) / 100.0,
                    memory_utilization_ratio=None if util is None else float(util.memory) / 100.0,
                    memory_used_bytes=None if mem is None else int(mem.used),
                    memory_total_bytes=None if mem is None else int(mem.total),
                    power_watts=None if power_mw is None else float(power_mw) / 1e3,
                    power_limit_watts=None if limit_mw is None else float(limit_mw) / 1e3,
                    energy_joules=None if energy_mj is None else float(energy_mj) / 1e3,
                    sm_clock_hertz=None if sm_mhz is None else float(sm_mhz) * 1e6,
                    memory_clock_hertz=None if mem_mhz is None else float(mem_mhz) * 1e6,
                    temperature_celsius=None if temp is None else float(temp),
                )
            )
        return out

    def close(self) -> None:
        if self._handles and self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)
        self._handles.clear()


def hostname() -> str:
    """The host name used as the ``Hostname`` label (as the DCGM exporter does)."""
    return socket.gethostname()
