"""The multi-tenant policies and trace tools: static partitions are fixed and first come first
served, the dynamic policy never pushes a job below its floor nor over the machine, grows a job
whose peak presses on its limit, preempts for urgent work, and the cluster simulation over a CSV
trace reports OOM failures only where static partitions are outgrown."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoglm_rt.jobqueue import multi_tenant as mt
from autoglm_rt.jobqueue import trace_sim
from autoglm_rt.policy.scheduler.dynamic_plan import plan_dynamic
from autoglm_rt.policy.scheduler.static_plan import plan_static
from autoglm_rt.policy.scheduler.tenants import PlannerConfig, TenantState
from autoglm_rt.trainers import tenant_job

MiB = 1 << 20
CFG = PlannerConfig(memory=2000 * MiB, cores=2.0, max_running=4)


def job(name: str, at: float = 0.0, **kw: object) -> TenantState:
    base: dict[str, object] = {
        "urgency": 0.3,
        "request_memory": 400 * MiB,
        "request_cpus": 0.75,
        "floor_memory": 250 * MiB,
        "submitted_at": at,
    }
    return TenantState(name, **(base | kw))  # type: ignore[arg-type]


def test_trace_is_seeded_poisson_with_urgent_jobs_every_k() -> None:
    w = mt.Workload(request_rate=20.0, request_window=50.0, training_jobs=8, urgent_every=4, seed=3)
    trace = mt.make_trace(w)
    assert trace == mt.make_trace(w) and trace != mt.make_trace(mt.Workload(seed=4))
    requests = [a for a in trace if a.kind == "request"]
    assert abs(len(requests) - 1000) < 5 * math.sqrt(1000)  # 5 sigma of the Poisson count
    training = [a for a in trace if a.kind != "request"]
    assert len(training) == 8 and {a.kind for a in training} <= set(mt.CATALOG)
    assert [a.urgency for a in sorted(training, key=lambda a: int(a.name[5:]))] == [0.3, 0.3, 0.3, 0.9] * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"request_rate": 0.0}, "request_rate"),
        ({"tick": math.nan}, "tick"),
        ({"training_jobs": 0}, "training_jobs"),
        ({"tenant_weight": 0}, "tenant_weight"),
        ({"tenant_weight": 2.5}, "tenant_weight"),
        ({"request_passes": 0}, "request_passes"),
        ({"request_passes": 2.0}, "request_passes"),
        ({"request_passes": True}, "request_passes"),
        ({"service_cpus": -1.0}, "service_cpus"),
        ({"training_cpus": math.inf}, "training_cpus"),
        ({"cores": 1.0}, r"cores must be >= .*\(0\.5 \+ 0\.75\), got 1$"),
        ({"cores": 3.0, "training_cpus": 2.75}, r"cores must be >= .*\(0\.5 \+ 2\.75\), got 3$"),
    ],
)
def test_bad_workloads_name_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mt.Workload(**kwargs)  # type: ignore[arg-type]


def test_static_gives_requests_exactly_and_never_lets_a_later_job_overtake() -> None:
    tenants = [job("a", 0.0, running=True), job("big", 1.0, request_cpus=1.5), job("small", 2.0, request_cpus=0.25)]
    plan = plan_static(tenants, CFG)
    assert plan.admit == []  # "big" does not fit beside "a"; "small" would, but may not overtake
    assert plan.memory == {"a": 400 * MiB} and plan.cpus == {"a": 0.75} and plan.preempt == []
    plan = plan_static([tenants[1], tenants[2]], CFG)
    assert plan.admit == ["big", "small"]  # both fit, in arrival order


def test_dynamic_respects_floors_and_the_machine_and_spreads_what_is_left() -> None:
    tenants = [job(f"j{i}", float(i), running=i < 2, limit=400 * MiB if i < 2 else None) for i in range(6)]
    plan = plan_dynamic(tenants, CFG, now=10.0)
    live = [n for n in plan.memory]
    assert len(live) == 4 == CFG.max_running  # admitted by score up to max_running
    assert sum(plan.memory.values()) <= CFG.memory
    assert all(plan.memory[n] >= 250 * MiB * (1 + CFG.headroom) for n in live)
    # Nobody has used anything yet: every quota (a cap) is the whole machine. Equal requests: the two
    # admitted now start, so they weigh starting_cpu_weight times the two running (mean 100).
    assert plan.cpus == {n: CFG.cores for n in live}
    assert plan.cpu_weights == {"j0": 40, "j1": 40, "j2": 160, "j3": 160}


def test_dynamic_cpu_quotas_lend_what_others_leave_idle_and_weights_follow_requests() -> None:
    cfg = PlannerConfig(memory=4000 * MiB, cores=2.0, service_cores_busy=1.0)
    svc = TenantState("svc", "service", 1.0, 100 * MiB, 0.5, 100 * MiB, running=True, cpu_used=0.1)
    a = job("a", running=True, limit=400 * MiB, request_cpus=1.0, cpu_used=0.2)
    b = job("b", running=True, limit=400 * MiB, request_cpus=0.5, cpu_used=1.6)
    plan = plan_dynamic([svc, a, b], cfg, now=0.0)
    left = cfg.cores - cfg.service_cores_idle  # what the idle service does not reserve
    share = {"a": left * 1.0 / 1.5, "b": left * 0.5 / 1.5}
    assert plan.cpus["a"] == pytest.approx(max(share["a"], 2.0 - 0.1 - 1.6))  # its share: b uses the rest
    assert plan.cpus["b"] == pytest.approx(2.0 - 0.1 - 0.2)  # lent what svc and a leave idle
    assert plan.cpu_weights == {"svc": 100, "a": 133, "b": 67}
    busy = TenantState("svc", "service", 1.0, 100 * MiB, 0.5, 100 * MiB, running=True, busy=True, cpu_used=0.1)
    plan = plan_dynamic([busy, a, b], cfg, now=0.0)
    assert plan.cpus["svc"] == cfg.busy_service_cores and plan.cpu_weights["svc"] == cfg.service_weight_busy
    assert plan.cpus["a"] == pytest.approx((cfg.cores - cfg.busy_service_cores) / 1.5)
    assert all(0 < q <= cfg.cores for q in plan.cpus.values())


def test_a_starting_job_gets_a_whole_core_and_a_higher_weight_until_its_first_step() -> None:
    cfg = PlannerConfig(memory=4000 * MiB, cores=2.0)
    used = {"svc": 0.05, "a": 0.5, "b": 0.5, "s": 0.95}  # a saturated machine
    svc = TenantState("svc", "service", 1.0, 100 * MiB, 0.5, 100 * MiB, running=True, cpu_used=used["svc"])
    busy = [job(n, running=True, limit=400 * MiB, cpu_used=used[n]) for n in ("a", "b")]
    starting = job("s", running=True, limit=400 * MiB, cpu_used=used["s"], starting=True)
    pending = job("p", submitted_at=1.0)  # admitted by this plan: it starts now
    plan = plan_dynamic([svc, *busy, starting, pending], cfg, now=2.0)
    assert plan.admit == ["p"]
    share = (cfg.cores - cfg.service_cores_idle) / 4
    for name in ("s", "p"):  # one thread, and a whole core to run it on
        assert plan.cpus[name] == pytest.approx(1.0)
    for name in ("a", "b"):  # their share, or what the others leave idle
        assert plan.cpus[name] == pytest.approx(max(share, cfg.cores - (sum(used.values()) - used[name])))
    # Equal requests and urgency: the starting jobs weigh starting_cpu_weight times the others.
    assert plan.cpu_weights["s"] == plan.cpu_weights["p"] == round(plan.cpu_weights["a"] * cfg.starting_cpu_weight)
    # Past its first step it is one job among others.
    stepped = job("s", running=True, limit=400 * MiB, cpu_used=used["s"])
    after = plan_dynamic([svc, *busy, stepped], cfg, now=2.0)
    assert after.cpu_weights["s"] == after.cpu_weights["a"] == 100
    assert after.cpus["s"] == pytest.approx(max((cfg.cores - cfg.service_cores_idle) / 3, 2.0 - 1.05))
    small = PlannerConfig(memory=4000 * MiB, cores=0.75, service_cores_idle=0.1)
    assert plan_dynamic([starting], small, now=0.0).cpus["s"] == 0.75  # never more than the machine
    for bad in (0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="starting_cpu_weight"):
            PlannerConfig(memory=MiB, cores=2.0, starting_cpu_weight=bad)


def test_a_busy_service_may_use_every_core_by_default_and_bad_caps_are_refused() -> None:
    cfg = PlannerConfig(memory=4000 * MiB, cores=3.0)
    busy = TenantState("svc", "service", 1.0, 100 * MiB, 0.5, 100 * MiB, running=True, busy=True)
    a = job("a", running=True, limit=400 * MiB, request_cpus=1.0, cpu_used=2.5)
    plan = plan_dynamic([busy, a], cfg, now=0.0)
    assert plan.cpus["svc"] == 3.0 and plan.cpu_weights["svc"] == cfg.service_weight_busy
    assert plan.cpus["a"] == 3.0  # nothing else used a core last period
    assert PlannerConfig(memory=MiB, cores=2.0, service_cores_busy=8.0).busy_service_cores == 2.0
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="service_cores_busy"):
            PlannerConfig(memory=MiB, cores=2.0, service_cores_busy=bad)


def test_cpu_weights_follow_request_times_urgency_with_a_mean_of_100() -> None:
    cfg = PlannerConfig(memory=4000 * MiB, cores=2.0)
    urgent = job("urgent", running=True, limit=400 * MiB, urgency=0.9, request_cpus=0.75)
    low = job("low", running=True, limit=400 * MiB, urgency=0.3, request_cpus=0.75)
    big = job("big", running=True, limit=400 * MiB, urgency=0.3, request_cpus=1.5)
    plan = plan_dynamic([urgent, low, big], cfg, now=0.0)
    claim = {"urgent": 0.75 * (1 + 4.0 * 0.9), "low": 0.75 * (1 + 4.0 * 0.3), "big": 1.5 * (1 + 4.0 * 0.3)}
    mean = sum(claim.values()) / 3
    assert plan.cpu_weights == {n: round(100 * c / mean) for n, c in claim.items()}
    assert plan.cpu_weights["urgent"] > plan.cpu_weights["low"]
    flat = plan_dynamic([urgent, low, big], PlannerConfig(memory=4000 * MiB, cores=2.0, urgency_cpu_weight=0.0), 0.0)
    assert flat.cpu_weights == {"urgent": 75, "low": 75, "big": 150}  # requests alone
    with pytest.raises(ValueError, match="urgency_cpu_weight"):
        PlannerConfig(memory=MiB, cores=2.0, urgency_cpu_weight=-1.0)


def reference_cfs(caps: dict[str, float], weights: dict[str, int], cores: float) -> dict[str, float]:
    """Weighted max-min fairness by bisection on the water level: given = min(cap, level * weight)."""
    target = min(cores, sum(caps.values()))
    lo, hi = 0.0, max(c / weights[n] for n, c in caps.items()) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(c, mid * weights[n]) for n, c in caps.items()) < target:
            lo = mid
        else:
            hi = mid
    return {n: min(c, hi * weights[n]) for n, c in caps.items()}


@pytest.mark.parametrize(
    ("caps", "weights", "cores"),
    [
        ({"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}, 2.0),
        ({"a": 0.3, "b": 4.0, "c": 4.0}, {"a": 100, "b": 100, "c": 300}, 2.0),
        ({"a": 0.5, "b": 0.25}, {"a": 1, "b": 10000}, 8.0),
        ({"a": 3.0, "b": 3.0, "c": 0.1, "d": 2.0}, {"a": 50, "b": 100, "c": 1000, "d": 7}, 4.0),
    ],
)
def test_simulated_cfs_share_matches_a_water_filling_reference(
    caps: dict[str, float], weights: dict[str, int], cores: float
) -> None:
    got = trace_sim.share_cores(caps, weights, cores)
    want = reference_cfs(caps, weights, cores)
    assert got == pytest.approx(want, abs=1e-9)
    assert sum(got.values()) <= cores + 1e-9 and all(got[n] <= caps[n] + 1e-12 for n in caps)


def test_thread_count_follows_the_quotas_cores_and_the_cpu_received() -> None:
    assert tenant_job.thread_count(None, 0.0) == 1
    assert tenant_job.thread_count(2.0, 0.3) == 1  # starved: a second thread would only contend
    assert tenant_job.thread_count(2.0, 0.98) == 2  # got a whole core and may have two
    assert tenant_job.thread_count(1.5, 1.9) == 1  # the quota grants one whole core
    assert tenant_job.thread_count(1.75, 1.9) == 2  # within a quarter core of two
    assert tenant_job.thread_count(0.25, 0.2) == 1
    assert tenant_job.thread_count(8.0, 3.2) == 4


def test_dynamic_grows_a_pressed_job_and_follows_the_phase_share() -> None:
    pressed = job("pressed", running=True, limit=360 * MiB, peak=350 * MiB)
    calm = job("calm", running=True, limit=360 * MiB, peak=260 * MiB, phase="fine_tuning")
    small = PlannerConfig(memory=900 * MiB, cores=2.0)
    plan = plan_dynamic([pressed, calm], small, now=0.0)
    assert plan.memory["pressed"] > plan.memory["calm"]
    assert plan.memory["calm"] >= int(250 * MiB * (1 + small.headroom))
    assert sum(plan.memory.values()) <= small.memory


def test_dynamic_preempts_the_lowest_score_for_an_urgent_job_and_gives_a_busy_service_cores() -> None:
    small = PlannerConfig(memory=700 * MiB, cores=2.0)
    low = job("low", 0.0, running=True, limit=300 * MiB, urgency=0.1)
    mid = job("mid", 0.0, running=True, limit=300 * MiB, urgency=0.3)
    urgent = job("urgent", 5.0, urgency=0.9)
    plan = plan_dynamic([low, mid, urgent], small, now=5.0)
    assert plan.preempt == ["low"] and plan.admit == ["urgent"]
    service = TenantState("svc", "service", 1.0, 100 * MiB, 0.5, 100 * MiB, running=True, busy=True, cpu_used=0.9)
    mid = job("mid", 0.0, running=True, limit=300 * MiB, urgency=0.3, cpu_used=1.0)
    plan = plan_dynamic([service, mid], CFG, now=0.0)
    assert plan.cpus["svc"] == CFG.busy_service_cores and plan.cpus["mid"] == pytest.approx(1.1)
    assert plan.cpu_weights == {"svc": 10000, "mid": 100}


def test_an_urgent_job_short_only_of_a_slot_pauses_its_victim_which_resumes_first() -> None:
    cfg = PlannerConfig(memory=4096 * MiB, cores=2.0, max_running=2)  # memory is plenty
    low = job("low", 0.0, running=True, limit=300 * MiB, urgency=0.1)
    mid = job("mid", 0.0, running=True, limit=300 * MiB, urgency=0.3)
    urgent = job("urgent", 5.0, urgency=0.9)
    plan = plan_dynamic([low, mid, urgent], cfg, now=5.0)
    # The lowest score is held in place: no stop, its memory kept, the minimum CPU quota.
    assert plan.pause == ["low"] and plan.preempt == [] and plan.admit == ["urgent"]
    assert plan.cpus["low"] == cfg.paused_cores and plan.cpu_weights["low"] == 1
    assert plan.memory["low"] >= int(250 * MiB * (1 + cfg.headroom))
    assert plan.cpus["mid"] > cfg.paused_cores and plan.cpus["urgent"] > cfg.paused_cores
    # While the slots stay full it stays paused; another urgent job pauses a running one, not it.
    held = job("low", 0.0, running=True, limit=300 * MiB, urgency=0.1, paused=True)
    running_urgent = job("urgent", 5.0, running=True, limit=300 * MiB, urgency=0.9)
    second = job("second", 6.0, urgency=0.95)
    plan = plan_dynamic([held, mid, running_urgent, second], cfg, now=6.0)
    assert plan.pause == ["mid"] and plan.admit == ["second"] and plan.preempt == []
    assert plan.cpus["low"] == cfg.paused_cores and plan.cpus["mid"] == cfg.paused_cores
    # A slot frees (mid is gone): the paused job resumes before a waiting job of higher score.
    newcomer = job("new", 7.0, urgency=0.5)
    plan = plan_dynamic([held, running_urgent, newcomer], cfg, now=8.0)
    assert plan.admit == ["low"] and plan.pause == [] and plan.cpus["low"] > cfg.paused_cores
    # Short of memory as well: the victim is stopped and requeued, which frees its memory.
    tight = PlannerConfig(memory=700 * MiB, cores=2.0, max_running=2)
    plan = plan_dynamic([low, mid, urgent], tight, now=5.0)
    assert plan.preempt == ["low"] and plan.pause == [] and plan.admit == ["urgent"]
    with pytest.raises(ValueError, match="paused_cores must be > 0"):
        PlannerConfig(memory=MiB, cores=1.0, paused_cores=0.0)


def test_the_victim_is_the_lowest_mission_score_then_the_job_nearest_its_end() -> None:
    cfg = PlannerConfig(memory=4096 * MiB, cores=2.0, max_running=3)  # memory is plenty
    # Equal mission scores; aging alone would rank the newest ("new") lowest.
    old = job("old", 0.0, running=True, limit=300 * MiB, progress=0.2)
    near = job("near", 4.0, running=True, limit=300 * MiB, progress=0.8)
    new = job("new", 8.0, running=True, limit=300 * MiB, progress=0.0)
    urgent = job("urgent", 9.0, urgency=0.9)
    plan = plan_dynamic([old, near, new, urgent], cfg, now=9.0)
    assert plan.pause == ["near"] and plan.admit == ["urgent"]
    # A job that has done all its steps is ending: the next nearest goes instead.
    done = job("near", 4.0, running=True, limit=300 * MiB, progress=1.0)
    assert plan_dynamic([old, done, new, urgent], cfg, now=9.0).pause == ["old"]
    # Unknown progress counts as none done; a lower mission score still goes first.
    unknown = job("near", 4.0, running=True, limit=300 * MiB)
    assert plan_dynamic([old, unknown, new, urgent], cfg, now=9.0).pause == ["old"]
    low = job("new", 8.0, running=True, limit=300 * MiB, progress=0.0, urgency=0.1)
    assert plan_dynamic([old, near, low, urgent], cfg, now=9.0).pause == ["new"]


def test_the_live_progress_is_read_from_valid_status_steps_only() -> None:
    assert mt._progress({"step": 5, "steps": 20}) == 0.25
    assert mt._progress({"step": 20, "steps": 20}) == 1.0
    for bad in ({}, {"step": 5}, {"step": "5", "steps": 20}, {"step": True, "steps": 20}, {"step": 21, "steps": 20}):
        assert mt._progress(bad) is None
    assert mt._progress({"step": -1, "steps": 20}) is None and mt._progress({"step": 0, "steps": 0}) is None


def test_trace_file_errors_name_row_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("arrival_s,duration_s,cpus,memory_mib,gpus,qos\n0,10,1,100,0,gold\n")
    with pytest.raises(ValueError, match=r"t.csv:2: qos must be one of"):
        trace_sim.load_trace(bad)
    bad.write_text("arrival_s,duration_s,cpus,memory_mib,gpus,qos\n0,nan,1,100,0,latency\n")
    with pytest.raises(ValueError, match="duration_s must be a finite number"):
        trace_sim.load_trace(bad)
    bad.write_text("arrival_s,cpus\n0,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        trace_sim.load_trace(bad)


def test_simulation_ooms_only_outgrown_static_partitions_and_dynamic_finishes_all(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    trace_sim.generate_trace(path, jobs=60, seed=1, horizon=600.0)
    jobs = trace_sim.load_trace(path)
    outgrown = sum(1 for j in jobs if j.peak_memory > j.memory and j.qos != "latency")
    static = trace_sim.simulate(jobs, "static", nodes=2, dt=10.0)
    dynamic = trace_sim.simulate(jobs, "dynamic", nodes=2, dt=10.0)
    assert 0 < static["oom_kills"] == static["jobs_failed"] <= outgrown
    assert dynamic["oom_kills"] == 0 and dynamic["jobs_failed"] == 0
    assert static["jobs"] == dynamic["jobs"] == len(jobs)


def test_dynamic_does_not_lower_a_limit_below_the_recent_peak_with_margin() -> None:
    """Grown to 500 MiB, its recent peak 350 MiB (< 80% of the limit): the next plan keeps at least
    350 x 1.35 = 472 MiB, or the limit would flap down and the next step's peak would be killed."""
    grown = job("grown", running=True, limit=500 * MiB, peak=350 * MiB)
    plan = plan_dynamic([grown, job("other", running=True, limit=300 * MiB, peak=260 * MiB)], CFG, now=0.0)
    assert plan.memory["grown"] >= int(350 * MiB * CFG.grow_by)


class _Group:
    """Records the quotas set on it, as a JobGroup would apply them; ``gone``: removed."""

    def __init__(self) -> None:
        self.quotas: list[float | None] = []
        self.gone = False

    def set_cpu_quota(self, cores: float | None) -> None:
        if self.gone:
            raise mt.ResourceError("gone")
        self.quotas.append(cores)


def test_training_yields_from_the_first_request_sent_to_the_last_answered() -> None:
    cfg = PlannerConfig(memory=MiB, cores=2.0)
    y = mt.TrainingYield(cfg)
    a, b = _Group(), _Group()
    y.plan("a", a, 1.5)  # type: ignore[arg-type]
    y.plan("b", b, 0.005)  # type: ignore[arg-type]  # already below the cap: kept
    assert (a.quotas, b.quotas) == ([1.5], [0.005])
    y.sent("r0")
    y.sent("r1")  # already serving: no second write
    assert (a.quotas, b.quotas) == ([1.5, cfg.serving_training_cores], [0.005, 0.005])
    y.plan("a", a, 1.0)  # a new period's plan while serving stays capped
    assert a.quotas[-1] == cfg.serving_training_cores
    y.answered("r0")
    assert a.quotas[-1] == cfg.serving_training_cores and y.serving
    b.gone = True  # b's job ended between the plan and the answer: skipped, not an error
    y.answered("r1")
    assert not y.serving and a.quotas[-1] == 1.0
    y.forget("b")
    y.sent("r2")
    assert a.quotas[-1] == cfg.serving_training_cores and len(b.quotas) == 2  # b forgotten: untouched
    writes = len(a.quotas)
    y.answered("unknown")  # an answer to nothing in flight changes nothing
    assert y.serving and len(a.quotas) == writes
    idle = mt.TrainingYield(cfg)  # static mode: nothing sent through it, answers write nothing
    c = _Group()
    idle.plan("c", c, 1.0)  # type: ignore[arg-type]
    idle.answered("r9")
    assert c.quotas == [1.0]
    with pytest.raises(ValueError, match="serving_training_cores"):
        PlannerConfig(memory=MiB, cores=2.0, serving_training_cores=0.0)


@pytest.mark.cgroup
def test_a_real_training_group_is_throttled_while_serving_and_restored_after() -> None:
    from autoglm_rt import resources

    cfg = PlannerConfig(memory=MiB, cores=2.0)
    group = resources.JobGroup.create(f"pid-{os.getpid()}-yield", "train")
    try:
        y = mt.TrainingYield(cfg)
        y.plan("t", group, 1.25)
        assert group.cpu_quota() == 1.25
        y.sent("r")
        assert group.cpu_quota() == pytest.approx(cfg.serving_training_cores)
        y.answered("r")
        assert group.cpu_quota() == 1.25
    finally:
        group.remove()


def test_the_service_takes_one_worker_per_core_its_quota_reaches_into() -> None:
    from autoglm_rt.trainers.tenant_service import quota_workers

    cores = os.cpu_count() or 1
    assert quota_workers(None) == cores and quota_workers(math.nan) == cores and quota_workers(-1.0) == cores
    assert quota_workers(0.5) == 1 and quota_workers(0.01) == 1 and quota_workers(1.0) == 1
    assert quota_workers(1.0 + 1e-9) == 1  # a quota read back from microseconds is not rounded up
    assert quota_workers(1.25) == min(2, cores) and quota_workers(1.5) == min(2, cores)
    assert quota_workers(2.0) == min(2, cores) and quota_workers(2.01) == min(3, cores)
    assert quota_workers(1e6) == cores


@pytest.mark.cgroup
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to see a second thread")
def test_the_live_service_starts_a_second_worker_only_when_its_quota_reaches_a_second_core() -> None:
    from autoglm_rt import resources

    tasks: dict[float, tuple[int, int]] = {}
    root = Path(__file__).resolve().parents[1]
    for quota in (0.5, 1.5, 2.0):
        group = resources.JobGroup.create(f"pid-{os.getpid()}-svc", f"q{round(quota * 10)}")
        try:
            group.set_cpu_quota(quota)
            with subprocess.Popen(
                [sys.executable, "-m", "autoglm_rt.trainers.tenant_service", "--passes=2"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(root / "python"), "OMP_NUM_THREADS": "1"},
                preexec_fn=lambda g=group: g.add(os.getpid()),  # type: ignore[misc]
            ) as proc:
                assert proc.stdin is not None and proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready"
                before = len(os.listdir(f"/proc/{proc.pid}/task"))
                proc.stdin.write("r0\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "r0"
                tasks[quota] = (before, len(os.listdir(f"/proc/{proc.pid}/task")))
                proc.stdin.close()
                assert proc.wait(timeout=30) == 0
        finally:
            group.remove()
    assert tasks[0.5][1] == tasks[0.5][0]  # one worker: the request ran on the main thread alone
    for quota in (1.5, 2.0):  # one helper thread for the second pass, no intra-op pool
        assert tasks[quota][1] == tasks[quota][0] + 1


@pytest.mark.parametrize("passes", [1, 2, 7, 8, 9])
@pytest.mark.parametrize("workers", [0, 1, 2, 3, 16])
def test_a_requests_passes_are_split_evenly_over_its_workers(passes: int, workers: int) -> None:
    from autoglm_rt.trainers.tenant_service import split_passes

    parts = split_passes(passes, workers)
    assert sum(parts) == passes
    assert len(parts) == max(1, min(passes, workers))
    assert max(parts) - min(parts) <= 1 and parts == sorted(parts, reverse=True) and min(parts) >= 1


def test_the_service_refuses_passes_below_one() -> None:
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "autoglm_rt.trainers.tenant_service", "--passes=0"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root / "python")},
        timeout=60,
    )
    assert run.returncode == 2 and "--passes must be >= 1" in run.stderr.splitlines()[-1]


@pytest.mark.cgroup
def test_a_live_run_reports_the_work_its_groups_did_and_each_jobs_progress(tmp_path: Path) -> None:
    w = mt.Workload(training_jobs=1, request_window=2.0, seed=1)  # one cnn-s job and three requests
    assert [a.kind for a in mt.make_trace(w) if a.kind != "request"] == ["cnn-s"]
    r = mt.run_mode("dynamic", w, tmp_path)
    assert r.jobs_failed == 0 and r.requests_answered == r.requests == 3
    steps = int(next(a for a in mt.CATALOG["cnn-s"].args if a.startswith("--steps="))[len("--steps=") :])
    progress = [s["jobs"]["train0"] for s in r.timeline if "step" in s["jobs"].get("train0", {})]
    seen = [p["step"] for p in progress]
    assert seen and seen == sorted(seen) and 1 <= seen[-1] <= steps
    assert all(p["micro_batch"] >= 1 and p["threads"] >= 1 for p in progress)
    # The sampled rates integrate to at most what the group's accounting says it used in all.
    integral = sum(
        b["jobs"].get("train0", {}).get("cpu_used", 0.0) * (b["t"] - a["t"]) for a, b in itertools.pairwise(r.timeline)
    )
    assert 1.0 < r.training_cpu_seconds <= w.cores * r.makespan_seconds + 1.0  # an interpreter, torch, 30 steps
    assert integral <= r.training_cpu_seconds * 1.05 + 0.1
    # The job's own record: its group's CPU time is the whole training figure, its end the makespan.
    (run,) = r.job_runs
    assert (run["name"], run["kind"], run["state"], run["attempts"], run["oom_kills"]) == (
        "train0",
        "cnn-s",
        "succeeded",
        1,
        0,
    )
    assert run["cpu_seconds"] == r.training_cpu_seconds
    assert run["arrived"] <= run["started"] < run["ended"] == r.makespan_seconds


@pytest.mark.cgroup
def test_a_live_run_acts_on_arrivals_and_exits_at_once_not_at_its_next_period(tmp_path: Path) -> None:
    # A 30 s period: a loop that only polled would admit the second job and see the first exit
    # no sooner than 30 s in.
    w = mt.Workload(training_jobs=2, job_rate=1.0, request_window=1.0, seed=0, tick=30.0)
    second = [a for a in mt.make_trace(w) if a.kind != "request"][1]
    assert 0.5 < second.at < 5.0
    started = time.monotonic()
    r = mt.run_mode("dynamic", w, tmp_path)
    took = time.monotonic() - started
    assert r.jobs_failed == 0 and r.requests_answered == r.requests
    assert took < w.tick and r.makespan_seconds < took
    admitted = next(s["t"] for s in r.timeline if second.name in s["jobs"])
    assert second.at <= admitted < second.at + 0.3
    # The last job's end is its exit: the period that found it gone began within 0.3 s of it (just
    # after, woken by it, or just before, when the exit came while that period was planning).
    ends = [b["t"] for a, b in itertools.pairwise(r.timeline) if a["jobs"] and not b["jobs"]]
    assert ends and abs(ends[-1] - r.makespan_seconds) < 0.3
    assert [j["name"] for j in r.job_runs] == ["train0", second.name]  # in order of arrival
    assert max(j["ended"] for j in r.job_runs) == r.makespan_seconds
    assert sum(j["cpu_seconds"] for j in r.job_runs) == pytest.approx(r.training_cpu_seconds)


def test_the_services_schedstat_counts_every_thread_of_the_process() -> None:
    import hashlib
    import threading

    data = b"x" * (8 << 20)
    burnt, leave = threading.Event(), threading.Event()

    def burn() -> None:
        for _ in range(40):
            hashlib.sha256(data).digest()  # releases the GIL on large inputs: real CPU in this thread
        burnt.set()
        leave.wait(30)  # alive while measured: an exited thread's schedstat goes with it

    before, cpu0 = mt._schedstat(os.getpid()), time.process_time()
    helper = threading.Thread(target=burn)
    helper.start()
    try:
        assert burnt.wait(30)
        after, cpu1 = mt._schedstat(os.getpid()), time.process_time()
    finally:
        leave.set()
        helper.join()
    assert before is not None and after is not None
    used = after[0] - before[0]
    assert cpu1 - cpu0 > 0.1  # the helper did measurable work
    assert used == pytest.approx(cpu1 - cpu0, rel=0.2, abs=0.02)  # the kernel's CPU clock for the process
    assert mt._schedstat(2**22 + 12345) is None  # no such process


def test_a_request_runs_every_pass_once_across_its_workers_and_raises_a_helpers_error() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from autoglm_rt.trainers.tenant_service import answer, split_passes

    class Counting(torch.nn.Module):
        def __init__(self, fail_in_helper: bool = False) -> None:
            super().__init__()
            self.lock = threading.Lock()
            self.calls: list[int] = []
            self.fail_in_helper = fail_in_helper

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with self.lock:
                self.calls.append(threading.get_ident())
            if self.fail_in_helper and threading.current_thread() is not threading.main_thread():
                raise RuntimeError("helper failed")
            return x

    x = torch.zeros(1)
    with ThreadPoolExecutor(max_workers=2) as helpers:
        model = Counting()
        answer(model, x, split_passes(7, 3), helpers)
        assert len(model.calls) == 7
        assert model.calls.count(threading.get_ident()) == 3  # the largest part runs in the caller
        bad = Counting(fail_in_helper=True)
        with pytest.raises(RuntimeError, match="helper failed"):
            answer(bad, x, split_passes(4, 2), helpers)


def test_tenant_envs_tune_malloc_for_training_only_and_keep_the_users_tunables() -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/mine", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OMP_NUM_THREADS": "8"}
    training, service = mt.tenant_envs(base)
    assert training["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert training["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert service["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and "MALLOC_MMAP_THRESHOLD_" not in service
    for env in (training, service):
        assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1"
        assert env["PYTHONPATH"].split(os.pathsep)[1:] == ["/mine"]
        assert (Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "autoglm_rt" / "__init__.py").is_file()
    training, service = mt.tenant_envs({})
    assert training["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "GLIBC_TUNABLES" not in service


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "none"


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_a_training_tenants_large_buffers_come_in_huge_pages() -> None:
    """A 64 MiB torch buffer in a process started with the training environment is backed by
    transparent huge pages; with the service's environment (glibc's default) it is not when THP
    is on madvise only."""
    code = (
        "import torch\n"
        "x = torch.ones(16 << 20)\n"  # 64 MiB: above the mmap threshold, touched
        "rollup = open('/proc/self/smaps_rollup').read().splitlines()\n"
        "print(next(int(l.split()[1]) for l in rollup if l.startswith('AnonHugePages:')))\n"
    )
    training, service = mt.tenant_envs(os.environ)
    huge = {}
    for name, env in (("training", training), ("service", service)):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        huge[name] = int(out.stdout.split()[-1])  # KiB
    assert huge["training"] >= 16 * 1024, huge  # a quarter of the 64 MiB at least (fragmentation)
    if _thp_mode() == "madvise":
        assert huge["service"] < 8 * 1024, huge


def _fake_result(mode: str, makespan: float, ooms: int, response: float) -> mt.ModeResult:
    return mt.ModeResult(
        mode=mode,
        mean_response_seconds=response,
        p95_response_seconds=response,
        cpu_utilization=0.5,
        memory_utilization=0.25,
        oom_kills=ooms,
        jobs_failed=0,
        jobs=2,
        makespan_seconds=makespan,
        samples_per_second=10.0,
        requests=3,
        requests_answered=3,
        preemptions=0,
        job_runs=[{"name": "train0"}],
        timeline=[{"t": makespan}],
    )


def test_rounds_alternate_the_order_and_report_each_figures_median(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Drift on a shared machine: the mode run second in a round is slower. Alternating cancels it.
    calls: list[str] = []
    makespans = {"static": [10.0, 14.0, 11.0], "dynamic": [9.0, 30.0, 8.0]}
    ooms = {"static": [2, 1, 3], "dynamic": [0, 0, 1]}
    responses = {"static": [0.2, math.nan, 0.4], "dynamic": [math.nan, math.nan, math.nan]}

    def fake_run_mode(mode: str, w: mt.Workload, work_dir: object, log: object = None) -> mt.ModeResult:
        i = sum(1 for c in calls if c == mode)
        calls.append(mode)
        return _fake_result(mode, makespans[mode][i], ooms[mode][i], responses[mode][i])

    monkeypatch.setattr(mt, "run_mode", fake_run_mode)
    monkeypatch.setattr(mt, "availability", lambda: ("cgroup-v1", ""))
    monkeypatch.setattr(mt.JobGroup, "tree", classmethod(lambda cls, backend=None: _FakeTree()))
    doc = mt.run_comparison(mt.Workload(), tmp_path, rounds=3)
    assert calls == ["static", "dynamic", "dynamic", "static", "static", "dynamic"]
    assert [r["order"] for r in doc["rounds"]] == [["static", "dynamic"], ["dynamic", "static"], ["static", "dynamic"]]
    assert doc["static"]["makespan_seconds"] == 11.0 and doc["dynamic"]["makespan_seconds"] == 9.0
    assert doc["static"]["oom_kills"] == 3 and doc["dynamic"]["oom_kills"] == 1  # failures: the worst round
    assert doc["static"]["preemptions"] == 0 and type(doc["static"]["requests"]) is int  # ints stay ints
    assert type(doc["static"]["oom_kills"]) is int
    assert doc["static"]["mean_response_seconds"] == pytest.approx(0.3)  # the NaN round left out
    assert math.isnan(doc["dynamic"]["mean_response_seconds"])  # NaN in every round: NaN
    assert "job_runs" not in doc["static"] and doc["rounds"][1]["dynamic"]["job_runs"] == [{"name": "train0"}]
    assert doc["timeline"] == {"static": [{"t": 10.0}], "dynamic": [{"t": 9.0}]}  # the first round's
    text = mt.format_comparison(doc)
    assert "3 rounds" in text and "round 2 (dynamic then static)" in text and "makespan 2.14x" in text
    # Rounds' own makespan ratios 0.90, 2.14, 0.73: their median pairs each round's runs.
    assert "own ratios (each pairs runs minutes apart): response nanx, CPU +0 pt, makespan 0.90x" in text
    calls.clear()
    one = mt.run_comparison(mt.Workload(), tmp_path, rounds=1)
    assert "rounds" not in one and one["static"]["job_runs"] == [{"name": "train0"}]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="rounds must be an int >= 1"):
            mt.run_comparison(mt.Workload(), tmp_path, rounds=bad)  # type: ignore[arg-type]


class _FakeTree:
    def cpu_weight(self) -> int:
        return 100


@pytest.mark.cgroup
def test_utilisation_counts_the_services_cpu_up_to_the_makespan_only(tmp_path: Path) -> None:
    # One short job, requests for 12 s: most are answered after the training has ended.
    w = mt.Workload(training_jobs=1, request_window=12.0, seed=1)
    trace = mt.make_trace(w)
    r = mt.run_mode("dynamic", w, tmp_path)
    assert r.jobs_failed == 0 and r.requests_answered == r.requests
    before = sum(1 for a in trace if a.kind == "request" and a.at < r.makespan_seconds)
    assert r.requests - before >= 3  # the case under test: requests go on after the makespan
    service_in_makespan = r.cpu_utilization * w.cores * r.makespan_seconds - r.training_cpu_seconds
    # At most the requests sent before the end (one more may be in flight) and a little idle time;
    # the whole run's service CPU would hold every request.
    assert 0.0 <= service_in_makespan <= r.service_on_cpu_seconds * (before + 1) + 0.1
    assert service_in_makespan < r.service_on_cpu_seconds * r.requests


def test_a_job_before_its_first_step_keeps_its_request_when_memory_is_cut() -> None:
    # Memory for the floors at micro-batch 1 of four jobs (4 x 287.5 MiB), not for four requests.
    cfg = PlannerConfig(memory=1300 * MiB, cores=2.0, max_running=4)
    ran = {"running": True, "limit": 300 * MiB, "peak": 200 * MiB, "progress": 0.5}
    tenants = [job("a", 0.0, **ran), job("b", 1.0, **ran), job("c", 2.0, **ran), job("new", 3.0)]
    plan = plan_dynamic(tenants, cfg, now=5.0)
    # Its request leaves room only for three floors beside it: it is admitted at its request, the
    # others keep at least theirs (floor 250 MiB + 15% headroom).
    assert "new" in plan.admit and plan.memory["new"] >= 400 * MiB
    assert all(plan.memory[n] >= int(250 * MiB * (1 + cfg.headroom)) for n in "abc")
    assert sum(plan.memory.values()) <= cfg.memory
    # Started but not past its first step: the same; after it, the floor at micro-batch 1 again.
    starting = job("new", 3.0, running=True, starting=True, limit=400 * MiB, peak=100 * MiB)
    assert plan_dynamic([*tenants[:3], starting], cfg, now=6.0).memory["new"] >= 400 * MiB
    stepped = job("new", 3.0, running=True, limit=400 * MiB, peak=100 * MiB)
    assert plan_dynamic([*tenants[:3], stepped], cfg, now=7.0).memory["new"] < 400 * MiB
    # Not enough memory for its request beside the others' floors: it waits (not urgent).
    tight = PlannerConfig(memory=1150 * MiB, cores=2.0, max_running=4)
    assert "new" not in plan_dynamic(tenants, tight, now=5.0).admit


@pytest.mark.cgroup
@pytest.mark.parametrize("kind", sorted(mt.CATALOG))
def test_each_kinds_first_step_fits_in_its_request(kind: str, tmp_path: Path) -> None:
    # The dynamic plan holds a job at its request until its first step (memory_floor), because
    # that step runs at the full micro-batch: the request must hold it, under the live limit.
    from autoglm_rt import resources

    spec = mt.CATALOG[kind]
    env, _ = mt.tenant_envs(os.environ)
    args = [a for a in spec.args if not a.startswith("--steps=")]
    status = tmp_path / "status.json"
    cmd = [sys.executable, "-m", "autoglm_rt.trainers.tenant_job", *args, "--steps=1", f"--status={status}"]
    group = resources.JobGroup.create(f"pid-{os.getpid()}-first", kind)
    try:
        group.set_memory_limit(spec.request)
        run = subprocess.run(
            cmd, env=env, preexec_fn=lambda: group.add(os.getpid()), capture_output=True, text=True, timeout=120
        )
        assert (run.returncode, group.oom_kills()) == (0, 0), run.stderr[-400:]
        done = json.loads(status.read_text())
        assert done["step"] == 1 and done["limit_bytes"] == spec.request
        assert 0 < done["peak_bytes"] <= spec.request  # the group's peak, read in the job
    finally:
        group.remove()


def test_the_timeline_png_draws_each_mode_and_marks_every_oom_kill(tmp_path: Path) -> None:
    from matplotlib.image import imread

    def sample(t: float, ooms: list[str]) -> dict[str, object]:
        job = {"usage": 200 * MiB, "limit": 300 * MiB, "cpu_used": 0.7}
        return {"t": t, "jobs": {"train0": job}, "service_usage": 50 * MiB, "service_cpu_used": 0.1, "ooms": ooms}

    def red_pixels(ooms: list[str]) -> int:
        workload = {"memory": 1024 * MiB, "service_memory": 100 * MiB, "cores": 2.0}
        tl = [sample(0.0, []), sample(1.0, ooms), sample(2.0, [])]
        path = tmp_path / "sub" / f"{len(ooms)}.png"
        mt.write_timeline_png({"workload": workload, "timeline": {"static": tl, "dynamic": tl}}, path)
        image = imread(path)
        assert image.shape[1] > image.shape[0] > 100  # two modes side by side, two rows each
        return int(((image[..., 0] > 0.8) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)).sum())

    none, one, two = red_pixels([]), red_pixels(["train0"]), red_pixels(["train0", "train1"])
    assert none < one < two  # each kill adds its mark and its label, in both modes
