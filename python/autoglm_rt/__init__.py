"""autoglm_rt: a native-accelerated runtime for data-parallel training.

The C++/CUDA core lives in ``autoglm_rt._C``; importing this package fails with ImportError if it
cannot be loaded (never a silent fallback). See ``build_info()``.
"""

from __future__ import annotations

from autoglm_rt._build import build_info, cuda_available, num_threads, set_num_threads
from autoglm_rt.units import format_size, parse_size

__version__: str = build_info()["version"]

__all__ = [
    "__version__",
    "build_info",
    "cuda_available",
    "format_size",
    "num_threads",
    "parse_size",
    "set_num_threads",
]
