"""The work bound of ``benches/multi_tenant_accounting.py`` against a fluid queue."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "multi_tenant_accounting", ROOT / "benches" / "multi_tenant_accounting.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["multi_tenant_accounting"] = mod
    spec.loader.exec_module(mod)
    return mod


def fluid_end(arrivals: dict[str, float], work: dict[str, float], cores: float) -> float:
    """A backlog that every arrival adds its work to and ``cores`` drain: when it last empties."""
    t, backlog = 0.0, 0.0
    for name in sorted(arrivals, key=arrivals.__getitem__):
        a = arrivals[name]
        backlog = max(0.0, backlog - (a - t) * cores)
        t = a
        backlog += work[name]
    return t + backlog / cores


def test_the_bound_is_when_a_fluid_queue_of_the_same_work_empties() -> None:
    bound = _bench().work_bound
    assert bound({"a": 0.0, "b": 10.0}, {"a": 4.0, "b": 6.0}, 2.0) == pytest.approx(13.0)  # b alone at the end
    assert bound({"a": 0.0, "b": 1.0}, {"a": 10.0, "b": 10.0}, 2.0) == pytest.approx(10.0)  # all the work from 0
    assert bound({}, {}, 2.0) == 0.0
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        arrivals = {f"j{i}": round(rng.uniform(0, 40), 1) for i in range(n)}
        work = {f"j{i}": rng.uniform(0.5, 12) for i in range(n)}
        cores = rng.choice([1.0, 2.0, 3.5])
        assert bound(arrivals, work, cores) == pytest.approx(fluid_end(arrivals, work, cores))
    with pytest.raises(ValueError, match="cores"):
        bound({"a": 0.0}, {"a": 1.0}, 0.0)


def test_job_cpu_seconds_integrates_each_jobs_sampled_rate() -> None:
    doc = {
        "timeline": {
            "dynamic": [
                {"t": 0.0, "jobs": {"a": {"cpu_used": 0.0}}},
                {"t": 0.5, "jobs": {"a": {"cpu_used": 1.0}, "b": {"cpu_used": 2.0}}},
                {"t": 1.5, "jobs": {"b": {"cpu_used": 0.5}}},
            ]
        }
    }
    assert _bench().job_cpu_seconds(doc, "dynamic") == pytest.approx({"a": 0.5, "b": 1.0 + 0.5})


def test_the_work_is_the_groups_accounting_where_the_file_has_it_and_rounds_read_the_first() -> None:
    bench = _bench()
    timeline = {"dynamic": [{"t": 0.0, "jobs": {"a": {"cpu_used": 0.0}}}, {"t": 1.0, "jobs": {"a": {"cpu_used": 1.0}}}]}
    old = {"timeline": timeline, "dynamic": {"makespan_seconds": 1.0}}
    assert bench.job_work(old, "dynamic") == pytest.approx({"a": 1.0})  # no job_runs: the sampled rates
    first = {"makespan_seconds": 1.2, "job_runs": [{"name": "a", "cpu_seconds": 1.3}]}
    rounds = {
        "timeline": timeline,
        "workload": {"cores": 2.0},
        "dynamic": {"makespan_seconds": 5.0},  # a median: not the timeline's run
        "rounds": [{"dynamic": first}, {"dynamic": {"makespan_seconds": 9.0, "job_runs": []}}],
    }
    assert bench.job_work(rounds, "dynamic") == {"a": 1.3}
    assert bench.account(rounds, "dynamic")["makespan_seconds"] == 1.2
