"""The text of ``autoglm-rt monitor``: one frame per snapshot, and a JSON form of the same."""

from __future__ import annotations

from typing import Any

from autoglm_rt.monitor.sampler import Sampler, Snapshot
from autoglm_rt.units import format_size

CLEAR = "\x1b[H\x1b[2J"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:6.1f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:7.2f}"


def _row(label: str, snap: Snapshot, key: str, fmt: Any) -> str:
    w = snap.window.get(key)
    return (
        f"{label:<18}{fmt(snap.series.get(key)):>9}{fmt(snap.ewma.get(key)):>9}"
        f"{fmt(w.mean if w else None):>10}{fmt(w.maximum if w else None):>10}"
    )


def render(snap: Snapshot, sampler: Sampler, hostname: str = "") -> str:
    """A plain-text frame: header, load level, host rows and one block per GPU."""
    lines = [
        f"autoglm-rt monitor  {hostname}  sample #{snap.index + 1}  period {sampler.period:g} s  "
        f"window {sampler.window_seconds:g} s  EWMA half-life {sampler.halflife:g} s",
        f"load level: {snap.level.name}",
        "",
        f"{'':<18}{'now':>9}{'ewma':>9}{'win mean':>10}{'win max':>10}",
        _row("cpu", snap, "cpu_ratio", _pct),
        _row("load / core", snap, "load_per_core", _num),
        _row("memory used", snap, "memory_used_ratio", _pct),
    ]
    if snap.host is not None:
        h = snap.host
        lines.append(
            f"{'':<18}{format_size(h.memory_used_bytes)} of {format_size(h.memory_total_bytes)}, "
            f"{h.cpu_count} logical CPUs, load {h.load1:.2f} {h.load5:.2f} {h.load15:.2f}"
        )
    if not snap.gpus:
        lines += ["", f"GPUs: none ({sampler.gpu_reason or 'not sampled'})"]
    for g in snap.gpus:
        i = g.info.index
        lines += ["", f"gpu{i}  {g.info.name}  {g.info.uuid}"]
        lines.append(_row("  utilization", snap, f"gpu{i}_utilization_ratio", _pct))
        lines.append(_row("  memory used", snap, f"gpu{i}_memory_used_ratio", _pct))
        lines.append(_row("  power (W)", snap, f"gpu{i}_power_watts", _num))
        extra = []
        if g.energy_joules is not None:
            extra.append(f"energy counter {g.energy_joules / 3.6e6:.3f} kWh")
        if g.sm_clock_hertz is not None:
            extra.append(f"SM {g.sm_clock_hertz / 1e6:.0f} MHz")
        if g.temperature_celsius is not None:
            extra.append(f"{g.temperature_celsius:.0f} C")
        if extra:
            lines.append("  " + ", ".join(extra))
    return "\n".join(lines)


def as_dict(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as JSON-ready data (raw and EWMA series, window stats, level)."""
    return {
        "index": snap.index,
        "wall_time": snap.wall_time,
        "level": snap.level.name.lower(),
        "series": dict(snap.series),
        "ewma": dict(snap.ewma),
        "window": {
            k: {"count": w.count, "mean": w.mean, "min": w.minimum, "max": w.maximum} for k, w in snap.window.items()
        },
        "gpus": [{"index": g.info.index, "uuid": g.info.uuid, "name": g.info.name} for g in snap.gpus],
    }
