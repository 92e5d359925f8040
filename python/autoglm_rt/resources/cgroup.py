"""One small interface over Linux cgroups, v1 (``memory`` + ``cpu`` + ``cpuacct`` hierarchies)
and v2 (one unified tree with the ``memory`` and ``cpu`` controllers), detected at run time.

A :class:`JobGroup` is one job's group: create it, put processes in it, set and read its memory
limit, memory target and CPU quota, read its usage, peak, OOM-kill count and CPU time, and remove
it (killing what is left in it). Groups live under ``<mount><own group>/autoglm_rt/<scope>/<job>``,
so they nest under whatever group the creating process is in (its limits still hold above them).

File mapping (v1 / v2):

- hard memory limit: ``memory.limit_in_bytes`` / ``memory.max`` (the kernel OOM-kills above it);
- memory target: ``memory.soft_limit_in_bytes`` / ``memory.high`` -- the scheduler's announced
  next limit, which a cooperating job adapts to before the hard limit follows (v2 also throttles
  and reclaims above it; v1 only reclaims under global pressure);
- usage and peak: ``memory.usage_in_bytes`` / ``memory.current``, ``memory.max_usage_in_bytes``
  (reset by writing 0) / ``memory.peak`` (reset per open file, kernel >= 6.12; else the peak
  since the group was created);
- OOM kills: ``oom_kill`` in ``memory.oom_control`` / ``memory.events``;
- CPU quota: ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` / ``cpu.max``;
- CPU time: ``cpuacct.usage`` (ns) / ``usage_usec`` in ``cpu.stat``.

Where no writable hierarchy exists, :func:`detect` returns None and :func:`availability` says why
in one line; callers fall back to running without enforcement.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autoglm_rt.constants import limit_or_none

__all__ = [
    "Backend",
    "JobGroup",
    "ResourceError",
    "availability",
    "cleanup_stale",
    "cpu_quota_cores",
    "detect",
    "group_of_pid",
]

_PREFIX = "autoglm_rt"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
CPU_PERIOD_US = 100_000


class ResourceError(RuntimeError):
    """A cgroup operation the kernel refused or that cannot be done here; says which and why."""


@dataclass(frozen=True)
class Backend:
    """Where this machine's cgroups are: ``kind`` is "cgroup-v1" or "cgroup-v2"; ``bases`` maps a
    controller ("memory", "cpu", "cpuacct"; v2: all three share one directory) to the directory
    under which this process creates groups (``<mount><own group>/autoglm_rt``)."""

    kind: str
    bases: dict[str, Path]

    @property
    def v2(self) -> bool:
        return self.kind == "cgroup-v2"

    def dirs(self, rel: str) -> dict[str, Path]:
        return {c: b / rel for c, b in self.bases.items()}


def _mounts(mountinfo: str) -> tuple[dict[str, Path], Path | None]:
    """v1 controller -> mount point, and the v2 mount point (None if absent)."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mount_point, fstype, options = Path(fields[4]), rfields[0], rfields[2].split(",")
        if fstype == "cgroup":
            for c in ("memory", "cpu", "cpuacct"):
                if c in options:
                    v1.setdefault(c, mount_point)
        elif fstype == "cgroup2" and v2 is None:
            v2 = mount_point
    return v1, v2


def _own_paths(proc_cgroup: str) -> tuple[dict[str, str], str | None]:
    """This process's group per v1 controller and its v2 group, from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for c in controllers.split(","):
            if c in ("memory", "cpu", "cpuacct"):
                v1[c] = path
    return v1, v2


def _outside_jobs(own: str) -> str:
    """``own`` (a /proc/self/cgroup path) up to the first autoglm_rt tree: a process inside a job
    group sees the same base as the runner that created the group."""
    parts = own.strip("/").split("/") if own.strip("/") else []
    return "/".join(parts[: parts.index(_PREFIX)] if _PREFIX in parts else parts)


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


_detected: tuple[Backend | None, str] | None = None


def detect(refresh: bool = False) -> Backend | None:
    """The writable cgroup hierarchy of this machine (v1 preferred when both are writable: it is
    where the memory controller is bound when both are mounted), or None. Cached."""
    return _detect(refresh)[0]


def availability(refresh: bool = False) -> tuple[str, str]:
    """``(kind, reason)``: kind is "cgroup-v1", "cgroup-v2" or "none"; reason says in one line why
    there is no enforcement (empty when there is)."""
    backend, reason = _detect(refresh)
    return (backend.kind if backend else "none"), reason


def _detect(refresh: bool) -> tuple[Backend | None, str]:
    global _detected
    if _detected is None or refresh:
        _detected = _probe(Path("/proc/self/mountinfo"), Path("/proc/self/cgroup"))
    return _detected


def _probe(mountinfo: Path, proc_cgroup: Path) -> tuple[Backend | None, str]:
    try:
        v1_mounts, v2_mount = _mounts(mountinfo.read_text())
        v1_own, _ = _own_paths(proc_cgroup.read_text())
    except OSError as exc:
        return None, f"no cgroup enforcement: cannot read {exc.filename}: {exc.strerror}"
    if all(c in v1_mounts for c in ("memory", "cpu", "cpuacct")):
        bases = {c: v1_mounts[c] / _outside_jobs(v1_own.get(c, "/")) / _PREFIX for c in ("memory", "cpu", "cpuacct")}
        if all(_writable_dir(b.parent) or _writable_dir(b) for b in bases.values()):
            return Backend("cgroup-v1", bases), ""
        return (
            None,
            f"no cgroup enforcement: cgroup v1 is mounted but {bases['memory'].parent} is not writable (not root?)",
        )
    if v2_mount is not None:
        controllers = (
            (v2_mount / "cgroup.controllers").read_text().split() if (v2_mount / "cgroup.controllers").exists() else []
        )
        if not {"memory", "cpu"} <= set(controllers):
            return (
                None,
                f"no cgroup enforcement: cgroup v2 at {v2_mount} lacks the memory/cpu controllers ({controllers})",
            )
        # v2 forbids processes in a group whose children have controllers, so our tree hangs
        # off the root (or a delegated subtree), not under this process's own leaf group.
        base = v2_mount / _PREFIX
        if not (_writable_dir(v2_mount) or _writable_dir(base)):
            return None, f"no cgroup enforcement: cgroup v2 at {v2_mount} is not writable (not root, no delegation)"
        return Backend("cgroup-v2", {"memory": base, "cpu": base, "cpuacct": base}), ""
    return None, "no cgroup enforcement: neither cgroup v1 memory/cpu/cpuacct nor cgroup v2 is mounted"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ResourceError(f"cannot read {path}: {exc.strerror}") from exc


def _write(path: Path, text: str, what: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ResourceError(f"{what}: the kernel refused {text.strip()!r} ({path}): usage is above it") from exc
        raise ResourceError(f"{what}: cannot write {text.strip()!r} to {path}: {exc.strerror}") from exc


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what}: expected 1-100 characters of [A-Za-z0-9_.:-], got {name!r}")
    return name


class JobGroup:
    """One job's cgroup (in each v1 hierarchy, or one v2 directory). Not thread-safe.

    Limits are bytes (None: no limit) and CPU quotas cores (None: no quota). Every setter either
    takes effect in the kernel or raises :class:`ResourceError`; every getter reads the kernel."""

    def __init__(self, backend: Backend, rel: str) -> None:
        self.backend = backend
        self.rel = rel
        self.dirs = backend.dirs(rel)
        self._peak_fd: int | None = None

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    def create(cls, scope: str, name: str, backend: Backend | None = None) -> JobGroup:
        """Creates (or reuses, if it exists and is empty) ``<scope>/<name>``. Raises ResourceError
        when there is no writable hierarchy, naming why."""
        backend = backend or detect()
        if backend is None:
            raise ResourceError(availability()[1])
        rel = f"{_check_name(scope, 'scope')}/{_check_name(name, 'group name')}"
        group = cls(backend, rel)
        if backend.v2:
            _enable_v2_controllers(backend.bases["memory"].parent, backend.bases["memory"], group.dirs["memory"].parent)
        group._make_dirs()
        if group.pids():
            raise ResourceError(
                f"cgroup {group.rel} already exists with processes {group.pids()}; refusing to reuse it"
            )
        return group

    @classmethod
    def tree(cls, backend: Backend | None = None) -> JobGroup:
        """The group every job group of this runner lives in (``<own group>/autoglm_rt``): its CPU
        weight is theirs together against the processes outside it. Shared by every runner in the
        same group. Created when missing (:func:`cleanup_stale` removes it once empty, and a fresh
        machine has none yet), so its weight can always be read and set. Raises ResourceError when
        there is no writable hierarchy."""
        backend = backend or detect()
        if backend is None:
            raise ResourceError(availability()[1])
        tree = cls(backend, "")
        if backend.v2:
            _enable_v2_controllers(backend.bases["memory"].parent)
        tree._make_dirs()
        return tree

    def _make_dirs(self) -> None:
        """Creates the group's directory in every hierarchy (parents too; existing ones are kept)."""
        for d in dict.fromkeys(self.dirs.values()):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ResourceError(f"cannot create cgroup {d}: {exc.strerror}") from exc

    def exists(self) -> bool:
        """True while the group has a directory in any hierarchy (a removal cut short can leave
        the cpu one after the memory one is gone; :meth:`remove` still finishes it)."""
        return any(d.is_dir() for d in dict.fromkeys(self.dirs.values()))

    def add(self, pid: int) -> None:
        """Moves ``pid`` (with its threads) into the group; its future children start inside."""
        for d in dict.fromkeys(self.dirs.values()):
            _write(d / "cgroup.procs", f"{int(pid)}\n", f"cgroup {self.rel}: add pid")

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join (one per hierarchy)."""
        return [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def pids(self) -> list[int]:
        """The processes in the group, in any of its hierarchies."""
        found: dict[int, None] = {}
        for d in dict.fromkeys(self.dirs.values()):
            with contextlib.suppress(OSError):
                found.update(dict.fromkeys(int(x) for x in (d / "cgroup.procs").read_text().split()))
        return list(found)

    def kill(self) -> None:
        """SIGKILLs every process in the group (v2: through ``cgroup.kill`` when the kernel has it)."""
        kill_file = self.dirs["memory"] / "cgroup.kill"
        if self.backend.v2 and kill_file.exists():
            _write(kill_file, "1", f"cgroup {self.rel}: kill")
            return
        for _ in range(3):  # a process forking while we kill is caught on the next pass
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 5.0) -> None:
        """Kills what is left in the group and removes it (and its scope directory when that is
        empty). Idempotent. Raises ResourceError if processes survive ``timeout`` seconds."""
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        if not self.exists():
            return
        deadline = time.monotonic() + timeout
        while self.pids():
            self.kill()
            if time.monotonic() > deadline:
                raise ResourceError(f"cgroup {self.rel}: processes {self.pids()} survived SIGKILL for {timeout} s")
            time.sleep(0.01)
        for d in dict.fromkeys(self.dirs.values()):
            _rmdir_retry(d, deadline)
            with contextlib.suppress(OSError):
                d.parent.rmdir()  # the scope, once its last group is gone

    # -- memory ------------------------------------------------------------------------------

    def _mem(self, v1: str, v2: str) -> Path:
        return self.dirs["memory"] / (v2 if self.backend.v2 else v1)

    def set_memory_limit(self, limit: int | None) -> None:
        """The hard limit (the kernel OOM-kills the group above it). v1 refuses (ResourceError) a
        limit below what it cannot reclaim; v2 OOM-kills instead, so lower it with care."""
        value = "max" if limit is None and self.backend.v2 else str(-1 if limit is None else _bytes(limit))
        _write(self._mem("memory.limit_in_bytes", "memory.max"), value + "\n", f"cgroup {self.rel}: memory limit")

    def memory_limit(self) -> int | None:
        return _parse_limit(_read(self._mem("memory.limit_in_bytes", "memory.max")))

    def set_memory_target(self, target: int | None) -> None:
        """The announced limit a cooperating job adapts to (see the module docstring)."""
        value = "max" if target is None and self.backend.v2 else str(-1 if target is None else _bytes(target))
        _write(
            self._mem("memory.soft_limit_in_bytes", "memory.high"), value + "\n", f"cgroup {self.rel}: memory target"
        )

    def memory_target(self) -> int | None:
        return _parse_limit(_read(self._mem("memory.soft_limit_in_bytes", "memory.high")))

    def memory_usage(self) -> int:
        return int(_read(self._mem("memory.usage_in_bytes", "memory.current")))

    def memory_peak(self) -> int:
        """Peak usage since the last :meth:`reset_memory_peak` (or since creation)."""
        if self.backend.v2 and self._peak_fd is not None:
            return int(os.pread(self._peak_fd, 64, 0))
        return int(_read(self._mem("memory.max_usage_in_bytes", "memory.peak")))

    def reset_memory_peak(self) -> None:
        if not self.backend.v2:
            _write(self._mem("memory.max_usage_in_bytes", ""), "0\n", f"cgroup {self.rel}: reset peak")
            return
        if self._peak_fd is None:
            self._peak_fd = os.open(self._mem("", "memory.peak"), os.O_RDWR)
        with contextlib.suppress(OSError):  # kernels before 6.12 have no per-fd reset
            os.write(self._peak_fd, b"reset\n")

    def oom_kills(self) -> int:
        """Processes of this group the kernel's OOM killer has killed."""
        return _kv(_read(self._mem("memory.oom_control", "memory.events"))).get("oom_kill", 0)

    # -- cpu ---------------------------------------------------------------------------------

    def set_cpu_quota(self, cores: float | None) -> None:
        """At most ``cores`` CPUs' worth of time per period (None: no quota)."""
        quota = -1 if cores is None else _quota_us(cores)
        if self.backend.v2:
            _write(
                self.dirs["cpu"] / "cpu.max",
                f"{'max' if quota < 0 else quota} {CPU_PERIOD_US}\n",
                f"cgroup {self.rel}: cpu quota",
            )
        else:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", f"{CPU_PERIOD_US}\n", f"cgroup {self.rel}: cpu period")
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", f"{quota}\n", f"cgroup {self.rel}: cpu quota")

    def set_cpu_weight(self, weight: int) -> None:
        """The group's share of contended CPU against its siblings, 1..10000 (100: the default;
        v1 ``cpu.shares`` = weight x 1024 / 100, v2 ``cpu.weight``). Unlike the quota (a cap), the
        weight decides who runs first when the cores are busy."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 10000:
            raise ValueError(f"cpu weight: expected an int in 1..10000, got {weight!r}")
        if self.backend.v2:
            _write(self.dirs["cpu"] / "cpu.weight", f"{weight}\n", f"cgroup {self.rel}: cpu weight")
        else:
            shares = max(2, weight * 1024 // 100)
            _write(self.dirs["cpu"] / "cpu.shares", f"{shares}\n", f"cgroup {self.rel}: cpu weight")

    def cpu_weight(self) -> int:
        if self.backend.v2:
            return int(_read(self.dirs["cpu"] / "cpu.weight"))
        return max(1, round(int(_read(self.dirs["cpu"] / "cpu.shares")) * 100 / 1024))

    def cpu_quota(self) -> float | None:
        return _read_quota(self.dirs["cpu"], self.backend.v2)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used by the group's processes, seconds."""
        if self.backend.v2:
            return _kv(_read(self.dirs["cpu"] / "cpu.stat")).get("usage_usec", 0) / 1e6
        return int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9

    def __repr__(self) -> str:
        return f"JobGroup({self.backend.kind}, {self.rel!r})"


def _bytes(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"memory limit: expected a positive number of bytes or None, got {limit!r}")
    return limit


def _quota_us(cores: float) -> int:
    if isinstance(cores, bool) or not isinstance(cores, int | float) or not (0 < cores < 1e6):
        raise ValueError(f"cpu quota: expected a positive number of cores or None, got {cores!r}")
    return max(1000, round(cores * CPU_PERIOD_US))  # the kernel's minimum quota is 1 ms


def _parse_limit(text: str) -> int | None:
    text = text.strip()
    return None if text == "max" else limit_or_none(int(text))


def _read_quota(cpu_dir: Path, v2: bool) -> float | None:
    if v2:
        quota, _, period = _read(cpu_dir / "cpu.max").strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    quota_us = int(_read(cpu_dir / "cpu.cfs_quota_us"))
    return None if quota_us < 0 else quota_us / int(_read(cpu_dir / "cpu.cfs_period_us"))


def _rmdir_retry(d: Path, deadline: float) -> None:
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # EBUSY for a moment after the last process died, until the kernel drops it.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise ResourceError(f"cannot remove cgroup {d}: {exc.strerror}") from exc
            time.sleep(0.01)


def _enable_v2_controllers(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(exist_ok=True)
        control = d / "cgroup.subtree_control"
        enabled = set(_read(control).split())
        missing = [c for c in ("memory", "cpu") if c not in enabled]
        if missing:
            _write(control, " ".join(f"+{c}" for c in missing) + "\n", f"cgroup {d}: enable controllers")


def group_of_pid(pid: int | str = "self", backend: Backend | None = None) -> JobGroup | None:
    """The autoglm_rt job group ``pid`` is in, or None when it is in none (or there is no backend)."""
    backend = backend or detect()
    if backend is None:
        return None
    v1_own, v2_own = _own_paths(_read(Path(f"/proc/{pid}/cgroup")))
    own = v2_own if backend.v2 else v1_own.get("memory")
    if own is None:
        return None
    # Job groups are <creator's group>/autoglm_rt/<scope>/<job>: the first autoglm_rt in the path.
    parts = own.strip("/").split("/")
    if _PREFIX not in parts:
        return None
    i = parts.index(_PREFIX)
    if len(parts) < i + 3:
        return None
    return JobGroup(backend, "/".join(parts[i + 1 : i + 3]))


def cpu_quota_cores(pid: int | str = "self") -> float | None:
    """The CPU quota (in cores) that holds for ``pid``: the smallest quota of its cpu group and
    the groups above it; None when there is none or no cgroup can be read. Round up for a
    thread count."""
    try:
        mounts, v2_mount = _mounts(Path("/proc/self/mountinfo").read_text())
        v1_own, v2_own = _own_paths(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None
    if "cpu" in mounts and "cpu" in v1_own:
        d, v2 = mounts["cpu"] / v1_own["cpu"].lstrip("/"), False
        top = mounts["cpu"]
    elif v2_mount is not None and v2_own is not None:
        d, v2 = v2_mount / v2_own.lstrip("/"), True
        top = v2_mount
    else:
        return None
    best: float | None = None
    for g in [d, *d.parents]:
        with contextlib.suppress(OSError, ResourceError, ValueError):
            q = _read_quota(g, v2)
            if q is not None and (best is None or q < best):
                best = q
        if g == top:
            break
    return best


def _groups(backend: Backend) -> Iterator[JobGroup]:
    """Every job group with a directory in any hierarchy (once each)."""
    rels: set[str] = set()
    for base in dict.fromkeys(backend.bases.values()):
        if not base.is_dir():
            continue
        for scope in (p for p in base.iterdir() if p.is_dir()):
            rels.update(f"{scope.name}/{job.name}" for job in scope.iterdir() if job.is_dir())
    for rel in sorted(rels):
        yield JobGroup(backend, rel)


def scope_pid(scope: str) -> int | None:
    """The owner pid of a scope named ``pid-<N>-...`` (None for other scopes)."""
    m = re.match(r"^pid-(\d+)(?:-|$)", scope)
    return int(m.group(1)) if m else None


def cleanup_stale(backend: Backend | None = None, scope: str | None = None, *, empty_after: float = 600.0) -> list[str]:
    """Removes groups left behind by a runner that died: every group of a ``pid-<N>`` scope whose
    owner process N is gone (its processes are killed); with ``scope`` given (a restarted runner's
    own scope), every empty group of that scope; and any group that has been empty and existed for
    ``empty_after`` seconds (its job ended while no runner watched, and none came back: a runner
    restarted after that reports such a job's exit but no longer an OOM kill). Groups holding
    processes without a dead owner stay (a restarted queue adopts those jobs). Returns the
    removed groups as ``scope/job``."""
    backend = backend or detect()
    if backend is None:
        return []
    removed: list[str] = []
    now = time.time()
    for g in list(_groups(backend)):
        s = g.rel.split("/")[0]
        owner = scope_pid(s)
        owner_gone = owner is not None and not _pid_alive(owner)
        if not owner_gone:
            if g.pids():
                continue
            # An empty group of a live owner may be one just created, its job not yet in it.
            try:
                born = min(d.stat().st_mtime for d in dict.fromkeys(g.dirs.values()) if d.is_dir())
            except (OSError, ValueError):
                continue
            old = now - born >= empty_after
            if s != scope and not old:
                continue
        with contextlib.suppress(ResourceError):
            g.remove()
            removed.append(g.rel)
    for b in dict.fromkeys(backend.bases.values()):
        if b.is_dir():
            for scope_dir in b.iterdir():
                with contextlib.suppress(OSError):
                    scope_dir.rmdir()  # empty scopes in the cpu/cpuacct trees too
            with contextlib.suppress(OSError):
                b.rmdir()  # and the autoglm_rt directory itself once nothing is left
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
