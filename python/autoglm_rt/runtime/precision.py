"""The autocast precision of the forward passes, chosen per training phase."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from autoglm_rt.constants import PHASES, PRECISIONS
from autoglm_rt.stateful import Stateful

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Default: bfloat16 autocast in fine-tuning where the device supports it, full precision before.
DEFAULT_BY_PHASE: Mapping[str, str] = {"fine_tuning": "bfloat16"}


class Precision(Stateful):
    """``current`` is the precision of the next forward passes (``float32``: no autocast).
    ``by_phase`` maps phases to precisions (``{}``: full precision throughout). A precision the
    device cannot autocast to falls back to the other half type, else to float32."""

    _state_fields = ("current",)

    def __init__(self, device_type: str, by_phase: Mapping[str, str] | None = None) -> None:
        by_phase = DEFAULT_BY_PHASE if by_phase is None else by_phase
        for phase, dtype in by_phase.items():
            if phase not in PHASES:
                raise ValueError(f"precision_by_phase: unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
            if dtype not in PRECISIONS:
                raise ValueError(
                    f"precision_by_phase[{phase!r}]: expected one of {', '.join(PRECISIONS)}, got {dtype!r}"
                )
        self.device_type = device_type
        self.by_phase = dict(by_phase)
        self.current = "float32"

    def for_phase(self, phase: str) -> str:
        """Sets and returns the precision of ``phase``."""
        return self.set(self.by_phase.get(phase, "float32"))

    def set(self, precision: str) -> str:
        """Sets the precision (see the class docstring for the fallback); returns what was set."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "float32" and not autocast_supported(self.device_type, _DTYPES[precision]):
            other = "float16" if precision == "bfloat16" else "bfloat16"
            precision = other if autocast_supported(self.device_type, _DTYPES[other]) else "float32"
        self.current = precision
        return precision

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward pass runs in."""
        if self.current == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.current])


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    if not torch.amp.is_autocast_available(device_type):
        return False
    if device_type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16)


__all__ = ["DEFAULT_BY_PHASE", "Precision", "autocast_supported"]
