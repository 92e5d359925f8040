"""pytest-benchmark: the caching pool (CI runs these once with --benchmark-disable)."""

from __future__ import annotations

from pathlib import Path

from autoglm_rt import memory
from autoglm_rt._native import _C

TRACE = Path(__file__).with_name("traces") / "cnn_train.csv"  # the shared CNN trace, shipped


def test_python_alloc_free_pair(benchmark) -> None:  # type: ignore[no-untyped-def]
    pool = memory.CachingPool()

    def pair() -> int:
        p = pool.allocate(4096)
        pool.deallocate(p)
        return p

    first = benchmark(pair)
    assert pool.allocate(4096) == first  # the same cached block every time
    s = pool.stats()
    assert s["num_upstream_allocs"] == 1 and s["num_allocs"] == s["num_frees"] + 1


def test_cpp_cached_pair_loop(benchmark) -> None:  # type: ignore[no-untyped-def]
    ns = benchmark(_C.memory_loop_ns, 4096, 10000, "pool")
    assert 0 < ns < 100_000


def test_replay_shared_trace(benchmark) -> None:  # type: ignore[no-untyped-def]
    result = benchmark(memory.replay, TRACE, repeat=3)
    assert result["reserved_to_requested"] <= 1.10
    assert result["upstream_allocs_after_first_pass"] == 0
