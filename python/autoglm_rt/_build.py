"""What this build contains and whether CUDA can be used here."""

from __future__ import annotations

from typing import Any, Literal, overload

from autoglm_rt._native import _C


def build_info() -> dict[str, Any]:
    """Returns a fresh dict: ``version``, ``cuda_compiled``, ``cuda_runtime_version`` (str or None),
    ``cuda_archs`` (list of str), ``cuda_device_count``, ``cuda_unavailable_reason`` (None or a
    sentence), ``cpu_threads``, ``compiler``, ``cpu_simd``. Safe on machines without a GPU or driver."""
    return dict(_C.build_info())


@overload
def cuda_available(return_reason: Literal[False] = False) -> bool: ...
@overload
def cuda_available(return_reason: Literal[True]) -> tuple[bool, str | None]: ...
def cuda_available(return_reason: bool = False) -> bool | tuple[bool, str | None]:
    """True when the CUDA kernels were compiled and at least one device is usable. With
    ``return_reason=True`` returns ``(available, reason)`` where reason says why not (else None)."""
    info = _C.build_info()
    ok = bool(info["cuda_compiled"]) and info["cuda_device_count"] > 0
    reason = None if ok else (info["cuda_unavailable_reason"] or "no usable CUDA device")
    return (ok, reason) if return_reason else ok


def num_threads() -> int:
    """Threads the CPU kernels use."""
    return int(_C.num_threads())


def set_num_threads(n: int) -> None:
    """Sets the CPU kernels' thread count (n >= 1); applies to the next kernel call."""
    _C.set_num_threads(int(n))
