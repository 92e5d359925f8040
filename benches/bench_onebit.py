"""pytest-benchmark: fused 1-bit (sign) compression and its inverse vs the torch pipeline of
``ratios_onebit.py``; each asserts that both produce the same message. Error feedback rewrites
the error, so every round gets a fresh copy through ``setup=`` (outside the timing). The side by
side ratios, on one and on all threads, come from ``benches/run_ratios.py onebit``. The 1-bit
Adam step (fused ops vs the hook's former torch + sign-op sequence) asserts that the fused result
equals that sequence built without a fused multiply-add, bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from autoglm_rt import ops

_spec = importlib.util.spec_from_file_location("ratios_onebit", Path(__file__).with_name("ratios_onebit.py"))
assert _spec and _spec.loader
ratios_onebit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ratios_onebit)

N = 1 << 20
CHUNK = ratios_onebit.CHUNK


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=gen), 0.1 * torch.randn(N, generator=gen)


def test_sign_compress(benchmark) -> None:  # type: ignore[no-untyped-def]
    x, error = _inputs()
    bits, scales = benchmark.pedantic(
        ops.sign_compress, setup=lambda: ((x, error.clone(), CHUNK), {}), rounds=3, iterations=1
    )
    ref_bits, ref_scales = ratios_onebit.torch_compress(x, error.clone(), CHUNK)
    assert torch.equal(bits, ref_bits)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)


def test_torch_compress_baseline(benchmark) -> None:  # type: ignore[no-untyped-def]
    x, error = _inputs()
    bits, _scales = benchmark.pedantic(
        ratios_onebit.torch_compress, setup=lambda: ((x, error.clone(), CHUNK), {}), rounds=3, iterations=1
    )
    assert torch.equal(bits, ops.sign_compress(x, error.clone(), CHUNK)[0])


@pytest.mark.parametrize("world", [1, 4])
def test_sign_decompress(benchmark, world: int) -> None:  # type: ignore[no-untyped-def]
    x, error = _inputs()
    bits, scales = ops.sign_compress(x, error, CHUNK)
    rows_b = torch.stack([bits.roll(r) for r in range(world)])
    rows_s = torch.stack([scales.roll(r) for r in range(world)])
    out = benchmark(lambda: ops.sign_decompress(rows_b, rows_s, torch.empty(N), CHUNK, scale=1 / world))
    expected = torch.empty(N)
    ratios_onebit.torch_decompress(rows_b, rows_s, expected, CHUNK, 1 / world)
    assert torch.equal(out, expected)


def test_torch_decompress_baseline(benchmark) -> None:  # type: ignore[no-untyped-def]
    x, error = _inputs()
    bits, scales = ops.sign_compress(x, error, CHUNK)
    out = torch.empty(N)
    benchmark(lambda: ratios_onebit.torch_decompress(bits[None], scales[None], out, CHUNK, 1.0))
    assert torch.equal(out, ops.sign_decompress(bits, scales, torch.empty(N), CHUNK))


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_onebit_adam_step(benchmark) -> None:  # type: ignore[no-untyped-def]
    state = ratios_onebit.adam_state(N, "cpu")
    benchmark.pedantic(ratios_onebit.fused_adam_step, setup=lambda: ((state.clone(),), {}), rounds=3, iterations=1)
    fused, exact = state.clone(), state.clone()
    ratios_onebit.fused_adam_step(fused)
    ratios_onebit.unfused_adam_step_without_fma(exact)
    for a, b in zip(
        (fused.g, fused.u, fused.e, fused.bits, fused.scales),
        (exact.g, exact.u, exact.e, exact.bits, exact.scales),
        strict=True,
    ):
        assert _bitwise(a, b)
    torch.testing.assert_close(fused.sq, exact.sq, rtol=1e-5, atol=0)  # float64 sum vs torch.dot's float32


def test_unfused_adam_step_baseline(benchmark) -> None:  # type: ignore[no-untyped-def]
    state = ratios_onebit.adam_state(N, "cpu")
    benchmark.pedantic(ratios_onebit.unfused_adam_step, setup=lambda: ((state.clone(),), {}), rounds=3, iterations=1)
    hook, fused = state.clone(), state.clone()
    ratios_onebit.unfused_adam_step(hook)
    ratios_onebit.fused_adam_step(fused)
    # The hook's add_(u, alpha=beta1) rounds once less (a fused multiply-add): the momentum differs
    # in the last bit here and there, so scales agree closely and a sign flips only where c ~ 0.
    torch.testing.assert_close(hook.scales, fused.scales, rtol=1e-5, atol=0)
    assert int((hook.bits != fused.bits).sum()) <= 16
