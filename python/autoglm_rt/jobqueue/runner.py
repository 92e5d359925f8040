"""Runs a queue of real commands on this machine's device slots under the PriorityScheduler.

Each job runs in its own session through ``_job_wrapper.py`` (which records the exit status in a
file), with ``CUDA_VISIBLE_DEVICES`` set to its devices (empty for CPU slots), ``AUTOGLM_RT_SLOTS``
to its slot numbers and ``AUTOGLM_RT_CHECKPOINT_DIR`` to a directory it owns. Preemption and
migration follow the checkpoint contract: SIGTERM, the job saves and exits (0), and after
``grace_period`` seconds the runner sends SIGKILL to its whole process group; a preempted job goes
back to the queue, a migrated one restarts on other slots. The runner reads how recent each job's
last checkpoint is from the directory's modification times, so victims are the jobs losing least.

All state lives in SQLite (:class:`~autoglm_rt.jobqueue.store.QueueStore`) and is committed before
each action, so a runner that is killed loses no job: a new runner on the same file adopts jobs
that are still running, collects the exit status of those that ended meanwhile and carries on.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from autoglm_rt.jobqueue.placement import CgroupPlacement
from autoglm_rt.jobqueue.spec import JobSpec, QueueSpec, check_job
from autoglm_rt.jobqueue.store import TERMINAL, JobRow, QueueStore, RunnerLock
from autoglm_rt.policy.scheduler.priority import PriorityScheduler
from autoglm_rt.policy.scheduler.tasks import SchedulerError, TaskState
from autoglm_rt.resources import ResourceError

if TYPE_CHECKING:
    import psutil

__all__ = ["QueueRunner"]

_WRAPPER = Path(__file__).with_name("_job_wrapper.py")


class QueueRunner:
    """One runner over one state file. ``step()`` does one round (collect exits, escalate stops,
    schedule, start); ``run()`` repeats it until every job has finished.

    ``log``: called with one line per event (default: print). ``scheduler_options``: passed to
    :class:`PriorityScheduler` (aging_rate, preemption_margin, reserve_after...). ``retry_failed``:
    jobs the state file records as failed run again (a new attempt each); otherwise finished jobs
    keep their result. Raises StateLockedError when another runner holds the state file."""

    def __init__(
        self,
        spec: QueueSpec,
        state: str | Path,
        *,
        grace_period: float | None = None,
        poll_interval: float | None = None,
        log: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        scheduler_options: dict[str, float] | None = None,
        retry_failed: bool = False,
    ) -> None:
        self.spec = spec
        # One runner per state file: a second one raises StateLockedError naming the holder.
        self._lock = RunnerLock(state)
        try:
            self.store = QueueStore(state)
        except BaseException:
            self._lock.release()
            raise
        self.work_dir = Path(f"{self.store.path}.d")
        self.grace_period = spec.grace_period if grace_period is None else float(grace_period)
        self.poll_interval = spec.poll_interval if poll_interval is None else float(poll_interval)
        self._log = log if log is not None else (lambda line: print(line, flush=True))
        self._env = dict(os.environ if env is None else env)
        self._killed: set[tuple[int, float | None]] = set()  # (pid, created) sent SIGKILL by this runner
        options = {"aging_rate": spec.aging_rate, **(scheduler_options or {})}
        self.scheduler = PriorityScheduler(list(spec.devices), clock=time.time, **options)  # type: ignore[arg-type]
        now = time.time()
        known = {j.name: j.state for j in self.store.jobs()}
        for name in self.store.add_missing(spec.jobs, now):
            self._log(f"queued {name}")
        self.placement = CgroupPlacement(self.store.path, self._log)
        failed = [n for n, st in known.items() if st == "failed"]
        if retry_failed:
            for name in failed:
                self.store.update(name, now, "retry", "retry_failed", state="pending", finished_at=None, message=None)
                self._log(f"retry {name}")
        finished = [n for n, st in known.items() if st in TERMINAL and not (retry_failed and st == "failed")]
        if finished:
            self._log(
                f"resuming {self.store.path}: {len(finished)} job(s) finished before are not run again"
                + (f" ({len(failed)} failed; --retry-failed runs them again)" if failed and not retry_failed else "")
            )
        self._recover(now)

    # ---------------------------------------------------------------- public

    def run(self, timeout: float | None = None) -> int:
        """Runs until every job has finished (0 if all succeeded, 1 if any failed). With ``timeout``
        seconds, raises TimeoutError and leaves the jobs running (a new runner resumes them)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.step():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"queue not finished after {timeout} s; state kept in {self.store.path}")
            time.sleep(self.poll_interval)
        jobs = self.store.jobs()
        width = max(len(j.name) for j in jobs) if jobs else 0
        for j in jobs:
            took = f"{j.finished_at - j.submitted_at:.1f} s" if j.finished_at is not None else "-"
            self._log(
                f"  {j.name:<{width}}  {j.state:<9}  exit {j.exit_code}  attempts {j.attempt}  "
                f"preempted {j.preemptions}  {took} after submission"
            )
        failed = [j.name for j in jobs if j.state == "failed"]
        if failed:
            self._log(f"finished with {len(failed)} failed job(s): {', '.join(failed)}")
        else:
            self._log("all jobs succeeded")
        return 1 if failed else 0

    def step(self) -> bool:
        """One round. Returns True once every job has finished."""
        now = time.time()
        for job in self.store.jobs():
            if job.state in ("running", "stopping"):
                self._collect(job, now)
        for job in self.store.jobs():
            if job.state == "stopping":
                self._escalate(job, now)
            if job.state in ("running", "stopping"):
                self._note_checkpoint(job)
        self._serve_requests(now)
        self._start_migrations(now)
        held = [d for j in self.store.jobs() if j.state == "pending" and j.migrate_to for d in j.migrate_to]
        plan = self.scheduler.schedule(now, exclude=held)
        for p in plan.preempt:
            self._log(f"preempt {p.victim} for {p.for_task} (about {p.work_lost:.1f} s of work since its checkpoint)")
            self._stop(self.store.job(p.victim), "preempt", now)
        for placement in plan.start:
            self._launch(self.store.job(placement.task), placement.devices, now)
        return all(j.state in TERMINAL for j in self.store.jobs())

    def submit(self, job: JobSpec) -> None:
        """Adds a job to the running queue (it is stored before this returns). Raises
        QueueSpecError for a job the queue file would reject, SchedulerError for a duplicate name
        or a job no set of this queue's slots can hold."""
        if not isinstance(job, JobSpec):
            raise TypeError(f"job: expected a JobSpec, got {type(job).__name__}")
        check_job(job, "submit")
        known = {j.name for j in self.store.jobs()}
        if job.name in known:
            raise SchedulerError(f"job {job.name!r} is already in the queue")
        missing = [d for d in job.depends_on if d not in known]
        if missing:
            raise SchedulerError(f"job {job.name!r} depends on unknown job(s) {missing}")
        now = time.time()
        self.scheduler.submit(job.task(), now)
        self.store.add_missing((job,), now)
        if any(self.scheduler.state(d) is TaskState.FAILED for d in job.depends_on):
            self._fail_pending(job.name, now)

    def migrate_task(self, name: str, to: Sequence[int] | None = None) -> tuple[int, ...]:
        """Moves a running job to other slots: it checkpoints (SIGTERM), stops and restarts on
        ``to`` (default: free slots it does not use now). Returns the target slots. Raises
        SchedulerError if the job is not running or not enough other slots are free."""
        job = self.store.job(name)
        if job.state != "running":
            raise SchedulerError(f"job {name!r} is {job.state}; only a running job can be migrated")
        held = {d for j in self.store.jobs() if j.migrate_to for d in j.migrate_to}
        free = [d for d in self.scheduler.free_devices() if d not in held]
        if to is None:
            target = tuple(free[: job.spec.gpus])
        else:
            target = tuple(sorted(to))
            bad = [d for d in target if d not in free]
            if bad:
                raise SchedulerError(f"job {name!r}: target slots {bad} are not free")
        if len(target) != job.spec.gpus:
            raise SchedulerError(
                f"job {name!r} needs {job.spec.gpus} free slot(s) other than {list(job.devices)} to migrate; "
                f"free: {free}"
            )
        now = time.time()
        self.scheduler.request_stop(name)
        self.store.update(name, now, "migrate", f"{list(job.devices)} -> {list(target)}", migrate_to=target)
        self._log(f"migrate {name} {list(job.devices)} -> {list(target)}")
        self._stop(self.store.job(name), "migrate", now)
        return target

    def close(self) -> None:
        """Closes the state file and frees it for another runner. Running jobs keep running; a new
        runner adopts them."""
        self.store.close()
        self._lock.release()

    def job_dir(self, name: str) -> Path:
        return self.work_dir / name

    # ---------------------------------------------------------------- recovery

    def _recover(self, now: float) -> None:
        """Rebuilds the scheduler from the state file, adopting jobs that still run."""
        for job in self.store.jobs():
            task = job.spec.task()
            if job.state in TERMINAL:
                self.scheduler.submit(task, now, submitted_at=job.submitted_at)
                self.scheduler.finished(job.name, job.state == "succeeded", now)
                continue
            if job.state == "starting":
                # The runner died between committing 'starting' and 'running'. The wrapper writes its
                # pid file first thing: with one, the job started (it may even have finished; the
                # first step() reads its exit file); without one, it never ran.
                pid, created = self._read_pid_file(job)
                if pid is not None:
                    self.store.update(
                        job.name, now, "adopted", f"pid {pid}", state="running", pid=pid, pid_created=created
                    )
                else:
                    self.store.update(job.name, now, "requeued", "runner died while starting it", state="pending")
                job = self.store.job(job.name)
            if job.state in ("running", "stopping"):
                self.scheduler.adopt_running(
                    task, job.devices, job.started_at or now, now, submitted_at=job.submitted_at
                )
                if job.state == "stopping":
                    self.scheduler.request_stop(job.name)
                self._log(f"adopted {job.name} (pid {job.pid}, {job.state})")
            else:
                self.scheduler.submit(task, now, submitted_at=job.submitted_at)
        # Dependents of jobs that failed before the crash.
        for job in self.store.jobs():
            if job.state == "pending" and any(self.scheduler.state(d) is TaskState.FAILED for d in job.spec.depends_on):
                self._fail_pending(job.name, now)

    # ---------------------------------------------------------------- process handling

    def _launch(self, job: JobRow, devices: Sequence[int], now: float) -> None:
        """Starts one attempt of ``job``; a job that cannot be started (its directory, log or
        process cannot be created) fails alone and the queue carries on."""
        try:
            self._spawn(job, devices, now)
        except (OSError, ValueError) as exc:
            reason = f"cannot start {job.name!r}: {exc}"
            with contextlib.suppress(OSError, ResourceError):
                self.placement.finished(job.name, job.attempt + 1)  # the group made for it, if any
            self.store.update(
                job.name,
                now,
                "failed",
                reason,
                state="failed",
                finished_at=now,
                pid=None,
                devices=(),
                message=reason,
            )
            self._log(f"FAILED {job.name} ({reason})")
            for dependent in self.scheduler.finished(job.name, False, now):
                self._fail_pending(dependent, now, scheduler_knows=True)

    def _spawn(self, job: JobRow, devices: Sequence[int], now: float) -> None:
        """The wrapper leads the job's own process group (pgid == its pid, a new session): that
        group is the job, and stopping the job means signalling it."""
        attempt = job.attempt + 1
        jdir = self.job_dir(job.name)
        (jdir / "checkpoint").mkdir(parents=True, exist_ok=True)
        exit_file, pid_file = jdir / f"exit.{attempt}", jdir / f"pid.{attempt}"
        for f in (exit_file, pid_file):
            f.unlink(missing_ok=True)
        env = dict(self._env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices) if self.spec.uses_gpus else ""
        env["AUTOGLM_RT_SLOTS"] = ",".join(str(d) for d in devices)
        env["AUTOGLM_RT_CHECKPOINT_DIR"] = str(jdir / "checkpoint")
        env["AUTOGLM_RT_JOB_NAME"] = job.name
        env["AUTOGLM_RT_QUEUE_STATE"] = str(self.store.path.resolve())  # the job's Runtime asks this queue
        env["AUTOGLM_RT_JOB_ATTEMPT"] = str(attempt)
        if not self.spec.uses_gpus:
            env.setdefault("OMP_NUM_THREADS", str(len(devices)))
        env.update(self.placement.env_for(job.spec, attempt))
        self.store.update(
            job.name,
            now,
            None,
            state="starting",
            attempt=attempt,
            devices=tuple(devices),
            started_at=now,
            stop_reason=None,
            stop_sent_at=None,
            migrate_to=None,
        )
        log = jdir / "log"
        with open(log, "ab") as fh:
            fh.write(f"--- attempt {attempt} on slots {list(devices)} ---\n".encode())
        # posix_spawn in a new session: no Popen object to outlive, and a restarted runner treats
        # its predecessor's jobs exactly like its own.
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-S", str(_WRAPPER), str(exit_file), str(pid_file), "--", *job.spec.command],
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        created = _create_time(pid)
        self.store.update(
            job.name,
            now,
            "started",
            f"attempt {attempt} on {list(devices)} pid {pid}",
            state="running",
            pid=pid,
            pid_created=created,
        )
        self._log(
            f"start {job.name} on {'gpus' if self.spec.uses_gpus else 'slots'} {list(devices)} "
            f"(process group {pid}: kill -- -{pid} stops it)"
        )

    def _collect(self, job: JobRow, now: float) -> None:
        """If the job's process has ended, records how and updates the scheduler."""
        if job.pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job.pid, os.WNOHANG)  # reap it if it is our own child
            if _alive(job.pid, job.pid_created):
                return
            # The wrapper is gone. Whatever is left of its process group (the command, if the
            # wrapper was killed; strays it left behind) still uses the slots: stop it first.
            left = _group_members(job.pid, job.pid_created)
            if left:
                self._log(
                    f"stop {job.name}: its wrapper (pid {job.pid}) ended but pid(s) {[p.pid for p in left]} "
                    "of its process group still run; SIGKILL"
                )
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.pid, signal.SIGKILL)
                return  # the slots stay taken until the group is gone
        code, reason = self._read_exit_file(job)
        oom = self.placement.finished(job.name, job.attempt)  # removes the job's cgroup
        if job.state == "stopping":
            reason = job.stop_reason or "preempt"
            detail = f"exit {code}" if code is not None else "killed after the grace period"
            self.scheduler.stopped(job.name, now)
            self.store.update(
                job.name,
                now,
                "stopped",
                f"{reason}: {detail}",
                state="pending",
                pid=None,
                devices=(),
                exit_code=code,
                preemptions=job.preemptions + (reason == "preempt"),
            )
            self._log(f"stopped {job.name} ({reason}, {detail}); requeued")
            return
        ok = code == 0
        message = (
            oom or reason or (None if code is not None else "the job's wrapper died without recording an exit status")
        )
        self.store.update(
            job.name,
            now,
            "succeeded" if ok else "failed",
            oom or (f"exit {code}" + (f": {reason}" if reason else "")),
            state="succeeded" if ok else "failed",
            finished_at=now,
            exit_code=code,
            pid=None,
            message=message,
        )
        self._log(
            f"{'done' if ok else 'FAILED'} {job.name} ({oom or f'exit {code}' + (': ' + reason if reason else '')})"
        )
        for dependent in self.scheduler.finished(job.name, ok, now):
            self._fail_pending(dependent, now, scheduler_knows=True)

    def _fail_pending(self, name: str, now: float, *, scheduler_knows: bool = False) -> None:
        if not scheduler_knows:
            self.scheduler.finished(name, False, now)
        self.store.update(
            name, now, "failed", "a dependency failed", state="failed", finished_at=now, message="a dependency failed"
        )
        self._log(f"FAILED {name} (a dependency failed)")

    def _stop(self, job: JobRow, reason: str, now: float) -> None:
        self.store.update(job.name, now, "stop", reason, state="stopping", stop_reason=reason, stop_sent_at=now)
        if job.pid is not None and _alive(job.pid, job.pid_created):
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.pid, signal.SIGTERM)  # the wrapper forwards it to the command
        elif job.pid is not None and _group_members(job.pid, job.pid_created):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGTERM)

    def _escalate(self, job: JobRow, now: float) -> None:
        if job.stop_sent_at is None or now - job.stop_sent_at < self.grace_period or job.pid is None:
            return
        if (job.pid, job.pid_created) not in self._killed and _alive(job.pid, job.pid_created):
            self._log(f"kill {job.name}: still running {self.grace_period:g} s after SIGTERM")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)
            self._killed.add((job.pid, job.pid_created))
            self.store.update(job.name, now, "killed", f"SIGKILL after {self.grace_period:g} s")

    def _serve_requests(self, now: float) -> None:
        """Carries out requests other processes left in the state file (``autoglm-rt queue-migrate``)."""
        known = {j.name for j in self.store.jobs()}
        for req in self.store.open_requests():
            if req.job not in known:
                self.store.answer_request(req.id, now, False, f"no job named {req.job!r} in this queue")
                continue
            if req.kind != "migrate":
                self.store.answer_request(req.id, now, False, f"unknown request kind {req.kind!r}")
                continue
            if not self.store.claim_request(req.id, now):
                continue  # past its deadline: answered as expired, never carried out
            try:
                target = self.migrate_task(req.job, req.to)
            except SchedulerError as exc:
                self.store.answer_request(req.id, now, False, str(exc))
            else:
                self.store.answer_request(req.id, now, True, f"{req.job} -> slots {list(target)}")

    def _start_migrations(self, now: float) -> None:
        for job in self.store.jobs():
            if job.state == "pending" and job.migrate_to:
                try:
                    self.scheduler.assign(job.name, job.migrate_to, now)
                except SchedulerError as exc:
                    self._log(f"migration of {job.name} to {list(job.migrate_to)} abandoned: {exc}")
                    self.store.update(job.name, now, "migrate-abandoned", str(exc), migrate_to=None)
                    continue
                self._launch(job, job.migrate_to, now)

    def _note_checkpoint(self, job: JobRow) -> None:
        ckpt = self.job_dir(job.name) / "checkpoint"
        try:
            newest = max([ckpt.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(ckpt)])
        except (OSError, ValueError):
            return
        if job.started_at is not None and newest > job.started_at:
            self.scheduler.record_checkpoint(job.name, newest)

    def _read_exit_file(self, job: JobRow) -> tuple[int | None, str | None]:
        """The attempt's exit code (None: not recorded) and, when the command could not start, why."""
        try:
            lines = (self.job_dir(job.name) / f"exit.{job.attempt}").read_text().splitlines()
            return int(lines[0].strip()), (lines[1].strip() if len(lines) > 1 and lines[1].strip() else None)
        except (OSError, ValueError, IndexError):
            return None, None

    def _read_pid_file(self, job: JobRow) -> tuple[int | None, float | None]:
        try:
            pid = int((self.job_dir(job.name) / f"pid.{job.attempt}").read_text().strip())
        except (OSError, ValueError):
            return None, None
        return pid, _create_time(pid)


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _group_members(pgid: int, leader_created: float | None) -> list[psutil.Process]:
    """Live processes of the process group ``pgid`` started no earlier than its leader (so a
    recycled group id is not mistaken for the job's)."""
    import psutil

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the common case: the group is empty
    except PermissionError:
        pass  # the group exists (another user's process in it): list its members below
    members = []
    for p in psutil.process_iter(["create_time", "status"]):
        try:
            if os.getpgid(p.pid) != pgid or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        if leader_created is not None and p.info["create_time"] < leader_created - 0.05:
            continue
        members.append(p)
    return members


def _alive(pid: int, created: float | None) -> bool:
    """The process ``pid`` exists, is the one started at ``created`` and is not a zombie."""
    import psutil

    try:
        p = psutil.Process(pid)
        if created is not None and not math.isclose(p.create_time(), created, abs_tol=0.05):
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
