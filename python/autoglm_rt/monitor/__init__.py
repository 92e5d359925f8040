"""What operators look at: a sampler of the host and GPUs with smoothing and a load level,
Prometheus metrics, and energy.

- :class:`Sampler` (``sampler``): psutil + NVML every ``period`` s, EWMA, sliding window, level;
  :func:`strategy_metrics` names its smoothed figures as the policy's strategy triggers do.
- :class:`LoadClassifier`, :class:`LoadLevel` (``load``): low / medium / high with hysteresis.
- :class:`Ewma`, :class:`SlidingWindow` (``smoothing``).
- :class:`MetricsExporter`, :func:`start_metrics_server` (``exporter``): the Prometheus endpoint.
- :class:`EnergyMeter` (``energy``): NVML energy counter, RAPL, kWh and CO2e.

Metric names and labels are listed in docs/metrics.md.
"""

from __future__ import annotations

from autoglm_rt.monitor.energy import EnergyMeter, EnergyReport, EnergyWindow, RaplReader
from autoglm_rt.monitor.exporter import (
    DEFAULT_PORT,
    SOURCE_FIELDS,
    STEP_BUCKETS,
    MetricsExporter,
    MetricsServer,
    start_metrics_server,
)
from autoglm_rt.monitor.load import LoadClassifier, LoadLevel, LoadThresholds, classify
from autoglm_rt.monitor.probes import GpuInfo, GpuReading, HostProbe, HostReading, NvmlProbe
from autoglm_rt.monitor.sampler import Sampler, Snapshot, strategy_metrics
from autoglm_rt.monitor.smoothing import Ewma, SlidingWindow, WindowStats

__all__ = [
    "DEFAULT_PORT",
    "SOURCE_FIELDS",
    "STEP_BUCKETS",
    "EnergyMeter",
    "EnergyReport",
    "EnergyWindow",
    "Ewma",
    "GpuInfo",
    "GpuReading",
    "HostProbe",
    "HostReading",
    "LoadClassifier",
    "LoadLevel",
    "LoadThresholds",
    "MetricsExporter",
    "MetricsServer",
    "NvmlProbe",
    "RaplReader",
    "Sampler",
    "SlidingWindow",
    "Snapshot",
    "WindowStats",
    "classify",
    "start_metrics_server",
    "strategy_metrics",
]
