"""Fused 1-bit (sign) compression with error feedback, and its averaging inverse.

``sign_compress`` cuts ``c = x + error`` (float32, flattened) into chunks of ``chunk`` elements and
sends one bit per element (``c >= 0``, packed least significant bit first like
``numpy.packbits(..., bitorder="little")``) and one float32 scale per chunk (the mean of ``|c|``
over the chunk, summed in float64). ``error`` becomes ``c - d`` where ``d = ±scale`` is what the
message decodes to, so nothing is lost over steps (error feedback, as in 1-bit SGD / 1-bit Adam).

``sign_decompress`` adds up W such messages (one row per rank) in a fixed order in float32 and
scales the sum, so every rank that decodes the same gathered rows gets the same bits.

The message of n elements is ``sign_message_sizes(n, chunk)`` = (bytes of bits, number of
scales); one uint8 buffer can hold both, e.g. ``scales = msg[:4 * nc].view(torch.float32)`` and
``bits = msg[4 * nc:]``, and the rows of a gathered ``[W, message bytes]`` buffer can be passed to
``sign_decompress`` as they are (row-strided views, no copy).
"""

from __future__ import annotations

import torch

from autoglm_rt._native import _C


def _stream_of(t: torch.Tensor) -> int | None:
    if t.device.type == "cuda":
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return None


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _require_chunk(chunk: object) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    return chunk


def sign_message_sizes(numel: int, chunk: int) -> tuple[int, int]:
    """``(bytes of bits, number of scales)`` for ``numel`` elements: ``ceil(numel / 8)`` and
    ``ceil(numel / chunk)``. The message is ``bytes + 4 * scales`` bytes."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel: expected an int >= 0, got {numel!r}")
    chunk = _require_chunk(chunk)
    return -(-numel // 8), -(-numel // chunk)


def sign_compress(
    x: torch.Tensor,
    error: torch.Tensor | None,
    chunk: int,
    *,
    bits_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compresses ``c = x + error`` (float32, contiguous, any shape, flattened) to signs and
    per-chunk mean magnitudes; returns ``(bits, scales)``.

    ``bits``: uint8, ``ceil(n / 8)`` bytes; bit ``i % 8`` of byte ``i // 8`` is 1 iff ``c[i] >= 0``
    (-0.0 gives 1, NaN gives 0); padding bits are 0. ``scales``: float32, ``ceil(n / chunk)``; the
    mean of ``|c|`` over ``[j * chunk, min(n, (j + 1) * chunk))``, summed in float64 in a fixed
    order (``autoglm_rt/kernels/onebit.h``), rounded to float32. ``error`` (float32, n elements,
    contiguous; ``None`` = no error feedback) becomes ``c - d`` with ``d = ±scales[i // chunk]``.
    Written into ``bits_out``/``scales_out`` when given (contiguous, right dtype, size and
    device; they may be views into one message buffer). NaN or Inf in ``c`` makes its chunk's
    scale NaN or Inf and with it that chunk's error; other chunks are unaffected. n = 0 gives empty
    outputs. The result does not depend on the thread count, and the CUDA kernel gives the same
    bits as the CPU one.

    Raises before anything is written: TypeError for a non-tensor, a wrong dtype or a
    non-contiguous tensor; ValueError for ``chunk`` not an int >= 1, mismatched sizes, mixed
    devices, or any two of x, error, bits_out, scales_out sharing memory. On CUDA the work is
    queued on the current stream and the host never waits."""
    x = _require_tensor("x", x)
    if error is not None:
        error = _require_tensor("error", error)
    chunk = _require_chunk(chunk)
    nbytes, nchunks = sign_message_sizes(x.numel(), chunk)
    if bits_out is None:
        bits_out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    else:
        bits_out = _require_tensor("bits_out", bits_out)
    if scales_out is None:
        scales_out = torch.empty(nchunks, dtype=torch.float32, device=x.device)
    else:
        scales_out = _require_tensor("scales_out", scales_out)
    _C.sign_compress(x, error, chunk, bits_out, scales_out, _stream_of(x))
    return bits_out, scales_out


def sign_decompress(
    bits: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, chunk: int, *, scale: float = 1.0
) -> torch.Tensor:
    """Writes ``out[i] = scale * (d_0[i] + d_1[i] + ... + d_(W-1)[i])`` and returns ``out``.

    ``bits`` (uint8, ``[W, ceil(n / 8)]``, or 1-D for W = 1) and ``scales`` (float32,
    ``[W, ceil(n / chunk)]`` or 1-D) hold one message per row; ``d_r[i] = ±scales[r, i // chunk]``
    by bit i of row r. ``out`` is float32, contiguous, with n elements (any shape). Rows may lie any
    distance apart (each row contiguous), e.g. views into one gathered uint8 buffer; they are read
    in place. The sum starts at 0.0 and adds the rows in order in float32, then multiplies by
    ``float32(scale)``: every rank decoding the same rows gets the same bits, on CPU (any thread
    count) and CUDA alike. W = 0 gives zeros.

    Raises before ``out`` is written: TypeError for a non-tensor, a wrong dtype, a non-contiguous
    ``out`` or a row that is not contiguous; ValueError for ``chunk`` not an int >= 1, row lengths
    that do not match ``out``'s size, different row counts in bits and scales, mixed devices, or
    ``out`` sharing memory with bits or scales. On CUDA the work is queued on the current stream and
    the host never waits."""
    bits = _require_tensor("bits", bits)
    scales = _require_tensor("scales", scales)
    out = _require_tensor("out", out)
    chunk = _require_chunk(chunk)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    _C.sign_decompress(bits, scales, out, chunk, float(scale), _stream_of(out))
    return out
