"""The sampler: a background thread that reads the host and the GPUs every ``period`` seconds,
smooths each series (EWMA and a sliding window) and classifies the host's load level.

Readers see immutable :class:`Snapshot` objects; the newest is :meth:`Sampler.latest`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoglm_rt.monitor.load import LoadClassifier, LoadLevel
from autoglm_rt.monitor.probes import GpuReading, HostProbe, HostReading, NvmlProbe
from autoglm_rt.monitor.smoothing import Ewma, SlidingWindow, WindowStats

log = logging.getLogger("autoglm_rt.monitor")

DEFAULT_PERIOD = 2.0
DEFAULT_WINDOW = 60.0
DEFAULT_HALFLIFE = 10.0


@dataclass(frozen=True)
class Snapshot:
    """One sample with its smoothed view.

    ``series`` holds the raw values of this sample by key (``cpu_ratio``, ``load_per_core``,
    ``memory_used_ratio``, ``gpu<i>_utilization_ratio``, ``gpu<i>_memory_used_ratio``,
    ``gpu<i>_power_watts``); ``ewma`` and ``window`` the smoothed values of the same keys (a key
    is missing while it has no finite value). ``level`` comes from the EWMA of ``cpu_ratio`` and
    ``load_per_core`` through the classifier's hysteresis.
    """

    time: float
    wall_time: float
    index: int
    host: HostReading | None
    gpus: tuple[GpuReading, ...]
    series: dict[str, float]
    ewma: dict[str, float]
    window: dict[str, WindowStats]
    level: LoadLevel
    sample_seconds: float  # CPU time this sample cost the sampling thread


def _series(host: HostReading | None, gpus: tuple[GpuReading, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    if host is not None:
        out["cpu_ratio"] = host.cpu_ratio
        out["load_per_core"] = host.load_per_core
        out["memory_used_ratio"] = host.memory_used_ratio
    for g in gpus:
        i = g.info.index
        if g.utilization_ratio is not None:
            out[f"gpu{i}_utilization_ratio"] = g.utilization_ratio
        if g.memory_used_bytes is not None and g.memory_total_bytes:
            out[f"gpu{i}_memory_used_ratio"] = g.memory_used_bytes / g.memory_total_bytes
        if g.power_watts is not None:
            out[f"gpu{i}_power_watts"] = g.power_watts
    return out


def strategy_metrics(snap: Snapshot) -> dict[str, float]:
    """The smoothed figures under the names the policy layer's strategy triggers use:
    ``cpu_usage`` (EWMA, 0..1), ``load_1min`` (raw 1-minute load average), ``gpu_utilization``
    (highest GPU EWMA, 0..1; absent without GPUs), ``gpu_memory_usage`` (highest GPU memory ratio
    EWMA), ``host_memory_usage`` (EWMA) and ``memory_usage`` (the GPU figure where there are GPUs,
    else the host's; a runtime with a memory pool may override it with the pool's own ratio).
    A figure with no value yet is absent."""
    out: dict[str, float] = {}
    if "cpu_ratio" in snap.ewma:
        out["cpu_usage"] = snap.ewma["cpu_ratio"]
    if snap.host is not None:
        out["load_1min"] = snap.host.load1
    if "memory_used_ratio" in snap.ewma:
        out["host_memory_usage"] = snap.ewma["memory_used_ratio"]
    util = [v for k, v in snap.ewma.items() if k.startswith("gpu") and k.endswith("_utilization_ratio")]
    mem = [v for k, v in snap.ewma.items() if k.startswith("gpu") and k.endswith("_memory_used_ratio")]
    if util:
        out["gpu_utilization"] = max(util)
    if mem:
        out["gpu_memory_usage"] = max(mem)
    memory = out.get("gpu_memory_usage", out.get("host_memory_usage"))
    if memory is not None:
        out["memory_usage"] = memory
    return out


@dataclass
class _Series:
    ewma: Ewma
    window: SlidingWindow


class Sampler:
    """Samples the machine every ``period`` seconds on a daemon thread (:meth:`start`), or on
    demand (:meth:`sample_once`).

    - ``period`` (default 2 s), ``window`` (sliding window length, default 60 s) and ``halflife``
      (EWMA half-life, default 10 s) are seconds > 0.
    - ``host_probe`` / ``gpu_probe``: readers (default: psutil and NVML). ``gpus=False`` skips
      NVML entirely. Without NVML there are simply no GPU series (one log line, no exception).
    - ``clock``: monotonic seconds (injectable for tests).
    - Listeners added with :meth:`add_listener` are called with each new snapshot on the sampling
      thread; an exception in one is logged and does not stop sampling.

    Thread-safe: :meth:`latest` may be called from any thread.
    """

    def __init__(
        self,
        period: float = DEFAULT_PERIOD,
        *,
        window: float = DEFAULT_WINDOW,
        halflife: float = DEFAULT_HALFLIFE,
        host_probe: HostProbe | Any | None = None,
        gpu_probe: NvmlProbe | Any | None = None,
        gpus: bool = True,
        classifier: LoadClassifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("period", period), ("window", window), ("halflife", halflife)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected seconds as a number, got {type(value).__name__}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number of seconds > 0, got {value}")
        self.period = float(period)
        self.window_seconds = float(window)
        self.halflife = float(halflife)
        self.host_probe = host_probe if host_probe is not None else HostProbe()
        if gpu_probe is None and gpus:
            gpu_probe = NvmlProbe()
        self.gpu_probe = gpu_probe
        self.classifier = classifier or LoadClassifier()
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}
        self._latest: Snapshot | None = None
        self._count = 0
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.total_sample_seconds = 0.0

    @property
    def gpu_reason(self) -> str | None:
        """Why there are no GPU series (None when NVML works or GPUs were not asked for)."""
        return getattr(self.gpu_probe, "reason", None) if self.gpu_probe is not None else None

    def add_listener(self, fn: Callable[[Snapshot], None]) -> None:
        """Calls ``fn(snapshot)`` after every sample (on the sampling thread)."""
        if not callable(fn):
            raise TypeError(f"fn: expected a callable taking a Snapshot, got {type(fn).__name__}")
        with self._lock:
            self._listeners.append(fn)

    def latest(self) -> Snapshot | None:
        """The newest snapshot, or None before the first sample."""
        with self._lock:
            return self._latest

    def sample_once(self) -> Snapshot:
        """Reads every probe now, updates the smoothing and the level, returns the snapshot."""
        cpu0 = time.thread_time()
        host: HostReading | None = None
        try:
            host = self.host_probe.read()
        except Exception as exc:  # a broken reading must not kill the sampler
            log.warning("autoglm_rt.monitor: host reading failed: %s", exc)
        gpus: tuple[GpuReading, ...] = ()
        if self.gpu_probe is not None:
            try:
                gpus = tuple(self.gpu_probe.read())
            except Exception as exc:
                log.warning("autoglm_rt.monitor: GPU reading failed: %s", exc)
        t = self._clock()
        values = _series(host, gpus)
        with self._lock:
            for key, value in values.items():
                s = self._series.get(key)
                if s is None:
                    s = self._series[key] = _Series(Ewma(self.halflife), SlidingWindow(self.window_seconds))
                s.ewma.update(value, t)
                s.window.add(value, t)
            ewma = {k: s.ewma.value for k, s in self._series.items() if s.ewma.value is not None}
            window = {k: st for k, s in self._series.items() if (st := s.window.stats()) is not None}
            level = self.classifier.update(ewma.get("cpu_ratio", float("nan")), ewma.get("load_per_core", float("nan")))
            cost = time.thread_time() - cpu0
            self.total_sample_seconds += cost
            snap = Snapshot(
                time=t,
                wall_time=time.time(),
                index=self._count,
                host=host,
                gpus=gpus,
                series=values,
                ewma=ewma,
                window=window,
                level=level,
                sample_seconds=cost,
            )
            self._count += 1
            self._latest = snap
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(snap)
            except Exception:
                log.exception("autoglm_rt.monitor: sampler listener %r failed", fn)
        return snap

    @property
    def samples(self) -> int:
        """Number of samples taken so far."""
        with self._lock:
            return self._count

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:  # keep sampling; the next period may succeed
                log.exception("autoglm_rt.monitor: sampling failed")
            next_at += self.period
            delay = next_at - self._clock()
            if delay < 0:  # fell behind (suspended, overloaded): restart the schedule from now
                next_at = self._clock()
                delay = 0.0
            self._stop.wait(delay)

    def start(self) -> Sampler:
        """Starts the sampling thread (samples at once, then every ``period``); returns self."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="autoglm_rt-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops the thread (waits up to ``timeout`` s); it may be started again. Safe to call
        twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stops the thread and releases NVML (no GPU series afterwards)."""
        self.stop()
        close = getattr(self.gpu_probe, "close", None)
        if close is not None:
            close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_HALFLIFE", "DEFAULT_PERIOD", "DEFAULT_WINDOW", "Sampler", "Snapshot", "strategy_metrics"]
