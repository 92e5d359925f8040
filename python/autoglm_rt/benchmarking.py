"""Side-by-side measurement: a case and its baseline timed alternately in one process, so the
ratio survives a noisy shared machine, plus the machine's memory bandwidth measured in the same
process so a kernel's speed can be stated as a fraction of it.

Used by ``benches/run_ratios.py`` and ``autoglm-rt bench``. Ratios are ``baseline / case``:
above 1 means the case is faster.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoglm_rt._build import build_info
from autoglm_rt._native import _C


@dataclass
class Comparison:
    """One case against its baseline. Times are medians over rounds, in seconds per call."""

    name: str
    case_label: str
    baseline_label: str
    case_seconds: float
    baseline_seconds: float
    ratio: float  # median over rounds of baseline_time / case_time
    rounds: int
    bytes_read: int | None = None
    case_gbps: float | None = None
    fraction_of_read_bandwidth: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _time_call(
    fn: Callable[[], Any], min_time: float, sync: Callable[[], None] | None, clock: Callable[[], float]
) -> float:
    """Seconds per call on ``clock``, repeating fn until min_time has passed (at least once)."""
    calls = 0
    start = clock()
    while True:
        fn()
        calls += 1
        if sync is not None:
            sync()
        elapsed = clock() - start
        if elapsed >= min_time:
            return elapsed / calls


def compare(
    name: str,
    case: Callable[[], Any],
    baseline: Callable[[], Any],
    *,
    case_label: str = "autoglm_rt",
    baseline_label: str = "baseline",
    rounds: int = 7,
    min_time: float = 0.05,
    bytes_read: int | None = None,
    read_gbps: float | None = None,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Times ``case`` and ``baseline`` alternately (after one warm-up call each) for ``rounds``
    rounds, swapping which goes first every round. ``bytes_read``: bytes one case call must read,
    to report GB/s and, given ``read_gbps`` from :func:`measure_bandwidth`, the fraction of it.
    ``sync``: called after each call (e.g. ``torch.cuda.synchronize``) so GPU work is counted.
    ``clock``: wall time by default; ``time.process_time`` measures this process's CPU time, which
    other tenants of a shared machine disturb far less."""
    case()
    baseline()
    if sync is not None:
        sync()
    case_t: list[float] = []
    base_t: list[float] = []
    for r in range(rounds):
        order = [(case, case_t), (baseline, base_t)]
        if r % 2:
            order.reverse()
        for fn, out in order:
            out.append(_time_call(fn, min_time, sync, clock))
    ratios = [b / c for b, c in zip(base_t, case_t, strict=True)]
    cmp = Comparison(
        name=name,
        case_label=case_label,
        baseline_label=baseline_label,
        case_seconds=statistics.median(case_t),
        baseline_seconds=statistics.median(base_t),
        ratio=statistics.median(ratios),
        rounds=rounds,
        bytes_read=bytes_read,
    )
    if bytes_read:
        cmp.case_gbps = bytes_read / cmp.case_seconds / 1e9
        if read_gbps:
            cmp.fraction_of_read_bandwidth = cmp.case_gbps / read_gbps
    return cmp


def measure_bandwidth(nbytes: int = 512 * 2**20, rounds: int = 5) -> dict[str, float]:
    """The machine's CPU memory bandwidth as the native kernels see it (all threads): ``read_gbps``
    (read every byte) and ``copy_gbps`` (bytes read plus bytes written, per second). Best of
    ``rounds``, buffers much larger than the caches."""
    words = nbytes // 8
    src = np.ones(words, dtype=np.int64)
    dst = np.empty_like(src)
    _C.parallel_copy(dst, src)  # fault the pages in
    read_t = min(_time_once(lambda: _C.read_checksum(src)) for _ in range(rounds))
    copy_t = min(_time_once(lambda: _C.parallel_copy(dst, src)) for _ in range(rounds))
    return {
        "buffer_bytes": float(src.nbytes),
        "read_gbps": src.nbytes / read_t / 1e9,
        "copy_gbps": 2 * src.nbytes / copy_t / 1e9,
        "threads": float(_C.num_threads()),
    }


def measure_cuda_bandwidth(nbytes: int = 2 * 2**30, rounds: int = 10) -> dict[str, float]:
    """Device-memory bandwidth of the current CUDA device: a device-to-device copy of ``nbytes``
    (read + write counted), timed with CUDA events; ``read_gbps`` is half the copy figure."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    copy = 2 * src.numel() * 4 / best / 1e9
    return {"buffer_bytes": float(src.numel() * 4), "copy_gbps": copy, "read_gbps": copy / 2}


def _time_once(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine_description() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # no /proc/cpuinfo: keep platform.processor()'s name
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "autoglm_rt": build_info(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass  # torch is optional for the description
    return info


def format_table(comparisons: list[Comparison]) -> str:
    """A plain-text table of the comparisons (one line each)."""
    head = f"{'benchmark':<44} {'case':>11} {'baseline':>11} {'ratio':>8} {'GB/s':>7} {'of read bw':>10}"
    lines = [head, "-" * len(head)]
    for c in comparisons:
        gbps = f"{c.case_gbps:7.2f}" if c.case_gbps else f"{'':>7}"
        frac = f"{c.fraction_of_read_bandwidth:10.0%}" if c.fraction_of_read_bandwidth else f"{'':>10}"
        lines.append(
            f"{c.name:<44} {_fmt_time(c.case_seconds):>11} {_fmt_time(c.baseline_seconds):>11} "
            f"{c.ratio:7.2f}x {gbps} {frac}"
        )
    return "\n".join(lines)


def _fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def write_results(path: str | Path, suite: str, comparisons: list[Comparison], **extra: Any) -> Path:
    """Writes ``{"suite", "machine", "comparisons", ...extra}`` as JSON and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "suite": suite,
        "machine": machine_description(),
        "comparisons": [asdict(c) for c in comparisons],
        **extra,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path
