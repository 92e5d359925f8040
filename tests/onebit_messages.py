"""Inputs shared by the sign-kernel tests: seeded float32 vectors, and gathered [W, message]
buffers laid out as the 1-bit hooks gather them (rows of scales then bits, padded)."""

from __future__ import annotations

import numpy as np
import torch

from autoglm_rt import ops


def rand(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """n float32 draws of a normal distribution with standard deviation ``scale``."""
    return torch.from_numpy((scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32))


def gathered_messages(world: int, n: int, chunk: int, *, seed: int = 100, error: bool = True) -> torch.Tensor:
    """A CPU [world, message bytes] uint8 buffer whose row r holds
    ``sign_compress(rand(n, seed + r, 1 + r), rand(n, seed + 100 + r, 0.1) or None, chunk)`` as
    [scales | bits], each row a multiple of 4 bytes with a gap of 0xFF bytes after the message
    (never to be read). Split it with :func:`message_fields`."""
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    msg_bytes = -(-(4 * nc + nbytes) // 4) * 4 + 4
    rows = torch.full((world, msg_bytes), 0xFF, dtype=torch.uint8)
    for r in range(world):
        bits, scales = message_fields(rows, n, chunk)
        ops.sign_compress(
            rand(n, seed + r, 1.0 + r),
            rand(n, seed + 100 + r, 0.1) if error else None,
            chunk,
            scales_out=scales[r],
            bits_out=bits[r],
        )
    return rows


def message_fields(rows: torch.Tensor, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bits, scales)``: row-strided views of a :func:`gathered_messages` buffer (on any device)."""
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    return rows[:, 4 * nc : 4 * nc + nbytes], rows[:, : 4 * nc].view(torch.float32)
