"""The queue's state in SQLite: one row per job and an event log. Every change is committed before
the runner acts on it, so a runner that dies loses no job and a new one resumes from the file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_rt.jobqueue.spec import JobSpec

__all__ = ["JobRow", "QueueStore", "Request", "RunnerLock", "StateLockedError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,            -- pending starting running stopping succeeded failed
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    devices TEXT NOT NULL DEFAULT '[]',
    pid INTEGER,
    pid_created REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    stop_reason TEXT,               -- preempt | migrate while stopping
    stop_sent_at REAL,
    migrate_to TEXT,
    preemptions INTEGER NOT NULL DEFAULT 0,
    message TEXT
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,             -- migrate
    job TEXT NOT NULL,
    target TEXT,                    -- JSON list of slots, or NULL
    answered_at REAL,
    ok INTEGER,
    answer TEXT,
    expires_at REAL,                -- a request not taken by a runner by then is never carried out
    claimed_at REAL                 -- taken by a runner: it will answer
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    job TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""

TERMINAL = ("succeeded", "failed")


@dataclass(frozen=True)
class Request:
    """A request to the running runner, left in the state file by another process."""

    id: int
    kind: str
    job: str
    to: tuple[int, ...] | None
    answered: bool
    ok: bool | None
    answer: str | None


@dataclass
class JobRow:
    name: str
    seq: int
    spec: JobSpec
    state: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    devices: tuple[int, ...]
    pid: int | None
    pid_created: float | None
    attempt: int
    exit_code: int | None
    stop_reason: str | None
    stop_sent_at: float | None
    migrate_to: tuple[int, ...] | None
    preemptions: int
    message: str | None


class QueueStore:
    """A queue state file. Not shared between threads; one runner per file at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # State files written before requests expired: add the columns (NULL: no deadline).
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(requests)")}
        for col in ("expires_at", "claimed_at"):
            if col not in cols:
                self._db.execute(f"ALTER TABLE requests ADD COLUMN {col} REAL")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> QueueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_missing(self, jobs: tuple[JobSpec, ...], now: float) -> list[str]:
        """Inserts jobs not yet in the file (a known name keeps its stored state). Returns the added names."""
        added = []
        with self._tx():
            seq = self._db.execute("SELECT COALESCE(MAX(seq), -1) FROM jobs").fetchone()[0]
            for j in jobs:
                if self._db.execute("SELECT 1 FROM jobs WHERE name=?", (j.name,)).fetchone():
                    continue
                seq += 1
                self._db.execute(
                    "INSERT INTO jobs(name, seq, spec, state, submitted_at) VALUES (?, ?, ?, 'pending', ?)",
                    (j.name, seq, json.dumps(j.to_dict()), now),
                )
                self._event(now, j.name, "submitted", "")
                added.append(j.name)
        return added

    def jobs(self) -> list[JobRow]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        cols = [c[0] for c in self._db.execute("SELECT * FROM jobs LIMIT 0").description]
        return [self._row(dict(zip(cols, r, strict=True))) for r in rows]

    def job(self, name: str) -> JobRow:
        for j in self.jobs():
            if j.name == name:
                return j
        raise KeyError(name)

    def update(self, name: str, now: float, event: str | None = None, detail: str = "", **fields: Any) -> None:
        """Sets ``fields`` of one job and logs ``event``, in one transaction."""
        for key in ("devices", "migrate_to"):
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(list(fields[key]))
        with self._tx():
            if fields:
                cols = ", ".join(f"{k}=?" for k in fields)
                self._db.execute(f"UPDATE jobs SET {cols} WHERE name=?", (*fields.values(), name))
            if event:
                self._event(now, name, event, detail)

    def events(self, job: str | None = None) -> list[tuple[float, str, str, str]]:
        """(at, job, event, detail) in the order they happened."""
        q = "SELECT at, job, event, detail FROM events"
        rows = self._db.execute(q + " WHERE job=? ORDER BY id" if job else q + " ORDER BY id", (job,) if job else ())
        return [tuple(r) for r in rows.fetchall()]

    def request(
        self, kind: str, job: str, to: tuple[int, ...] | None, now: float, expires_at: float | None = None
    ) -> int:
        """Leaves a request for the runner; returns its id. A runner takes it only before
        ``expires_at`` (None: no deadline); after that it is answered as expired, never carried out."""
        with self._tx():
            cur = self._db.execute(
                "INSERT INTO requests(at, kind, job, target, expires_at) VALUES (?, ?, ?, ?, ?)",
                (now, kind, job, json.dumps(list(to)) if to is not None else None, expires_at),
            )
        return int(cur.lastrowid or 0)

    def open_requests(self) -> list[Request]:
        rows = self._db.execute("SELECT id FROM requests WHERE answered_at IS NULL ORDER BY id").fetchall()
        return [self.get_request(r[0]) for r in rows]

    def claim_request(self, request_id: int, now: float) -> bool:
        """The runner takes an unanswered request before its deadline (True), or answers it as
        expired (False). Exactly one of this and :meth:`cancel_request` wins."""
        with self._tx():
            claimed = self._db.execute(
                "UPDATE requests SET claimed_at=? WHERE id=? AND claimed_at IS NULL AND answered_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (now, request_id, now),
            ).rowcount
            if not claimed:
                self._db.execute(
                    "UPDATE requests SET answered_at=?, ok=0, answer='expired before a runner took it' "
                    "WHERE id=? AND claimed_at IS NULL AND answered_at IS NULL",
                    (now, request_id),
                )
        return bool(claimed)

    def cancel_request(self, request_id: int, now: float) -> bool:
        """Withdraws a request no runner has taken yet (True); False if a runner took it (it will
        answer) or it was answered already."""
        with self._tx():
            return bool(
                self._db.execute(
                    "UPDATE requests SET answered_at=?, ok=0, answer='withdrawn by the requester' "
                    "WHERE id=? AND claimed_at IS NULL AND answered_at IS NULL",
                    (now, request_id),
                ).rowcount
            )

    def get_request(self, request_id: int) -> Request:
        r = self._db.execute(
            "SELECT id, kind, job, target, answered_at, ok, answer FROM requests WHERE id=?", (request_id,)
        ).fetchone()
        if r is None:
            raise KeyError(request_id)
        return Request(
            id=r[0],
            kind=r[1],
            job=r[2],
            to=tuple(json.loads(r[3])) if r[3] else None,
            answered=r[4] is not None,
            ok=None if r[5] is None else bool(r[5]),
            answer=r[6],
        )

    def answer_request(self, request_id: int, now: float, ok: bool, answer: str) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE requests SET answered_at=?, ok=?, answer=? WHERE id=?", (now, int(ok), answer, request_id)
            )

    def _event(self, now: float, job: str, event: str, detail: str) -> None:
        self._db.execute("INSERT INTO events(at, job, event, detail) VALUES (?, ?, ?, ?)", (now, job, event, detail))

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    @staticmethod
    def _row(r: dict[str, Any]) -> JobRow:
        spec = json.loads(r["spec"])
        spec["command"] = tuple(spec["command"])
        spec["depends_on"] = tuple(spec["depends_on"])
        return JobRow(
            name=r["name"],
            seq=r["seq"],
            spec=JobSpec(**spec),
            state=r["state"],
            submitted_at=r["submitted_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            devices=tuple(json.loads(r["devices"] or "[]")),
            pid=r["pid"],
            pid_created=r["pid_created"],
            attempt=r["attempt"],
            exit_code=r["exit_code"],
            stop_reason=r["stop_reason"],
            stop_sent_at=r["stop_sent_at"],
            migrate_to=tuple(json.loads(r["migrate_to"])) if r["migrate_to"] else None,
            preemptions=r["preemptions"],
            message=r["message"],
        )


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


class StateLockedError(RuntimeError):
    """Another runner holds the queue's state file."""


class RunnerLock:
    """An exclusive ``flock`` on ``STATE.lock`` beside the state file, which records the holder's
    pid and host. Held for the runner's lifetime; the kernel releases it when the holder exits or
    dies, so a lock left by a dead runner is free and simply taken over (the pid in the file is
    only for the message). Local file systems only (``flock`` over NFS is not reliable)."""

    def __init__(self, state: str | Path) -> None:
        self.state = Path(state)
        self.path = Path(f"{self.state}.lock")
        self.state.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            pid, host = [*holder, "?", "?"][:2]
            raise StateLockedError(
                f"state {self.state} is held by pid {pid} on {host}; stop that runner or use another --state"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Frees the lock (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
