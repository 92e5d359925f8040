"""The CUDA twin of sign_compress / sign_decompress (and of the fused 1-bit Adam steps built on
them) against the CPU kernel, bit for bit, on the cases the CUDA code has its own paths for: the
fused one-warp-per-chunk kernel (chunk a multiple of 8, at most 16384), the general path (bytes
straddling chunks; chunks of several segments), with and without error feedback, NaN/Inf,
row-strided gathered rows, views at odd offsets, and no host synchronisation. All skipped
without a usable CUDA device (compiled here, run by benches/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_rt import ops
from tests import onebit_reference as ref
from tests.onebit_messages import gathered_messages, message_fields, rand

pytestmark = pytest.mark.cuda


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte for byte (packed bits; values the kernels copy rather than compute, such as kept u)."""
    return a.shape == b.shape and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Computed floats: NaN in the same places, every other value byte for byte. A NaN's sign and
    payload are not part of the contract: a GPU writes its one canonical NaN (0x7FFFFFFF), x86
    keeps an operand's NaN or makes 0xFFC00000."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    keep = ~torch.isnan(a)
    return torch.equal(a[keep].view(torch.uint8), b[keep].view(torch.uint8))


def check_twins(x: torch.Tensor, error: torch.Tensor | None, chunk: int) -> None:
    """CPU and CUDA compress the same input to the same bits, scales and error."""
    e_cpu = None if error is None else error.clone()
    e_gpu = None if error is None else error.cuda()
    bits_c, scales_c = ops.sign_compress(x, e_cpu, chunk)
    bits_g, scales_g = ops.sign_compress(x.cuda(), e_gpu, chunk)
    assert bits_g.device.type == "cuda" and scales_g.device.type == "cuda"
    assert _same_bits(bits_g, bits_c)
    assert _same_values(scales_g, scales_c)
    if error is not None:
        assert e_gpu is not None and e_cpu is not None
        assert _same_values(e_gpu, e_cpu)


@pytest.mark.parametrize("feedback", [False, True])
@pytest.mark.parametrize("chunk", [8, 64, 2048, 16384, 1, 3, 7, 2049, 16392, 100_000])
def test_compress_matches_the_cpu_kernel(chunk: int, feedback: bool) -> None:
    # 8..16384: fused kernel; 1, 3, 7, 2049: bytes straddle chunks; 16392, 100_000: several segments.
    for n in (1, 7, 8, 33, 2047, 2048, 2049, 300_007):
        x = rand(n, n + chunk)
        check_twins(x, rand(n, n + chunk + 1, 0.3) if feedback else None, chunk)


def test_compress_matches_the_reference_on_cuda() -> None:
    n, chunk = 1_000_003, 2048
    x, error = rand(n, 1), rand(n, 2, 0.1)
    ref_bits, ref_scales, ref_after = ref.compress_reference(x.numpy(), error.numpy(), chunk)
    e = error.cuda()
    bits, scales = ops.sign_compress(x.cuda(), e, chunk)
    np.testing.assert_array_equal(bits.cpu().numpy(), ref_bits)
    np.testing.assert_array_equal(scales.cpu().numpy(), ref_scales)
    np.testing.assert_array_equal(e.cpu().numpy(), ref_after)


def test_nan_inf_and_signed_zeros_match_the_cpu_kernel() -> None:
    n = 50_000
    x = rand(n, 3)
    x[[10, 20_000]] = float("nan")
    x[[5000, 49_999]] = float("inf")
    x[7] = -float("inf")
    x[100:4196] = 0.0
    x[200:300] = -0.0
    for chunk in (2048, 7, 30_000):
        check_twins(x, None, chunk)
        check_twins(x, rand(n, 4, 0.1), chunk)


def test_float64_sum_order_matches_the_cpu_kernel_where_it_decides_the_rounding() -> None:
    from tests.test_onebit_ops import _order_sensitive_inputs

    for x, chunk, times_chunk in _order_sensitive_inputs():
        _bits, scales = ops.sign_compress(torch.from_numpy(x).cuda(), None, chunk)
        assert scales.item() * chunk == np.float32(times_chunk)
        check_twins(torch.from_numpy(x), torch.zeros(chunk), chunk)
        check_twins(torch.from_numpy(np.tile(x, 3)), None, chunk)


def test_views_at_odd_offsets_and_outputs_in_one_message() -> None:
    n, chunk = 100_003, 2048
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    big_x, big_e = rand(n + 3, 5), rand(n + 3, 6, 0.2)
    bits_c, scales_c = ops.sign_compress(big_x[3:], big_e[3:].clone(), chunk)
    msg = torch.zeros(4 * nc + nbytes + 1, dtype=torch.uint8, device="cuda")
    e = big_e.cuda()[3:]
    ops.sign_compress(
        big_x.cuda()[3:], e, chunk, scales_out=msg[: 4 * nc].view(torch.float32), bits_out=msg[4 * nc + 1 :]
    )
    assert _same_bits(msg[4 * nc + 1 :], bits_c) and _same_values(msg[: 4 * nc].view(torch.float32), scales_c)
    expected_e = big_e[3:].clone()
    ops.sign_compress(big_x[3:], expected_e, chunk)
    assert _same_values(e, expected_e)


@pytest.mark.parametrize("world", [1, 2, 5])
@pytest.mark.parametrize("chunk", [2048, 37])
def test_decompress_of_gathered_rows_matches_the_cpu_kernel(world: int, chunk: int) -> None:
    n = 300_007
    gathered = gathered_messages(world, n, chunk, seed=10)
    cpu = ops.sign_decompress(*message_fields(gathered, n, chunk), torch.empty(n), chunk, scale=1.0 / world)
    gpu = ops.sign_decompress(
        *message_fields(gathered.cuda(), n, chunk), torch.empty(n, device="cuda"), chunk, scale=1.0 / world
    )
    assert _same_values(gpu, cpu)


def test_round_trip_identity_on_cuda() -> None:
    n, chunk = 500_000, 2048
    x, error = rand(n, 7).cuda(), rand(n, 8, 0.1).cuda()
    c = x + error
    bits, scales = ops.sign_compress(x, error, chunk)
    d = ops.sign_decompress(bits, scales, torch.empty(n, device="cuda"), chunk)
    assert torch.equal(error, c - d)


def test_mixed_devices_are_rejected_before_anything_changes() -> None:
    x = torch.randn(100, device="cuda")
    error = torch.zeros(100)
    with pytest.raises(ValueError, match="error: expected a tensor on cuda:0 like x, got one on cpu"):
        ops.sign_compress(x, error, 16)
    bits_out = torch.full((13,), 7, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits_out: expected a tensor on cuda:0 like x, got one on cpu"):
        ops.sign_compress(x, None, 16, bits_out=bits_out)
    assert bool((bits_out == 7).all()) and bool((error == 0).all())
    out = torch.full((100,), 3.0, device="cuda")
    with pytest.raises(ValueError, match="bits: expected a tensor on cuda:0 like out, got one on cpu"):
        ops.sign_decompress(torch.zeros(13, dtype=torch.uint8), torch.zeros(7, device="cuda"), out, 16)
    assert bool((out == 3.0).all())


def test_compress_and_decompress_never_wait_for_the_stream() -> None:
    n, chunk = 1_000_000, 2048
    x, error = rand(n, 9), rand(n, 10, 0.1)
    bits_c, scales_c = ops.sign_compress(x, error.clone(), chunk)
    out_c = ops.sign_decompress(bits_c, scales_c, torch.empty(n), chunk)
    xg, eg = x.cuda(), error.cuda()
    # Warm up on copies: with lazy module loading the first launch of a kernel may synchronise.
    b, s = ops.sign_compress(xg, eg.clone(), chunk)
    ops.sign_decompress(b, s, torch.empty(n, device="cuda"), chunk)
    ops.sign_compress(xg, eg.clone(), 7)  # the general path's kernels too
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the kernels
    bits, scales = ops.sign_compress(xg, eg, chunk)
    out = ops.sign_decompress(bits, scales, torch.empty(n, device="cuda"), chunk)
    assert not stream.query(), "sign_compress/sign_decompress waited for the stream: they must only enqueue work"
    torch.cuda.synchronize()
    assert _same_bits(bits, bits_c) and _same_values(scales, scales_c) and _same_values(out, out_c)


def _adam_inputs(n: int, seed: int) -> list[torch.Tensor]:
    """g, denom (positive), u, error."""
    rng = np.random.default_rng(seed)
    g = (1e-3 * rng.standard_normal(n)).astype(np.float32)
    denom = (10.0 ** rng.uniform(-4, 1, n)).astype(np.float32)
    u = (0.5 * rng.standard_normal(n)).astype(np.float32)
    e = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return [torch.from_numpy(a) for a in (g, denom, u, e)]


def check_adam_twins(g: torch.Tensor, denom: torch.Tensor, u: torch.Tensor, error: torch.Tensor, chunk: int) -> None:
    """onebit_adam_compress on CPU and CUDA: same bits, scales and error; sq_norm close to the CPU's
    and the same bits on a second CUDA run."""
    e_cpu = error.clone()
    sq_cpu = torch.zeros(1, dtype=torch.float64)
    bits_c, scales_c = ops.onebit_adam_compress(g, denom, u, e_cpu, 0.9, chunk, sq_norm_out=sq_cpu)
    runs = []
    for _ in range(2):
        e_gpu = error.cuda()
        sq = torch.full((1,), -1.0, dtype=torch.float64, device="cuda")
        bits_g, scales_g = ops.onebit_adam_compress(g.cuda(), denom.cuda(), u.cuda(), e_gpu, 0.9, chunk, sq_norm_out=sq)
        assert _same_bits(bits_g, bits_c) and _same_values(scales_g, scales_c) and _same_values(e_gpu, e_cpu)
        runs.append(sq)
    assert _same_bits(runs[0], runs[1])
    if bool(torch.isfinite(sq_cpu).all()):
        assert runs[0].item() == pytest.approx(sq_cpu.item(), rel=1e-12, abs=0.0)
    else:
        assert _same_values(runs[0], sq_cpu)  # NaN (or Inf) either way


@pytest.mark.parametrize("chunk", [8, 64, 2048, 16384, 1, 3, 7, 2049, 16392, 100_000])
def test_adam_compress_matches_the_cpu_kernel(chunk: int) -> None:
    # 8..16384: fused kernel; 1, 3, 7, 2049: bytes straddle chunks; 16392, 100_000: several segments.
    for n in (1, 7, 8, 33, 2047, 2048, 2049, 300_007):
        check_adam_twins(*_adam_inputs(n, n + chunk), chunk)


def test_adam_compress_with_nan_inf_and_zero_denominators() -> None:
    n = 50_000
    g, denom, u, error = _adam_inputs(n, 3)
    g[10] = float("nan")
    denom[[5000, 6000]] = 0.0
    g[6000] = 0.0
    u[20_000] = float("inf")
    for chunk in (2048, 7, 30_000):
        check_adam_twins(g, denom, u, error, chunk)
    g[10] = 1.0
    check_adam_twins(g, denom, u, error, 2048)


def test_adam_compress_of_nothing_writes_a_zero_norm() -> None:
    sq = torch.full((1,), 5.0, dtype=torch.float64, device="cuda")
    empty = torch.empty(0, device="cuda")
    bits, scales = ops.onebit_adam_compress(empty, empty, empty, torch.empty(0, device="cuda"), 0.9, 64, sq_norm_out=sq)
    assert bits.numel() == 0 and scales.numel() == 0 and sq.item() == 0.0


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("chunk", [2048, 37])
def test_adam_decompress_matches_the_cpu_kernel(world: int, chunk: int) -> None:
    n = 300_007
    gathered = gathered_messages(world, n, chunk, seed=10, error=False)
    scales = message_fields(gathered, n, chunk)[1]
    scales[world - 1, 2] = float("nan")
    scales[0, 5] = float("inf")
    u = rand(n, 99)
    u.view(torch.int32)[::3] = 0x7FC00001  # NaN payloads stay where the average is not finite
    u_cpu = u.clone()
    out_cpu = ops.onebit_adam_decompress(
        *message_fields(gathered, n, chunk), torch.empty(n), u_cpu, chunk, scale=1.0 / world, bias=1.7
    )
    u_gpu = u.cuda()
    out_gpu = ops.onebit_adam_decompress(
        *message_fields(gathered.cuda(), n, chunk),
        torch.empty(n, device="cuda"),
        u_gpu,
        chunk,
        scale=1.0 / world,
        bias=1.7,
    )
    assert _same_values(out_gpu, out_cpu) and _same_bits(u_gpu, u_cpu)


def test_adam_ops_reject_mixed_devices_and_never_wait_for_the_stream() -> None:
    n, chunk = 1_000_000, 2048
    g, denom, u, error = _adam_inputs(n, 9)
    with pytest.raises(ValueError, match="denom: expected a tensor on cuda:0 like g, got one on cpu"):
        ops.onebit_adam_compress(g.cuda(), denom, u.cuda(), error.cuda(), 0.9, chunk)
    with pytest.raises(ValueError, match="sq_norm_out: expected a tensor on cuda:0 like g, got one on cpu"):
        ops.onebit_adam_compress(
            g.cuda(), denom.cuda(), u.cuda(), error.cuda(), 0.9, chunk, sq_norm_out=torch.zeros(1, dtype=torch.float64)
        )
    e_cpu, u_cpu = error.clone(), u.clone()
    bits_c, scales_c = ops.onebit_adam_compress(g, denom, u, e_cpu, 0.9, chunk)
    out_c = ops.onebit_adam_decompress(bits_c, scales_c, torch.empty(n), u_cpu, chunk, bias=2.0)
    gg, dg, ug, eg = (t.cuda() for t in (g, denom, u, error))
    # Warm up on copies: with lazy module loading the first launch of a kernel may synchronise.
    sq = torch.zeros(1, dtype=torch.float64, device="cuda")
    b, s = ops.onebit_adam_compress(gg, dg, ug, eg.clone(), 0.9, chunk, sq_norm_out=sq)
    ops.onebit_adam_decompress(b, s, torch.empty(n, device="cuda"), ug.clone(), chunk)
    ops.onebit_adam_compress(gg, dg, ug, eg.clone(), 0.9, 7, sq_norm_out=sq)  # the general path's kernels too
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the kernels
    bits, scales = ops.onebit_adam_compress(gg, dg, ug, eg, 0.9, chunk, sq_norm_out=sq)
    out = ops.onebit_adam_decompress(bits, scales, torch.empty(n, device="cuda"), ug, chunk, bias=2.0)
    assert not stream.query(), "onebit_adam_compress/decompress waited for the stream: they must only enqueue work"
    torch.cuda.synchronize()
    assert _same_bits(bits, bits_c) and _same_values(scales, scales_c) and _same_values(eg, e_cpu)
    assert _same_values(out, out_c) and _same_bits(ug, u_cpu)
