"""topk_compress's one-pass path (tensors from 2^18 elements) at the densities DDP uses, on both
inner loops: the AVX2 float32 loop and the portable one that AUTOGLM_RT_TOPK_SIMD=scalar forces
(and that float16/bfloat16 always take). Each case is checked against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_rt import ops
from tests.test_topk import check_against_reference
from tests.topk_reference import topk_reference

LOOPS = ["auto", "scalar"]
N = 600_011  # not a multiple of 8 or of the 128-entry block: every chunk ends in a tail


@pytest.fixture(params=LOOPS)
def inner_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "scalar":
        monkeypatch.setenv("AUTOGLM_RT_TOPK_SIMD", "scalar")
    else:
        monkeypatch.delenv("AUTOGLM_RT_TOPK_SIMD", raising=False)
    return str(request.param)


def _normal(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32))


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.3])
def test_densities_with_and_without_residual(inner_loop: str, density: float) -> None:
    k = int(N * density)
    check_against_reference(_normal(N, 1), _normal(N, 2, 0.3), k)
    check_against_reference(_normal(N, 3), None, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_at_ten_percent(inner_loop: str, dtype: torch.dtype) -> None:
    check_against_reference(_normal(N, 4).to(dtype), _normal(N, 5, 0.3).to(dtype), N // 10, value_dtype=dtype)


def test_int64_indices_and_half_values(inner_loop: str) -> None:
    g, residual = _normal(N, 6), _normal(N, 7, 0.1)
    chosen, ref_values, ref_after = topk_reference(g, residual, N // 10, torch.float16)
    values = torch.empty(N // 10, dtype=torch.float16)
    indices = torch.empty(N // 10, dtype=torch.int64)
    ops.topk_compress(g, residual, N // 10, values_out=values, indices_out=indices)
    np.testing.assert_array_equal(indices.numpy(), chosen)
    assert torch.equal(values, ref_values) and torch.equal(residual, ref_after)


def test_nan_payloads_and_inf_in_the_kept_set(inner_loop: str) -> None:
    # Several NaN bit patterns (quiet, negative, large payload) and infinities spread over the
    # tensor: NaN ranks above +Inf whatever its bits, and with 12% NaN at density 0.1 the bounds
    # both sit at the NaN key, so the ties among NaNs decide (lowest indices first).
    rng = np.random.default_rng(8)
    bits = rng.standard_normal(N).astype(np.float32).view(np.uint32)
    where = rng.choice(N, size=N * 12 // 100, replace=False)
    bits[where] = rng.choice(np.array([0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFC00123], dtype=np.uint32), where.size)
    bits[rng.choice(N, size=500, replace=False)] = 0x7F800000  # +Inf (may overwrite a NaN)
    g = torch.from_numpy(bits.view(np.float32).copy())
    for k in (N // 100, N // 10, N // 5):
        check_against_reference(g, _normal(N, 9, 0.1), k)
        check_against_reference(g, None, k)


def test_heavy_ties_at_ten_percent(inner_loop: str) -> None:
    rng = np.random.default_rng(10)
    g = torch.from_numpy(rng.integers(-20, 21, size=N).astype(np.float32))
    for k in (N // 100, N // 10):
        check_against_reference(g, torch.zeros(N), k)


def test_uneven_layers_grow_the_kept_lists(inner_loop: str) -> None:
    # A DDP bucket holds layers of different scales: the chunks over the large layer keep several
    # times the sampled fraction (their lists grow, or the exact fallback takes over).
    g = _normal(N, 11)
    g[: N // 20] *= 3.0
    g[N // 2 : N // 2 + 70_000] *= 50.0
    for k in (N // 100, N // 10):
        check_against_reference(g, _normal(N, 12, 0.1), k)


def test_both_inner_loops_give_identical_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    g, residual = _normal(N, 13), _normal(N, 14, 0.2)
    results = []
    for loop in LOOPS:
        if loop == "scalar":
            monkeypatch.setenv("AUTOGLM_RT_TOPK_SIMD", "scalar")
        else:
            monkeypatch.delenv("AUTOGLM_RT_TOPK_SIMD", raising=False)
        res = residual.clone()
        values, indices = ops.topk_compress(g, res, N // 10)
        results.append((values, indices, res))
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)


def test_forked_child_can_compress_while_parent_threads_do() -> None:
    # The kept-list cache's lock may be held by another thread at the moment of a fork; the child
    # must start with a fresh cache rather than wait forever on a lock no thread will release.
    import os
    import threading
    import time

    grad = torch.randn(1 << 20)
    stop = threading.Event()

    def hammer() -> None:
        residual = torch.zeros_like(grad)
        while not stop.is_set():
            ops.topk_compress(grad, residual, 10_000)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # child: one compress, checked against the parent-independent reference
                try:
                    import faulthandler

                    faulthandler.dump_traceback_later(20, exit=True)
                    values, indices = ops.topk_compress(grad, None, 1000)
                    # numpy, not torch: torch's OpenMP pool is not usable in a forked child.
                    mags = np.abs(grad.numpy())
                    ref = np.sort(np.argsort(-mags, kind="stable")[:1000])
                    ok = np.array_equal(indices.numpy(), ref) and np.array_equal(values.numpy(), grad.numpy()[ref])
                    os._exit(0 if ok else 1)
                finally:
                    os._exit(2)
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    raise AssertionError("the forked child hung in topk_compress")
                time.sleep(0.01)
    finally:
        stop.set()
        worker.join()
