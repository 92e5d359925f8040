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

``onebit_adam_compress`` / ``onebit_adam_decompress`` are the two halves of a 1-bit Adam step
fused into one pass each: the momentum ``beta1 * u + (1 - beta1) * g / denom`` is built inside the
compression (plus the squared norm of g), and the decompression writes the new momentum and the
bias-corrected step together. Each gives exactly the bits of the unfused torch + sign op sequence
its docstring spells out.

"Same bits" and "bit for bit" here hold for every value that is not NaN; where a result is NaN,
its sign and payload are not specified and differ between CPU and CUDA (a GPU writes its one
canonical NaN). Values the kernels keep rather than compute (``u`` where the average is not
finite) keep their bits everywhere.
"""

from __future__ import annotations

import math
import struct

import torch

from autoglm_rt._native import _C
from autoglm_rt.ops._wrapper_args import require_tensor, stream_of


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


def _message_outputs(
    x: torch.Tensor, chunk: int, bits_out: object, scales_out: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caller's message buffers (checked to be tensors), or new ones sized for x on x's device."""
    nbytes, nchunks = sign_message_sizes(x.numel(), chunk)
    bits = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if bits_out is None else bits_out
    scales = torch.empty(nchunks, dtype=torch.float32, device=x.device) if scales_out is None else scales_out
    return require_tensor("bits_out", bits), require_tensor("scales_out", scales)


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
    x = require_tensor("x", x)
    if error is not None:
        error = require_tensor("error", error)
    chunk = _require_chunk(chunk)
    bits_out, scales_out = _message_outputs(x, chunk, bits_out, scales_out)
    _C.sign_compress(x, error, chunk, bits_out, scales_out, stream_of(x))
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
    bits = require_tensor("bits", bits)
    scales = require_tensor("scales", scales)
    out = require_tensor("out", out)
    chunk = _require_chunk(chunk)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    _C.sign_decompress(bits, scales, out, chunk, float(scale), stream_of(out))
    return out


def _require_beta1(beta1: object) -> float:
    if (
        isinstance(beta1, bool)
        or not isinstance(beta1, (int, float))
        or not math.isfinite(beta1)
        or not 0.0 <= beta1 < 1.0
    ):
        raise ValueError(f"beta1: expected a finite float in [0, 1), got {beta1!r}")
    return float(beta1)


def _require_finite32(name: str, value: object) -> float:
    """``value`` as a float if it is a number that stays finite when rounded to float32 (the
    kernels apply it as one); TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    try:
        finite = math.isfinite(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:  # beyond float32's range after rounding
        finite = False
    if not finite:
        raise ValueError(f"{name}: expected a float finite in float32, got {value!r}")
    return float(value)


def onebit_adam_compress(
    g: torch.Tensor,
    denom: torch.Tensor,
    u: torch.Tensor,
    error: torch.Tensor,
    beta1: float,
    chunk: int,
    *,
    bits_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
    sq_norm_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit Adam's compress half in one pass: returns ``(bits, scales)`` of
    ``sign_compress(m, error, chunk)`` where, per element in float32,
    ``m = float32(beta1) * u + float32(1 - beta1) * (g / denom)`` (``1 - beta1`` computed in
    float64, as torch applies a Python scalar; every operation rounded once, no fused multiply-add,
    on CPU and CUDA alike). ``error`` is updated exactly as sign_compress updates it
    (``c = m + error``, then ``error = c - d``): bits, scales and error are bit for bit those of
    ``m`` built by torch or numpy one operation at a time followed by ``sign_compress``.

    g, denom, u, error: float32, contiguous, same number of elements (any shapes, flattened) and
    device; g, denom and u are only read (they may share memory with each other). ``beta1``: a
    finite float in [0, 1). ``bits_out``/``scales_out``: as for ``sign_compress``.
    ``sq_norm_out`` (one float64 element on g's device) receives ``sum(g ** 2)`` accumulated in
    float64 (overwritten; 0.0 for empty g), in an order fixed by n and chunk: the same value on any
    thread count and on every run (CPU and CUDA use different orders).

    Raises before anything is written: TypeError for a non-tensor, a wrong dtype or a
    non-contiguous tensor; ValueError for ``chunk`` not an int >= 1, ``beta1`` (bool included) not
    a finite float in [0, 1), mismatched sizes, mixed devices, ``sq_norm_out`` not one element, or
    error, bits_out, scales_out or sq_norm_out sharing memory with any other argument. On CUDA the
    work is queued on the current stream and the host never waits."""
    g = require_tensor("g", g)
    denom = require_tensor("denom", denom)
    u = require_tensor("u", u)
    error = require_tensor("error", error)
    beta1 = _require_beta1(beta1)
    chunk = _require_chunk(chunk)
    bits_out, scales_out = _message_outputs(g, chunk, bits_out, scales_out)
    sq_bits = None
    if sq_norm_out is not None:
        sq_norm_out = require_tensor("sq_norm_out", sq_norm_out)
        if sq_norm_out.dtype != torch.float64:
            raise TypeError(f"sq_norm_out: expected dtype float64, got {str(sq_norm_out.dtype).removeprefix('torch.')}")
        if sq_norm_out.numel() != 1:
            raise ValueError(f"sq_norm_out: expected one element, got {sq_norm_out.numel()}")
        # The native boundary has no float64: the kernel writes the double through its int64 bits.
        sq_bits = sq_norm_out.reshape(1).view(torch.int64)
    _C.onebit_adam_compress(g, denom, u, error, beta1, chunk, bits_out, scales_out, sq_bits, stream_of(g))
    return bits_out, scales_out


def onebit_adam_decompress(
    bits: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    u: torch.Tensor,
    chunk: int,
    *,
    scale: float = 1.0,
    bias: float = 1.0,
) -> torch.Tensor:
    """1-bit Adam's decompress half in one pass; returns ``out``.

    With ``avg`` the value ``sign_decompress(bits, scales, out, chunk, scale=scale)`` would write
    (rows added in order in float32, times ``float32(scale)``), per element: ``u = avg`` where avg is
    finite (NaN or Inf, e.g. from a rank's NaN scale: u keeps its value, bit for bit), and
    ``out = avg * float32(bias)`` (one float32 multiply; pass ``bias = 1 / (1 - beta1 ** t)``).
    bits and scales as for ``sign_decompress`` (rows, possibly row-strided views of one gathered
    buffer); out and u: float32, contiguous, n elements each, on the same device.

    Raises before anything is written: TypeError as ``sign_decompress`` does (and for a scale or
    bias that is not a number, bool included); ValueError as it does, and for a scale or bias that
    is not finite once rounded to float32, u's size or device, or out or u sharing memory with each
    other, bits or scales. On CUDA the work is queued on the current stream and the host never
    waits."""
    bits = require_tensor("bits", bits)
    scales = require_tensor("scales", scales)
    out = require_tensor("out", out)
    u = require_tensor("u", u)
    chunk = _require_chunk(chunk)
    scale = _require_finite32("scale", scale)
    bias = _require_finite32("bias", bias)
    _C.onebit_adam_decompress(bits, scales, out, u, chunk, scale, bias, stream_of(out))
    return out
