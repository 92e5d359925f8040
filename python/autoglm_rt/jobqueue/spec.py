"""The queue file (``JOBS.yaml``) read and checked: the machine's slots and the jobs.

```yaml
slots: 2                 # CPU slots, or: gpus: [0, 1] (device indices), or: gpus: auto
grace_period: 10         # optional: seconds between SIGTERM and SIGKILL on preemption
jobs:
  - name: prep
    command: [python, prep.py]
    urgency: 0.5         # optional, 0..1
    priority: 0          # optional priority class (int)
    gpus: 1              # optional: slots/devices it needs, all at once
    depends_on: []       # optional: names of jobs that must succeed first
    preemptible: true    # optional
    min_runtime: 0       # optional: seconds before it may be preempted
    memory: 2Gi          # optional: the job's cgroup memory limit (bytes or "512Mi"); OOM kills are reported
    cpus: 1.5            # optional: the job's cgroup CPU quota in cores
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_rt.policy.scheduler.tasks import Task
from autoglm_rt.units import parse_size

__all__ = ["JobSpec", "QueueSpec", "QueueSpecError", "check_job", "detect_gpus", "load_queue_spec", "parse_queue_spec"]


class QueueSpecError(ValueError):
    """The queue file is malformed; the message names the field and what was expected."""


MAX_NAME_BYTES = 255  # a job's name is its directory's name: NAME_MAX on Linux file systems
_JOB_KEYS = {
    "name",
    "command",
    "urgency",
    "priority",
    "gpus",
    "depends_on",
    "preemptible",
    "min_runtime",
    "memory",
    "cpus",
}
_TOP_KEYS = {"slots", "gpus", "jobs", "grace_period", "poll_interval", "aging_rate"}


@dataclass(frozen=True)
class JobSpec:
    """One job: its command and its scheduling fields (see :class:`~autoglm_rt.policy.scheduler.tasks.Task`)."""

    name: str
    command: tuple[str, ...]
    urgency: float = 0.5
    priority: int = 0
    gpus: int = 1
    depends_on: tuple[str, ...] = ()
    preemptible: bool = True
    min_runtime: float = 0.0
    memory: int | None = None  # bytes: the job's cgroup memory limit (None: none)
    cpus: float | None = None  # cores: the job's cgroup CPU quota (None: none)

    def task(self) -> Task:
        return Task(
            self.name,
            urgency=self.urgency,
            gpus=self.gpus,
            depends_on=self.depends_on,
            priority=self.priority,
            preemptible=self.preemptible,
            min_runtime=self.min_runtime,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": list(self.command),
            "urgency": self.urgency,
            "priority": self.priority,
            "gpus": self.gpus,
            "depends_on": list(self.depends_on),
            "preemptible": self.preemptible,
            "min_runtime": self.min_runtime,
            "memory": self.memory,
            "cpus": self.cpus,
        }


@dataclass(frozen=True)
class QueueSpec:
    """The machine (``devices``: GPU indices, or CPU slot numbers when ``uses_gpus`` is False) and
    the jobs in file order."""

    devices: tuple[int, ...]
    uses_gpus: bool
    jobs: tuple[JobSpec, ...]
    grace_period: float = 10.0
    poll_interval: float = 0.1
    aging_rate: float = 0.01
    extra: dict[str, Any] = field(default_factory=dict)


def load_queue_spec(path: str | Path) -> QueueSpec:
    """Reads and checks a queue file. Raises QueueSpecError (a ValueError) naming what is wrong."""
    from autoglm_rt.untrusted_yaml import UntrustedYAMLError, load_untrusted

    path = Path(path)
    try:
        doc = load_untrusted(path.read_text())  # bounded: a jobs file is untrusted input too
    except OSError as exc:
        raise QueueSpecError(f"{path}: cannot read the queue file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise QueueSpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except UntrustedYAMLError as exc:
        where = f"{path}:{exc.line}" if exc.line is not None else str(path)
        raise QueueSpecError(f"{where}: not a valid queue file: {exc.message}") from None
    return parse_queue_spec(doc, source=str(path))


def parse_queue_spec(doc: object, *, source: str = "queue file") -> QueueSpec:
    """Checks a parsed queue document (see the module docstring for the format)."""
    if not isinstance(doc, Mapping):
        raise QueueSpecError(f"{source}: expected a mapping with 'slots' or 'gpus' and 'jobs'")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise QueueSpecError(f"{source}: unknown keys {sorted(unknown)}; expected some of {sorted(_TOP_KEYS)}")
    if ("slots" in doc) == ("gpus" in doc):
        raise QueueSpecError(
            f"{source}: give exactly one of 'slots' (a number of CPU slots) or 'gpus' (device indices)"
        )
    if "slots" in doc:
        slots = doc["slots"]
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise QueueSpecError(f"{source}: slots must be a positive int, got {slots!r}")
        devices, uses_gpus = tuple(range(slots)), False
    elif doc["gpus"] == "auto":
        found = detect_gpus()
        devices, uses_gpus = (tuple(found), True) if found else (tuple(range(os.cpu_count() or 1)), False)
    else:
        gpus = doc["gpus"]
        if (
            not isinstance(gpus, list)
            or not gpus
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus)
        ):
            raise QueueSpecError(f"{source}: gpus must be a non-empty list of device indices or 'auto', got {gpus!r}")
        if len(set(gpus)) != len(gpus):
            raise QueueSpecError(f"{source}: gpus lists a device twice: {gpus!r}")
        devices, uses_gpus = tuple(gpus), True
    grace = _number(doc.get("grace_period", 10.0), f"{source}: grace_period", minimum=0.0)
    poll = _number(doc.get("poll_interval", 0.1), f"{source}: poll_interval", minimum=0.001)
    aging = _number(doc.get("aging_rate", 0.01), f"{source}: aging_rate", minimum=0.0)
    raw_jobs = doc.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        raise QueueSpecError(f"{source}: jobs must be a non-empty list")
    jobs = [_job(j, i, source) for i, j in enumerate(raw_jobs)]
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise QueueSpecError(f"{source}: job names must be unique; repeated: {dupes}")
    for j in jobs:
        missing = [d for d in j.depends_on if d not in names]
        if missing:
            raise QueueSpecError(f"{source}: job {j.name!r} depends on unknown job(s) {missing}")
        if j.gpus > len(devices):
            raise QueueSpecError(f"{source}: job {j.name!r} needs {j.gpus} slot(s); the queue has {len(devices)}")
    _check_acyclic(jobs, source)
    return QueueSpec(devices, uses_gpus, tuple(jobs), grace, poll, aging)


def check_job(job: JobSpec, source: str = "job") -> None:
    """Applies the queue file's checks to a job built in code. Raises QueueSpecError."""
    _job(job.to_dict(), 0, source)


def detect_gpus() -> list[int]:
    """This machine's GPU indices as jobs would name them: ``CUDA_VISIBLE_DEVICES`` if it is set
    (empty: none), else every device NVML reports. Empty when there is no GPU or no driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        try:
            return [int(x) for x in visible.split(",") if x.strip()]
        except ValueError:
            raise QueueSpecError(
                f"gpus: auto cannot use CUDA_VISIBLE_DEVICES={visible!r}; expected indices like 0,1"
            ) from None
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver: no GPU to schedule
        return []
    try:
        return list(range(pynvml.nvmlDeviceGetCount()))
    finally:
        pynvml.nvmlShutdown()


def _number(value: object, what: str, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise QueueSpecError(f"{what}: expected a finite number >= {minimum}, got {value!r}")
    return float(value)


def _memory(value: object, where: str) -> int | None:
    if value is None:
        return None
    try:
        nbytes = parse_size(value, name=f"{where}: memory")  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise QueueSpecError(f"{exc}; expected bytes or a size like '512Mi'") from exc
    if nbytes < 1 << 20:
        raise QueueSpecError(f"{where}: memory must be at least 1Mi (a job cannot start below that), got {value!r}")
    return nbytes


def _job(raw: object, i: int, source: str) -> JobSpec:
    where = f"{source}: jobs[{i}]"
    if not isinstance(raw, Mapping):
        raise QueueSpecError(f"{where}: expected a mapping with 'name' and 'command'")
    unknown = set(raw) - _JOB_KEYS
    if unknown:
        raise QueueSpecError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(_JOB_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise QueueSpecError(f"{where}: name must be a non-empty string without '/' or a leading '.', got {name!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise QueueSpecError(f"{where}: name must not contain control characters (NUL, newline...), got {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise QueueSpecError(
            f"{where}: name is {len(name.encode('utf-8', 'surrogateescape'))} bytes; at most {MAX_NAME_BYTES} "
            "(it names the job's directory)"
        )
    where = f"{source}: job {name!r}"
    command = raw.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise QueueSpecError(f"{where}: command must be a non-empty list of strings (arguments), got {command!r}")
    nul = [i for i, a in enumerate(command) if "\0" in a]
    if nul:
        raise QueueSpecError(f"{where}: command argument {nul[0]} contains a NUL byte, which no program can receive")
    if not command[0]:
        raise QueueSpecError(f"{where}: command[0] (the program) is empty")
    depends = raw.get("depends_on", [])
    if isinstance(depends, str):
        depends = [depends]
    if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
        raise QueueSpecError(f"{where}: depends_on must be a list of job names, got {depends!r}")
    preemptible = raw.get("preemptible", True)
    if not isinstance(preemptible, bool):
        raise QueueSpecError(f"{where}: preemptible must be true or false, got {preemptible!r}")
    gpus = raw.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise QueueSpecError(f"{where}: gpus must be a positive int (slots needed), got {gpus!r}")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise QueueSpecError(f"{where}: priority must be an int, got {priority!r}")
    urgency = _number(raw.get("urgency", 0.5), f"{where}: urgency", minimum=0.0)
    if urgency > 1.0:
        raise QueueSpecError(f"{where}: urgency must be in [0, 1], got {urgency}")
    spec = JobSpec(
        name=name,
        command=tuple(command),
        urgency=urgency,
        priority=priority,
        gpus=gpus,
        depends_on=tuple(depends),
        preemptible=preemptible,
        min_runtime=_number(raw.get("min_runtime", 0.0), f"{where}: min_runtime", minimum=0.0),
        memory=_memory(raw.get("memory"), where),
        cpus=None if raw.get("cpus") is None else _number(raw["cpus"], f"{where}: cpus", minimum=0.01),
    )
    try:
        spec.task()
    except (TypeError, ValueError) as exc:
        raise QueueSpecError(f"{where}: {exc}") from exc
    return spec


def _check_acyclic(jobs: list[JobSpec], source: str) -> None:
    deps = {j.name: j.depends_on for j in jobs}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = [*path[path.index(n) :], n]
            raise QueueSpecError(f"{source}: dependency cycle {' -> '.join(cycle)}")
        state[n] = 1
        for d in deps[n]:
            visit(d, [*path, n])
        state[n] = 2

    for j in jobs:
        visit(j.name, [])
