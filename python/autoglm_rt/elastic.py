"""Elastic replicas for a job run under TorchElastic: grow or shrink the number of ``torchrun``
agents on one c10d rendezvous while the job trains.

    job = ElasticJob("train.py", ["--checkpoint-dir", "ckpt"], min_nodes=1, max_nodes=2)
    job.start()                  # one agent: torchrun --nnodes=1:2 --rdzv-backend=c10d ...
    scale_up_replicas(job)       # a second agent joins; workers restart with world size 2
    scale_down_replicas(job)     # one agent leaves; workers restart with world size 1
    job.wait()

This process hosts the rendezvous' TCP store, listening on 127.0.0.1 only (agents get ``is_host=false``), so any
agent, including the first, can leave without taking the rendezvous down. Scaling up starts
another agent on the same endpoint: TorchElastic sees a node waiting and restarts every worker
group with the new world size (membership changes do not use up ``--max-restarts``). Scaling down
sends SIGTERM to the newest agent: its workers finish their step, save and exit (the checkpoint
contract, see :mod:`autoglm_rt.trainers.elastic_trainer`); the others lose their peer, fail their next
collective and are restarted by their agents (this does count against ``max_restarts``) in a
smaller world. Workers resume from the last checkpoint and keep the effective batch through
gradient accumulation. A worker that dies is restarted by its agent the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_rt.distributed import bind_address, create_store

__all__ = ["ElasticError", "ElasticJob", "ElasticJobScheduler", "scale_down_replicas", "scale_up_replicas"]

#: Environment the workers of an ElasticJob get: where to send scaling requests.
ENDPOINT_ENV, RUN_ID_ENV = "AUTOGLM_RT_ELASTIC_ENDPOINT", "AUTOGLM_RT_ELASTIC_RUN_ID"


def _scale_key(run_id: str) -> str:
    return f"autoglm_rt/{run_id}/scale_requests"


class ElasticError(RuntimeError):
    """An elastic job cannot do what was asked (no agent to stop, max_nodes reached, ...)."""


@dataclass
class _Agent:
    index: int
    process: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False  # stopped by us: its exit code is not a failure


class ElasticJob:
    """A training script run by ``torchrun`` agents on one c10d rendezvous at 127.0.0.1.

    ``min_nodes``/``max_nodes``: the ``--nnodes=MIN:MAX`` range. ``max_restarts``: failures each
    agent may recover from. ``rdzv_conf``: extra rendezvous settings; the defaults make membership
    changes take seconds rather than TorchElastic's defaults of 30 s and more. ``log_dir``: where
    each agent's output goes (``agent-<i>.log``). ``host``: the one address the rendezvous store,
    the agents and rank 0's worker store listen on (default ``$AUTOGLM_RT_BIND_ADDR`` or 127.0.0.1;
    see :mod:`autoglm_rt.distributed`)."""

    def __init__(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        *,
        min_nodes: int = 1,
        max_nodes: int = 2,
        nproc_per_node: int = 1,
        max_restarts: int = 10,
        monitor_interval: float = 0.5,
        log_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        rdzv_conf: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        host: str | None = None,
    ) -> None:
        for name, value in (("min_nodes", min_nodes), ("max_nodes", max_nodes), ("nproc_per_node", nproc_per_node)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if max_nodes < min_nodes:
            raise ValueError(f"max_nodes ({max_nodes}) must be >= min_nodes ({min_nodes})")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts: expected an int >= 0, got {max_restarts!r}")
        self.script = Path(script)
        if not self.script.is_file():
            raise ValueError(f"script: {self.script} is not a file")
        self.args = [str(a) for a in args]
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.nproc_per_node = nproc_per_node
        self.max_restarts = max_restarts
        self.monitor_interval = float(monitor_interval)
        self.log_dir = Path(log_dir) if log_dir is not None else Path.cwd() / "elastic-logs"
        self.env = dict(os.environ if env is None else env)
        # With the rendezvous store shared with the workers (torch >= 2.4's default), an agent that
        # stays rank 0 across a membership change does not publish the new round's master address,
        # and a joining agent waits for it until it times out. Per-round worker stores avoid that.
        self.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        self.rdzv_conf: dict[str, Any] = {
            "join_timeout": 120,
            "last_call_timeout": 2,
            "close_timeout": 10,
            "keep_alive_interval": 1,
            "keep_alive_max_attempt": 3,
            **(rdzv_conf or {}),
            "is_host": "false",
        }
        self.run_id = run_id or f"agrt-{uuid.uuid4().hex[:8]}"
        self.host = bind_address() if host is None else host
        self._store: Any = None
        self._agents: list[_Agent] = []
        self._next_index = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of the rendezvous (valid after :meth:`start`)."""
        if self._store is None:
            raise ElasticError("the job has not been started")
        return f"{self.host}:{self._store.port}"

    def start(self, nodes: int | None = None) -> None:
        """Hosts the rendezvous store and starts ``nodes`` agents (default ``min_nodes``)."""
        if self._store is not None:
            raise ElasticError("the job was already started")
        nodes = self.min_nodes if nodes is None else nodes
        if not self.min_nodes <= nodes <= self.max_nodes:
            raise ValueError(f"nodes: expected {self.min_nodes}..{self.max_nodes}, got {nodes}")
        from datetime import timedelta

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._store = create_store(
            self.host, 0, is_master=True, wait_for_workers=False, multi_tenant=True, timeout=timedelta(seconds=60)
        )
        # Workers send scaling requests (their strategies' scale_*_replicas) through this store.
        self.env[ENDPOINT_ENV], self.env[RUN_ID_ENV] = self.endpoint, self.run_id
        self._scale_served = 0
        for _ in range(nodes):
            self._spawn()

    def command(self) -> list[str]:
        """The torchrun command line each agent runs."""
        conf = ",".join(f"{k}={v}" for k, v in self.rdzv_conf.items())
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.min_nodes}:{self.max_nodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={conf}",
            f"--max-restarts={self.max_restarts}",
            f"--monitor-interval={self.monitor_interval:g}",
            f"--local-addr={self.host}",
            str(self.script),
            *self.args,
        ]

    def agents(self) -> list[int]:
        """PIDs of the agents still running, oldest first."""
        return [a.process.pid for a in self._agents if a.process.poll() is None]

    def replicas(self) -> int:
        """Agents still running."""
        return len(self.agents())

    def scale_up(self, n: int = 1) -> int:
        """Starts ``n`` more agents on the same rendezvous. Returns the number running."""
        self._check_count(n)
        if self.replicas() + n > self.max_nodes:
            raise ElasticError(f"cannot run {self.replicas() + n} agents: max_nodes is {self.max_nodes}")
        for _ in range(n):
            self._spawn()
        return self.replicas()

    def scale_down(self, n: int = 1, *, grace: float = 30.0) -> int:
        """Stops the ``n`` newest agents (SIGTERM; SIGKILL to their process group after ``grace``
        seconds). Returns the number running."""
        self._check_count(n)
        running = [a for a in self._agents if a.process.poll() is None]
        if len(running) - n < self.min_nodes:
            raise ElasticError(f"cannot go below min_nodes={self.min_nodes} (running: {len(running)})")
        for agent in running[-n:]:
            _stop(agent, grace)
        return self.replicas()

    def scale_by(self, delta: int) -> str:
        """Adds (``delta`` > 0) or removes agents, within ``min_nodes..max_nodes``: a request
        beyond them does as much as it can and says so. Returns what happened; an answer that
        changed nothing starts with "not " (the actuators' convention)."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta: expected an int, got {delta!r}")
        before = self.replicas()
        want = min(self.max_nodes, max(self.min_nodes, before + delta))
        if want == before:
            bound = "max_nodes" if delta > 0 else "min_nodes"
            return f"not scaled: {before} replica(s) already at {bound}"
        after = self.scale_up(want - before) if want > before else self.scale_down(before - want)
        clipped = (
            "" if want == before + delta else f" (asked {delta:+d}, limited to {self.min_nodes}..{self.max_nodes})"
        )
        return f"scaled replicas {before} -> {after}{clipped}"

    def serve_requests(self) -> list[str]:
        """Carries out the scaling requests the workers sent since the last call (summed into one
        change); returns what happened. :meth:`wait` calls it while it waits."""
        if self._store is None:
            return []
        total = int(self._store.add(_scale_key(self.run_id), 0))
        pending, self._scale_served = total - self._scale_served, total
        return [self.scale_by(pending)] if pending else []

    def wait(self, timeout: float | None = None, *, poll: float = 0.5) -> int:
        """Waits for every agent to exit, serving the workers' scaling requests every ``poll``
        seconds; 0 if all exited 0, else the first non-zero code. Raises TimeoutError (agents
        left running) after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(a.process.poll() is None for a in self._agents):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"elastic job still running after {timeout} s; logs in {self.log_dir}")
            self.serve_requests()
            time.sleep(poll)
        codes = [a.process.returncode for a in self._agents if not a.stopped]
        return next((c for c in codes if c != 0), 0)

    def close(self, grace: float = 10.0) -> None:
        """Stops every agent still running and the rendezvous store."""
        for agent in self._agents:
            if agent.process.poll() is None:
                _stop(agent, grace)
        self._store = None

    def __enter__(self) -> ElasticJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _spawn(self) -> None:
        index = self._next_index
        self._next_index += 1
        log = self.log_dir / f"agent-{index}.log"
        with open(log, "ab") as f:
            process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self._agents.append(_Agent(index, process, log))

    @staticmethod
    def _check_count(n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")


def _stop(agent: _Agent, grace: float) -> None:
    """SIGTERM to the agent (it forwards SIGTERM to its workers), SIGKILL to the group after ``grace``."""
    agent.stopped = True
    process = agent.process
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class ElasticJobScheduler:
    """A worker's side of an :class:`ElasticJob`: scaling requests go to the launcher through the
    rendezvous host's store (the Runtime finds it from ``AUTOGLM_RT_ELASTIC_ENDPOINT`` and
    ``AUTOGLM_RT_ELASTIC_RUN_ID``, which the job gives its workers). Every rank decides the same
    actions, so only rank 0 sends them; the launcher applies them within ``min..max_nodes``.
    Answers that change nothing start with "not " (the actuators' convention)."""

    def __init__(self, endpoint: str, run_id: str, rank: int) -> None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"endpoint: expected HOST:PORT, got {endpoint!r}")
        self.host, self.port, self.run_id, self.rank = host, int(port), run_id, rank
        self._store: Any = None

    def scale_replicas(self, delta: int, action: object = None) -> str:
        if self.rank != 0:
            return f"not sent by rank {self.rank}: rank 0 sends the job's scaling requests"
        if self._store is None:
            from datetime import timedelta

            import torch.distributed as dist

            self._store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=30))
        total = self._store.add(_scale_key(self.run_id), int(delta))
        return f"scale request {delta:+d} sent to the elastic launcher (requests so far sum to {total:+d})"

    def migrate(self, action: object = None) -> str:
        return "not migrated: an elastic job moves by scaling its replicas (scale_up/down_replicas)"


def scale_up_replicas(job: ElasticJob, n: int = 1) -> int:
    """Adds ``n`` agents to a running elastic job; returns the number of agents running."""
    return job.scale_up(n)


def scale_down_replicas(job: ElasticJob, n: int = 1, *, grace: float = 30.0) -> int:
    """Removes the ``n`` newest agents from a running elastic job; returns the number running."""
    return job.scale_down(n, grace=grace)
