"""Watches a process tree's listening TCP sockets while it runs (psutil, polled)."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil

WILDCARDS = {"0.0.0.0", "::", "::ffff:0.0.0.0"}


def listening_sockets(root: int) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of ``root`` and its descendants."""
    found: set[tuple[int, str, int]] = set()
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.add((proc.pid, c.laddr.ip, c.laddr.port))
    return found


class ListenerWatch:
    """Polls ``listening_sockets(root)`` every ``interval`` seconds until closed; ``seen`` holds all
    that were ever seen, ``wildcard()`` those on every interface."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root, self.interval = root, interval
        self.seen: set[tuple[int, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= listening_sockets(self.root)
            self._stop.wait(self.interval)

    def wildcard(self) -> set[tuple[int, str, int]]:
        return {s for s in self.seen if s[1] in WILDCARDS}

    def __enter__(self) -> ListenerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
