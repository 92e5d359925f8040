"""Facts shared by every layer: one home each, imported everywhere they are needed.

Nothing here imports torch or the native module, so the policy layer stays plain Python.
"""

from __future__ import annotations

from typing import Final

#: Training phases, in the order a run normally passes through them.
PHASES: Final = ("initial", "convergence", "fine_tuning")

#: Autocast precisions a phase may ask for (``float32``: no autocast).
PRECISIONS: Final = ("bfloat16", "float16", "float32")

#: A limit at or above this many bytes means "no limit" (the native pool reports SIZE_MAX;
#: cgroup v1 reports a page-rounded 2**63 - 1; both are far above any real machine).
UNLIMITED_BYTES: Final = 2**62


def limit_or_none(value: object) -> int | None:
    """A byte limit as reported by a pool or a cgroup, or None when there is none (None, 0,
    or anything at or above :data:`UNLIMITED_BYTES`)."""
    if value is None or isinstance(value, bool):
        return None
    limit = int(value)  # type: ignore[call-overload]
    if limit <= 0 or limit >= UNLIMITED_BYTES:
        return None
    return limit


__all__ = ["PHASES", "PRECISIONS", "UNLIMITED_BYTES", "limit_or_none"]
