"""Elastic replicas under torchrun on CPU with gloo over 127.0.0.1: scale from 1 to 2 agents and
back, and kill a worker; each time training resumes from its checkpoint with no completed step
lost or repeated, and the weights equal a float64 reference that never changed world size."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from autoglm_rt.elastic import ElasticError, ElasticJob, scale_down_replicas, scale_up_replicas
from autoglm_rt.trainers import elastic_trainer as trainer
from tests.listeners import ListenerWatch

SCRIPT = Path(trainer.__file__)
FEATURES, BATCH, MICRO, LR = 8, 64, 16, 0.05


def reference_weights(steps: int) -> np.ndarray:
    """SGD with momentum 0.9 on the full batch of each step, in numpy float64: what any world size
    with any accumulation must reproduce."""
    w = np.zeros(FEATURES)
    buf = None
    for step in range(steps):
        x, y = (t.numpy() for t in trainer.make_batch(step, BATCH, FEATURES, seed=0))
        grad = 2.0 / BATCH * x.T @ (x @ w - y)
        buf = grad if buf is None else 0.9 * buf + grad
        w = w - LR * buf
    return w


def checkpoint(ckpt: Path) -> dict[str, Any] | None:
    try:
        return trainer.load_checkpoint(ckpt)
    except (RuntimeError, EOFError, OSError):
        return None  # being replaced right now


def history(ckpt: Path) -> list[dict[str, int]]:
    state = checkpoint(ckpt)
    return [] if state is None else list(state["history"])


def last_record(ckpt: Path) -> dict[str, int]:
    h = history(ckpt)
    return h[-1] if h else {}


def wait_until(job: ElasticJob, what: str, predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-3000:] for p in sorted(job.log_dir.glob("*.log")))
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


def check_training(ckpt: Path) -> list[dict[str, int]]:
    state = checkpoint(ckpt)
    assert state is not None
    hist = list(state["history"])
    steps = [r["step"] for r in hist]
    assert steps == list(range(1, len(steps) + 1)), "a completed step was lost or repeated"
    for r in hist:  # the effective batch is the same at every world size
        assert r["local_batch"] * r["world_size"] in range(BATCH - r["world_size"] + 1, BATCH + r["world_size"])
        assert r["accumulation"] == -(-r["local_batch"] // MICRO)
    w = state["model"]["weight"].squeeze(0).numpy()
    np.testing.assert_allclose(w, reference_weights(len(steps)), rtol=1e-9, atol=1e-12)
    return hist


def make_job(tmp_path: Path, **kwargs: Any) -> ElasticJob:
    args = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--steps", "100000", "--step-time", "0.15"]
    args += ["--global-batch", str(BATCH), "--micro-batch", str(MICRO), "--features", str(FEATURES), "--lr", str(LR)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return ElasticJob(SCRIPT, args, log_dir=tmp_path / "logs", env=env, **kwargs)


@pytest.mark.slow
@pytest.mark.distributed
def test_scale_from_one_to_two_agents_and_back_keeps_every_step(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with ListenerWatch(os.getpid()) as listeners, make_job(tmp_path, min_nodes=1, max_nodes=2) as job:
        job.start()
        wait_until(job, "3 steps with 1 agent", lambda: len(history(ckpt)) >= 3, 60)
        assert scale_up_replicas(job) == 2
        wait_until(job, "world size 2", lambda: any(r["world_size"] == 2 for r in history(ckpt)), 80)
        at_two = len(history(ckpt))
        wait_until(job, "3 steps at world size 2", lambda: len(history(ckpt)) >= at_two + 3, 30)
        assert scale_down_replicas(job, grace=20) == 1
        wait_until(job, "world size 1 again", lambda: last_record(ckpt).get("world_size") == 1, 80)
        last = len(history(ckpt))
        wait_until(job, "2 more steps", lambda: len(history(ckpt)) >= last + 2, 30)
        with pytest.raises(ElasticError, match="min_nodes"):
            scale_down_replicas(job)
    hist = check_training(ckpt)
    worlds = [r["world_size"] for r in hist]
    changes = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    assert changes == [1, 2, 1]
    # The rendezvous store, the agents' and the workers' stores and gloo: loopback only.
    assert "127.0.0.1" in {addr for _, addr, _ in listeners.seen}
    assert not listeners.wildcard(), listeners.seen


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_worker_is_restarted_and_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with make_job(tmp_path, min_nodes=2, max_nodes=2) as job:
        job.start()
        wait_until(job, "3 steps with 2 agents", lambda: len(history(ckpt)) >= 3, 80)
        agent = psutil.Process(job.agents()[1])
        workers = [p for p in agent.children(recursive=True) if "elastic_trainer" in " ".join(p.cmdline())]
        assert workers, "the agent has no worker"
        before = {r["pid"] for r in history(ckpt)}
        os.kill(workers[0].pid, signal.SIGKILL)
        # Every worker is replaced (one agent restarts after the failure, the other on the
        # membership change), so new steps come from a new process.
        wait_until(job, "new workers", lambda: last_record(ckpt).get("pid", -1) not in before | {-1}, 80)
        restarted = len(history(ckpt))
        wait_until(job, "2 steps after the restart", lambda: len(history(ckpt)) >= restarted + 2, 30)
    hist = check_training(ckpt)
    assert {r["world_size"] for r in hist} == {2}


def test_elastic_job_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_nodes"):
        ElasticJob(SCRIPT, min_nodes=0)
    with pytest.raises(ValueError, match="max_nodes"):
        ElasticJob(SCRIPT, min_nodes=3, max_nodes=2)
    with pytest.raises(ValueError, match="script"):
        ElasticJob(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="max_restarts"):
        ElasticJob(SCRIPT, max_restarts=-1)
    job = ElasticJob(SCRIPT, log_dir=tmp_path)
    with pytest.raises(ElasticError, match="not been started"):
        _ = job.endpoint
    with pytest.raises(ValueError, match="nodes"):
        job.start(nodes=5)


def test_trainer_splits_every_batch_exactly_and_keeps_it_deterministic() -> None:
    for world in range(1, 9):
        shares = [trainer.rank_share(BATCH + 3, world, r) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == BATCH + 3
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
    x1, y1 = trainer.make_batch(7, BATCH, FEATURES, seed=0)
    x2, y2 = trainer.make_batch(7, BATCH, FEATURES, seed=0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(trainer.make_batch(8, BATCH, FEATURES, seed=0)[0], x1)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_workers_strategy_scales_the_job_through_the_launcher(tmp_path: Path) -> None:
    """scale_up_replicas from a worker's Runtime reaches the real ElasticJob by default (the
    job's environment names its launcher): 1 agent becomes 2; once at max_nodes, the next
    request says it was not carried out."""
    import json

    worker = Path(__file__).with_name("elastic_strategy_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    with ElasticJob(worker, [str(tmp_path)], min_nodes=1, max_nodes=2, log_dir=tmp_path / "logs", env=env) as job:
        job.start()
        served: list[str] = []

        def scaled() -> bool:
            served.extend(job.serve_requests())
            return job.replicas() == 2

        wait_until(job, "the worker's request to be served", scaled, 60)
        assert served[0] == "scaled replicas 1 -> 2"

        def results() -> list[dict[str, Any]]:
            path = tmp_path / "actions.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        wait_until(job, "the 2-rank workers' strategy", lambda: any(r["world"] == 2 for r in results()), 80)
        wait_until(
            job, "the launcher's answer", lambda: bool(served.extend(job.serve_requests()) or len(served) > 1), 30
        )
    first = results()[0]
    assert first["world"] == 1 and first["applied"] and "sent to the elastic launcher" in first["detail"]
    at_two = [r for r in results() if r["world"] == 2]
    assert {r["rank"] for r in at_two} == {0, 1}
    assert all(r["applied"] == (r["rank"] == 0) for r in at_two)  # rank 0 sends; rank 1 says it did not
    assert served[1] == "not scaled: 2 replica(s) already at max_nodes"
