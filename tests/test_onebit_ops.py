"""autoglm_rt.ops.sign_compress / sign_decompress (CPU) against the numpy reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import autoglm_rt
from autoglm_rt import ops
from tests import onebit_reference as ref
from tests.onebit_messages import gathered_messages, message_fields, rand

SIZES = [1, 7, 8, 9, 31, 33, 100, 2047, 2048, 2049, 4099, 70_001]
CHUNKS = [1, 3, 8, 13, 100, 2048, 2056, 5000, 100_000]


def check_compress(x: torch.Tensor, error: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs sign_compress and checks bits, scales and the error update against the reference."""
    x_before = x.clone()
    e_before = None if error is None else error.clone()
    ref_bits, ref_scales, ref_after = ref.compress_reference(
        x.numpy(), None if e_before is None else e_before.numpy(), chunk
    )
    bits, scales = ops.sign_compress(x, error, chunk)
    assert bits.dtype == torch.uint8 and scales.dtype == torch.float32
    assert (bits.numel(), scales.numel()) == ops.sign_message_sizes(x.numel(), chunk)
    np.testing.assert_array_equal(bits.numpy(), ref_bits)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)  # the documented float64 order, exactly
    c = ref.combined(x_before.numpy(), None if e_before is None else e_before.numpy())
    finite = np.isfinite(ref_scales)
    np.testing.assert_array_max_ulp(scales.numpy()[finite], ref.scales_exact(c, chunk)[finite], maxulp=1)
    if error is not None:
        np.testing.assert_array_equal(error.reshape(-1).numpy(), ref_after)
    assert torch.equal(x.view(torch.int32), x_before.view(torch.int32))  # bitwise: NaN included
    return bits, scales


@pytest.mark.parametrize("feedback", [False, True])
def test_compress_matches_reference_over_sizes_and_chunks(feedback: bool) -> None:
    for n in SIZES:
        for chunk in CHUNKS:
            x = rand(n, n + chunk)
            error = rand(n, 7 * n + chunk, 0.3) if feedback else None
            check_compress(x, error, chunk)


def test_large_tensor_with_several_segments_per_chunk_and_ragged_end() -> None:
    n = 300_007  # many tasks on the thread pool; chunks of 2.4 segments; a short last chunk
    for chunk in (2048, 4900, 65_536, n, n + 1):
        check_compress(rand(n, chunk), rand(n, chunk + 1, 0.1), chunk)


def test_scales_reflect_the_float64_sum_not_a_float32_one() -> None:
    # 2^24 + one chunk of ones after a huge value: a float32 running sum would lose the ones.
    x = torch.ones(4096)
    x[0] = 2.0**24
    _bits, scales = ops.sign_compress(x, None, 4096)
    assert scales.item() == np.float32((2.0**24 + 4095) / 4096)


def _order_sensitive_inputs() -> list[tuple[np.ndarray, int, float]]:
    """(x, chunk, expected scale * chunk): float64 sums that land on a float32 midpoint, where
    the order of additions decides the rounding (random data almost never shows the order)."""
    # 1 + 2^-24 is a float32 midpoint. Adding 2^-53 to it is itself a tie and leaves it, so two
    # such terms added one by one vanish (rounds down to 1), while added to each other first they
    # survive (rounds up to 1 + 2^-23). Chunks are powers of two, so the division is exact.
    lanes = np.zeros(64, np.float32)
    lanes[[0, 32]] = [1.0, 2.0**-24]  # lane 0
    lanes[[8, 24]] = 2.0**-53  # lanes 8 and 24 meet in the tree before joining lane 0: up
    segments = np.zeros(8192, np.float32)
    segments[[0, 32]] = [1.0, 2.0**-24]  # segment 0
    segments[[2048, 4096]] = 2.0**-53  # segments 1 and 2, added to the total one by one: down
    return [(lanes, 64, 1.0 + 2.0**-23), (segments, 8192, 1.0)]


@pytest.mark.parametrize("simd", ["auto", "scalar"])
def test_scales_follow_the_documented_float64_order(simd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_RT_ONEBIT_SIMD", simd)
    for x, chunk, times_chunk in _order_sensitive_inputs():
        np.testing.assert_array_equal(ref.scales_in_documented_order(x, chunk) * chunk, [times_chunk])
        for sign in (1.0, -1.0):
            _bits, scales = ops.sign_compress(torch.from_numpy(sign * x), None, chunk)
            assert scales.item() * chunk == np.float32(times_chunk)
            _bits, scales = ops.sign_compress(torch.zeros(chunk), torch.from_numpy(sign * x), chunk)
            assert scales.item() * chunk == np.float32(times_chunk)


def test_any_shape_is_flattened() -> None:
    x = rand(3 * 5 * 7, 1).reshape(3, 5, 7)
    error = rand(105, 2).reshape(15, 7)
    check_compress(x, error, 10)


def test_signs_of_zero_nan_and_padding_bits() -> None:
    x = torch.tensor([0.0, -0.0, float("nan"), -1.0, 1.0, float("-inf"), 2.0, -2.0, 5.0, -0.0, 3.0])
    bits, _ = ops.sign_compress(x, None, 4)
    # element order 0..7 -> bits 0..7 of byte 0: 1,1,0,0,1,0,1,0; byte 1: 1,1,1 then zero padding
    assert bits.tolist() == [0b01010011, 0b00000111]


def test_simd_and_portable_loops_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 100_003
    x = rand(n, 3)
    x[::97] = 0.0
    x[5::101] = -0.0
    for chunk in (1, 7, 2048, 3000):
        results = []
        for simd in ("auto", "scalar"):
            monkeypatch.setenv("AUTOGLM_RT_ONEBIT_SIMD", simd)
            error = rand(n, 4, 0.2)
            bits, scales = ops.sign_compress(x, error, chunk)
            out = ops.sign_decompress(
                torch.stack([bits, bits.flip(0)]), torch.stack([scales, scales]), torch.empty(n), chunk
            )
            results.append((bits, scales, error, out))
        for a, b in zip(results[0], results[1], strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_error_feedback_identity() -> None:
    n, chunk = 200_003, 2048
    x = rand(n, 11)
    error = rand(n, 12, 0.1)
    c = x + error
    bits, scales = ops.sign_compress(x, error, chunk)
    d = ops.sign_decompress(bits, scales, torch.empty(n), chunk)
    # error = c - d rounded once, and d + error rounds once more: each rounding is at most half an
    # ulp of a value no larger than |c| + |d|, i.e. (|c| + |d|) * 2^-24.
    tol = (c.abs() + d.abs()) * 2.0**-23
    assert bool(((d.double() + error.double()) - c.double()).abs().le(tol.double()).all())
    assert bool(((d + error).double() - c.double()).abs().le(tol.double()).all())
    assert torch.equal(error, c - d)  # the stored error is exactly c - d in float32


@pytest.mark.parametrize("chunk", [7, 2048])
def test_deterministic_across_thread_counts(chunk: int) -> None:
    n = 3_000_001
    x = rand(n, 21)
    results = []
    old = autoglm_rt.num_threads()
    try:
        for threads in (1, 2, 3):
            autoglm_rt.set_num_threads(threads)
            error = rand(n, 22, 0.5)
            bits, scales = ops.sign_compress(x, error, chunk)
            rows = torch.stack([bits, bits.roll(1), bits.roll(2)])
            out = ops.sign_decompress(rows, torch.stack([scales] * 3), torch.empty(n), chunk, scale=1 / 3)
            results.append((bits, scales, error, out))
    finally:
        autoglm_rt.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    ref_bits, ref_scales, ref_after = ref.compress_reference(x.numpy(), rand(n, 22, 0.5).numpy(), chunk)
    np.testing.assert_array_equal(results[0][0].numpy(), ref_bits)
    np.testing.assert_array_equal(results[0][1].numpy(), ref_scales)
    np.testing.assert_array_equal(results[0][2].numpy(), ref_after)


def test_outputs_can_be_views_into_one_message_buffer() -> None:
    n, chunk = 10_007, 512
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    msg = torch.full((4 * nc + nbytes,), 0xAB, dtype=torch.uint8)
    x, e1 = rand(n, 5), rand(n, 6, 0.2)
    e2 = e1.clone()
    scales_out, bits_out = msg[: 4 * nc].view(torch.float32), msg[4 * nc :]
    bits, scales = ops.sign_compress(x, e1, chunk, bits_out=bits_out, scales_out=scales_out)
    assert bits.data_ptr() == bits_out.data_ptr() and scales.data_ptr() == scales_out.data_ptr()
    fresh_bits, fresh_scales = ops.sign_compress(x, e2, chunk)
    assert torch.equal(bits, fresh_bits) and torch.equal(scales, fresh_scales) and torch.equal(e1, e2)


@pytest.mark.parametrize("world", [1, 2, 5])
@pytest.mark.parametrize(("n", "chunk"), [(1, 1), (13, 3), (2048, 2048), (100_003, 2048), (100_003, 37)])
def test_decompress_rows_of_a_gathered_buffer_match_reference(world: int, n: int, chunk: int) -> None:
    gathered = gathered_messages(world, n, chunk)
    bits, scales = message_fields(gathered, n, chunk)
    assert not bits.is_contiguous() or world == 1
    before = gathered.clone()
    out = ops.sign_decompress(bits, scales, torch.empty(n), chunk, scale=1.0 / world)
    expected = ref.decompress_reference(bits.numpy(), scales.numpy(), n, chunk, 1.0 / world)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert torch.equal(gathered, before)
    # The same rows passed contiguous give the same bits.
    again = ops.sign_decompress(bits.contiguous(), scales.contiguous(), torch.empty(n), chunk, scale=1.0 / world)
    assert torch.equal(out, again)
    if world == 1:
        one = ops.sign_decompress(bits[0], scales[0], torch.empty(n), chunk, scale=1.0)
        np.testing.assert_array_equal(one.numpy(), ref.decoded(bits[0].numpy(), scales[0].numpy(), n, chunk))


def test_decompress_adds_rows_in_order_in_float32() -> None:
    # Row 0: +1e8, row 1: +1, row 2: -1e8. In order: (1e8 + 1) rounds to 1e8, minus 1e8 is 0;
    # any other order (or a float64 sum) would give 1.
    bits = torch.tensor([[0b1], [0b1], [0b0]], dtype=torch.uint8)
    scales = torch.tensor([[1e8], [1.0], [1e8]])
    out = ops.sign_decompress(bits, scales, torch.empty(1), 1)
    assert out.item() == 0.0
    assert ref.decompress_reference(bits.numpy(), scales.numpy(), 1, 1, 1.0)[0] == 0.0
    reordered = ops.sign_decompress(bits[[0, 2, 1]], scales[[0, 2, 1]], torch.empty(1), 1)
    assert reordered.item() == 1.0


def test_decompress_writes_only_its_view_of_a_larger_buffer() -> None:
    n, chunk = 5003, 64
    bits, scales = ops.sign_compress(rand(n, 9), None, chunk)
    big = torch.full((n + 20,), 7.0)
    out = big[5 : 5 + n]
    res = ops.sign_decompress(bits, scales, out, chunk, scale=2)
    assert res is out
    np.testing.assert_array_equal(
        big[5 : 5 + n].numpy(), ref.decompress_reference(bits.numpy(), scales.numpy(), n, chunk, 2.0)
    )
    assert bool((big[:5] == 7.0).all()) and bool((big[5 + n :] == 7.0).all())
    shaped = ops.sign_decompress(bits[:8], scales[:1], torch.empty(4, 16), chunk)  # 64 elements, any shape
    np.testing.assert_array_equal(
        shaped.reshape(-1).numpy(), ref.decoded(bits[:8].numpy(), scales[:1].numpy(), 64, chunk)
    )


def test_nan_and_inf_stay_in_their_chunk() -> None:
    n, chunk = 10_000, 1000
    x = rand(n, 31)
    error = rand(n, 32, 0.1)
    x[1500] = float("nan")
    x[3200] = float("inf")
    error[7001] = float("-inf")
    before_e = error.clone()
    bits, scales = check_compress(x, error, chunk)
    s = scales.numpy()
    assert np.isnan(s[1]) and s[3] == np.inf and s[7] == np.inf
    assert np.isfinite(np.delete(s, [1, 3, 7])).all()
    bad = ~np.isfinite(error.numpy())
    chunks_hit = set(np.nonzero(bad)[0] // chunk)
    assert chunks_hit == {1, 3, 7}
    assert not ref.unpack_signs(bits.numpy(), n)[1500]  # NaN sends a 0 bit
    others = np.ones(n, dtype=bool)
    for j in (1, 3, 7):
        others[j * chunk : (j + 1) * chunk] = False
    c = (x + before_e).numpy()
    np.testing.assert_array_equal(bits.numpy(), ref.pack_signs(c))
    assert np.isfinite(error.numpy()[others]).all()


def test_empty_input() -> None:
    x = torch.empty(0)
    error = torch.empty(0)
    bits, scales = ops.sign_compress(x, error, 2048)
    assert bits.shape == (0,) and scales.shape == (0,) and bits.dtype == torch.uint8
    out = ops.sign_decompress(bits, scales, torch.empty(0), 2048)
    assert out.numel() == 0
    out = ops.sign_decompress(torch.empty(3, 0, dtype=torch.uint8), torch.empty(3, 0), torch.empty(0), 5)
    assert out.numel() == 0


def test_no_rows_decodes_to_zeros() -> None:
    out = ops.sign_decompress(torch.empty(0, 2, dtype=torch.uint8), torch.empty(0, 3), torch.full((10,), 9.0), 4)
    assert torch.equal(out, torch.zeros(10))


def test_message_sizes() -> None:
    assert ops.sign_message_sizes(0, 5) == (0, 0)
    assert ops.sign_message_sizes(1, 5) == (1, 1)
    assert ops.sign_message_sizes(17, 8) == (3, 3)
    assert ops.sign_message_sizes(2**24, 2048) == (2**21, 2**13)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="chunk"):
            ops.sign_message_sizes(10, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="numel"):
        ops.sign_message_sizes(-1, 5)


def _snapshot(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.clone() for t in ts]


def _unchanged(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and torch.equal(x.view(torch.uint8), y.view(torch.uint8)))
        for x, y in zip(a, b, strict=True)
    )


def test_compress_refuses_bad_input_before_writing_anything() -> None:
    n, chunk = 100, 16
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    x = rand(n, 1)
    error = rand(n, 2)
    bits_out = torch.full((nbytes,), 0x5A, dtype=torch.uint8)
    scales_out = torch.full((nc,), -3.0)
    msg = torch.full((4 * nc + nbytes,), 0x11, dtype=torch.uint8)
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (TypeError, r"^x: expected a torch.Tensor, got ndarray$", {"x": np.ones(n, np.float32)}),
        (TypeError, r"^error: expected a torch.Tensor, got list$", {"error": [0.0] * n}),
        (TypeError, r"^x: expected dtype float32, got float64$", {"x": x.double()}),
        (TypeError, r"^error: expected dtype float32, got float16$", {"error": error.half()}),
        (TypeError, r"^x: expected a contiguous tensor", {"x": rand(2 * n, 3)[::2]}),
        (TypeError, r"^error: expected a contiguous tensor", {"error": rand(2 * n, 3)[::2]}),
        (ValueError, r"^chunk: expected an int >= 1, got 0$", {"chunk": 0}),
        (ValueError, r"^chunk: expected an int >= 1, got -3$", {"chunk": -3}),
        (ValueError, r"^chunk: expected an int >= 1, got True$", {"chunk": True}),
        (ValueError, r"^chunk: expected an int >= 1, got 16.0$", {"chunk": 16.0}),
        (ValueError, r"^sign_compress: error has 99 elements, x has 100$", {"error": rand(99, 4)}),
        (
            TypeError,
            r"^bits_out: expected dtype uint8, got int32$",
            {"bits_out": torch.zeros(nbytes, dtype=torch.int32)},
        ),
        (
            TypeError,
            r"^scales_out: expected dtype float32, got float64$",
            {"scales_out": torch.zeros(nc, dtype=torch.float64)},
        ),
        (
            ValueError,
            r"^sign_compress: bits_out has 12 bytes, expected ceil\(100 / 8\) = 13$",
            {"bits_out": torch.zeros(12, dtype=torch.uint8)},
        ),
        (
            ValueError,
            r"^sign_compress: scales_out has 8 elements, expected ceil\(100 / 16\) = 7$",
            {"scales_out": torch.zeros(8)},
        ),
        (
            TypeError,
            r"^bits_out: expected a contiguous tensor",
            {"bits_out": torch.zeros(2 * nbytes, dtype=torch.uint8)[::2]},
        ),
        (TypeError, r"^scales_out: expected a torch.Tensor, got int$", {"scales_out": 5}),
        (ValueError, r"^sign_compress: error overlaps x in memory", {"error": x}),
        (
            ValueError,
            r"^sign_compress: bits_out overlaps error in memory",
            {"bits_out": error.view(torch.uint8)[:nbytes]},
        ),
        (
            ValueError,
            r"^sign_compress: scales_out overlaps bits_out in memory",
            {"bits_out": msg[4 * nc - 4 : 4 * nc - 4 + nbytes], "scales_out": msg[: 4 * nc].view(torch.float32)},
        ),
        (ValueError, r"^sign_compress: scales_out overlaps x in memory", {"scales_out": x[:nc]}),
    ]
    for exc, match, override in cases:
        kwargs: dict[str, object] = {
            "x": x,
            "error": error,
            "chunk": chunk,
            "bits_out": bits_out,
            "scales_out": scales_out,
        }
        kwargs.update(override)
        before = _snapshot(x, error, bits_out, scales_out, msg)
        with pytest.raises(exc, match=match):
            ops.sign_compress(**kwargs)  # type: ignore[arg-type]
        assert _unchanged(before, _snapshot(x, error, bits_out, scales_out, msg)), override


def test_compress_refuses_a_read_only_error() -> None:
    x = np.ones(10, np.float32)
    error = np.zeros(10, np.float32)
    error.flags.writeable = False
    with pytest.raises((TypeError, ValueError), match="error"):
        autoglm_rt._C.sign_compress(x, error, 4, np.zeros(2, np.uint8), np.zeros(3, np.float32))
    assert not error.any()


def test_decompress_refuses_bad_input_before_writing_anything() -> None:
    n, chunk = 100, 16
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    bits, scales = ops.sign_compress(rand(n, 1), None, chunk)
    rows_b, rows_s = torch.stack([bits, bits]), torch.stack([scales, scales])
    out = torch.full((n,), 4.0)
    msg = torch.zeros(4 * n + 64, dtype=torch.uint8)
    shared = torch.zeros(2 * nc + n)
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (TypeError, r"^bits: expected a torch.Tensor, got bytes$", {"bits": b"\x00" * nbytes}),
        (TypeError, r"^out: expected a torch.Tensor, got ndarray$", {"out": np.zeros(n, np.float32)}),
        (TypeError, r"^bits: expected dtype uint8, got int8$", {"bits": rows_b.to(torch.int8)}),
        (TypeError, r"^scales: expected dtype float32, got float64$", {"scales": rows_s.double()}),
        (TypeError, r"^out: expected dtype float32, got float16$", {"out": torch.zeros(n, dtype=torch.float16)}),
        (TypeError, r"^out: expected a contiguous tensor", {"out": torch.zeros(2 * n)[::2]}),
        (
            TypeError,
            r"^bits: expected each row contiguous \(inner stride 1\), got inner stride 2",
            {"bits": torch.zeros(2, 2 * nbytes, dtype=torch.uint8)[:, ::2]},
        ),
        (TypeError, r"^scales: expected rows that do not overlap", {"scales": scales.expand(2, nc)}),
        (
            ValueError,
            r"^bits: expected a 1-D tensor \(one row\) or a 2-D tensor of rows, got 3 dimensions",
            {"bits": rows_b.reshape(2, 1, nbytes)},
        ),
        (ValueError, r"^chunk: expected an int >= 1, got 0$", {"chunk": 0}),
        (ValueError, r"^sign_decompress: bits has 2 rows, scales has 3", {"scales": torch.stack([scales] * 3)}),
        (ValueError, r"^sign_decompress: bits has 1 rows, scales has 2", {"bits": bits}),
        (
            ValueError,
            r"^sign_decompress: bits rows have 13 bytes, expected ceil\(120 / 8\) = 15 for out's 120",
            {"out": torch.zeros(120)},
        ),
        (ValueError, r"^sign_decompress: scales rows have 7 elements, expected ceil\(100 / 20\) = 5", {"chunk": 20}),
        (
            ValueError,
            r"^sign_decompress: out overlaps bits in memory",
            {"bits": msg[:nbytes], "scales": torch.zeros(nc), "out": msg[8 : 8 + 4 * n].view(torch.float32)},
        ),
        (
            ValueError,
            r"^sign_decompress: out overlaps scales in memory",
            {"scales": shared[: 2 * nc].view(2, nc), "out": shared[2 * nc - 1 : 2 * nc - 1 + n]},
        ),
        (TypeError, r"^scale: expected a float, got bool$", {"scale": True}),
        (TypeError, r"^scale: expected a float, got str$", {"scale": "2"}),
    ]
    for exc, match, override in cases:
        kwargs: dict[str, object] = {"bits": rows_b, "scales": rows_s, "out": out, "chunk": chunk}
        kwargs.update(override)
        before = _snapshot(out, rows_b, rows_s, msg, shared)
        with pytest.raises(exc, match=match):
            ops.sign_decompress(**kwargs)  # type: ignore[arg-type]
        assert _unchanged(before, _snapshot(out, rows_b, rows_s, msg, shared)), override


def test_refusal_messages_are_one_line() -> None:
    calls: list[Callable[[], object]] = [
        lambda: ops.sign_compress(torch.ones(10), torch.ones(9), 4),
        lambda: ops.sign_compress(torch.ones(10), None, 4, bits_out=torch.zeros(3, dtype=torch.uint8)),
        lambda: ops.sign_decompress(torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(3, 3), torch.zeros(10), 4),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)


def test_decompress_accepts_numpy_rows_through_the_native_boundary() -> None:
    # The boundary speaks DLPack: numpy rows of a gathered buffer work without torch as well.
    n, chunk = 1000, 100
    nbytes, nc = ops.sign_message_sizes(n, chunk)
    bits, scales = ops.sign_compress(rand(n, 3), None, chunk)
    gathered = np.zeros((2, -(-(4 * nc + nbytes) // 4) * 4 + 4), dtype=np.uint8)
    for r in range(2):
        gathered[r, : 4 * nc] = scales.numpy().view(np.uint8)
        gathered[r, 4 * nc : 4 * nc + nbytes] = bits.numpy()
    out = np.empty(n, np.float32)
    autoglm_rt._C.sign_decompress(
        gathered[:, 4 * nc : 4 * nc + nbytes], gathered[:, : 4 * nc].view(np.float32), out, chunk, 0.5
    )
    np.testing.assert_array_equal(
        out, ref.decompress_reference(np.stack([bits.numpy()] * 2), np.stack([scales.numpy()] * 2), n, chunk, 0.5)
    )
