"""The mission's static-vs-dynamic comparison, with real tenants under live cgroup limits.

One seeded trace (training jobs arriving at random, each a real torch process from
``autoglm_rt.trainers.tenant_job``; short inference requests to a resident service,
``autoglm_rt.trainers.tenant_service``) runs twice on the same machine share (``memory`` bytes,
``cores`` CPUs):

- **static** (:func:`~autoglm_rt.policy.scheduler.static_plan.plan_static`): each tenant gets a fixed
  partition sized by its request, first come first served, no resize; jobs run as today's jobs do
  (``--fixed``: no micro-batch adaptation). A job whose input grows past its partition is
  OOM-killed by the kernel and fails.
- **dynamic** (:func:`~autoglm_rt.policy.scheduler.dynamic_plan.plan_dynamic`): every ``tick``
  seconds memory limits and CPU quotas are re-divided (phase share, priority score, preemption,
  headroom over each job's floor; an urgent job blocked only by the running-job cap pauses its
  victim in place, memory kept and CPU quota at the minimum, and the victim resumes when a slot
  frees); a limit is lowered by announcing it (the cgroup's memory target) and enforcing it once
  the job's peak is under it, and jobs adapt their micro-batch to it
  (``Runtime(pool=CgroupMemory.own())``). A request gives the service every core and the top
  weight at once, and the training jobs yield (:class:`TrainingYield`) until it is answered; the
  service splits each request's passes over one worker per core its quota reaches into (static:
  its 0.5-core partition, one worker).

Both modes plan every ``tick`` seconds and at once on an event (an arrival, a tenant's exit, an
answered request), so a freed partition or core is given out without waiting for the period and
a job's end is its process's exit.

Figures per mode (what :func:`run_mode` returns): mean/p95 response of the requests (arrival to
answer), ``cpu_utilization`` = CPU-seconds of all tenants' groups up to the end of the makespan
(requests answered after it do not count) / (cores x makespan),
``memory_utilization`` = mean over samples of the tenants' summed usage / ``memory``,
``oom_kills`` (the groups' kernel counters), ``jobs_failed``, ``jobs``, ``makespan_seconds``
(first arrival to last training job done), ``samples_per_second`` (training samples of
succeeded jobs / makespan), ``preemptions`` (stops and pauses) and ``training_cpu_seconds`` (the
training groups' CPU time: the work each mode did, up to the kill for a failed job; the
makespan is read beside it), and ``job_runs`` (each training job's arrival, start, end, state
and CPU-seconds). Each timeline sample keeps a job's step, micro-batch and threads
from its status file. Without a writable cgroup
hierarchy the comparison cannot enforce anything and says so (``enforcement: none``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoglm_rt.policy.scheduler.cpu_plan import quota_while_serving
from autoglm_rt.policy.scheduler.dynamic_plan import plan_dynamic
from autoglm_rt.policy.scheduler.static_plan import plan_static
from autoglm_rt.policy.scheduler.tenants import PlannerConfig, ResourcePlan, TenantState
from autoglm_rt.resources import JobGroup, ResourceError, availability, cleanup_stale, detect

__all__ = [
    "CATALOG",
    "Arrival",
    "JobKind",
    "TrainingYield",
    "Workload",
    "format_comparison",
    "make_trace",
    "run_comparison",
    "run_mode",
    "tenant_envs",
    "write_timeline_png",
]

MiB = 1 << 20


@dataclass(frozen=True)
class JobKind:
    """One kind of training tenant: its ``tenant_job`` arguments and its memory, measured on this
    machine (``benches/multi_tenant.py --calibrate``): ``request`` = 1.25 x the peak of its first
    steps (what a user sizing from a trial run asks for), ``floor`` = its peak at micro-batch 1."""

    name: str
    args: tuple[str, ...]
    samples: int  # batch x steps
    request: int
    floor: int


# Peaks measured here with /tmp-free ``benches/multi_tenant.py --calibrate`` style runs (MiB,
# dev-cpu, in a cgroup, --fixed): cnn-s 230 at the start / 219 at micro-batch 1; cnn-m 282 /
# 382 grown 1.6x / 219; gpt-s 230 / 220; gpt-m (batch 32) ~265 / 338 grown 2.2x. A torch
# process alone holds ~215 MiB; the request is 1.25x the start's peak. The first step runs at the
# full micro-batch: cnn-s 232, cnn-m 284, gpt-s 235-246, gpt-m 283-304 (2026-12-06; a group's peak
# read after the job ends is only its last step's: the Runtime resets it every step). So a job
# keeps its request until that step (memory_plan.memory_floor), not floor plus headroom.
CATALOG: dict[str, JobKind] = {
    "cnn-s": JobKind(
        "cnn-s", ("--model=cnn", "--width=16", "--batch=32", "--side=32", "--steps=30"), 960, 288 * MiB, 220 * MiB
    ),
    "cnn-m": JobKind(
        "cnn-m",
        ("--model=cnn", "--width=24", "--batch=64", "--side=40", "--steps=20", "--grow-from=0.4", "--grow=1.6"),
        1280,
        352 * MiB,
        220 * MiB,
    ),
    "gpt-s": JobKind(
        "gpt-s", ("--model=gpt", "--width=64", "--batch=16", "--side=64", "--steps=30"), 480, 288 * MiB, 220 * MiB
    ),
    "gpt-m": JobKind(
        "gpt-m",
        ("--model=gpt", "--width=128", "--batch=32", "--side=96", "--steps=20", "--grow-from=0.4", "--grow=2.5"),
        640,
        330 * MiB,
        222 * MiB,
    ),
}


@dataclass(frozen=True)
class Workload:
    """The trace's shape. Times in seconds, memory in bytes, a seeded Poisson process."""

    memory: int = 2048 * MiB
    cores: float = 2.0
    training_jobs: int = 6
    job_rate: float = 0.25  # training arrivals per second
    urgent_every: int = 4  # every k-th training job is urgent (urgency 0.9); 0: none
    request_rate: float = 1.0
    request_window: float = 30.0
    request_passes: int = 8  # forward passes per request: its work (~90 ms of one dev-cpu core)
    service_memory: int = 400 * MiB
    service_cpus: float = 0.5
    training_cpus: float = 0.75  # a training job's static CPU partition
    tick: float = 0.5
    seed: int = 0
    tenant_weight: int | None = None  # CPU weight of all tenants together (100: one process); None: as is

    def __post_init__(self) -> None:
        for name in ("job_rate", "request_rate", "request_window", "tick", "cores", "service_cpus", "training_cpus"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if isinstance(self.request_passes, bool) or not isinstance(self.request_passes, int) or self.request_passes < 1:
            raise ValueError(f"request_passes must be an int >= 1, got {self.request_passes!r}")
        if self.training_jobs < 1:
            raise ValueError(f"training_jobs must be >= 1, got {self.training_jobs}")
        weight = self.tenant_weight
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 10000):
            raise ValueError(f"tenant_weight must be an int in 1..10000 or None, got {self.tenant_weight!r}")
        if self.memory < 4 * self.service_memory:
            raise ValueError(f"memory must be >= 4x service_memory ({4 * self.service_memory}), got {self.memory}")
        if self.cores < self.service_cpus + self.training_cpus:
            # Static partitions would never admit a training job beside the service: the run
            # could only wait out its time limit.
            raise ValueError(
                f"cores must be >= the service's and one training job's static partitions "
                f"({self.service_cpus:g} + {self.training_cpus:g}), got {self.cores:g}"
            )


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    name: str
    kind: str  # a CATALOG key, or "request"
    urgency: float = 0.5


def make_trace(w: Workload) -> list[Arrival]:
    """Training jobs (CATALOG kinds in turn) and requests, each a seeded Poisson process."""
    rng = random.Random(w.seed)
    kinds = sorted(CATALOG)
    first = rng.randrange(len(kinds))  # kinds cycle from a seeded start, so every trace has each
    out: list[Arrival] = []
    t = 0.0
    for i in range(w.training_jobs):
        urgent = w.urgent_every > 0 and i % w.urgent_every == w.urgent_every - 1
        kind = kinds[(first + i) % len(kinds)]
        out.append(Arrival(round(t, 3), f"train{i}", kind, 0.9 if urgent else 0.3))
        t += rng.expovariate(w.job_rate)
    t = rng.expovariate(w.request_rate)
    i = 0
    while t <= w.request_window:
        out.append(Arrival(round(t, 3), f"req{i}", "request", 1.0))
        t += rng.expovariate(w.request_rate)
        i += 1
    return sorted(out, key=lambda a: (a.at, a.name))


@dataclass
class _Tenant:
    arrival: Arrival
    job: JobKind
    state: str = "pending"  # pending | running | paused | stopping | succeeded | failed
    proc: subprocess.Popen[bytes] | None = None
    group: JobGroup | None = None
    attempt: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    exited_at: float | None = None  # when the current attempt's process exited (its waiter saw it)
    step_at_spawn: object = None  # its status's step when the current attempt started: none done since
    oom_kills: int = 0
    cpu_seconds: float = 0.0
    hard_limit: int | None = None
    preemptions: int = 0
    peaks: list[tuple[float, int]] = field(default_factory=list)  # (time, group peak) samples
    cpu_mark: tuple[float, float] | None = None  # (time, group CPU-seconds) at the last period
    cpu_used: float = 0.0  # cores used over the last period

    def recent_peak(self, now: float, window: float = 5.0) -> int:
        """The highest peak sampled in the last ``window`` seconds (the job resets its group's
        peak every step, so one sample is one step at most)."""
        self.peaks = [(t, p) for t, p in self.peaks if now - t <= window]
        return max((p for _, p in self.peaks), default=0)


class TrainingYield:
    """Training jobs yield the CPU to requests in flight: from the first request sent to the last
    one answered each training group's quota is
    :func:`~autoglm_rt.policy.scheduler.cpu_plan.quota_while_serving` of its planned quota, and
    the plan comes back the moment the last request is answered (event-driven: a request lasts
    milliseconds, a control period half a second). Not thread-safe: callers hold one lock."""

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.in_flight: set[str] = set()
        self._planned: dict[str, tuple[JobGroup, float]] = {}

    @property
    def serving(self) -> bool:
        return bool(self.in_flight)

    def plan(self, name: str, group: JobGroup, cores: float) -> None:
        """The period's quota for ``name``'s group, applied now (capped while serving)."""
        self._planned[name] = (group, cores)
        self._apply(name)

    def forget(self, name: str) -> None:
        """``name``'s group is gone (its job ended or was preempted)."""
        self._planned.pop(name, None)

    def sent(self, request: str) -> None:
        was = self.serving
        self.in_flight.add(request)
        if not was:
            self._apply_all()

    def answered(self, request: str) -> None:
        if request not in self.in_flight:
            return  # not sent through here (static mode) or answered twice: nothing to restore
        self.in_flight.remove(request)
        if not self.serving:
            self._apply_all()

    def _apply_all(self) -> None:
        for name in list(self._planned):
            self._apply(name)

    def _apply(self, name: str) -> None:
        group, cores = self._planned[name]
        with contextlib.suppress(ResourceError):  # a job that just ended has no group to set
            group.set_cpu_quota(quota_while_serving(cores, self.serving, self.cfg))


@dataclass
class ModeResult:
    mode: str
    mean_response_seconds: float
    p95_response_seconds: float
    cpu_utilization: float
    memory_utilization: float
    oom_kills: int
    jobs_failed: int
    jobs: int
    makespan_seconds: float
    samples_per_second: float
    requests: int
    requests_answered: int
    preemptions: int
    service_on_cpu_seconds: float = math.nan  # mean per request: the service's CPU time, all threads
    service_queue_seconds: float = math.nan  # mean per request: its threads' time runnable but not running
    training_cpu_seconds: float = 0.0  # all training groups' CPU time, failed and preempted attempts too
    job_runs: list[dict[str, Any]] = field(default_factory=list)  # per training job: see _job_run
    timeline: list[dict[str, Any]] = field(default_factory=list)


#: What the timeline keeps of a job's status file (see ``tenant_job --status``).
_STATUS_KEYS = ("step", "micro_batch", "threads")


def tenant_envs(base: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The environments of the training tenants and of the service: ``base`` with this package on
    ``PYTHONPATH`` and one OpenMP thread (each tenant sets its own count). Training tenants also
    get glibc's malloc tuned for limits that move: ``MALLOC_MMAP_THRESHOLD_=131072`` (freed
    activations go back to the kernel at once) and ``glibc.malloc.hugetlb=1`` appended to
    ``base``'s ``GLIBC_TUNABLES`` (each buffer mapped afresh faults in 2 MiB pages where THP is on
    madvise; ``benches/tenant_malloc.py`` measures it). The resident service keeps glibc's
    default and ``base``'s tunables: returning every freed activation would make each request
    fault its buffers in again (measured: 27 -> 36-44 ms of CPU each)."""
    common = {
        **base,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), base.get("PYTHONPATH")) if p
        ),
        "OMP_NUM_THREADS": "1",
    }
    tunables = ":".join(t for t in (base.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1") if t)
    training = {**common, "MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": tunables}
    return training, common


def _progress(status: dict[str, Any]) -> float | None:
    """``step / steps`` from a job's status, or None unless both are ints with 0 <= step <= steps > 0."""
    step, steps = status.get("step"), status.get("steps")
    if type(step) is not int or type(steps) is not int or not 0 <= step <= steps or steps == 0:
        return None
    return step / steps


def _status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_mode(mode: str, w: Workload, work_dir: str | Path, log: Callable[[str], None] | None = None) -> ModeResult:
    """Runs the trace under ``mode`` ("static" or "dynamic") with real processes in cgroups."""
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode: expected 'static' or 'dynamic', got {mode!r}")
    backend = detect()
    if backend is None:
        raise ResourceError(availability()[1])
    say = log or (lambda _line: None)
    work = Path(work_dir) / mode
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scope = f"pid-{os.getpid()}-{mode}"
    cleanup_stale(backend)
    cfg = PlannerConfig(memory=w.memory, cores=w.cores)
    trace = make_trace(w)
    env, service_env = tenant_envs(os.environ)
    tenants = {a.name: _Tenant(a, CATALOG[a.kind]) for a in trace if a.kind != "request"}
    requests = [a for a in trace if a.kind == "request"]
    service_group = JobGroup.create(scope, "service", backend)
    service_group.set_memory_limit(w.service_memory)
    service_group.set_cpu_quota(w.service_cpus)
    service = subprocess.Popen(
        [sys.executable, "-m", "autoglm_rt.trainers.tenant_service", f"--passes={w.request_passes}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=service_env,
        text=True,
        preexec_fn=lambda: service_group.add(os.getpid()),
    )
    assert service.stdin is not None and service.stdout is not None
    if service.stdout.readline().strip() != "ready":
        raise RuntimeError("the inference service did not start")
    answers: queue.Queue[tuple[str, float]] = queue.Queue()
    # Set when a tenant exits or a request is answered: the control loop acts on events at once
    # (a freed partition is refilled, idle cores are lent) and on its period otherwise.
    wake = threading.Event()

    sent: dict[str, float] = {}
    service_lock = threading.Lock()  # sender, reader and control loop all set CPU quotas
    yielding = TrainingYield(cfg)  # dynamic: training jobs yield while requests are in flight

    sched_at: dict[str, tuple[float, float]] = {}  # request -> service's (on-CPU, run-queue) s at send
    sched_used: dict[str, tuple[float, float]] = {}  # request -> (on-CPU, run-queue wait) s while it ran

    def reader() -> None:
        assert service.stdout is not None
        for line in service.stdout:
            at = time.monotonic()
            rid = line.strip()
            now_sched = _schedstat(service.pid)
            if rid in sched_at and now_sched is not None:
                before = sched_at[rid]
                sched_used[rid] = (now_sched[0] - before[0], now_sched[1] - before[1])
            answers.put((rid, at))
            with service_lock:
                yielding.answered(rid)  # the last one in flight: training gets its plan back
            wake.set()

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    answered: dict[str, float] = {}
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()
    svc_cpu0 = service_group.cpu_seconds()
    # The service's CPU-seconds when the last training job ended: utilisation is over the makespan,
    # and requests may go on after it (the request window is its own).
    svc_cpu_in_makespan: float | None = None
    pending_arrivals = [a for a in trace if a.kind != "request"]
    service_quota = w.service_cpus
    stop_sending = threading.Event()

    def sender() -> None:
        """Delivers each request at its arrival time (not at the control loop's next period); in
        dynamic mode a request gives the service its busy share at once and the training jobs
        yield until the reader sees the last request in flight answered."""
        nonlocal service_quota
        assert service.stdin is not None
        for a in requests:
            if stop_sending.wait(max(0.0, t0 + a.at - time.monotonic())):
                return
            with service_lock:
                if mode == "dynamic" and service_quota != cfg.busy_service_cores:
                    service_group.set_cpu_quota(cfg.busy_service_cores)
                    service_group.set_cpu_weight(cfg.service_weight_busy)
                    service_quota = cfg.busy_service_cores
                if mode == "dynamic":
                    yielding.sent(a.name)
                stat = _schedstat(service.pid)
                if stat is not None:
                    sched_at[a.name] = stat
                sent[a.name] = time.monotonic()
                service.stdin.write(a.name + "\n")
                service.stdin.flush()

    sending = threading.Thread(target=sender, daemon=True)
    sending.start()

    def await_exit(t: _Tenant, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        exited = time.monotonic() - t0
        if t.proc is proc:
            t.exited_at = exited
        wake.set()

    def spawn(t: _Tenant) -> None:
        t.attempt += 1
        t.group = JobGroup.create(scope, f"{t.arrival.name}.{t.attempt}", backend)
        t.cpu_mark = (time.monotonic() - t0, 0.0)  # a new group has used no CPU: its first period counts
        jdir = work / t.arrival.name
        (jdir / "ckpt").mkdir(parents=True, exist_ok=True)
        t.step_at_spawn = _status(jdir / "status.json").get("step")
        cmd = [
            sys.executable,
            "-m",
            "autoglm_rt.trainers.tenant_job",
            *t.job.args,
            "--status",
            str(jdir / "status.json"),
        ]
        if mode == "static":
            cmd.append("--fixed")
        group = t.group
        with open(jdir / "log", "ab") as fh:
            t.proc = subprocess.Popen(
                cmd,
                env={**env, "AUTOGLM_RT_CHECKPOINT_DIR": str(jdir / "ckpt")},
                stdout=fh,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: group.add(os.getpid()),
            )
        t.state = "running"
        if t.started_at is None:  # its first attempt's start (0.0 is a start too)
            t.started_at = time.monotonic() - t0
        t.exited_at = None
        threading.Thread(target=await_exit, args=(t, t.proc), daemon=True).start()

    def apply_limits(t: _Tenant, limit: int, cores: float, now: float) -> None:
        g = t.group
        assert g is not None
        with service_lock:
            yielding.plan(t.arrival.name, g, cores)
        if t.hard_limit is None or limit >= t.hard_limit:
            g.set_memory_limit(limit)
            g.set_memory_target(None)
            t.hard_limit = limit
            return
        # Lowering: announce, and enforce once the job's recent peak fits (v1 refuses a limit
        # below its usage; one under its step peak would OOM-kill it mid-step).
        g.set_memory_target(limit)
        try:
            if t.recent_peak(now) <= limit * 0.95:
                g.set_memory_limit(limit)
                t.hard_limit = limit
        except ResourceError:
            pass  # the kernel refused a hard limit below current usage: the target stands; retried next period

    def finish(t: _Tenant) -> bool:
        """Accounts for ``t``'s exited attempt and removes its group; True if the OOM killer ended it."""
        assert t.proc is not None and t.group is not None and t.exited_at is not None
        rc = t.proc.wait()  # it has exited: its waiter saw it
        kills = t.group.oom_kills()
        t.oom_kills += kills
        t.cpu_seconds += t.group.cpu_seconds()
        t.group.remove()
        t.group, t.hard_limit, t.peaks, t.cpu_mark, t.cpu_used = None, None, [], None, 0.0
        with service_lock:
            yielding.forget(t.arrival.name)
        if t.state == "stopping" and rc in (0, -signal.SIGTERM) and not kills:
            # Preempted: it checkpointed (exit 0), or SIGTERM came before it could handle it
            # (still starting: nothing done to lose). It waits again either way.
            t.state = "pending"
            say(f"{mode}: {t.arrival.name} preempted, requeued")
            return False
        t.state = "succeeded" if rc == 0 and not kills else "failed"
        t.finished_at = t.exited_at
        why = "OOM-killed" if kills else f"exit {rc}"
        outcome = "done" if t.state == "succeeded" else "FAILED: " + why
        say(f"{mode}: {t.arrival.name} ({t.job.name}) {outcome} at {t.exited_at:.1f} s, {t.cpu_seconds:.1f} CPU-s")
        return kills > 0

    svc_mark: tuple[float, float] | None = None
    svc_used = 0.0
    try:
        while True:
            wake.clear()
            now = time.monotonic() - t0
            while pending_arrivals and pending_arrivals[0].at <= now:
                a = pending_arrivals.pop(0)
                tenants[a.name].state = "pending"
                tenants[a.name].arrival = a
            while not answers.empty():
                rid, at = answers.get()
                answered[rid] = at
            oom_killed = []  # ended by the OOM killer in this period: marked once on the timeline
            for t in tenants.values():
                # The waiter's exit time is the one signal an attempt ended (poll() could see the
                # exit a moment before the waiter has recorded when).
                if t.state in ("running", "paused", "stopping") and t.exited_at is not None and finish(t):
                    oom_killed.append(t.arrival.name)
            arrived = [t for t in tenants.values() if t.arrival.at <= now]
            statuses: dict[str, dict[str, Any]] = {}
            views = []
            for t in arrived:
                if t.state not in ("pending", "running", "paused", "stopping"):
                    continue
                st = _status(work / t.arrival.name / "status.json") if t.state != "pending" else {}
                usage = peak = 0
                if t.group is not None:
                    with contextlib.suppress(ResourceError):
                        usage = t.group.memory_usage()
                        t.peaks.append((now, t.group.memory_peak()))
                        peak = t.recent_peak(now)
                        t.cpu_used, t.cpu_mark = _cpu_rate(
                            t.cpu_mark, now, t.group.cpu_seconds(), t.cpu_used, w.tick / 2
                        )
                statuses[t.arrival.name] = st
                views.append(
                    TenantState(
                        t.arrival.name,
                        "training",
                        t.arrival.urgency,
                        t.job.request,
                        w.training_cpus,
                        t.job.floor,
                        t.arrival.at,
                        running=t.state != "pending",
                        preemptible=t.state == "running",
                        paused=t.state == "paused",
                        phase=str(st.get("phase", "initial")),
                        progress=_progress(st),
                        starting=t.state == "running" and st.get("step") == t.step_at_spawn,
                        usage=usage,
                        peak=peak,
                        limit=t.hard_limit,
                        cpu_used=t.cpu_used,
                    )
                )
            svc_used, svc_mark = _cpu_rate(svc_mark, now, service_group.cpu_seconds(), svc_used, w.tick / 2)
            busy = len(sent) > len(answered)
            svc = TenantState(
                "service",
                "service",
                1.0,
                w.service_memory,
                w.service_cpus,
                w.service_memory,
                0.0,
                True,
                False,
                busy=busy,
                cpu_used=svc_used,
            )
            plan: ResourcePlan = (
                plan_static([svc, *views], cfg) if mode == "static" else plan_dynamic([svc, *views], cfg, now)
            )
            for name in plan.preempt:
                t = tenants[name]
                if t.state == "running" and t.proc is not None:
                    t.proc.send_signal(signal.SIGTERM)
                    t.state = "stopping"
                    t.preemptions += 1
            for name in plan.pause:  # held in place: its quota drops to the plan's below
                t = tenants[name]
                if t.state == "running":
                    t.state = "paused"
                    t.preemptions += 1
                    say(f"{mode}: {name} paused in place")
            for name in plan.admit:
                if name in tenants and tenants[name].state == "pending":
                    spawn(tenants[name])
                elif name in tenants and tenants[name].state == "paused":
                    tenants[name].state = "running"
                    say(f"{mode}: {name} resumed")
            for name, limit in plan.memory.items():
                t = tenants.get(name)  # type: ignore[assignment]
                if t is not None and t.state in ("running", "paused") and t.group is not None:
                    try:
                        apply_limits(t, limit, plan.cpus[name], now)
                        if name in plan.cpu_weights:
                            t.group.set_cpu_weight(plan.cpu_weights[name])
                    except ResourceError as exc:
                        say(f"{mode}: {name}: {exc}")
            with service_lock:
                if busy or len(sent) == len(answered):  # not while a request is being delivered
                    want_quota = plan.cpus.get("service", w.service_cpus)
                    if want_quota != service_quota:
                        service_group.set_cpu_quota(want_quota)
                        service_quota = want_quota
                    if "service" in plan.cpu_weights:
                        service_group.set_cpu_weight(plan.cpu_weights["service"])
            sample: dict[str, Any] = {
                "t": round(now, 3),
                "jobs": {},
                "service_cpus": service_quota,
                "service_cpu_used": round(svc_used, 3),
            }
            sample["service_usage"] = service_group.memory_usage()
            for t in tenants.values():
                if t.group is not None and t.state in ("running", "paused", "stopping"):
                    with contextlib.suppress(ResourceError):
                        sample["jobs"][t.arrival.name] = {
                            "usage": t.group.memory_usage(),
                            "limit": t.group.memory_limit(),
                            "cpus": t.group.cpu_quota(),
                            "cpu_used": round(t.cpu_used, 3),
                            **{k: v for k, v in statuses.get(t.arrival.name, {}).items() if k in _STATUS_KEYS},
                        }
            sample["ooms"] = oom_killed
            timeline.append(sample)
            training_done = all(t.state in ("succeeded", "failed") for t in tenants.values())
            if training_done and svc_cpu_in_makespan is None:
                svc_cpu_in_makespan = service_group.cpu_seconds() - svc_cpu0  # woken by the last exit
            if training_done and not sending.is_alive() and len(answered) >= len(sent):
                break
            if now > 900:
                say(f"{mode}: giving up after 900 s")
                break
            # The control period, not work: cut short by the next arrival, an exit or an answer.
            until_arrival = pending_arrivals[0].at - (time.monotonic() - t0) if pending_arrivals else w.tick
            wake.wait(max(0.0, min(w.tick, until_arrival)))
    finally:
        stop_sending.set()
        sending.join(timeout=5)
        svc_cpu = service_group.cpu_seconds() - svc_cpu0
        with service_lock:
            with_suppress_stdin_close(service)
        reading.join(timeout=5)  # the service has exited: its output ends
        if not reading.is_alive():
            service.stdout.close()
        for t in tenants.values():
            if t.proc is not None and t.proc.poll() is None:
                t.proc.kill()
                t.proc.wait()
            if t.group is not None:
                t.oom_kills += t.group.oom_kills()
                t.cpu_seconds += t.group.cpu_seconds()
                t.group.remove()
        service_group.remove()
    end_times = [t.finished_at for t in tenants.values() if t.finished_at is not None]
    makespan = max(end_times) if end_times else time.monotonic() - t0
    responses = sorted(answered[r] - sent[r] for r in sent if r in answered)
    ok = [t for t in tenants.values() if t.state == "succeeded"]
    if svc_cpu_in_makespan is None:  # it gave up before the training ended: the whole run is the makespan
        svc_cpu_in_makespan = svc_cpu
    busy_cpu = svc_cpu_in_makespan + sum(t.cpu_seconds for t in tenants.values())
    usage_samples = [s["service_usage"] + sum(j["usage"] for j in s["jobs"].values()) for s in timeline]
    return ModeResult(
        mode=mode,
        mean_response_seconds=statistics.fmean(responses) if responses else math.nan,
        p95_response_seconds=responses[min(len(responses) - 1, int(0.95 * len(responses)))] if responses else math.nan,
        cpu_utilization=busy_cpu / (w.cores * makespan),
        memory_utilization=statistics.fmean(usage_samples) / w.memory if usage_samples else 0.0,
        oom_kills=sum(t.oom_kills for t in tenants.values()),
        jobs_failed=sum(1 for t in tenants.values() if t.state != "succeeded"),
        jobs=len(tenants),
        makespan_seconds=makespan,
        samples_per_second=sum(t.job.samples for t in ok) / makespan,
        requests=len(requests),
        requests_answered=len(responses),
        preemptions=sum(t.preemptions for t in tenants.values()),
        service_on_cpu_seconds=statistics.fmean(u[0] for u in sched_used.values()) if sched_used else math.nan,
        service_queue_seconds=statistics.fmean(u[1] for u in sched_used.values()) if sched_used else math.nan,
        training_cpu_seconds=sum(t.cpu_seconds for t in tenants.values()),
        job_runs=[_job_run(t) for t in sorted(tenants.values(), key=lambda t: (t.arrival.at, t.arrival.name))],
        timeline=timeline,
    )


def _job_run(t: _Tenant) -> dict[str, Any]:
    """One training job's outcome: its kind and urgency; when it arrived, was first started and
    ended (seconds from the first arrival; None if never); its final state; attempts (a stopped
    victim restarts: one more); its CPU-seconds over all attempts; OOM kills; preemptions."""
    return {
        "name": t.arrival.name,
        "kind": t.job.name,
        "urgency": t.arrival.urgency,
        "arrived": t.arrival.at,
        "started": t.started_at,
        "ended": t.finished_at,
        "state": t.state,
        "attempts": t.attempt,
        "cpu_seconds": t.cpu_seconds,
        "oom_kills": t.oom_kills,
        "preemptions": t.preemptions,
    }


def _schedstat(pid: int) -> tuple[float, float] | None:
    """A process's (on-CPU, run-queue wait) seconds, summed over its threads'
    ``/proc/PID/task/TID/schedstat`` (a thread that exits takes its share with it); None where the
    kernel does not keep them or the process is gone."""
    on_cpu = waited = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just exited
                fields = (task / "schedstat").read_text().split()
                on_cpu, waited = on_cpu + int(fields[0]), waited + int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return on_cpu / 1e9, waited / 1e9


def _cpu_rate(
    mark: tuple[float, float] | None, now: float, cpu_seconds: float, last: float = 0.0, min_span: float = 0.0
) -> tuple[float, tuple[float, float]]:
    """Cores used since ``mark`` (time, CPU-seconds) and the new mark; 0 for the first sample.
    Less than ``min_span`` seconds after ``mark`` it returns ``last`` and keeps ``mark``: a span
    shorter than a few CFS periods (100 ms each) reads one burst or one throttle, not a rate."""
    if mark is None:
        return 0.0, (now, cpu_seconds)
    if now - mark[0] < min_span or now <= mark[0]:
        return last, mark
    return max(0.0, (cpu_seconds - mark[1]) / (now - mark[0])), (now, cpu_seconds)


def with_suppress_stdin_close(proc: subprocess.Popen[str]) -> None:
    """Ends the service: end of input, then a kill if it does not exit."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


_FIGURES = (
    "mean_response_seconds",
    "p95_response_seconds",
    "cpu_utilization",
    "memory_utilization",
    "oom_kills",
    "jobs_failed",
    "jobs",
    "makespan_seconds",
    "samples_per_second",
)


#: What each mode reports beside the headline figures (``_FIGURES``).
_DETAILS = (
    "requests",
    "requests_answered",
    "preemptions",
    "service_on_cpu_seconds",
    "service_queue_seconds",
    "training_cpu_seconds",
    "job_runs",
)


#: Counts a round summary reports at their worst, not their median.
_WORST = ("oom_kills", "jobs_failed")


def run_comparison(
    w: Workload, work_dir: str | Path, log: Callable[[str], None] | None = None, rounds: int = 1
) -> dict[str, Any]:
    """Static and dynamic on the same trace, ``rounds`` times, the order alternating (static first
    in even rounds, dynamic first in odd ones: a machine whose speed drifts favours neither mode).
    Returns the ``--json`` document: per mode its figures (one round: that round's, ``job_runs``
    included; more: each figure's median over the rounds, OOM kills and failed jobs their largest,
    and ``rounds`` lists every round's figures); the first round's timelines under ``timeline``;
    ``tenant_weight``: the CPU weight all tenants had together against the rest of the machine.
    ``w.tenant_weight`` sets that weight for every run and restores it after."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    kind, reason = availability()
    doc: dict[str, Any] = {"enforcement": kind, "workload": asdict(w)}
    if kind == "none":
        doc["reason"] = reason
        return doc
    tree = JobGroup.tree() if w.tenant_weight is not None else None
    before = tree.cpu_weight() if tree is not None else None
    runs: list[dict[str, Any]] = []
    try:
        if tree is not None and w.tenant_weight is not None:
            tree.set_cpu_weight(w.tenant_weight)  # every run alike; restored below
        doc["tenant_weight"] = tree.cpu_weight() if tree is not None else JobGroup.tree().cpu_weight()
        for i in range(rounds):
            order = ("static", "dynamic") if i % 2 == 0 else ("dynamic", "static")
            figures: dict[str, Any] = {"order": list(order)}
            for mode in order:
                r = run_mode(mode, w, work_dir, log)
                figures[mode] = {k: getattr(r, k) for k in _FIGURES + _DETAILS}
                if i == 0:
                    doc.setdefault("timeline", {})[mode] = r.timeline
            runs.append(figures)
    finally:
        if tree is not None and before is not None:
            tree.set_cpu_weight(before)
    if rounds == 1:
        doc |= {mode: runs[0][mode] for mode in ("static", "dynamic")}
    else:
        doc |= {mode: _medians([run[mode] for run in runs]) for mode in ("static", "dynamic")}
        doc["rounds"] = runs
    return doc


def _medians(modes: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number's median over rounds (an int's: the lower middle one, still an int; NaNs, a
    round without an answered request, are left out unless every round has one), except the
    failure counts (``_WORST``): their largest, so a kill in any round is reported."""
    out: dict[str, Any] = {}
    for key, value in modes[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [m[key] for m in modes]
        out[key] = max(values) if key in _WORST else _median(values, low=isinstance(value, int))
    return out


def _median(values: list[float], low: bool = False) -> float:
    """The median of ``values`` without their NaNs (NaN if all are); ``low``: the lower middle one."""
    kept = [v for v in values if not math.isnan(v)] or [math.nan]
    return statistics.median_low(kept) if low else statistics.median(kept)


def format_comparison(doc: dict[str, Any]) -> str:
    """The side-by-side table with the mission's claims and the issue's targets."""
    if doc["enforcement"] == "none":
        return f"bench-multi-tenant: nothing measured: {doc.get('reason', 'no cgroup enforcement')}"
    s, d = doc["static"], doc["dynamic"]
    rows = [
        (
            "mean response (requests)",
            f"{s['mean_response_seconds'] * 1e3:.0f} ms",
            f"{d['mean_response_seconds'] * 1e3:.0f} ms",
            "412 / 203 ms; target <= 0.6x",
        ),
        (
            "p95 response (requests)",
            f"{s['p95_response_seconds'] * 1e3:.0f} ms",
            f"{d['p95_response_seconds'] * 1e3:.0f} ms",
            "",
        ),
        (
            "CPU utilisation",
            f"{s['cpu_utilization']:.0%}",
            f"{d['cpu_utilization']:.0%}",
            "63% / 89%; target >= +15 pt",
        ),
        ("memory utilisation", f"{s['memory_utilization']:.0%}", f"{d['memory_utilization']:.0%}", ""),
        ("OOM kills", f"{s['oom_kills']}", f"{d['oom_kills']}", "target: > 0 / 0"),
        ("jobs failed", f"{s['jobs_failed']}/{s['jobs']}", f"{d['jobs_failed']}/{d['jobs']}", "4.2% / 0.7%"),
        ("training makespan", f"{s['makespan_seconds']:.1f} s", f"{d['makespan_seconds']:.1f} s", "target <= 1.0x"),
        (
            "training CPU-seconds",
            f"{s['training_cpu_seconds']:.1f}",
            f"{d['training_cpu_seconds']:.1f}",
            "the work done: a failed job's ends where it was killed",
        ),
        ("training samples/s", f"{s['samples_per_second']:.1f}", f"{d['samples_per_second']:.1f}", ""),
        ("preemptions", f"{s['preemptions']}", f"{d['preemptions']}", ""),
    ]
    head = f"{'figure':<26} {'static':>10} {'dynamic':>10}   published reference (static / dynamic); our target"
    lines = [f"enforcement: {doc['enforcement']}", head, "-" * len(head)]
    lines += [f"{a:<26} {b:>10} {c:>10}   {m}" for a, b, c, m in rows]
    if "rounds" in doc:
        lines.append(f"{len(doc['rounds'])} rounds, the order alternating; each figure above is its median")
        paired = [_paired(run["static"], run["dynamic"]) for run in doc["rounds"]]
        for i, (run, (response, cpu, makespan)) in enumerate(zip(doc["rounds"], paired, strict=True)):
            lines.append(
                f"  round {i + 1} ({' then '.join(run['order'])}): response {response:.2f}x, CPU {cpu:+.0f} pt, "
                f"OOM kills {run['static']['oom_kills']} / {run['dynamic']['oom_kills']}, makespan {makespan:.2f}x"
            )
        response, cpu, makespan = (_median(list(column)) for column in zip(*paired, strict=True))
        lines.append(
            f"  median of the rounds' own ratios (each pairs runs minutes apart): response {response:.2f}x, "
            f"CPU {cpu:+.0f} pt, makespan {makespan:.2f}x"
        )
    return "\n".join(lines)


def _paired(s: dict[str, Any], d: dict[str, Any]) -> tuple[float, float, float]:
    """One round's dynamic against static: response ratio, CPU points, makespan ratio."""
    return (
        d["mean_response_seconds"] / s["mean_response_seconds"],
        (d["cpu_utilization"] - s["cpu_utilization"]) * 100,
        d["makespan_seconds"] / s["makespan_seconds"],
    )


def write_timeline_png(doc: dict[str, Any], path: str | Path) -> None:
    """Per mode: each job's memory usage stacked, the sum of limits as a line, OOM kills marked
    with an x; below, the CPU each tenant used (its group's accounting), stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("static", "dynamic") if m in doc.get("timeline", {})]
    fig, axes = plt.subplots(2, len(modes), figsize=(7 * len(modes), 7), sharex="col", squeeze=False)
    for col, mode in enumerate(modes):
        tl = doc["timeline"][mode]
        ts = [s["t"] for s in tl]
        names = sorted({n for s in tl for n in s["jobs"]}, key=lambda n: int(n[5:]) if n[5:].isdigit() else 0)
        usage = [[s["jobs"].get(n, {}).get("usage", 0) / MiB for s in tl] for n in names]
        svc = [s["service_usage"] / MiB for s in tl]
        ax = axes[0][col]
        ax.stackplot(ts, [svc, *usage], labels=["service", *names], alpha=0.7)
        limits = [
            sum((s["jobs"].get(n, {}).get("limit") or 0) for n in names) / MiB + w_svc
            for s in tl
            for w_svc in [doc["workload"]["service_memory"] / MiB]
        ]
        ax.plot(ts, limits, "k--", lw=1, label="sum of limits")
        ax.axhline(doc["workload"]["memory"] / MiB, color="r", lw=1, label="tenant memory")
        for s in tl:
            for n in s.get("ooms", []):
                ax.plot(s["t"], doc["workload"]["memory"] / MiB * 0.95, "rx", ms=10)
                ax.annotate(  # upright below its x: kills seconds apart no longer overprint
                    f"OOM {n}",
                    (s["t"], doc["workload"]["memory"] / MiB * 0.9),
                    fontsize=7,
                    color="r",
                    rotation=90,
                    ha="center",
                    va="top",
                )
        ax.set_title(f"{mode}: memory (MiB)")
        ax.legend(fontsize=6, loc="center right", ncol=3)  # the upper left holds the OOM marks
        ax2 = axes[1][col]
        used = [[s["jobs"].get(n, {}).get("cpu_used", 0.0) for s in tl] for n in names]
        svc_used = [s.get("service_cpu_used", 0.0) for s in tl]
        ax2.stackplot(ts, [svc_used, *used], labels=["service", *names], alpha=0.7)
        ax2.axhline(doc["workload"]["cores"], color="r", lw=1, label="tenant cores")
        ax2.set_title(f"{mode}: CPU used (cores, cpuacct); quotas are caps")
        ax2.set_xlabel("seconds")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
