"""MemoryPolicy against a real host CachingPool: phase limits applied at once, the working set
never forced out, sizes or fractions, threads scaled to the machine."""

from __future__ import annotations

import ctypes

import pytest

from autoglm_rt.memory import CachingPool, OutOfMemoryError
from autoglm_rt.policy.memory import MemoryPolicy

MiB = 2**20


def fill(ptr: int, n: int, byte: int) -> None:
    ctypes.memset(ptr, byte, n)


def intact(ptr: int, n: int, byte: int) -> bool:
    return ctypes.string_at(ptr, n) == bytes([byte]) * n


def test_phase_limits_apply_at_once_and_free_memory_for_others() -> None:
    pool = CachingPool("cpu")
    capacity = 64 * MiB
    calls: list[int] = []
    policy = MemoryPolicy(pool, capacity=capacity, cores=2, thread_setter=calls.append)
    live = pool.allocate(4 * MiB)
    fill(live, 4 * MiB, 0x5A)
    cached = [pool.allocate(8 * MiB) for _ in range(5)]  # 44 MiB in use, then cached
    for p in cached:
        pool.deallocate(p)
    assert pool.stats()["reserved_bytes"] >= 44 * MiB

    d = policy.apply("initial")
    assert d.limit_bytes == int(0.9 * capacity) == pool.stats()["limit_bytes"]
    d = policy.apply("fine_tuning")
    # 30% of 64 MiB = 19.2 MiB, but the peak working set was 44 MiB: the floor wins
    assert d.target_bytes == int(0.3 * capacity)
    assert d.floor_bytes == pytest.approx(44 * MiB * 1.1, rel=1e-6) and d.limit_bytes == d.floor_bytes
    pool.reset_peak_stats()
    d = policy.apply("fine_tuning")
    assert d.limit_bytes == int(0.3 * capacity) and pool.stats()["limit_bytes"] == d.limit_bytes
    # the cache was given back at once, the live block is untouched
    assert pool.stats()["reserved_bytes"] <= d.limit_bytes
    assert intact(live, 4 * MiB, 0x5A)
    pool.check()
    # the new limit is hard
    with pytest.raises(OutOfMemoryError):
        pool.allocate(20 * MiB)
    assert calls == [2, 1, 1]  # 16/8/4 scaled to 2 cores, at least 1
    assert [x.threads for x in policy.decisions] == [2, 1, 1]
    pool.deallocate(live)


def test_limits_as_sizes_and_explicit_limits_respect_the_floor() -> None:
    pool = CachingPool("cpu")
    policy = MemoryPolicy(
        pool,
        limits={"initial": "48Mi", "convergence": 32 * MiB, "fine_tuning": "16Mi"},
        margin=0.25,
        thread_setter=None,
    )
    assert [policy.limit_for(p)[0] for p in ("initial", "convergence", "fine_tuning")] == [48 * MiB, 32 * MiB, 16 * MiB]
    ptr = pool.allocate(16 * MiB)
    assert policy.apply("fine_tuning").limit_bytes == 20 * MiB  # 16 MiB peak * 1.25
    assert policy.set_limit("1Mi") == 20 * MiB
    with pytest.raises(ValueError, match="capacity"):
        policy.set_limit(("ratio", 0.5))
    pool.deallocate(ptr)
    pool.reset_peak_stats()
    assert policy.set_limit("1Mi") == 1 * MiB
    ratio_policy = MemoryPolicy(pool, capacity="100Mi", thread_setter=None)
    assert ratio_policy.set_limit(("ratio", 0.5)) == 50 * MiB == pool.limit


@pytest.mark.parametrize(("cores", "expected"), [(1, [1, 1, 1]), (2, [2, 1, 1]), (16, [16, 8, 4]), (64, [64, 32, 16])])
def test_threads_scale_with_cores(cores: int, expected: list[int]) -> None:
    policy = MemoryPolicy(CachingPool("cpu"), capacity="1Gi", cores=cores, thread_setter=None)
    assert [policy.threads[p] for p in ("initial", "convergence", "fine_tuning")] == expected


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"limits": {"initial": 0.9, "convergence": 0.6, "fine_tuning": 0.3}}, ValueError, "capacity"),
        ({"capacity": "1Gi", "limits": {"initial": 0.9, "convergence": 0.6}}, ValueError, "fine_tuning"),
        (
            {"capacity": "1Gi", "limits": {"initial": 0.9, "convergence": 0.6, "fine_tuning": 0.3, "x": 1}},
            ValueError,
            "unknown phase",
        ),
        ({"capacity": "1Gi", "limits": {"initial": 0.9, "convergence": 0.6, "fine_tuning": 0}}, ValueError, "positive"),
        (
            {"capacity": "1Gi", "limits": {"initial": "12Xi", "convergence": 0.6, "fine_tuning": 0.3}},
            ValueError,
            "initial",
        ),
        ({"capacity": "lots"}, ValueError, "capacity"),
        ({"capacity": "1Gi", "margin": -0.1}, ValueError, "margin"),
        ({"capacity": "1Gi", "threads": {"initial": 0, "convergence": 1, "fine_tuning": 1}}, ValueError, "threads"),
        ({"capacity": "1Gi", "cores": 0}, ValueError, "cores"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], exc: type[Exception], words: str) -> None:
    with pytest.raises(exc, match=words):
        MemoryPolicy(CachingPool("cpu"), **kwargs)  # type: ignore[arg-type]


def test_rejects_a_pool_without_the_protocol_and_unknown_phases() -> None:
    with pytest.raises(TypeError, match="pool"):
        MemoryPolicy(object(), capacity="1Gi")  # type: ignore[arg-type]
    policy = MemoryPolicy(CachingPool("cpu"), capacity="1Gi", thread_setter=None)
    with pytest.raises(ValueError, match="phase"):
        policy.apply("warmup")
