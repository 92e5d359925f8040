"""What the native ops' Python wrappers share: the stream a call is queued on, and argument checks
that raise one clear error before the native code sees anything."""

from __future__ import annotations

import torch


def stream_of(t: torch.Tensor) -> int | None:
    """The raw handle of the current CUDA stream of t's device; None for a CPU tensor."""
    if t.device.type == "cuda":
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return None


def require_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` if it is a torch.Tensor; TypeError naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value
