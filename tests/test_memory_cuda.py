"""The CUDA pool from Python on a GPU: cupy arrays served by memory.cupy_allocator (the data
round-trips through pool memory, torch reads it in place through DLPack), and a pool used from a
thread that has never touched CUDA. Skipped without a usable CUDA device (run by
benches/gpu_check.sh)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from autoglm_rt import memory

pytestmark = pytest.mark.cuda

MiB = 1 << 20


def test_cupy_allocator_serves_cupy_arrays_from_the_pool() -> None:
    # cupy's own import-time warnings (e.g. about locating a CUDA toolkit) are not this test's
    # subject: shown, not turned into errors by the suite's filterwarnings=error.
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        import cupy

    alloc = memory.cupy_allocator(0, limit="256Mi")
    pool = alloc.pool  # type: ignore[attr-defined]
    previous = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(alloc)
    try:
        live_before = pool.stats()["num_live_blocks"]
        host = np.arange(3_000_000, dtype=np.float32)
        arrays = [cupy.asarray(host + i) for i in range(4)]  # host-to-device copies into pool blocks
        s = pool.stats()
        assert s["num_live_blocks"] >= live_before + 4 and s["allocated_bytes"] >= 4 * host.nbytes
        for i, a in enumerate(arrays):
            np.testing.assert_array_equal(a.get(), host + i)
        # torch reads the same pool memory in place: no copy, same address.
        t = torch.from_dlpack(arrays[2])
        assert t.data_ptr() == arrays[2].data.ptr
        assert float(t.double().sum()) == float((host.astype(np.float64) + 2).sum())
        del t
        del arrays
        cupy.cuda.Device(0).synchronize()
        s = pool.stats()
        assert s["num_live_blocks"] == live_before and s["num_frees"] >= 4
        with pytest.raises(MemoryError, match="limit"):  # the pool's OutOfMemoryError is a MemoryError
            cupy.empty(300 * MiB, dtype=cupy.uint8)  # above the pool's 256 MiB limit
        pool.check()
    finally:
        cupy.cuda.set_allocator(previous)


def test_pool_from_a_thread_that_never_used_cuda() -> None:
    # The VMM upstream must make its device current itself: a fresh thread has no CUDA context.
    pool = memory.CachingPool("cuda:0", limit="512Mi")
    errors: list[BaseException] = []
    done: list[int] = []

    def work() -> None:
        try:
            p = pool.allocate(64 * MiB)
            q = pool.allocate(3 * MiB)
            pool.deallocate(q)
            pool.deallocate(p)
            done.append(pool.trim())
            pool.check()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not errors, errors
    assert done and done[0] > 0
    assert pool.stats()["reserved_bytes"] == 0


def test_vmm_probe_result_is_reported() -> None:
    pool = memory.CachingPool("cuda:0")
    if pool.upstream == "cuda-vmm":
        assert pool.upstream_fallback_reason == ""
    else:  # the probe failed: the reason says which driver call, and segments still work
        assert pool.upstream_fallback_reason
        pool.deallocate(pool.allocate(3 * MiB))
    assert memory.CachingPool("cuda:0", expandable=False).upstream_fallback_reason == ""


def test_kernel_scratch_is_counted_and_freed_on_its_stream() -> None:
    from autoglm_rt.ops import topk

    before = memory.cuda_scratch_stats()
    grad = torch.randn(1 << 20, device="cuda")
    residual = torch.zeros_like(grad)
    topk.topk_compress(grad, residual, 1000)
    torch.cuda.synchronize()
    after = memory.cuda_scratch_stats()
    assert after["allocations"] > before["allocations"]
    assert after["live_bytes"] == before["live_bytes"] == 0
    assert after["peak_bytes"] > 0 and after["keep_bytes"] == 64 * MiB
