"""Fused gradient statistics: one native call, one pass over memory, for a whole list of tensors.

Per tensor and merged over all tensors: ``numel``, ``nonfinite`` (NaN/Inf count), ``sum``,
``sumsq``, ``maxabs``, ``mean`` and ``var`` (population variance). Sums, max and variance cover the
finite elements only. Results match a float64 reference to 1e-6 relative (sum and mean relative
to sum |x|): partial sums of at most 8 float32 terms widen to float64 and merge by Chan's formula
for Welford moments, in a fixed order that depends only on the tensor sizes (bit-identical for
any thread count).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoglm_rt._native import _C

_FIELDS = ("numel", "nonfinite", "sum", "sumsq", "maxabs", "mean", "var", "m2")
_COLUMN = {name: i for i, name in enumerate(_FIELDS)}
_COUNT_FIELDS = ("numel", "nonfinite")
_DLPACK_CPU, _DLPACK_CUDA = 1, 2


@dataclass(frozen=True)
class GradStatsTotal:
    """The statistics merged over all tensors. Python ``int``/``float`` for CPU tensors; 0-d
    device tensors for CUDA tensors (reading one as a number synchronizes). ``mean`` and ``var``
    are NaN when no element is finite; ``maxabs`` is 0 then."""

    numel: Any
    nonfinite: Any
    sum: Any
    sumsq: Any
    maxabs: Any
    mean: Any
    var: Any


class GradStats:
    """Per-tensor statistics (one entry per input tensor, in input order) plus :attr:`total`.

    Per-tensor fields are numpy arrays for CPU tensors and tensors on the inputs' device for CUDA
    tensors (computed on the device without a host synchronization): ``numel`` and ``nonfinite``
    int64, the others float64. :attr:`table` is the raw ``(len + 1, 8)`` float64 table the kernel
    wrote (columns ``numel, nonfinite, sum, sumsq, maxabs, mean, var, m2``; the last row is the
    total), handy for one all-reduce of everything.
    """

    fields: tuple[str, ...] = _FIELDS[:-1]

    def __init__(self, table: Any) -> None:
        self._table = table

    @property
    def table(self) -> Any:
        """The raw float64 table, ``(len(self) + 1, 8)``; the last row holds the totals."""
        return self._table

    @property
    def on_device(self) -> bool:
        """True when the results live on a CUDA device (as torch tensors)."""
        return not isinstance(self._table, np.ndarray)

    def __len__(self) -> int:
        return int(self._table.shape[0]) - 1

    def _column(self, name: str) -> Any:
        col = self._table[:-1, _COLUMN[name]]
        if name in _COUNT_FIELDS:
            return col.astype(np.int64) if isinstance(col, np.ndarray) else col.to(dtype=_torch().int64)
        return col

    @property
    def numel(self) -> Any:
        """Elements per tensor."""
        return self._column("numel")

    @property
    def nonfinite(self) -> Any:
        """NaN and Inf elements per tensor."""
        return self._column("nonfinite")

    @property
    def sum(self) -> Any:
        """Sum of the finite elements per tensor."""
        return self._column("sum")

    @property
    def sumsq(self) -> Any:
        """Sum of squares of the finite elements per tensor (squared L2 norm when all are finite)."""
        return self._column("sumsq")

    @property
    def maxabs(self) -> Any:
        """Largest |x| over the finite elements per tensor (0 where there are none)."""
        return self._column("maxabs")

    @property
    def mean(self) -> Any:
        """Mean of the finite elements per tensor (NaN where there are none)."""
        return self._column("mean")

    @property
    def var(self) -> Any:
        """Population variance of the finite elements per tensor (NaN where there are none)."""
        return self._column("var")

    @property
    def total(self) -> GradStatsTotal:
        """The same statistics merged over all tensors."""
        row = self._table[-1]
        if isinstance(row, np.ndarray):
            values = {name: float(row[_COLUMN[name]]) for name in GradStatsTotal.__dataclass_fields__}
            for name in _COUNT_FIELDS:
                values[name] = int(values[name])
            return GradStatsTotal(**values)
        torch = _torch()
        tensors = {name: row[_COLUMN[name]] for name in GradStatsTotal.__dataclass_fields__}
        for name in _COUNT_FIELDS:
            tensors[name] = tensors[name].to(dtype=torch.int64)
        return GradStatsTotal(**tensors)

    def __repr__(self) -> str:
        where = f"device={self._table.device}" if self.on_device else "device=cpu"
        return f"GradStats(len={len(self)}, {where})"


def _torch() -> Any:
    import torch

    return torch


def _as_list(tensors: Iterable[Any]) -> list[Any]:
    if hasattr(tensors, "__dlpack__") or isinstance(tensors, (str, bytes)):
        raise TypeError(
            f"tensors: expected a list or tuple of tensors, got a single {type(tensors).__name__}; wrap it in a list"
        )
    try:
        return list(tensors)
    except TypeError:
        raise TypeError(f"tensors: expected a list or tuple of tensors, got {type(tensors).__name__}") from None


def _device_of(obj: Any) -> tuple[int, int] | None:
    """(DLPack device type, index) of a tensor, or None when it does not say (the native call
    then rejects it with a precise message). torch tensors answer from attributes: cheaper than
    ``__dlpack_device__``, which also raises for layouts the kernel rejects anyway."""
    if getattr(obj, "is_cuda", None) is True:
        return (_DLPACK_CUDA, int(obj.get_device()))
    if getattr(obj, "is_cuda", None) is False:
        return (_DLPACK_CPU, 0)
    if hasattr(obj, "__dlpack_device__"):
        dev = obj.__dlpack_device__()
        return (int(dev[0]), int(dev[1]))
    return None


def grad_stats(tensors: Iterable[Any], *, stream: Any = None) -> GradStats:
    """Statistics of every tensor in ``tensors`` (float32, float16 or bfloat16, contiguous, all on
    one device; torch tensors or numpy arrays on the CPU, torch tensors on CUDA) in one native call.

    CUDA: runs on ``stream`` (default: torch's current stream of the tensors' device; the caller
    orders any other stream after the gradients' producer) and returns without synchronizing; the
    results are device tensors ordered on that stream.
    Raises TypeError for a wrong dtype, a non-contiguous tensor or something that is not a tensor,
    ValueError for tensors on different devices.
    """
    items = _as_list(tensors)
    rows = len(items) + 1
    fields = _C.grad_stats_fields()
    device = _device_of(items[0]) if items else None
    if device is None or int(device[0]) == _DLPACK_CPU:
        table = np.empty((rows, fields), dtype=np.float64)
        _C.grad_stats(items, table.view(np.int64))
        return GradStats(table)
    if int(device[0]) != _DLPACK_CUDA:
        raise TypeError(f"tensors[0]: expected a CPU or CUDA tensor, got DLPack device type {int(device[0])}")
    torch = _torch()
    dev = torch.device("cuda", int(device[1]))
    run_on = _cuda_stream(torch, dev, stream)
    # Allocated on the stream the kernels use, so torch's caching allocator does not hand the
    # memory to other work before they finish. The kernels' scratch is stream-ordered
    # (cudaMallocAsync) inside the native call, so the tensors are borrowed only once.
    with torch.cuda.stream(run_on):
        table = torch.empty((rows, fields), dtype=torch.float64, device=dev)
        _C.grad_stats(items, table.view(torch.int64), None, run_on.cuda_stream)
    return GradStats(table)


def _cuda_stream(torch: Any, dev: Any, stream: Any) -> Any:
    """A torch stream object for ``stream``: None (current stream), a torch.cuda.Stream, or a raw
    cudaStream_t as an int."""
    if stream is None:
        return torch.cuda.current_stream(dev)
    if isinstance(stream, torch.cuda.Stream):
        # A stream of another device would make the launches fail with an opaque
        # "invalid resource handle" after the inputs were borrowed.
        if stream.device != dev:
            raise ValueError(f"stream: expected a stream of {dev} like the tensors, got one of {stream.device}")
        return stream
    if isinstance(stream, int):
        return torch.cuda.ExternalStream(stream, device=dev)
    raise TypeError(f"stream: expected None, a torch.cuda.Stream or an int (cudaStream_t), got {type(stream).__name__}")
