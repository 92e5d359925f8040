"""autoglm_rt.ops.onebit_adam_compress / onebit_adam_decompress (CPU) against the unfused path
they replace: the momentum built one float32 operation at a time (numpy, and torch without
alpha=, which would fuse a multiply-add), then sign_compress; sign_decompress then the u/out
rules. Bit for bit, on both loops (AVX2 and portable) and several thread counts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import autoglm_rt
from autoglm_rt import ops
from tests import onebit_reference as ref
from tests.onebit_messages import gathered_messages, message_fields, rand

SIZES = [1, 7, 8, 9, 33, 2047, 2048, 2049, 4099, 70_001]
CHUNKS = [1, 3, 8, 13, 2048, 2056, 5000, 100_000]
BETA1 = 0.9


def _denom(n: int, seed: int) -> torch.Tensor:
    """Positive, like sqrt(v) + eps, spread over a few orders of magnitude."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((10.0 ** rng.uniform(-4, 1, n)).astype(np.float32))


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """g, denom, u, error."""
    return rand(n, seed, 1e-3), _denom(n, seed + 1), rand(n, seed + 2, 0.5), rand(n, seed + 3, 0.1)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
    )


@pytest.fixture(params=["auto", "scalar"])
def simd(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AUTOGLM_RT_ONEBIT_SIMD", request.param)
    return str(request.param)


def check_compress(
    g: torch.Tensor, denom: torch.Tensor, u: torch.Tensor, error: torch.Tensor, beta1: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the fused op and checks it against numpy's momentum + sign_compress, bit for bit;
    returns (bits, scales, sq_norm)."""
    before = [t.clone() for t in (g, denom, u)]
    m = ref.adam_momentum(g.numpy(), denom.numpy(), u.numpy(), beta1)
    e_ref = error.clone()
    ref_bits, ref_scales = ops.sign_compress(torch.from_numpy(m), e_ref, chunk)
    np_bits, np_scales, np_after = ref.compress_reference(m, error.numpy(), chunk)
    sq = torch.full((1,), -5.0, dtype=torch.float64)
    bits, scales = ops.onebit_adam_compress(g, denom, u, error, beta1, chunk, sq_norm_out=sq)
    assert bits.dtype == torch.uint8 and scales.dtype == torch.float32
    assert _bitwise(bits, ref_bits) and _bitwise(scales, ref_scales) and _bitwise(error, e_ref)
    np.testing.assert_array_equal(bits.numpy(), np_bits)
    assert _bitwise(scales, torch.from_numpy(np_scales)) and _bitwise(error.reshape(-1), torch.from_numpy(np_after))
    for t, b in zip((g, denom, u), before, strict=True):
        assert _bitwise(t, b)  # only read
    g64 = g.double().reshape(-1).numpy()
    if np.isfinite(g64).all():
        assert sq.item() == pytest.approx(math.fsum((g64 * g64).tolist()), rel=1e-12, abs=0.0)
    else:
        assert math.isnan(sq.item()) if np.isnan(g64).any() else sq.item() == math.inf
    return bits, scales, sq


def test_compress_equals_momentum_then_sign_compress(simd: str) -> None:
    for n in SIZES:
        for chunk in CHUNKS:
            check_compress(*_inputs(n, 3 * n + chunk), BETA1, chunk)


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9, 0.999, 1.0 - 2.0**-24, 0.1234567])
def test_compress_for_any_beta1(beta1: float) -> None:
    check_compress(*_inputs(20_011, 5), beta1, 2048)
    check_compress(*_inputs(20_011, 6), beta1, 37)


def test_momentum_matches_torch_one_operation_at_a_time() -> None:
    # The definition is torch's mul and add without alpha= (add_(u, alpha=beta1) fuses a
    # multiply-add on the CPU and differs in the last bit for about a third of the elements).
    n, chunk = 100_003, 2048
    g, denom, u, error = _inputs(n, 8)
    m = torch.mul(u, BETA1) + torch.mul(g / denom, 1 - BETA1)
    assert _bitwise(m, torch.from_numpy(ref.adam_momentum(g.numpy(), denom.numpy(), u.numpy(), BETA1)))
    e_ref = error.clone()
    ref_bits, ref_scales = ops.sign_compress(m, e_ref, chunk)
    bits, scales = ops.onebit_adam_compress(g, denom, u, error, BETA1, chunk)
    assert _bitwise(bits, ref_bits) and _bitwise(scales, ref_scales) and _bitwise(error, e_ref)


def test_large_input_with_several_segments_per_chunk_and_ragged_end(simd: str) -> None:
    n = 300_007
    for chunk in (2048, 4900, 65_536, n, n + 1):
        check_compress(*_inputs(n, chunk), BETA1, chunk)


def test_simd_and_portable_loops_give_the_same_bits_and_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 100_003
    results = []
    for simd in ("auto", "scalar"):
        monkeypatch.setenv("AUTOGLM_RT_ONEBIT_SIMD", simd)
        g, denom, u, error = _inputs(n, 12)
        sq = torch.zeros(1, dtype=torch.float64)
        bits, scales = ops.onebit_adam_compress(g, denom, u, error, BETA1, 2048, sq_norm_out=sq)
        out = torch.empty(n)
        ops.onebit_adam_decompress(torch.stack([bits, bits.flip(0)]), torch.stack([scales] * 2), out, u, 2048)
        results.append((bits, scales, error, sq, out, u))
    for a, b in zip(results[0], results[1], strict=True):
        assert _bitwise(a, b)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_deterministic_across_thread_counts(chunk: int) -> None:
    n = 3_000_001
    results = []
    old = autoglm_rt.num_threads()
    try:
        for threads in (1, 2, 3):
            autoglm_rt.set_num_threads(threads)
            g, denom, u, error = _inputs(n, 21)
            sq = torch.zeros(1, dtype=torch.float64)
            bits, scales = ops.onebit_adam_compress(g, denom, u, error, BETA1, chunk, sq_norm_out=sq)
            out = torch.empty(n)
            rows_b, rows_s = torch.stack([bits, bits.roll(1), bits.roll(2)]), torch.stack([scales] * 3)
            ops.onebit_adam_decompress(rows_b, rows_s, out, u, chunk, scale=1 / 3, bias=1 / (1 - BETA1**3))
            results.append((bits, scales, error, sq, out, u))
    finally:
        autoglm_rt.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert _bitwise(a, b)
    check_compress(*_inputs(n, 21), BETA1, chunk)


def test_nonfinite_inputs_spoil_only_their_chunk() -> None:
    n, chunk = 10_000, 1000
    g, denom, u, error = _inputs(n, 31)
    g[1500] = float("nan")
    denom[3200] = 0.0  # g / 0 = +-Inf
    u[5003] = float("inf")
    error[7001] = float("-inf")
    g[8000] = 0.0
    denom[8000] = 0.0  # 0 / 0 = NaN
    _bits, scales, sq = check_compress(g, denom, u, error, BETA1, chunk)
    s = scales.numpy()
    assert set(np.nonzero(~np.isfinite(s))[0]) == {1, 3, 5, 7, 8}
    assert math.isnan(sq.item())  # g holds a NaN


def test_outputs_can_be_views_into_one_message_buffer() -> None:
    n, chunk = 10_007, 512
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    msg = torch.full((8 + 4 * nc + nbytes,), 0xAB, dtype=torch.uint8)
    g, denom, u, e1 = _inputs(n, 5)
    e2 = e1.clone()
    bits, scales = ops.onebit_adam_compress(
        g,
        denom,
        u,
        e1,
        BETA1,
        chunk,
        sq_norm_out=msg[:8].view(torch.float64),
        scales_out=msg[8 : 8 + 4 * nc].view(torch.float32),
        bits_out=msg[8 + 4 * nc :],
    )
    assert bits.data_ptr() == msg[8 + 4 * nc :].data_ptr()
    sq = torch.zeros(1, dtype=torch.float64)
    fresh_bits, fresh_scales = ops.onebit_adam_compress(g, denom, u, e2, BETA1, chunk, sq_norm_out=sq)
    assert _bitwise(bits, fresh_bits) and _bitwise(scales, fresh_scales) and _bitwise(e1, e2)
    assert _bitwise(msg[:8].view(torch.float64), sq)


def test_any_shape_is_flattened_and_no_norm_requested() -> None:
    g, denom, u, error = (t.reshape(3, 5, 7) for t in _inputs(105, 2))
    e_ref = error.clone()
    m = torch.from_numpy(ref.adam_momentum(g.numpy(), denom.numpy(), u.numpy(), BETA1))
    ref_bits, ref_scales = ops.sign_compress(m, e_ref, 10)
    bits, scales = ops.onebit_adam_compress(g, denom, u.reshape(15, 7), error, BETA1, 10)
    assert _bitwise(bits, ref_bits) and _bitwise(scales, ref_scales) and _bitwise(error, e_ref)


def _gathered(world: int, n: int, chunk: int, poison: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-strided (bits, scales) views of a gathered [world, message] buffer; poison[r]
    overwrites scale 1 of row r (NaN, Inf)."""
    bits, scales = message_fields(gathered_messages(world, n, chunk), n, chunk)
    for r, value in poison.items():
        scales[r, min(1, scales.shape[1] - 1)] = value
    return bits, scales


def _u_with_special_values(n: int, seed: int) -> torch.Tensor:
    u = rand(n, seed)
    u.view(torch.int32)[::5] = 0x7FC12345  # NaN with a payload: kept bit for bit where avg is not finite
    u[1::7] = -0.0
    return u


def check_decompress(bits: torch.Tensor, scales: torch.Tensor, n: int, chunk: int, scale: float, bias: float) -> None:
    u = _u_with_special_values(n, chunk)
    u_before = u.clone()
    avg = ops.sign_decompress(bits, scales, torch.empty(n), chunk, scale=scale)
    finite = torch.isfinite(avg)
    exp_u = torch.where(finite, avg, u_before)
    exp_out = avg * float(np.float32(bias))
    np_out, np_u = ref.adam_decompress_reference(bits.numpy(), scales.numpy(), u_before.numpy(), n, chunk, scale, bias)
    bits_before, scales_before = bits.clone(), scales.clone()
    out = torch.full((n,), 7.0)
    res = ops.onebit_adam_decompress(bits, scales, out, u, chunk, scale=scale, bias=bias)
    assert res is out
    assert _bitwise(out, exp_out) and _bitwise(u, exp_u)
    assert _bitwise(out, torch.from_numpy(np_out)) and _bitwise(u, torch.from_numpy(np_u))
    assert _bitwise(u[~finite], u_before[~finite])  # untouched exactly there (NaN payloads included)
    assert _bitwise(bits, bits_before) and _bitwise(scales, scales_before)


@pytest.mark.parametrize("world", [1, 2, 5])
@pytest.mark.parametrize(("n", "chunk"), [(1, 1), (13, 3), (2048, 2048), (100_003, 2048), (100_003, 37)])
def test_decompress_equals_sign_decompress_then_the_u_and_out_rules(world: int, n: int, chunk: int, simd: str) -> None:
    bits, scales = _gathered(world, n, chunk, {})
    assert not bits.is_contiguous() or world == 1
    check_decompress(bits, scales, n, chunk, 1.0 / world, 1.0 / (1.0 - BETA1**7))


@pytest.mark.parametrize("poison", [{0: float("nan")}, {1: float("inf")}, {0: float("inf"), 2: float("-inf")}])
def test_decompress_keeps_u_where_a_rank_sent_nan_or_inf(poison: dict[int, float], simd: str) -> None:
    n, chunk = 20_011, 2048
    bits, scales = _gathered(3, n, chunk, poison)
    avg = ops.sign_decompress(bits, scales, torch.empty(n), chunk, scale=1 / 3)
    assert not bool(torch.isfinite(avg[chunk : 2 * chunk]).any()) and bool(torch.isfinite(avg[:chunk]).all())
    check_decompress(bits, scales, n, chunk, 1 / 3, 10.0)


def test_decompress_overflow_to_inf_keeps_u() -> None:
    # Finite scales whose sum overflows float32: avg is Inf, so u keeps its value there.
    bits = torch.tensor([[0b11], [0b11]], dtype=torch.uint8)
    scales = torch.tensor([[3e38, 3e38], [3e38, 3e38]])
    u = torch.tensor([1.5, -2.5])
    out = ops.onebit_adam_decompress(bits, scales, torch.empty(2), u, 1, scale=0.5, bias=2.0)
    assert out.tolist() == [float("inf")] * 2 and u.tolist() == [1.5, -2.5]
    out = ops.onebit_adam_decompress(bits, scales / 2, torch.empty(2), u, 1, scale=0.5, bias=2.0)
    assert u.tolist() == [np.float32(1.5e38)] * 2 and out.tolist() == [np.float32(3e38)] * 2


def test_empty_input() -> None:
    g = torch.empty(0)
    sq = torch.full((1,), 3.0, dtype=torch.float64)
    bits, scales = ops.onebit_adam_compress(
        g, torch.empty(0), torch.empty(0), torch.empty(0), BETA1, 2048, sq_norm_out=sq
    )
    assert bits.shape == (0,) and scales.shape == (0,) and sq.item() == 0.0
    assert math.copysign(1.0, sq.item()) == 1.0
    out = ops.onebit_adam_decompress(bits, scales, torch.empty(0), torch.empty(0), 2048)
    assert out.numel() == 0
    out = ops.onebit_adam_decompress(
        torch.empty(3, 0, dtype=torch.uint8), torch.empty(3, 0), torch.empty(0), torch.empty(0), 5
    )
    assert out.numel() == 0


def _snapshot(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in ts]


def _unchanged(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(_bitwise(x, y) for x, y in zip(a, b, strict=True))


def _compress_cases(
    n: int, chunk: int, g: torch.Tensor, error: torch.Tensor, msg: torch.Tensor
) -> Iterator[tuple[type[Exception], str, dict[str, object]]]:
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    yield TypeError, r"^g: expected a torch.Tensor, got ndarray$", {"g": np.ones(n, np.float32)}
    yield TypeError, r"^denom: expected a torch.Tensor, got list$", {"denom": [1.0] * n}
    yield TypeError, r"^u: expected a torch.Tensor, got NoneType$", {"u": None}
    yield TypeError, r"^error: expected a torch.Tensor, got NoneType$", {"error": None}
    yield TypeError, r"^g: expected dtype float32, got float64$", {"g": g.double()}
    yield TypeError, r"^denom: expected dtype float32, got float16$", {"denom": g.half()}
    yield TypeError, r"^u: expected dtype float32, got bfloat16$", {"u": g.bfloat16()}
    yield TypeError, r"^error: expected dtype float32, got float64$", {"error": error.double()}
    yield TypeError, r"^g: expected a contiguous tensor", {"g": rand(2 * n, 3)[::2]}
    yield TypeError, r"^denom: expected a contiguous tensor", {"denom": rand(2 * n, 3)[::2]}
    yield TypeError, r"^u: expected a contiguous tensor", {"u": rand(2 * n, 3)[::2]}
    yield TypeError, r"^error: expected a contiguous tensor", {"error": rand(2 * n, 3)[::2]}
    for bad in (0, -3, True, 16.0):
        yield ValueError, rf"^chunk: expected an int >= 1, got {bad!r}$", {"chunk": bad}
    for bad in (1.0, -0.1, float("nan"), float("inf"), True, False, "0.9", None):
        yield ValueError, r"^beta1: expected a finite float in \[0, 1\), got ", {"beta1": bad}
    yield ValueError, r"^onebit_adam_compress: denom has 99 elements, g has 100$", {"denom": rand(99, 4)}
    yield ValueError, r"^onebit_adam_compress: u has 101 elements, g has 100$", {"u": rand(101, 4)}
    yield ValueError, r"^onebit_adam_compress: error has 99 elements, g has 100$", {"error": rand(99, 4)}
    yield (
        TypeError,
        r"^bits_out: expected dtype uint8, got int32$",
        {"bits_out": torch.zeros(nbytes, dtype=torch.int32)},
    )
    yield TypeError, r"^scales_out: expected dtype float32, got float64$", {"scales_out": torch.zeros(nc).double()}
    yield (
        ValueError,
        r"^onebit_adam_compress: bits_out has 12 bytes, expected ceil\(100 / 8\) = 13$",
        {"bits_out": torch.zeros(12, dtype=torch.uint8)},
    )
    yield (
        ValueError,
        r"^onebit_adam_compress: scales_out has 8 elements, expected ceil\(100 / 16\) = 7$",
        {"scales_out": torch.zeros(8)},
    )
    yield TypeError, r"^sq_norm_out: expected a torch.Tensor, got float$", {"sq_norm_out": 0.0}
    yield TypeError, r"^sq_norm_out: expected dtype float64, got float32$", {"sq_norm_out": torch.zeros(1)}
    yield ValueError, r"^sq_norm_out: expected one element, got 2$", {"sq_norm_out": torch.zeros(2).double()}
    yield ValueError, r"^onebit_adam_compress: error overlaps g in memory", {"error": g}
    yield ValueError, r"^onebit_adam_compress: error overlaps u in memory", {"u": error}
    yield (
        ValueError,
        r"^onebit_adam_compress: scales_out overlaps denom in memory",
        {"scales_out": msg[: 4 * nc].view(torch.float32), "denom": msg[: 4 * n].view(torch.float32)},
    )
    yield (
        ValueError,
        r"^onebit_adam_compress: bits_out overlaps error in memory",
        {"bits_out": error.view(torch.uint8)[:nbytes]},
    )
    yield (
        ValueError,
        r"^onebit_adam_compress: scales_out overlaps bits_out in memory",
        {"bits_out": msg[4 * nc - 4 : 4 * nc - 4 + nbytes], "scales_out": msg[: 4 * nc].view(torch.float32)},
    )
    yield (
        ValueError,
        r"^onebit_adam_compress: sq_norm_out overlaps scales_out in memory",
        {"scales_out": msg[: 4 * nc].view(torch.float32), "sq_norm_out": msg[8:16].view(torch.float64)},
    )
    yield (
        ValueError,
        r"^onebit_adam_compress: sq_norm_out overlaps g in memory",
        {"sq_norm_out": g[:2].view(torch.float64)},
    )


def test_compress_refuses_bad_input_before_writing_anything() -> None:
    n, chunk = 100, 16
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    g, denom, u, error = _inputs(n, 1)
    bits_out = torch.full((nbytes,), 0x5A, dtype=torch.uint8)
    scales_out = torch.full((nc,), -3.0)
    sq = torch.full((1,), -1.0, dtype=torch.float64)
    msg = torch.full((4 * n + 64,), 0x11, dtype=torch.uint8)
    for exc, match, override in _compress_cases(n, chunk, g, error, msg):
        kwargs: dict[str, object] = {
            "g": g,
            "denom": denom,
            "u": u,
            "error": error,
            "beta1": BETA1,
            "chunk": chunk,
            "bits_out": bits_out,
            "scales_out": scales_out,
            "sq_norm_out": sq,
        }
        kwargs.update(override)
        before = _snapshot(g, denom, u, error, bits_out, scales_out, sq, msg)
        with pytest.raises(exc, match=match):
            ops.onebit_adam_compress(**kwargs)  # type: ignore[arg-type]
        assert _unchanged(before, _snapshot(g, denom, u, error, bits_out, scales_out, sq, msg)), override


def test_compress_refuses_a_read_only_error_and_lets_inputs_share_memory() -> None:
    n = 10
    g = np.arange(1, n + 1, dtype=np.float32)
    error = np.zeros(n, np.float32)
    error.flags.writeable = False
    with pytest.raises((TypeError, ValueError), match="error"):
        autoglm_rt._C.onebit_adam_compress(g, g, g, error, 0.9, 4, np.zeros(2, np.uint8), np.zeros(3, np.float32))
    assert not error.any()
    # g, denom and u are only read: they may share memory.
    error = np.full(n, 0.25, np.float32)
    _bits, _scales, after = ref.compress_reference(ref.adam_momentum(g, g, g, 0.5), error, 4)
    autoglm_rt._C.onebit_adam_compress(g, g, g, error, 0.5, 4, np.zeros(2, np.uint8), np.zeros(3, np.float32))
    np.testing.assert_array_equal(error, after)


def test_decompress_refuses_bad_input_before_writing_anything() -> None:
    n, chunk = 100, 16
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    bits, scales = ops.sign_compress(rand(n, 1), None, chunk)
    rows_b, rows_s = torch.stack([bits, bits]), torch.stack([scales, scales])
    out = torch.full((n,), 4.0)
    u = torch.full((n,), 5.0)
    msg = torch.zeros(4 * n + 64, dtype=torch.uint8)
    shared = torch.zeros(2 * nc + 2 * n)
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (TypeError, r"^bits: expected a torch.Tensor, got bytes$", {"bits": b"\x00" * nbytes}),
        (TypeError, r"^u: expected a torch.Tensor, got ndarray$", {"u": np.zeros(n, np.float32)}),
        (TypeError, r"^bits: expected dtype uint8, got int8$", {"bits": rows_b.to(torch.int8)}),
        (TypeError, r"^scales: expected dtype float32, got float64$", {"scales": rows_s.double()}),
        (TypeError, r"^out: expected dtype float32, got float16$", {"out": torch.zeros(n, dtype=torch.float16)}),
        (TypeError, r"^u: expected dtype float32, got float64$", {"u": torch.zeros(n, dtype=torch.float64)}),
        (TypeError, r"^out: expected a contiguous tensor", {"out": torch.zeros(2 * n)[::2]}),
        (TypeError, r"^u: expected a contiguous tensor", {"u": torch.zeros(2 * n)[::2]}),
        (
            TypeError,
            r"^bits: expected each row contiguous \(inner stride 1\), got inner stride 2",
            {"bits": torch.zeros(2, 2 * nbytes, dtype=torch.uint8)[:, ::2]},
        ),
        (ValueError, r"^chunk: expected an int >= 1, got 0$", {"chunk": 0}),
        (ValueError, r"^onebit_adam_decompress: bits has 1 rows, scales has 2", {"bits": bits}),
        (
            ValueError,
            r"^onebit_adam_decompress: bits rows have 13 bytes, expected ceil\(120 / 8\) = 15 for out's 120",
            {"out": torch.zeros(120), "u": torch.zeros(120)},
        ),
        (ValueError, r"^onebit_adam_decompress: u has 99 elements, out has 100$", {"u": torch.zeros(99)}),
        (ValueError, r"^onebit_adam_decompress: u overlaps out in memory", {"u": out}),
        (
            ValueError,
            r"^onebit_adam_decompress: u overlaps out in memory",
            {"out": shared[:n], "u": shared[n - 1 : 2 * n - 1]},
        ),
        (
            ValueError,
            r"^onebit_adam_decompress: out overlaps bits in memory",
            {"bits": msg[:nbytes], "scales": torch.zeros(nc), "out": msg[8 : 8 + 4 * n].view(torch.float32)},
        ),
        (
            ValueError,
            r"^onebit_adam_decompress: u overlaps scales in memory",
            {"scales": shared[: 2 * nc].view(2, nc), "u": shared[2 * nc - 1 : 2 * nc - 1 + n]},
        ),
        (
            ValueError,
            r"^onebit_adam_decompress: u overlaps bits in memory",
            {"bits": msg[:nbytes], "scales": torch.zeros(nc), "u": msg[8 : 8 + 4 * n].view(torch.float32)},
        ),
        (TypeError, r"^scale: expected a float, got bool$", {"scale": True}),
        (TypeError, r"^bias: expected a float, got str$", {"bias": "2"}),
        (ValueError, r"^scale: expected a float finite in float32, got nan$", {"scale": float("nan")}),
        (ValueError, r"^bias: expected a float finite in float32, got inf$", {"bias": float("inf")}),
        (ValueError, r"^bias: expected a float finite in float32, got -inf$", {"bias": -float("inf")}),
        # Finite as a double, infinite once rounded to the float32 the kernel applies.
        (ValueError, r"^scale: expected a float finite in float32, got 1e\+39$", {"scale": 1e39}),
        (ValueError, r"^bias: expected a float finite in float32, got -3\.5e\+38$", {"bias": -3.5e38}),
    ]
    for exc, match, override in cases:
        kwargs: dict[str, object] = {"bits": rows_b, "scales": rows_s, "out": out, "u": u, "chunk": chunk}
        kwargs.update(override)
        before = _snapshot(out, u, rows_b, rows_s, msg, shared)
        with pytest.raises(exc, match=match):
            ops.onebit_adam_decompress(**kwargs)  # type: ignore[arg-type]
        assert _unchanged(before, _snapshot(out, u, rows_b, rows_s, msg, shared)), override


def test_native_checks_hold_without_the_python_wrapper() -> None:
    # The kernel validates on its own (C++ callers): beta1, scale and bias included.
    g = torch.ones(10)
    for beta1 in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"^onebit_adam_compress: beta1: expected a finite float in \[0, 1\)"):
            autoglm_rt._C.onebit_adam_compress(
                g, g, g, torch.zeros(10), beta1, 4, torch.zeros(2, dtype=torch.uint8), torch.zeros(3)
            )
    bits, scales = torch.zeros(2, dtype=torch.uint8), torch.zeros(3)
    out, u = torch.full((10,), 2.0), torch.full((10,), 3.0)
    for scale, bias, name in ((float("inf"), 1.0, "scale"), (1.0, float("nan"), "bias"), (1e39, 1.0, "scale")):
        with pytest.raises(ValueError, match=rf"^onebit_adam_decompress: {name}: expected a float finite in float32"):
            autoglm_rt._C.onebit_adam_decompress(bits, scales, out, u, 4, scale, bias)
    assert bool((out == 2.0).all()) and bool((u == 3.0).all())
    with pytest.raises(ValueError, match=r"^onebit_adam_compress: sq_norm_out: expected 8 bytes"):
        autoglm_rt._C.onebit_adam_compress(
            g, g, g, torch.zeros(10), 0.9, 4, bits, scales, torch.zeros(2, dtype=torch.int64)
        )
