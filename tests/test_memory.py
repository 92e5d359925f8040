"""autoglm_rt.memory.CachingPool: real memory, limits, stats, errors, threads (CPU); the same
basic contract on CUDA where a device exists."""

from __future__ import annotations

import ctypes
import itertools
import random
import threading

import pytest

from autoglm_rt import memory
from autoglm_rt.memory import CachingPool, OutOfMemoryError

MiB = 2**20


def fill(ptr: int, nbytes: int, byte: int) -> None:
    ctypes.memset(ptr, byte, nbytes)


def holds(ptr: int, nbytes: int, byte: int) -> bool:
    return ctypes.string_at(ptr, nbytes) == bytes([byte]) * nbytes


def test_stats_keys_are_stable_and_typed() -> None:
    pool = CachingPool()
    s = pool.stats()
    assert set(memory.STATS_KEYS) <= set(s)
    assert s["limit_bytes"] is None
    for key in memory.STATS_KEYS:
        if key not in ("limit_bytes", "fragmentation_ratio"):
            assert isinstance(s[key], int) and s[key] == 0, key
    assert s["fragmentation_ratio"] == 0.0


def test_allocations_are_real_aligned_and_disjoint() -> None:
    pool = CachingPool("cpu")
    sizes = [1, 7, 256, 1000, 4096, 300_000, 3 * MiB]
    ptrs = [pool.allocate(n) for n in sizes]
    for i, (p, n) in enumerate(zip(ptrs, sizes, strict=True)):
        assert p % 256 == 0
        assert pool.block_size(p) >= n
        fill(p, n, i + 1)
    for i, (p, n) in enumerate(zip(ptrs, sizes, strict=True)):
        assert holds(p, n, i + 1)  # no block overlaps another
    spans = sorted((p, p + pool.block_size(p)) for p in ptrs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    s = pool.stats()
    assert s["requested_bytes"] == sum(sizes)
    assert s["allocated_bytes"] == sum(pool.block_size(p) for p in ptrs)
    assert s["num_allocs"] == len(sizes)
    for p in ptrs:
        pool.deallocate(p)
    pool.check()
    s = pool.stats()
    assert s["allocated_bytes"] == 0 and s["requested_bytes"] == 0 and s["num_frees"] == len(sizes)
    assert s["peak_requested_bytes"] == sum(sizes)


def test_freed_memory_is_reused_without_upstream_calls() -> None:
    pool = CachingPool()
    p = pool.allocate(MiB)
    pool.deallocate(p)
    before = pool.stats()
    for _ in range(100):
        pool.deallocate(pool.allocate(MiB))
    after = pool.stats()
    assert after["num_upstream_allocs"] == before["num_upstream_allocs"]
    assert after["num_cache_hits"] - before["num_cache_hits"] == 100


@pytest.mark.parametrize("expandable", [True, False])
def test_limit_raises_out_of_memory_with_numbers_and_keeps_pool_intact(expandable: bool) -> None:
    pool = CachingPool(limit="8Mi", expandable=expandable)
    assert pool.limit == 8 * MiB
    a = pool.allocate(6 * MiB)
    fill(a, 6 * MiB, 0x11)
    before = pool.stats()
    with pytest.raises(OutOfMemoryError) as info:
        pool.allocate(4 * MiB)
    assert isinstance(info.value, MemoryError)
    msg = str(info.value)
    for part in (f"requested {4 * MiB}", f"limit {8 * MiB}", "allocated", "reserved", "largest free block"):
        assert part in msg
    after = pool.stats()
    assert after["num_ooms"] == before["num_ooms"] + 1
    assert after["allocated_bytes"] == before["allocated_bytes"]
    assert after["reserved_bytes"] <= 8 * MiB
    assert holds(a, 6 * MiB, 0x11)
    pool.check()
    pool.deallocate(a)
    pool.deallocate(pool.allocate(8 * MiB))  # the whole limit is usable once the block is back


@pytest.mark.parametrize("expandable", [True, False])
def test_lowering_the_limit_releases_cache_at_once_and_never_live_blocks(expandable: bool) -> None:
    pool = CachingPool(expandable=expandable)
    live = [pool.allocate(MiB) for _ in range(4)]
    for i, p in enumerate(live):
        fill(p, MiB, 0x40 + i)
    spare = [pool.allocate(MiB) for _ in range(30)]
    for p in spare:
        pool.deallocate(p)
    reserved = pool.stats()["reserved_bytes"]
    assert reserved >= 34 * MiB
    pool.set_limit("16Mi")
    s = pool.stats()
    assert s["limit_bytes"] == 16 * MiB
    assert s["reserved_bytes"] < reserved
    if expandable:  # the arena's free tail goes back to the limit at once
        assert s["reserved_bytes"] <= 16 * MiB
    assert s["allocated_bytes"] == 4 * MiB
    # Below live usage: nothing live moves; growth beyond the cache is refused.
    pool.set_limit(MiB)
    assert all(holds(p, MiB, 0x40 + i) for i, p in enumerate(live))
    with pytest.raises(OutOfMemoryError):
        pool.allocate(pool.stats()["largest_free_block_bytes"] + 8 * MiB)
    for p in live:
        pool.deallocate(p)
    pool.set_limit(None)
    assert pool.limit is None
    released = pool.trim()
    assert released > 0 and pool.stats()["reserved_bytes"] == 0
    pool.check()


def test_trim_returns_released_bytes() -> None:
    pool = CachingPool()
    ps = [pool.allocate(MiB) for _ in range(8)]
    for p in ps:
        pool.deallocate(p)
    reserved = pool.stats()["reserved_bytes"]
    assert pool.trim() == reserved
    assert pool.stats()["reserved_bytes"] == 0
    assert pool.stats()["num_trims"] == 1
    assert pool.trim() == 0


def test_reset_peak_stats() -> None:
    pool = CachingPool()
    a = pool.allocate(4 * MiB)
    pool.deallocate(a)
    b = pool.allocate(1000)
    assert pool.stats()["peak_requested_bytes"] == 4 * MiB
    pool.reset_peak_stats()
    s = pool.stats()
    assert s["peak_requested_bytes"] == 1000
    assert s["peak_allocated_bytes"] == s["allocated_bytes"]
    assert s["peak_reserved_bytes"] == s["reserved_bytes"]
    pool.deallocate(b)


def test_fragmentation_ratio_matches_its_definition() -> None:
    pool = CachingPool(expandable=False)
    ps = [pool.allocate(4096) for _ in range(16)]
    for p in ps[::2]:
        pool.deallocate(p)
    s = pool.stats()
    cached = s["reserved_bytes"] - s["allocated_bytes"]
    assert s["fragmentation_ratio"] == pytest.approx(1 - s["largest_free_block_bytes"] / cached)
    assert 0 < s["fragmentation_ratio"] < 1
    for p in ps[1::2]:
        pool.deallocate(p)
    assert pool.stats()["fragmentation_ratio"] == 0.0  # everything merged back


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sizes_raise_value_error(bad: int) -> None:
    pool = CachingPool()
    with pytest.raises(ValueError, match="nbytes"):
        pool.allocate(bad)
    assert pool.stats()["num_allocs"] == 0


@pytest.mark.parametrize("bad", [2**48 + 1, 2**64, 2**80])
def test_absurd_sizes_raise_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="absurd"):
        CachingPool().allocate(bad)


@pytest.mark.parametrize("bad", [1.5, "10", None, True, float("nan")])
def test_wrong_types_raise_type_error(bad: object) -> None:
    pool = CachingPool()
    with pytest.raises(TypeError, match="nbytes"):
        pool.allocate(bad)  # type: ignore[arg-type]


def test_double_free_unknown_and_interior_pointers_leave_pool_intact() -> None:
    pool = CachingPool()
    a = pool.allocate(1000, stream=0)
    buf = ctypes.create_string_buffer(64)
    with pytest.raises(ValueError, match="not allocated by this pool"):
        pool.deallocate(ctypes.addressof(buf))
    with pytest.raises(ValueError, match="inside a block"):
        pool.deallocate(a + 16)
    with pytest.raises(ValueError, match="stream"):
        pool.deallocate(a, stream=5)
    for bad in (0, -8, 2**70):
        with pytest.raises(ValueError, match="not allocated by this pool"):
            pool.deallocate(bad)
    with pytest.raises(TypeError):
        pool.deallocate("0x10")  # type: ignore[arg-type]
    assert pool.stats()["num_frees"] == 0
    pool.check()
    pool.deallocate(a, stream=0)
    with pytest.raises(ValueError, match="double free"):
        pool.deallocate(a)
    pool.check()
    assert pool.stats()["num_frees"] == 1


def test_bad_limits_devices_and_options() -> None:
    with pytest.raises(ValueError, match="limit"):
        CachingPool(limit="-3Gi")
    with pytest.raises(TypeError, match="limit"):
        CachingPool(limit=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        CachingPool("gpu")
    with pytest.raises(ValueError, match="device"):
        CachingPool("cuda:x")
    with pytest.raises(TypeError, match="device"):
        CachingPool(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown pool option"):
        CachingPool(blocksize=4)
    with pytest.raises(ValueError, match="round_bytes"):
        CachingPool(round_bytes=100)
    with pytest.raises(TypeError, match="expandable"):
        CachingPool(expandable="yes")
    with pytest.raises(TypeError, match="decommit: expected a bool"):
        CachingPool(decommit=1)
    pool = CachingPool(limit="1Gi")
    with pytest.raises(ValueError, match="limit"):
        pool.set_limit("lots")
    assert pool.limit == 2**30  # unchanged after the bad call


def test_streams_are_separate_free_lists_on_the_host() -> None:
    pool = CachingPool()
    a = pool.allocate(4096, stream=1)
    pool.deallocate(a, stream=1)
    assert pool.allocate(4096, stream=1) == a  # same stream: reused at once
    pool.deallocate(a, stream=1)
    b = pool.allocate(4096, stream=2)  # host memory has no pending work: moves to stream 2
    fill(b, 4096, 7)
    pool.deallocate(b)  # the block's own stream is used when none is given
    pool.check()


@pytest.mark.parametrize("decommit", [False, True])
@pytest.mark.parametrize("granularity", ["64Ki", "2Mi"])  # 2 MiB: small blocks in chunks (CUDA VMM's layout)
def test_random_operations_against_a_reference_model(granularity: str, decommit: bool) -> None:
    rng = random.Random(7)
    pool = CachingPool(limit="32Mi", granularity=granularity, decommit=decommit)
    live: dict[int, tuple[int, int]] = {}
    requested = peak = 0
    for step in range(3000):
        r = rng.random()
        if r < 0.55:
            n = rng.choice([rng.randint(1, 512), rng.randint(1, 65536), rng.randint(1, 4 * MiB)])
            before = pool.stats()
            try:
                p = pool.allocate(n)
            except OutOfMemoryError:
                after = pool.stats()
                assert before["limit_bytes"] is not None
                assert after["allocated_bytes"] == before["allocated_bytes"]
                assert after["num_ooms"] == before["num_ooms"] + 1
                continue
            assert p not in live
            tag = step % 251
            ctypes.memset(p, tag, min(n, 64))
            live[p] = (n, tag)
            requested += n
            peak = max(peak, requested)
        elif r < 0.98 and live:
            p = rng.choice(list(live))
            n, tag = live.pop(p)
            assert holds(p, min(n, 64), tag)
            pool.deallocate(p)
            requested -= n
        elif r < 0.99:
            pool.set_limit(rng.choice([None, "16Mi", "32Mi", "64Mi"]))
        else:
            pool.trim()
        s = pool.stats()
        assert s["requested_bytes"] == requested
        assert s["num_live_blocks"] == len(live)
        if step % 100 == 0:
            pool.check()
    assert pool.stats()["peak_requested_bytes"] == peak
    for p in list(live):
        pool.deallocate(p)
    pool.check()


def test_threads_share_one_pool() -> None:
    pool = CachingPool()
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            mine: list[tuple[int, int, int]] = []
            for _ in range(2000):
                if mine and rng.random() < 0.5:
                    p, n, tag = mine.pop(rng.randrange(len(mine)))
                    assert holds(p, n, tag)
                    pool.deallocate(p)
                else:
                    n = rng.randint(1, 20000)
                    p = pool.allocate(n, stream=seed % 3)
                    tag = rng.randint(1, 255)
                    fill(p, n, tag)
                    mine.append((p, n, tag))
            for p, n, tag in mine:
                assert holds(p, n, tag)
                pool.deallocate(p)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    pool.check()
    assert pool.stats()["allocated_bytes"] == 0


def test_pool_on_each_device(device: str) -> None:
    pool = CachingPool(device, limit="64Mi")
    assert pool.device.startswith(device)
    p = pool.allocate(MiB)
    assert pool.stats()["allocated_bytes"] == MiB
    pool.deallocate(p)
    assert pool.trim() > 0
    pool.check()


def test_cuda_pool_refused_with_the_library_reason_where_unavailable() -> None:
    import autoglm_rt

    ok, _ = autoglm_rt.cuda_available(return_reason=True)
    if ok:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError) as info:
        CachingPool("cuda:0")
    assert "CUDA" in str(info.value)


@pytest.mark.cuda
def test_cuda_pool_streams_limit_and_trim() -> None:
    import torch

    pool = CachingPool("cuda:0", limit="256Mi")
    assert pool.upstream in ("cuda-vmm", "cuda-malloc")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    p = pool.allocate(4 * MiB, stream=s1.cuda_stream)
    pool.deallocate(p, stream=s1.cuda_stream)
    assert pool.allocate(4 * MiB, stream=s1.cuda_stream) == p  # same stream: at once
    pool.deallocate(p, stream=s1.cuda_stream)
    torch.cuda.synchronize()
    q = pool.allocate(4 * MiB, stream=s2.cuda_stream)  # other stream: only once its event is done
    pool.check()
    with pytest.raises(OutOfMemoryError, match="limit"):
        pool.allocate(300 * MiB)
    pool.deallocate(q, stream=s2.cuda_stream)
    assert pool.trim() > 0
    assert pool.stats()["reserved_bytes"] == 0
    pool.check()
