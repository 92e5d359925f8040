"""autoglm_rt: a native-accelerated runtime for data-parallel training.

The C++/CUDA core lives in ``autoglm_rt._C``; importing this package fails with ImportError if it
cannot be loaded (never a silent fallback). See ``build_info()``.
"""

from __future__ import annotations

from autoglm_rt._build import build_info, cuda_available, num_threads, set_num_threads
from autoglm_rt.units import format_size, parse_size

__version__: str = build_info()["version"]

# Submodules load on first use (``autoglm_rt.memory``, ``autoglm_rt.ddp``...), so importing the
# package stays cheap and does not import torch.
_SUBMODULES = {
    "memory", "ops", "stats", "ddp", "policy", "monitor", "runtime", "benchmarking", "units", "jobqueue", "elastic",
    "demo", "distributed",
}  # fmt: skip
_LAZY_ATTRS = {"Runtime": "runtime"}


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"autoglm_rt.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"autoglm_rt.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module 'autoglm_rt' has no attribute {name!r}")


__all__ = [
    "__version__",
    "build_info",
    "cuda_available",
    "format_size",
    "num_threads",
    "parse_size",
    "set_num_threads",
]
