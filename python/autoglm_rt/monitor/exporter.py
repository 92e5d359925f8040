"""Prometheus metrics for operators: host and GPU gauges from the sampler, the pool's statistics,
gradient statistics, compression, the policy's decisions, a step-time histogram and energy.

The exporter imports none of the components it reports on: each registers a *source*, a function
returning a dict of documented fields (see ``SOURCE_FIELDS`` and docs/metrics.md)::

    exporter = MetricsExporter(sampler=sampler)
    exporter.add_source("pool", pool.stats, labels={"device": "cuda:0"})
    exporter.add_source("policy", lambda: {"phase": det.phase, "micro_batch": 8, "accumulation": 4})
    exporter.observe_step(step_seconds)
    start_metrics_server(9500, exporter=exporter)      # http://127.0.0.1:9500/metrics

Sources are called at scrape time, on the scraping thread. Label names for GPUs follow the DCGM
exporter (``gpu``, ``UUID``, ``device``, ``modelName``, ``Hostname``); training series carry
``rank``.

Several ranks: every rank runs its own exporter; :func:`start_metrics_server` listens on
``port + LOCAL_RANK`` (so ranks on one host do not collide), training series carry the global
``rank`` label, and host/GPU series are exported by local rank 0 only (one copy per host, as
node_exporter/DCGM would), unless ``host_metrics=True`` is passed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from autoglm_rt.constants import PHASES, UNLIMITED_BYTES
from autoglm_rt.monitor.load import LoadLevel
from autoglm_rt.monitor.probes import GpuReading, hostname

log = logging.getLogger("autoglm_rt.monitor")

PREFIX = "autoglm_rt_"
DEFAULT_PORT = 9500
#: Step-time buckets: 5 ms doubling up to ~11 minutes (0.005 * 2**k, k = 0..17).
STEP_BUCKETS: tuple[float, ...] = tuple(0.005 * 2**k for k in range(18))


@dataclass(frozen=True)
class FieldSpec:
    """How one field of a source becomes a metric: ``kind`` is ``gauge``, ``counter``,
    ``phase`` (a phase name -> one series per phase, 1 for the current), ``bool`` or
    ``labelled_counter`` (a dict from a tuple of ``labels`` values to a count)."""

    metric: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


def _pool_fields() -> dict[str, FieldSpec]:
    g = "gauge"
    fields = {
        "allocated_bytes": FieldSpec("pool_allocated_bytes", g, "Bytes in live blocks handed out by the pool."),
        "reserved_bytes": FieldSpec("pool_reserved_bytes", g, "Bytes the pool holds from its upstream."),
        "requested_bytes": FieldSpec("pool_requested_bytes", g, "Bytes asked for by live allocations."),
        "peak_allocated_bytes": FieldSpec("pool_peak_allocated_bytes", g, "Highest allocated_bytes."),
        "peak_reserved_bytes": FieldSpec("pool_peak_reserved_bytes", g, "Highest reserved_bytes."),
        "peak_requested_bytes": FieldSpec("pool_peak_requested_bytes", g, "Highest requested_bytes."),
        "limit_bytes": FieldSpec("pool_limit_bytes", g, "The pool's hard limit (absent when unlimited)."),
        "largest_free_block_bytes": FieldSpec("pool_largest_free_block_bytes", g, "Largest cached free block."),
        "fragmentation_ratio": FieldSpec(
            "pool_fragmentation_ratio", g, "1 - largest free block / cached free bytes (0 when none)."
        ),
        "num_segments": FieldSpec("pool_segments", g, "Segments obtained from the upstream."),
        "num_free_blocks": FieldSpec("pool_free_blocks", g, "Cached free blocks."),
        "num_live_blocks": FieldSpec("pool_live_blocks", g, "Blocks in use."),
    }
    for key, what, doc in (
        ("num_allocs", "allocs", "Allocations served"),
        ("num_frees", "frees", "Blocks freed"),
        ("num_cache_hits", "cache_hits", "Allocations served from cached blocks"),
        ("num_upstream_allocs", "upstream_allocs", "Segments obtained from the upstream"),
        ("num_upstream_frees", "upstream_frees", "Segments returned to the upstream"),
        ("num_ooms", "ooms", "Allocations refused (limit or upstream out of memory)"),
        ("num_trims", "trims", "Trims of the cache (limit lowered or explicit)"),
        ("num_pressure_reclaims", "pressure_reclaims", "Allocations that first reclaimed free memory under the limit"),
        ("num_trace_dropped", "trace_dropped", "Trace records dropped because the trace buffer was full"),
    ):
        fields[key] = FieldSpec(f"pool_{what}_total", "counter", f"{doc} since the pool was created.")
    fields["pressure_reclaimed_bytes"] = FieldSpec(
        "pool_pressure_reclaimed_bytes_total", "counter", "Bytes given back to the upstream to fit under the limit."
    )
    return fields


#: Every field a source may return, per source kind. Unknown fields are ignored (logged once).
SOURCE_FIELDS: dict[str, dict[str, FieldSpec]] = {
    "pool": _pool_fields(),
    "stats": {
        "grad_norm": FieldSpec("grad_norm", "gauge", "Global L2 norm of the last step's gradients."),
        "nonfinite_steps": FieldSpec(
            "grad_nonfinite_steps_total", "counter", "Steps whose gradients held a NaN or Inf."
        ),
        "nonfinite_elements": FieldSpec(
            "grad_nonfinite_elements_total", "counter", "Gradient elements that were NaN or Inf, summed over steps."
        ),
    },
    "compression": {
        "bytes_sent": FieldSpec("compression_sent_bytes_total", "counter", "Bytes the compressed hook sent."),
        "dense_bytes": FieldSpec(
            "compression_dense_bytes_total", "counter", "Bytes a dense all-reduce would have sent for the same buckets."
        ),
        "ratio": FieldSpec(
            "compression_ratio", "gauge", "dense_bytes / bytes_sent: how many times fewer bytes were sent (1 = dense)."
        ),
        "density": FieldSpec("compression_density_ratio", "gauge", "Fraction of entries sent in the last iteration."),
        "compressed_buckets": FieldSpec("compression_compressed_buckets_total", "counter", "Buckets sent compressed."),
        "dense_buckets": FieldSpec("compression_dense_buckets_total", "counter", "Buckets all-reduced densely."),
        "residual_resets": FieldSpec(
            "compression_residual_resets_total", "counter", "Error-feedback residuals dropped (bucket layout changed)."
        ),
        "nonfinite_resets": FieldSpec(
            "compression_nonfinite_resets_total", "counter", "Residuals cleared because they held NaN or Inf."
        ),
        "iterations": FieldSpec("compression_iterations_total", "counter", "Iterations the hook has run."),
    },
    "policy": {
        "phase": FieldSpec("training_phase", "phase", "1 for the current training phase, 0 for the others."),
        "unstable": FieldSpec("training_unstable", "bool", "1 while the phase detector flags instability."),
        "micro_batch": FieldSpec("micro_batch_size", "gauge", "Samples per micro-batch."),
        "accumulation": FieldSpec("accumulation_steps", "gauge", "Micro-batches accumulated per optimizer step."),
        "effective_batch": FieldSpec("effective_batch_size", "gauge", "Samples per optimizer step (all ranks)."),
        "noise_scale": FieldSpec("gradient_noise_scale", "gauge", "Estimated gradient noise scale (B_simple)."),
        "steps": FieldSpec(
            "optimizer_steps_total", "counter", "Optimizer steps taken by the Runtime (skipped ones too)."
        ),
        "skipped_steps": FieldSpec(
            "skipped_steps_total", "counter", "Optimizer steps skipped because a gradient held NaN or Inf."
        ),
        "ooms_recovered": FieldSpec(
            "ooms_recovered_total", "counter", "Out-of-memory errors recovered by a smaller micro-batch."
        ),
        "actions": FieldSpec(
            "actions_total",
            "labelled_counter",
            "Strategy actions by action and whether something carried them out (applied).",
            ("action", "applied"),
        ),
    },
    "offload": {
        "offloaded": FieldSpec(
            "optimizer_state_offloaded", "bool", "1 while the optimizer state lives on the slower tier."
        ),
        "resident_bytes": FieldSpec(
            "optimizer_state_resident_bytes", "gauge", "Optimizer-state bytes held in the parameters' own memory."
        ),
        "state_bytes": FieldSpec("optimizer_state_bytes", "gauge", "Optimizer-state bytes, wherever they live."),
        "offloads": FieldSpec(
            "optimizer_state_offloads_total", "counter", "Moves of the optimizer state to the slower tier."
        ),
        "restores": FieldSpec("optimizer_state_restores_total", "counter", "Moves of the optimizer state back."),
    },
    "energy": {
        "cpu_joules": FieldSpec("energy_cpu_joules_total", "counter", "CPU energy since the meter started."),
        "cpu_estimated": FieldSpec(
            "energy_cpu_estimated", "bool", "1 when CPU energy is an estimate (no readable RAPL counter)."
        ),
        "gpu_joules": FieldSpec("energy_gpu_joules_total", "counter", "GPU energy since the meter started."),
        "co2e_grams": FieldSpec(
            "energy_co2e_grams_total", "counter", "CO2-equivalent of the metered energy (intensity x PUE)."
        ),
    },
}

Source = Callable[[], Mapping[str, Any]]
_Family = GaugeMetricFamily | CounterMetricFamily


@dataclass
class _SourceEntry:
    kind: str
    fn: Source
    labels: dict[str, str]


def _env_rank(name: str) -> int:
    """An ``int >= 0`` from the environment variable ``name`` (0 when unset or empty). Raises
    ValueError for anything else, so a mistyped ``RANK``/``LOCAL_RANK`` is not silently 0."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected an int >= 0 (the rank torchrun sets)")
    return value


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (labels or {}).items():
        if not isinstance(k, str) or not k.isidentifier() or k.startswith("__"):
            raise ValueError(f"labels: {k!r} is not a valid Prometheus label name")
        if k == "rank":
            raise ValueError("labels: 'rank' is set by the exporter; pass rank= to MetricsExporter")
        out[k] = str(v)
    return out


class MetricsExporter:
    """A prometheus_client collector over a sampler, registered sources and a step histogram.

    ``rank``: the global rank (default: env ``RANK``, else 0). ``host_metrics``: export host and
    GPU series (default: only where env ``LOCAL_RANK`` is unset or 0). ``registry``: where to
    register (default: a fresh ``CollectorRegistry``, so the process/platform collectors of the
    global registry do not mix in).
    """

    def __init__(
        self,
        sampler: Any | None = None,
        *,
        rank: int | None = None,
        host_metrics: bool | None = None,
        registry: CollectorRegistry | None = None,
        step_buckets: Iterable[float] = STEP_BUCKETS,
    ) -> None:
        if rank is None:
            rank = _env_rank("RANK")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank: expected an int >= 0, got {rank!r}")
        if host_metrics is None:
            host_metrics = _env_rank("LOCAL_RANK") == 0
        self.rank = rank
        self.host_metrics = bool(host_metrics)
        self.sampler = sampler
        self.hostname = hostname()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self._sources: list[_SourceEntry] = []
        self._lock = threading.Lock()
        self._source_errors: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        buckets = sorted(float(b) for b in step_buckets)
        if not buckets or any(not (math.isfinite(b) and b > 0) for b in buckets):
            raise ValueError(f"step_buckets: expected finite upper bounds > 0, got {buckets}")
        self._step_hist = Histogram(
            PREFIX + "step_duration_seconds",
            "Wall time of one optimizer step (forward, backward, communication, update).",
            labelnames=("rank",),
            buckets=buckets,
            registry=self.registry,
        ).labels(rank=str(rank))
        self.registry.register(_Collector(self))

    # -- sources -----------------------------------------------------------------------------
    def add_source(self, kind: str, fn: Source, *, labels: Mapping[str, str] | None = None) -> None:
        """Registers ``fn`` (called at each scrape) as a source of ``kind`` (a key of
        ``SOURCE_FIELDS``: pool, stats, compression, policy, offload, energy). ``labels`` are added to its
        series (e.g. ``{"device": "cuda:0"}`` for one pool per device); the same kind may be added
        again only with different labels."""
        if kind not in SOURCE_FIELDS:
            raise ValueError(f"kind: expected one of {', '.join(SOURCE_FIELDS)}, got {kind!r}")
        if not callable(fn):
            raise TypeError(f"fn: expected a callable returning a dict, got {type(fn).__name__}")
        lab = _check_labels(labels)
        with self._lock:
            for s in self._sources:
                if s.kind == kind and s.labels == lab:
                    raise ValueError(f"a {kind!r} source with labels {lab} is already registered")
            self._sources.append(_SourceEntry(kind, fn, lab))

    def remove_sources(self, kind: str) -> int:
        """Unregisters every source of ``kind``; returns how many were removed."""
        with self._lock:
            before = len(self._sources)
            self._sources = [s for s in self._sources if s.kind != kind]
            return before - len(self._sources)

    def observe_step(self, seconds: float) -> None:
        """Records one step's duration in ``autoglm_rt_step_duration_seconds``."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"seconds: expected a number, got {type(seconds).__name__}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: expected a finite duration >= 0, got {seconds}")
        self._step_hist.observe(float(seconds))

    def render(self) -> bytes:
        """The exposition text a scrape would get."""
        return generate_latest(self.registry)

    # -- collection --------------------------------------------------------------------------
    def _first_time(self, kind: str, problem: str) -> bool:
        with self._lock:
            first = (kind, problem) not in self._warned
            self._warned.add((kind, problem))
        return first

    def _error(self, kind: str, problem: str) -> None:
        with self._lock:
            self._source_errors[kind] = self._source_errors.get(kind, 0) + 1
        if self._first_time(kind, problem):
            log.warning("autoglm_rt.monitor: %s source: %s (logged once)", kind, problem)

    def _collect(self) -> Iterator[Metric]:
        sources = list(self._collect_sources())  # first, so this scrape's errors are counted in it
        yield from self._collect_monitor()
        if self.host_metrics and self.sampler is not None:
            snap = self.sampler.latest()
            if snap is not None:
                yield from self._collect_host(snap)
                yield from self._collect_gpus(snap.gpus, snap.ewma)
        yield from sources

    def _collect_monitor(self) -> Iterator[Metric]:
        samples = CounterMetricFamily(PREFIX + "monitor_samples", "Samples the sampler has taken.", labels=["rank"])
        cost = CounterMetricFamily(
            PREFIX + "monitor_sample_cpu_seconds",
            "CPU time the sampling thread spent sampling (its overhead).",
            labels=["rank"],
        )
        nvml = GaugeMetricFamily(PREFIX + "monitor_nvml_available", "1 if NVML could be read.", labels=["rank"])
        if self.sampler is not None:
            samples.add_metric([str(self.rank)], float(self.sampler.samples))
            cost.add_metric([str(self.rank)], float(self.sampler.total_sample_seconds))
            nvml.add_metric([str(self.rank)], float(bool(getattr(self.sampler.gpu_probe, "available", False))))
        errors = CounterMetricFamily(
            PREFIX + "monitor_source_errors", "Failed or malformed source readings.", labels=["rank", "source"]
        )
        with self._lock:
            errs = dict(self._source_errors)
        for kind, n in sorted(errs.items()):
            errors.add_metric([str(self.rank), kind], float(n))
        yield from (samples, cost, nvml, errors)

    def _collect_host(self, snap: Any) -> Iterator[Metric]:
        lab = ["Hostname"]
        val = [self.hostname]

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
            if value is None:
                return None
            g = GaugeMetricFamily(PREFIX + name, doc, labels=lab)
            g.add_metric(val, float(value))
            return g

        h = snap.host
        fams: list[GaugeMetricFamily | None] = []
        if h is not None:
            fams += [
                gauge("host_cpu_utilization_ratio", "System-wide CPU utilization over the last period.", h.cpu_ratio),
                gauge("host_cpus", "Logical CPUs.", h.cpu_count),
                gauge("host_memory_total_bytes", "Physical memory.", h.memory_total_bytes),
                gauge(
                    "host_memory_used_bytes",
                    "Memory not available to new work (total - available).",
                    h.memory_used_bytes,
                ),
                gauge(
                    "host_memory_used_ratio", "host_memory_used_bytes / host_memory_total_bytes.", h.memory_used_ratio
                ),
                gauge("host_load1", "1-minute load average.", h.load1),
                gauge("host_load_per_core", "1-minute load average / logical CPUs.", h.load_per_core),
            ]
        fams += [
            gauge("host_cpu_utilization_ewma_ratio", "EWMA of host_cpu_utilization_ratio.", snap.ewma.get("cpu_ratio")),
            gauge("host_load_per_core_ewma", "EWMA of host_load_per_core.", snap.ewma.get("load_per_core")),
            gauge("host_memory_used_ewma_ratio", "EWMA of host_memory_used_ratio.", snap.ewma.get("memory_used_ratio")),
            gauge("load_level", "Load level with hysteresis: 0 low, 1 medium, 2 high.", int(snap.level)),
        ]
        yield from (f for f in fams if f is not None)
        state = GaugeMetricFamily(
            PREFIX + "load_level_state", "1 for the current load level, 0 for the others.", labels=["Hostname", "level"]
        )
        for level in LoadLevel:
            state.add_metric([self.hostname, level.name.lower()], float(level == snap.level))
        yield state

    def _collect_gpus(self, gpus: tuple[GpuReading, ...], ewma: Mapping[str, float]) -> Iterator[Metric]:
        if not gpus:
            return
        labels = ["gpu", "UUID", "device", "modelName", "Hostname"]
        specs: list[tuple[str, str, str, Callable[[GpuReading], float | None]]] = [
            ("gpu_utilization_ratio", "gauge", "Fraction of time a kernel ran.", lambda g: g.utilization_ratio),
            (
                "gpu_utilization_ewma_ratio",
                "gauge",
                "EWMA of gpu_utilization_ratio.",
                lambda g: ewma.get(f"gpu{g.info.index}_utilization_ratio"),
            ),
            (
                "gpu_memory_utilization_ratio",
                "gauge",
                "Fraction of time device memory was read or written.",
                lambda g: g.memory_utilization_ratio,
            ),
            ("gpu_memory_used_bytes", "gauge", "Device memory in use (all processes).", lambda g: g.memory_used_bytes),
            ("gpu_memory_total_bytes", "gauge", "Device memory.", lambda g: g.memory_total_bytes),
            ("gpu_power_watts", "gauge", "Power draw.", lambda g: g.power_watts),
            ("gpu_power_limit_watts", "gauge", "Enforced power limit.", lambda g: g.power_limit_watts),
            (
                "gpu_energy_joules_total",
                "counter",
                "Energy since the driver was loaded (NVML counter).",
                lambda g: g.energy_joules,
            ),
            ("gpu_sm_clock_hertz", "gauge", "SM clock.", lambda g: g.sm_clock_hertz),
            ("gpu_memory_clock_hertz", "gauge", "Memory clock.", lambda g: g.memory_clock_hertz),
            ("gpu_temperature_celsius", "gauge", "GPU temperature.", lambda g: g.temperature_celsius),
        ]
        for name, kind, doc, get in specs:
            fam: GaugeMetricFamily | CounterMetricFamily
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(PREFIX + name, doc, labels=labels)
            any_value = False
            for g in gpus:
                v = get(g)
                if v is None:
                    continue
                i = g.info
                fam.add_metric([str(i.index), i.uuid, f"nvidia{i.index}", i.name, self.hostname], float(v))
                any_value = True
            if any_value:
                yield fam

    def _collect_sources(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        families: dict[str, _Family] = {}
        for src in sources:
            try:
                data = src.fn()
                if not isinstance(data, Mapping):
                    raise TypeError(f"returned {type(data).__name__}, expected a dict")
            except Exception as exc:
                self._error(src.kind, f"call failed: {type(exc).__name__}: {exc}")
                continue
            names = ["rank", *src.labels]
            values = [str(self.rank), *src.labels.values()]
            fields = SOURCE_FIELDS[src.kind]
            for key, raw in data.items():
                spec = fields.get(key)
                if spec is None:
                    if self._first_time(src.kind, f"unknown field {key}"):
                        log.info("autoglm_rt.monitor: %s source: field %r is not exported", src.kind, key)
                    continue
                if raw is None:
                    continue
                try:
                    self._add_field(families, spec, names, values, key, raw)
                except (TypeError, ValueError) as exc:
                    self._error(src.kind, str(exc))
            if src.kind == "compression" and "ratio" not in data:
                sent, dense = data.get("bytes_sent"), data.get("dense_bytes")
                if isinstance(sent, (int, float)) and isinstance(dense, (int, float)) and sent > 0:
                    self._add_field(families, fields["ratio"], names, values, "ratio", dense / sent)
        yield from families.values()

    @staticmethod
    def _add_field(
        families: dict[str, _Family], spec: FieldSpec, names: list[str], values: list[str], key: str, raw: Any
    ) -> None:
        full = PREFIX + spec.metric
        if spec.kind == "labelled_counter":
            if not isinstance(raw, Mapping):
                raise TypeError(f"field {key!r}: expected a dict of label values to counts, got {type(raw).__name__}")
            fam = families.get(full)
            if fam is None:
                fam = families[full] = CounterMetricFamily(full, spec.help, labels=[*names, *spec.labels])
            for label_values, count in raw.items():
                if not isinstance(label_values, tuple) or len(label_values) != len(spec.labels):
                    raise ValueError(
                        f"field {key!r}: expected keys of {len(spec.labels)} label values, got {label_values!r}"
                    )
                if isinstance(count, bool) or not isinstance(count, (int, float)) or not count >= 0:
                    raise ValueError(f"field {key!r}: a counter must be a number >= 0, got {count!r}")
                fam.add_metric([*values, *(str(v) for v in label_values)], float(count))
            return
        if spec.kind == "phase":
            if raw not in PHASES:
                raise ValueError(f"field {key!r}: expected one of {', '.join(PHASES)}, got {raw!r}")
            fam = families.get(full)
            if fam is None:
                fam = families[full] = GaugeMetricFamily(full, spec.help, labels=[*names, "phase"])
            for p in PHASES:
                fam.add_metric([*values, p], float(p == raw))
            return
        if isinstance(raw, (bool, int, float)):
            number = float(raw)
        else:
            raise TypeError(f"field {key!r}: expected a number, got {type(raw).__name__}")
        if spec.kind == "bool":
            number = float(bool(number))
        if key == "limit_bytes" and number >= UNLIMITED_BYTES:
            return
        if spec.kind == "counter" and not (math.isfinite(number) and number >= 0):
            raise ValueError(f"field {key!r}: a counter must be finite and >= 0, got {raw!r}")
        fam = families.get(full)
        if fam is None:
            cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            fam = families[full] = cls(full, spec.help, labels=names)
        fam.add_metric(values, number)


class _Collector:
    """The object registered with prometheus_client; delegates to its exporter."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        return self._exporter._collect()

    def describe(self) -> list[Metric]:
        return []


#: The metrics endpoint's limits: a client has this many seconds to send its request (an idle
#: connection is closed after it), and at most this many requests are served at once (further
#: connections get 503 at once instead of a thread each).
HEADER_TIMEOUT_SECONDS = 10.0
MAX_CONCURRENT_REQUESTS = 8


@dataclass
class MetricsServer:
    """A running metrics endpoint; ``url`` is its /metrics address. ``close()`` stops it."""

    exporter: MetricsExporter
    addr: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int = DEFAULT_PORT,
    addr: str = "127.0.0.1",
    *,
    exporter: MetricsExporter | None = None,
    offset_by_local_rank: bool = True,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
    max_concurrent: int = MAX_CONCURRENT_REQUESTS,
) -> MetricsServer:
    """Serves ``exporter`` (default: a new one without a sampler) over HTTP on a daemon thread.

    Listens on ``addr`` (loopback unless told otherwise) and ``port + LOCAL_RANK`` when
    ``offset_by_local_rank`` and env ``LOCAL_RANK`` is set (it must then be an int >= 0);
    ``port=0`` picks a free port (see ``MetricsServer.port``). A client that has not sent its
    request within ``header_timeout`` seconds is disconnected; at most ``max_concurrent`` requests
    are served at once, further connections get 503. Raises OSError if the port is taken."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int in 0..65535, got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr: expected an address to bind such as '127.0.0.1', got {addr!r}")
    if isinstance(header_timeout, bool) or not isinstance(header_timeout, int | float) or not header_timeout > 0:
        raise ValueError(f"header_timeout: expected seconds > 0, got {header_timeout!r}")
    if not math.isfinite(header_timeout):
        raise ValueError(f"header_timeout: expected a finite number of seconds, got {header_timeout!r}")
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise ValueError(f"max_concurrent: expected an int >= 1, got {max_concurrent!r}")
    if exporter is None:
        exporter = MetricsExporter()
    local_rank = _env_rank("LOCAL_RANK") if offset_by_local_rank else 0  # checked even when port=0
    if port and local_rank:
        port += local_rank
        if port > 65535:
            raise ValueError(f"port: port + LOCAL_RANK ({port}) exceeds 65535")
    server, thread = _serve(exporter.registry, addr, port, float(header_timeout), max_concurrent)
    return MetricsServer(exporter, addr, int(server.server_port), server, thread)


def _serve(registry: CollectorRegistry, addr: str, port: int, header_timeout: float, max_concurrent: int) -> Any:
    """prometheus_client's WSGI app behind a threading server with a bounded number of request
    threads and a socket timeout on each connection. Returns (server, thread)."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client.exposition import make_wsgi_app

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Handler(WSGIRequestHandler):
        timeout = header_timeout  # socket timeout: reading the request line and headers included

        def log_message(self, format: str, *args: Any) -> None:
            """Logs nothing: a scrape every few seconds is not news."""

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True
        _slots = threading.BoundedSemaphore(max_concurrent)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    request.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

    server = make_server(addr, port, make_wsgi_app(registry), Server, handler_class=Handler)
    thread = threading.Thread(target=server.serve_forever, name="autoglm-rt-metrics", daemon=True)
    thread.start()
    return server, thread
