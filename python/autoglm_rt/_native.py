"""Loads the compiled core. A broken build fails loudly here: there is no pure-Python fallback."""

from __future__ import annotations

try:
    from autoglm_rt import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "autoglm_rt: the native extension autoglm_rt._C failed to load "
        f"({exc}). Rebuild the package (pip install -e .) and check `pip show autoglm-rt`; "
        "see the README's build section."
    ) from exc

__all__ = ["_C"]
