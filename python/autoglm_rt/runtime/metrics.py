"""The Runtime's side of the metrics contract: counters kept from every ``StepReport`` and the
sources a ``MetricsExporter`` scrapes (field names: ``monitor.exporter.SOURCE_FIELDS``).

``attach(exporter, ...)`` registers every producer a Runtime has: its own ``stats`` and
``policy`` sources, the DDP hook state's ``compression`` source (anything with ``metrics()``),
the memory signal's ``pool`` source (anything with ``stats()``), the optimizer offload's
``offload`` source and, when given, an energy meter's ``energy`` source; step durations go to
the exporter's histogram.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

from autoglm_rt.runtime.report import StepReport


class RuntimeMetrics:
    """Thread-safe counters over the steps seen (scrapes come from the server's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.nonfinite_elements = 0
        self.ooms_recovered = 0
        self.actions: Counter[tuple[str, bool]] = Counter()
        self.last: StepReport | None = None
        self.exporters: list[Any] = []

    def record(self, report: StepReport, ooms_recovered: int) -> None:
        """Counts one step and passes its duration to every attached exporter."""
        with self._lock:
            self.steps += 1
            self.skipped_steps += int(report.skipped)
            self.nonfinite_steps += int(report.nonfinite > 0)
            self.nonfinite_elements += report.nonfinite
            self.ooms_recovered = ooms_recovered
            for result in report.actions:
                self.actions[(result.action.name, result.applied)] += 1
            self.last = report
        if report.step_seconds is not None:
            for exporter in self.exporters:
                exporter.observe_step(report.step_seconds)

    def stats(self) -> dict[str, Any]:
        """The ``stats`` source: gradient norm of the last step and the non-finite counters."""
        with self._lock:
            last = self.last
            return {
                "grad_norm": None if last is None or not math.isfinite(last.grad_norm) else last.grad_norm,
                "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_elements": self.nonfinite_elements,
            }

    def policy(self) -> dict[str, Any]:
        """The ``policy`` source: the last step's phase, batch plan and noise scale, the step,
        skip, OOM-recovery and action counters."""
        with self._lock:
            last = self.last
            out: dict[str, Any] = {
                "steps": self.steps,
                "skipped_steps": self.skipped_steps,
                "ooms_recovered": self.ooms_recovered,
                "actions": {(name, "true" if applied else "false"): n for (name, applied), n in self.actions.items()},
            }
            if last is not None:
                out.update(
                    phase=last.phase,
                    unstable=last.unstable,
                    micro_batch=last.micro_batch,
                    accumulation=last.accumulation,
                    effective_batch=last.effective_batch,
                    noise_scale=last.noise_scale,
                )
            return out

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "steps": self.steps,
                "skipped_steps": self.skipped_steps,
                "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_elements": self.nonfinite_elements,
                "ooms_recovered": self.ooms_recovered,
                "actions": [[name, applied, n] for (name, applied), n in self.actions.items()],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            for key in ("steps", "skipped_steps", "nonfinite_steps", "nonfinite_elements", "ooms_recovered"):
                setattr(self, key, int(state[key]))
            self.actions = Counter({(str(name), bool(applied)): int(n) for name, applied, n in state["actions"]})


def attach(
    exporter: Any,
    metrics: RuntimeMetrics,
    *,
    comm_state: Any = None,
    pool: Any = None,
    energy: Any = None,
    offload: Any = None,
) -> None:
    """Registers every producer with ``exporter`` (see the module docstring); ``offload``: the
    Runtime's ``OffloadControl``, whose ``metrics`` is the ``offload`` source."""
    exporter.add_source("stats", metrics.stats)
    exporter.add_source("policy", metrics.policy)
    comm_metrics = getattr(comm_state, "metrics", None)
    if callable(comm_metrics):
        exporter.add_source("compression", comm_metrics)
    pool_stats = getattr(pool, "stats", None)
    if callable(pool_stats):
        exporter.add_source("pool", pool_stats)
    if energy is not None:
        exporter.add_source("energy", energy.as_source)
    if offload is not None:
        exporter.add_source("offload", offload.metrics)
    metrics.exporters.append(exporter)


__all__ = ["RuntimeMetrics", "attach"]
