"""The caching memory pool: a native ``CachingPool`` with a hard limit that can change at run time,
stable statistics, allocation traces and their replay, and PyTorch's pluggable-allocator backend.

    pool = CachingPool("cpu", limit="1Gi")
    ptr = pool.allocate(4096)          # an address (int), aligned to 256 bytes
    pool.deallocate(ptr)
    pool.set_limit("512Mi")            # applies at once: cached memory above it is released
    pool.stats()["reserved_bytes"]

Every method is thread-safe. Errors: ``ValueError``/``TypeError`` for bad arguments (the pool is
left unchanged), :class:`OutOfMemoryError` (a ``MemoryError``) when the limit or the device refuses.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from autoglm_rt._build import build_info, cuda_available
from autoglm_rt._native import _C
from autoglm_rt.constants import UNLIMITED_BYTES
from autoglm_rt.units import parse_size

OutOfMemoryError: type[MemoryError] = _C.OutOfMemoryError
OutOfMemoryError.__module__ = __name__
OutOfMemoryError.__doc__ = (
    "An allocation the pool's limit or its device refused; the message carries requested bytes, "
    "limit, allocated, reserved and the largest free block."
)

STATS_KEYS: tuple[str, ...] = (
    "allocated_bytes",
    "reserved_bytes",
    "requested_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "peak_requested_bytes",
    "limit_bytes",
    "num_allocs",
    "num_frees",
    "num_cache_hits",
    "num_upstream_allocs",
    "num_upstream_frees",
    "num_ooms",
    "num_trims",
    "num_pressure_reclaims",
    "pressure_reclaimed_bytes",
    "num_trace_dropped",
    "largest_free_block_bytes",
    "fragmentation_ratio",
)

#: Default bound of the trace buffer of :meth:`CachingPool.record_trace`, in records.
TRACE_MAX_RECORDS = 1 << 20

_MAX_REQUEST = 1 << 48
_DEFAULTS: dict[str, Any] = {
    "expandable": True,
    "round_bytes": 256,
    "small_size": None,
    "small_segment": 2 * 2**20,
    "large_segment": 20 * 2**20,
    "arena_reserve": 64 * 2**30,
    "granularity": 64 * 1024,
    "decommit": False,
}


def _pool_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validated pool options with defaults filled in (sizes accept ints or '64Ki' strings)."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown pool option(s) {unknown}; expected some of {sorted(_DEFAULTS)}")
    out = dict(_DEFAULTS)
    for key, value in options.items():
        if key == "small_size" and value is None:
            out[key] = None
        elif key in ("expandable", "decommit"):
            if not isinstance(value, bool):
                raise TypeError(f"{key}: expected a bool, got {type(value).__name__}")
            out[key] = value
        else:
            out[key] = parse_size(value, name=key)
            if out[key] >= _MAX_OPTION_BYTES:
                raise ValueError(f"{key}: {out[key]} bytes is absurd (expected below 2**62)")
    return out


def _native_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Options as the native constructor takes them (small_size 0 = the pool's own default)."""
    return {**opts, "small_size": opts["small_size"] or 0}


def _limit_bytes(limit: int | str | None) -> int | None:
    """A hard limit in bytes, or None for none. No number means "no limit": a limit at or above
    :data:`autoglm_rt.constants.UNLIMITED_BYTES` (2**62, far above any machine) is refused."""
    if limit is None:
        return None
    nbytes = parse_size(limit, name="limit")
    if nbytes >= UNLIMITED_BYTES:
        raise ValueError(
            f"limit: {nbytes} bytes is not a usable limit (expected below 2**62 bytes); pass None for no limit"
        )
    return nbytes


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def _check_stream(value: object) -> int:
    """A stream handle: an int in 0 .. 2**64 - 1 (a cudaStream_t as an int; 0 the default stream)."""
    stream = _check_int(value, "stream")
    if not 0 <= stream < 2**64:
        raise ValueError(f"stream: expected a stream handle in 0 .. 2**64 - 1, got {stream}")
    return stream


#: Pool option sizes above this are refused (far above any machine; the native side takes 64 bits).
_MAX_OPTION_BYTES = 2**62


def _parse_device(device: str) -> str:
    if not isinstance(device, str):
        raise TypeError(f"device: expected 'cpu' or 'cuda:N', got {type(device).__name__}")
    return "cuda:0" if device == "cuda" else device


class CachingPool:
    """A caching allocator on ``device`` ("cpu", "cuda" or "cuda:N") with an optional hard
    ``limit`` (bytes or a string like "12Gi"). Options: ``expandable`` (grow one arena per size
    class in place; default True where the device supports it), ``round_bytes`` (block alignment,
    default 256), ``small_size`` (requests up to this share the small arena; default 128 KiB with arenas,
    1 MiB with segments),
    ``small_segment``/``large_segment`` (segment sizes without expansion), ``arena_reserve``
    (address space per arena), ``granularity`` (host arena growth step, default 64 KiB),
    ``decommit`` (arenas only, default False: before an arena maps more memory, unmap the whole free
    granules inside it; a smaller footprint for upstream calls on every step, see docs/memory.md)."""

    def __init__(self, device: str = "cpu", limit: int | str | None = None, **options: Any) -> None:
        opts = _pool_options(options)
        self._native = _C.CachingPool(_parse_device(device), _limit_bytes(limit), **_native_options(opts))

    @classmethod
    def _wrap(cls, native: Any) -> CachingPool:
        pool = cls.__new__(cls)
        pool._native = native
        return pool

    @property
    def device(self) -> str:
        """'cpu' or 'cuda:N'."""
        return str(self._native.device())

    @property
    def upstream(self) -> str:
        """Where memory comes from: 'host-mmap', 'host', 'cuda-vmm' or 'cuda-malloc'."""
        return str(self._native.upstream_name())

    @property
    def upstream_fallback_reason(self) -> str:
        """Why the upstream runs without something it was asked for, '' when it does not: e.g.
        the CUDA virtual-memory probe (reserve, create, map, set access, unmap one granule) failed
        for a reason other than out-of-memory, so the pool takes cudaMalloc segments instead of
        growable arenas."""
        return str(self._native.upstream_fallback_reason())

    def allocate(self, nbytes: int, stream: int = 0) -> int:
        """Address of a block of at least ``nbytes`` (aligned to ``round_bytes``) usable on
        ``stream`` (a cudaStream_t as an int; 0 is the default stream)."""
        nbytes = _check_int(nbytes, "nbytes")
        if nbytes <= 0:
            raise ValueError(f"nbytes: expected a positive byte count, got {nbytes}")
        if nbytes > _MAX_REQUEST:
            raise ValueError(f"nbytes: {nbytes} is absurd (more than 2**48 bytes)")
        return int(self._native.allocate(nbytes, _check_stream(stream)))

    def deallocate(self, ptr: int, stream: int | None = None) -> None:
        """Returns a block. ``stream``, if given, must be the one it was allocated on. A pointer
        this pool did not hand out, or a double free, raises ValueError and changes nothing."""
        ptr = _check_int(ptr, "ptr")
        if not 0 < ptr < 2**64:
            raise ValueError(f"ptr: {ptr} was not allocated by this pool")
        self._native.deallocate(ptr, None if stream is None else _check_stream(stream))

    def set_limit(self, limit: int | str | None) -> None:
        """Sets the hard limit (None: no limit). Cached free memory above it is released at once
        where possible; live blocks are never freed or moved, growth is refused until usage falls."""
        self._native.set_limit(_limit_bytes(limit))

    @property
    def limit(self) -> int | None:
        """The hard limit in bytes, or None."""
        value = self._native.limit()
        return None if value is None else int(value)

    def trim(self) -> int:
        """Releases cached free memory to the device; returns the bytes released."""
        return int(self._native.trim())

    def stats(self) -> dict[str, Any]:
        """Counters and gauges with the keys of :data:`STATS_KEYS` (plus num_segments,
        num_free_blocks, num_live_blocks). ``limit_bytes`` is None without a limit."""
        return dict(self._native.stats())

    def reset_peak_stats(self) -> None:
        """Sets every peak to its current value."""
        self._native.reset_peak_stats()

    def check(self) -> None:
        """Verifies every internal invariant; raises RuntimeError naming the first violation."""
        self._native.check()

    def block_size(self, ptr: int) -> int:
        """Usable bytes of the live block at ``ptr`` (its rounded size)."""
        ptr = _check_int(ptr, "ptr")
        if not 0 < ptr < 2**64:
            raise ValueError(f"ptr: {ptr} is not a live block of this pool")
        return int(self._native.block_size(ptr))

    def record_trace(self, on: bool = True, max_records: int = TRACE_MAX_RECORDS) -> None:
        """Starts (or stops) recording every allocate/deallocate for :meth:`dump_trace`. The
        buffer keeps at most ``max_records`` records (default 2**20, about 32 MiB); once it is full
        later records are dropped and counted in ``stats()["num_trace_dropped"]``, so what is kept
        is a consistent prefix that :func:`replay` accepts. Blocks allocated while not recording
        are never recorded, their frees neither."""
        max_records = _check_int(max_records, "max_records")
        if max_records < 0:
            raise ValueError(f"max_records: expected a non-negative record count, got {max_records}")
        self._native.record_trace(bool(on), min(max_records, 2**63))

    def trace(self) -> list[tuple[str, int, int, int]]:
        """The recorded trace as (op, id, bytes, stream) rows."""
        return [(str(op), int(i), int(b), int(s)) for op, i, b, s in self._native.trace()]

    def dump_trace(self, path: str | os.PathLike[str]) -> Path:
        """Writes the recorded trace as CSV (``op,id,bytes,stream``) and returns the path."""
        self._native.dump_trace(os.fspath(path))
        return Path(path)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"CachingPool(device={self.device!r}, upstream={self.upstream!r}, limit={s['limit_bytes']}, "
            f"allocated={s['allocated_bytes']}, reserved={s['reserved_bytes']})"
        )


def replay(
    path: str | os.PathLike[str], repeat: int = 1, limit: int | str | None = None, **pool_options: Any
) -> dict[str, float | int]:
    """Replays a trace CSV ``repeat`` times through a fresh host pool in a C++ loop (allocations
    live at the end of a pass are freed before the next), under ``limit`` if given (an allocation
    the pool then refuses raises :class:`OutOfMemoryError` naming the pass and record). Returns
    ``peak_reserved_bytes``, ``peak_requested_bytes``, ``reserved_to_requested``,
    ``upstream_allocs``, ``upstream_allocs_after_first_pass``, ``pressure_reclaims``,
    ``pressure_reclaimed_bytes``, ``ns_per_op`` and ``ops``. A bad row raises ValueError naming
    the file and line; Ctrl-C stops the loop (KeyboardInterrupt) within a few milliseconds."""
    repeat = _check_int(repeat, "repeat")
    if repeat < 1:
        raise ValueError(f"repeat: expected >= 1, got {repeat}")
    if repeat > 2**31 - 1:
        raise ValueError(f"repeat: expected at most 2**31 - 1 passes, got {repeat}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no trace file at {p}")
    options = _native_options(_pool_options(pool_options))
    return dict(_C.memory_replay(str(p), repeat, _limit_bytes(limit), **options))


def read_trace(path: str | os.PathLike[str]) -> list[tuple[str, int, int, int]]:
    """The rows of a trace CSV as (op, id, bytes, stream): ``op`` alloc or free, the rest
    non-negative integers, an alloc's bytes 1..2**48. A bad row raises ValueError naming the file
    and line (the native :func:`replay` reads the same format with the same rules)."""
    rows: list[tuple[str, int, int, int]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["op", "id", "bytes", "stream"]:
            raise ValueError(f"{path}: expected the header op,id,bytes,stream, got {header}")
        for row in reader:
            if not row:
                continue
            if (
                len(row) != 4
                or row[0] not in ("alloc", "free")
                or not all(v.isascii() and v.isdigit() for v in row[1:])
            ):
                raise ValueError(
                    f"{path}:{reader.line_num}: expected 'alloc|free,<id>,<bytes>,<stream>' with "
                    f"non-negative integers, got {','.join(row)!r}"
                )
            op, i, b, s = row[0], int(row[1]), int(row[2]), int(row[3])
            if i >= 2**64 or s >= 2**64 or (op == "alloc" and not 1 <= b <= _MAX_REQUEST):
                raise ValueError(
                    f"{path}:{reader.line_num}: ids and streams must be below 2**64 and an alloc row needs "
                    f"1..2**48 bytes, got {','.join(row)!r}"
                )
            rows.append((op, i, b, s))
    return rows


def write_trace(rows: Iterable[tuple[str, int, int, int]], path: str | os.PathLike[str]) -> Path:
    """Writes (op, id, bytes, stream) rows as a trace CSV."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["op", "id", "bytes", "stream"])
        w.writerows(rows)
    return Path(path)


def trace_from_torch_snapshot(
    snapshot: Mapping[str, Any], device: int = 0, path: str | os.PathLike[str] | None = None
) -> list[tuple[str, int, int, int]]:
    """Converts the allocation trace in ``torch.cuda.memory._snapshot()`` (recorded with
    ``torch.cuda.memory._record_memory_history()``) for ``device`` into trace rows, and writes
    them to ``path`` if given, so ``replay(path)`` answers what this pool would have reserved.

    ``alloc`` events become allocations and ``free_completed`` events (``free_requested`` when
    the trace has no completions) their frees; frees of blocks allocated before recording began
    are skipped. torch records block sizes (rounded to 512 B), not requested sizes. Streams are
    renumbered 0, 1, 2... in order of appearance, torch's default stream staying 0."""
    if not isinstance(snapshot, Mapping) or "device_traces" not in snapshot:
        raise ValueError("snapshot: expected the dict of torch.cuda.memory._snapshot() with a 'device_traces' entry")
    traces = snapshot["device_traces"]
    if not 0 <= device < len(traces):
        raise ValueError(f"device: the snapshot has traces for {len(traces)} device(s), got device={device}")
    events = traces[device]
    actions = {e.get("action") for e in events}
    free_action = "free_completed" if "free_completed" in actions else "free_requested"
    streams: dict[int, int] = {0: 0}
    live: dict[int, tuple[int, int, int]] = {}
    rows: list[tuple[str, int, int, int]] = []
    next_id = 0
    for e in events:
        action = e.get("action")
        if action == "alloc":
            stream = streams.setdefault(int(e.get("stream", 0)), len(streams))
            size = int(e["size"])
            live[int(e["addr"])] = (next_id, size, stream)
            rows.append(("alloc", next_id, size, stream))
            next_id += 1
        elif action == free_action:
            found = live.pop(int(e["addr"]), None)
            if found is not None:
                rows.append(("free", *found))
    if path is not None:
        write_trace(rows, path)
    return rows


# ---- torch backend ------------------------------------------------------------------------------

_installed_limit: int | None = None
_installed = False


def _require_cuda_build() -> None:
    if not build_info()["cuda_compiled"]:
        raise RuntimeError(
            "autoglm_rt was built without CUDA (AUTOGLM_RT_CUDA=OFF or no nvcc at build time); "
            "the torch allocator backend needs a CUDA build"
        )
    ok, reason = cuda_available(return_reason=True)
    if not ok:
        raise RuntimeError(f"no usable CUDA device: {reason}")


def install_torch_allocator(limit: int | str | None = None) -> None:
    """Makes this pool PyTorch's CUDA allocator (``CUDAPluggableAllocator`` over the ``extern
    "C"`` entry points in ``autoglm_rt._C``), with an optional hard ``limit`` per device. Call it
    before any CUDA tensor exists. Use :func:`torch_pool` for stats, limit and trim: torch's own
    ``memory_stats()``/``empty_cache()`` do not reach a pluggable allocator, and
    ``torch.backends.cudnn.benchmark`` fails on it (torch calls ``cacheInfo``), so this raises
    ValueError when that is on.

    A pluggable allocator gets no ``record_stream`` calls (torch drops them), so a block is reused
    in the order of the stream it was allocated on. For NCCL this sets
    ``TORCH_NCCL_AVOID_RECORD_STREAMS=1`` unless the environment already sets it: the process group
    then keeps collective tensors alive until their work completes instead of calling
    ``record_stream``. Code of your own that uses a tensor on a second stream must keep it alive
    until that stream's work is done."""
    global _installed
    limit_bytes = _limit_bytes(limit)
    import torch

    if torch.backends.cudnn.benchmark:
        raise ValueError(
            "install_torch_allocator: torch.backends.cudnn.benchmark is on, and with a pluggable "
            "allocator torch raises in cacheInfo when cuDNN benchmarks; set it to False (autoglm_rt's "
            "pool makes the workspace allocations cheap anyway)"
        )
    _require_cuda_build()

    if not torch.cuda.is_available():
        raise RuntimeError(f"this torch ({torch.__version__}) cannot use CUDA here; nothing to install")
    if _installed:
        set_torch_limit(limit_bytes)
        return
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "install_torch_allocator: torch has already initialised CUDA (a CUDA tensor or call came "
            "first); torch can switch allocators only before that. Call it at the start of the program."
        )
    os.environ.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    malloc_name, free_name = _C.torch_allocator_symbols()
    allocator = torch.cuda.memory.CUDAPluggableAllocator(_C.__file__, malloc_name, free_name)
    torch.cuda.memory.change_current_allocator(allocator)
    _installed = True
    set_torch_limit(limit_bytes)


def set_torch_limit(limit: int | str | None) -> None:
    """Sets the hard limit of every torch device pool (existing and future)."""
    global _installed_limit
    _require_cuda_build()
    _installed_limit = _limit_bytes(limit)
    _C.set_torch_pools_limit(_installed_limit)


def torch_pool(device: int = 0) -> CachingPool:
    """The pool behind torch's allocator on CUDA device ``device``: its stats, limit and trim
    work where torch's memory_stats/empty_cache do not."""
    device = _check_int(device, "device")
    if device < 0:
        raise ValueError(f"device: expected a CUDA device index >= 0, got {device}")
    _require_cuda_build()
    return CachingPool._wrap(_C.torch_pool(device))


def cuda_scratch_stats() -> dict[str, int]:
    """Counters of the CUDA kernels' stream-ordered scratch memory (top-k, grad_stats), which
    comes from each device's default memory pool, not from a CachingPool: ``live_bytes``,
    ``peak_bytes``, ``allocations`` and ``keep_bytes`` (the release threshold set once per device,
    so freed scratch up to that size stays mapped across synchronisations). Process-wide."""
    _require_cuda_build()
    return {str(k): int(v) for k, v in _C.cuda_scratch_stats().items()}


def explain_torch_error(exc: BaseException) -> str | None:
    """If ``exc`` is one of torch's known failures under a pluggable allocator, says why and what
    to do instead; None otherwise."""
    text = str(exc)
    if "cacheInfo" in text:
        return (
            "torch called cacheInfo, which a pluggable allocator does not implement; this happens "
            "with torch.backends.cudnn.benchmark=True. Set it to False while autoglm_rt's pool is installed."
        )
    if any(k in text for k in ("getDeviceStats", "resetPeakStats", "resetAccumulatedStats", "emptyCache")):
        return (
            "torch's memory statistics and empty_cache do not reach a pluggable allocator; use "
            "autoglm_rt.memory.torch_pool(device).stats() / .reset_peak_stats() / .trim() instead."
        )
    return None


def cupy_allocator(device: int = 0, limit: int | str | None = None) -> Callable[[int], Any]:
    """An allocator for ``cupy.cuda.set_allocator`` backed by a CachingPool on ``device``. The
    returned function carries the pool as ``.pool``. Needs cupy (``pip install autoglm-rt[cupy]``)."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("cupy_allocator needs cupy (pip install cupy-cuda12x)") from exc
    pool = CachingPool(f"cuda:{device}", limit)

    class _Release:
        def __init__(self, ptr: int, stream: int) -> None:
            self.ptr, self.stream = ptr, stream

        def __del__(self) -> None:
            pool.deallocate(self.ptr, self.stream)

    def allocate(nbytes: int) -> Any:
        if nbytes == 0:
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
        stream = int(cupy.cuda.get_current_stream().ptr)
        ptr = pool.allocate(nbytes, stream)
        mem = cupy.cuda.UnownedMemory(ptr, nbytes, _Release(ptr, stream), device)
        return cupy.cuda.MemoryPointer(mem, 0)

    allocate.pool = pool  # type: ignore[attr-defined]
    return allocate


__all__ = [
    "STATS_KEYS",
    "TRACE_MAX_RECORDS",
    "CachingPool",
    "OutOfMemoryError",
    "cuda_scratch_stats",
    "cupy_allocator",
    "explain_torch_error",
    "install_torch_allocator",
    "read_trace",
    "replay",
    "set_torch_limit",
    "torch_pool",
    "trace_from_torch_snapshot",
    "write_trace",
]
