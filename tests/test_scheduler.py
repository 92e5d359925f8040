"""PriorityScheduler scenarios: ordering by the mission's score, dependencies, preemption with the
least work lost, gang admission, aging against starvation, and bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm_rt.policy.scheduler import (
    Device,
    PriorityScheduler,
    SchedulerError,
    Task,
    TaskState,
)
from tests.scheduler_reference import brute_force_min_lost, reference_score, simulate


def test_score_is_the_mission_formula_plus_aging() -> None:
    s = PriorityScheduler([Device(0, "16Gi"), Device(1, "32Gi")], cpus=8, aging_rate=0.02, priority_weight=0.3)
    t = Task("a", urgency=0.7, gpus=1, gpu_memory="8Gi", cpus=6, depends_on=("x", "y"), priority=2)
    s.submit(t, now=10.0)
    # largest share: cpus 6/8 (devices 1/2, memory 8/32)
    want = reference_score(0.7, 6 / 8, 2, 2, age=15.0, aging=0.02, pw=0.3)
    assert s.score("a", now=25.0) == pytest.approx(want, rel=1e-12)
    assert s.base_score("a") == pytest.approx(reference_score(0.7, 6 / 8, 2, 2, 0.0, 0.0, 0.3))


def test_higher_score_runs_first_and_ties_keep_submission_order() -> None:
    s = PriorityScheduler(1, aging_rate=0.0)
    for name, urgency in [("low", 0.1), ("high", 0.9), ("mid", 0.5), ("mid2", 0.5)]:
        s.submit(Task(name, urgency=urgency, preemptible=False), now=0)
    order = []
    for now in range(4):
        plan = s.schedule(now)
        assert len(plan.start) == 1
        order.append(plan.start[0].task)
        s.finished(plan.start[0].task, True, now)
    assert order == ["high", "mid", "mid2", "low"]


def test_unmet_dependencies_make_a_task_ineligible_not_just_low() -> None:
    s = PriorityScheduler(2, aging_rate=1.0)
    s.submit(Task("prep", urgency=0.0), now=0)
    s.submit(Task("train", urgency=1.0, depends_on=("prep",)), now=0)
    plan = s.schedule(now=1000)  # even after a long wait, devices free, 'train' must not start
    assert [p.task for p in plan.start] == ["prep"]
    assert not s.is_eligible("train") and s.unmet_dependencies("train") == 1
    assert s.schedule(now=1001).start == []
    s.finished("prep", True, now=1002)
    assert [p.task for p in s.schedule(now=1003).start] == ["train"]


def test_a_failed_dependency_fails_its_dependents_transitively() -> None:
    s = PriorityScheduler(1)
    s.submit(Task("a"), now=0)
    s.submit(Task("b", depends_on=("a",)), now=0)
    s.submit(Task("c", depends_on=("b",)), now=0)
    s.submit(Task("d"), now=0)
    s.schedule(now=0)
    assert sorted(s.finished("a", False, now=1)) == ["b", "c"]
    assert s.state("c") is TaskState.FAILED and s.state("d") is TaskState.PENDING


def test_preemption_picks_the_victim_that_loses_least_work() -> None:
    s = PriorityScheduler(2, aging_rate=0.0)
    s.submit(Task("old", urgency=0.1), now=0)
    s.submit(Task("young", urgency=0.1), now=0)
    s.schedule(now=0)
    s.record_checkpoint("old", now=90)  # old has 10 s unsaved, young 100 s
    s.submit(Task("urgent", urgency=1.0), now=100)
    plan = s.schedule(now=100)
    assert plan.start == []
    assert [(p.victim, p.for_task) for p in plan.preempt] == [("old", "urgent")]
    assert plan.preempt[0].work_lost == pytest.approx(10.0)
    assert s.state("old") is TaskState.STOPPING
    # Nothing else is preempted while the victim stops, and the freed device goes to 'urgent'.
    assert s.schedule(now=101).preempt == []
    s.stopped("old", now=102)
    assert [(p.task, p.devices) for p in s.schedule(now=102).start] == [("urgent", s.devices_of("urgent"))]
    assert s.state("old") is TaskState.PENDING


@pytest.mark.parametrize(
    ("victim", "blocked_reason"),
    [
        (Task("v", urgency=0.0, preemptible=False), "not preemptible"),
        (Task("v", urgency=0.0, min_runtime=60), "min runtime"),
        (Task("v", urgency=0.97), "margin"),
    ],
)
def test_no_preemption_when_not_allowed(victim: Task, blocked_reason: str) -> None:
    s = PriorityScheduler(1, aging_rate=0.0, preemption_margin=0.05)
    s.submit(victim, now=0)
    s.schedule(now=0)
    s.submit(Task("u", urgency=1.0), now=10)
    assert s.schedule(now=10).preempt == [], blocked_reason


def test_preemption_policy_never_waits_instead_of_preempting() -> None:
    s = PriorityScheduler(1, aging_rate=0.0)
    s.submit(Task("v", urgency=0.0), now=0)
    s.schedule(now=0)
    s.submit(Task("polite", urgency=1.0, preempts=False), now=1)
    assert s.schedule(now=1).preempt == []
    s.finished("v", True, now=2)
    assert [p.task for p in s.schedule(now=2).start] == ["polite"]


def test_gang_task_gets_all_devices_at_once_or_waits() -> None:
    s = PriorityScheduler(4, aging_rate=0.0)
    for i in range(3):
        s.submit(Task(f"small{i}", urgency=0.9, preemptible=False), now=0)
    s.schedule(now=0)
    s.submit(Task("gang", urgency=1.0, gpus=3), now=1)
    assert s.schedule(now=1).start == []  # 1 free device is not enough
    assert s.state("gang") is TaskState.PENDING
    s.finished("small0", True, now=2)
    assert s.schedule(now=2).start == []
    s.finished("small1", True, now=3)
    plan = s.schedule(now=3)
    assert [p.task for p in plan.start] == ["gang"] and len(plan.start[0].devices) == 3


def test_minimal_victim_set_for_a_gang_task() -> None:
    s = PriorityScheduler(4, aging_rate=0.0)
    lost = {"a": 50.0, "b": 5.0, "c": 30.0, "d": 8.0}
    for n in lost:
        s.submit(Task(n, urgency=0.0), now=0)
    s.schedule(now=0)
    for n, w in lost.items():
        s.record_checkpoint(n, now=100 - w)
    s.submit(Task("gang", urgency=1.0, gpus=2), now=100)
    plan = s.schedule(now=100)
    assert sorted(p.victim for p in plan.preempt) == ["b", "d"]


def test_victims_on_too_small_devices_are_not_taken() -> None:
    s = PriorityScheduler([Device(0, "16Gi"), Device(1, "80Gi")], aging_rate=0.0)
    s.submit(Task("on_small", urgency=0.0, gpu_memory="8Gi"), now=0)
    s.submit(Task("on_big", urgency=0.0, gpu_memory="8Gi"), now=0)
    s.schedule(now=0)
    assert s.devices_of("on_small") == (0,)  # best fit keeps the big device for big tasks
    s.record_checkpoint("on_big", now=99)  # cheaper victim, but only it has the memory anyway
    s.record_checkpoint("on_small", now=99.5)
    s.submit(Task("big", urgency=1.0, gpu_memory="40Gi"), now=100)
    plan = s.schedule(now=100)
    assert [p.victim for p in plan.preempt] == ["on_big"]


def test_a_long_waiting_gang_task_reserves_devices_so_small_tasks_cannot_overtake() -> None:
    s = PriorityScheduler(2, aging_rate=0.0, reserve_after=10.0)
    s.submit(Task("blocker", urgency=1.0, preemptible=False), now=0)
    s.schedule(now=0)
    s.submit(Task("gang", urgency=1.0, gpus=2), now=0)
    s.submit(Task("small", urgency=0.0), now=0)
    assert [p.task for p in s.schedule(now=1).start] == ["small"]  # backfill while young
    s.finished("small", True, now=5)
    s.submit(Task("small2", urgency=0.0), now=5)
    assert s.schedule(now=20).start == []  # 'gang' has waited 20 s: the free device is held
    s.finished("blocker", True, now=21)
    assert [p.task for p in s.schedule(now=21).start] == ["gang"]


def test_aging_lets_a_low_task_run_under_a_steady_stream_and_without_it_it_starves() -> None:
    def stream() -> list[tuple[float, Task, float]]:
        arrivals = [(0.0, Task("low", urgency=0.0), 5.0)]
        # A higher-urgency 3-second job arrives every 2 s on a 1-device machine: always a queue.
        arrivals += [(float(t), Task(f"hi{t}", urgency=1.0), 3.0) for t in range(0, 400, 2)]
        return arrivals

    aged = simulate(PriorityScheduler(1, aging_rate=0.05), stream(), horizon=400)
    assert "low" in aged.finished_at
    starved = simulate(PriorityScheduler(1, aging_rate=0.0), stream(), horizon=400)
    assert "low" not in starved.first_start


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_devices=st.integers(1, 6),
    jobs=st.lists(
        st.tuples(
            st.floats(0, 1),  # urgency
            st.integers(1, 6),  # gpus (clipped to the machine)
            st.integers(1, 6),  # seconds of work
            st.booleans(),  # preemptible
            st.integers(0, 20),  # arrival
        ),
        min_size=1,
        max_size=12,
    ),
    stream_urgency=st.floats(0.5, 1.0),
)
def test_every_task_eventually_finishes_and_gangs_are_whole(
    n_devices: int, jobs: list[tuple[float, int, int, bool, int]], stream_urgency: float
) -> None:
    arrivals = [
        (float(at), Task(f"j{i}", urgency=u, gpus=min(g, n_devices), preemptible=p), float(w))
        for i, (u, g, w, p, at) in enumerate(jobs)
    ]
    # A steady stream of urgent one-device jobs that never stops during the run.
    arrivals += [(float(t), Task(f"s{t}", urgency=stream_urgency), 1.0) for t in range(0, 3000, 3)]
    names = [t.name for _, t, _ in arrivals if t.name.startswith("j")]
    sched = PriorityScheduler(n_devices, aging_rate=0.05, reserve_after=20.0)
    result = simulate(sched, arrivals, horizon=3000, until=lambda r: all(n in r.finished_at for n in names))
    missing = [n for n in names if n not in result.finished_at]
    assert not missing, f"starved: {missing}"
    assert result.max_devices_in_use <= n_devices


@settings(max_examples=60, deadline=None)
@given(
    n_devices=st.integers(2, 7),
    running=st.lists(st.tuples(st.integers(1, 3), st.floats(0, 100)), min_size=1, max_size=7),
    need=st.integers(1, 7),
)
def test_victim_set_loses_least_work_and_has_no_unneeded_member(
    n_devices: int, running: list[tuple[int, float]], need: int
) -> None:
    s = PriorityScheduler(n_devices, aging_rate=0.0)
    placed: dict[str, tuple[list[int], float]] = {}
    for i, (g, lost) in enumerate(running):
        if g > len(s.free_devices()):
            continue
        name = f"r{i}"
        s.submit(Task(name, urgency=0.0, gpus=g), now=0)
        start = s.schedule(now=0).start
        assert [p.task for p in start] == [name]
        s.record_checkpoint(name, now=1000 - lost)
        placed[name] = (list(s.devices_of(name)), lost)
    need = min(need, n_devices)
    free = s.free_devices()
    s.submit(Task("x", urgency=1.0, gpus=need), now=1000)
    plan = s.schedule(now=1000)
    if need <= len(free):
        assert plan.preempt == [] and [p.task for p in plan.start] == ["x"]
        return
    victims = [p.victim for p in plan.preempt]
    best = brute_force_min_lost(free, placed, need)
    assert best is not None
    assert sum(placed[v][1] for v in victims) == pytest.approx(best)
    for v in victims:  # irreducible: without any one victim, 'x' would not fit
        others = sum(len(placed[w][0]) for w in victims if w != v)
        assert len(free) + others < need


def test_runner_restart_keeps_age_and_adopts_running_tasks() -> None:
    s = PriorityScheduler(2, aging_rate=0.1)
    s.adopt_running(Task("r"), devices=[1], started_at=5.0, now=10.0)
    s.submit(Task("p", urgency=0.0), now=10.0, submitted_at=-20.0)
    assert s.age("p", now=15.0) == pytest.approx(35.0)
    assert s.free_devices() == [0]
    plan = s.schedule(now=15.0)
    assert [(p.task, p.devices) for p in plan.start] == [("p", (0,))]
    with pytest.raises(SchedulerError, match="held by another"):
        s.adopt_running(Task("clash"), devices=[1], started_at=0.0, now=15.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"urgency": math.nan}, ValueError, "urgency"),
        ({"urgency": 1.5}, ValueError, "urgency"),
        ({"urgency": "high"}, TypeError, "urgency"),
        ({"gpus": -1}, ValueError, "gpus"),
        ({"gpus": 1.5}, ValueError, "gpus"),
        ({"gpu_memory": "lots"}, ValueError, "gpu_memory"),
        ({"cpus": math.inf}, ValueError, "cpus"),
        ({"depends_on": "a"}, TypeError, "depends_on"),
        ({"depends_on": ("t",)}, ValueError, "itself"),
        ({"min_runtime": -1}, ValueError, "min_runtime"),
        ({"gpus": 0, "cpus": 0}, ValueError, "at least one"),
        ({"priority": 1.5}, TypeError, "priority"),
    ],
)
def test_task_rejects_bad_fields(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Task("t", **kwargs)  # type: ignore[arg-type]


def test_scheduler_rejects_impossible_and_unknown_tasks_and_keeps_its_state() -> None:
    s = PriorityScheduler([Device(0, "16Gi"), Device(1, "16Gi")], cpus=4)
    s.submit(Task("ok"), now=0)
    with pytest.raises(SchedulerError, match="needs 3 device"):
        s.submit(Task("wide", gpus=3), now=0)
    with pytest.raises(SchedulerError, match="needs 1 device"):
        s.submit(Task("fat", gpu_memory="17Gi"), now=0)
    with pytest.raises(SchedulerError, match="cpus"):
        s.submit(Task("hungry", cpus=5), now=0)
    with pytest.raises(SchedulerError, match="already submitted"):
        s.submit(Task("ok"), now=0)
    with pytest.raises(SchedulerError, match="unknown task"):
        s.finished("nope")
    with pytest.raises(SchedulerError, match="only a running task"):
        s.stopped("ok")
    with pytest.raises(TypeError, match="Task"):
        s.submit("ok")  # type: ignore[arg-type]
    assert s.names() == ["ok"] and s.state("ok") is TaskState.PENDING
    with pytest.raises(ValueError, match="unique"):
        PriorityScheduler([0, 0])
    with pytest.raises(ValueError, match="aging_rate"):
        PriorityScheduler(1, aging_rate=math.nan)


@settings(max_examples=40, deadline=None)
@given(
    lost=st.lists(st.floats(0, 100), min_size=2, max_size=14),
    need=st.integers(1, 14),
)
def test_greedy_victim_search_beyond_the_exact_limit_is_irreducible(lost: list[float], need: int) -> None:
    n = len(lost)
    need = min(need, n)
    s = PriorityScheduler(n, aging_rate=0.0, exact_victim_search=0)  # always the greedy path
    for i in range(n):
        s.submit(Task(f"r{i}", urgency=0.0), now=0)
    s.schedule(now=0)
    for i, w in enumerate(lost):
        s.record_checkpoint(f"r{i}", now=1000 - w)
    s.submit(Task("x", urgency=1.0, gpus=need), now=1000)
    victims = [p.victim for p in s.schedule(now=1000).preempt]
    assert len(victims) == need  # one device each: exactly `need` victims, none unneeded
    # One device per victim: the cheapest `need` are the optimum, and greedy must find it.
    assert sum(lost[int(v[1:])] for v in victims) == pytest.approx(sum(sorted(lost)[:need]))


def test_a_higher_priority_class_preempts_a_more_urgent_lower_class() -> None:
    s = PriorityScheduler(1, aging_rate=0.0, priority_weight=0.5)
    s.submit(Task("batch", urgency=1.0, priority=0), now=0)
    s.schedule(now=0)
    s.submit(Task("prod", urgency=0.2, priority=2), now=1)
    assert [p.victim for p in s.schedule(now=1).preempt] == ["batch"]


def test_assign_starts_a_task_on_exactly_the_given_free_devices() -> None:
    s = PriorityScheduler([Device(0, "8Gi"), Device(1, "8Gi"), Device(2, "32Gi")], cpus=4)
    s.submit(Task("busy", cpus=3), now=0)
    s.schedule(now=0)
    s.submit(Task("m", gpu_memory="16Gi"), now=1)
    s.submit(Task("c", cpus=2), now=1)
    with pytest.raises(SchedulerError, match="fits on"):
        s.assign("m", [1], now=1)  # too little memory
    with pytest.raises(SchedulerError, match="held by another"):
        s.assign("c", [s.devices_of("busy")[0]], now=1)
    free = [d for d in s.free_devices() if d != 2]
    with pytest.raises(SchedulerError, match="cpus"):
        s.assign("c", free[:1], now=1)
    s.assign("m", [2], now=1)
    assert s.state("m") is TaskState.RUNNING and s.devices_of("m") == (2,)
    with pytest.raises(SchedulerError, match="not eligible"):
        s.assign("m", [2], now=1)
