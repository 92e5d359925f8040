"""A real training job in its own cgroup whose memory limit is lowered below its working set:
the Runtime's batch controller shrinks the micro-batch (more accumulation, same effective batch)
before the hard limit follows, the job is never OOM-killed, and every sample is processed exactly
once (the weights equal a plain-torch full-batch reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autoglm_rt import resources
from autoglm_rt.resources import JobGroup, ResourceError
from autoglm_rt.trainers.tenant_job import build_model, make_batch

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"model": "cnn", "width": 24, "batch": 64, "side": 40, "steps": 12, "lr": 0.05, "seed": 3}


def _reference_weights() -> dict[str, torch.Tensor]:
    """Plain torch: one full-batch mean-loss gradient per step, SGD."""
    torch.set_num_threads(1)
    model = build_model(ARGS["model"], ARGS["width"], ARGS["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=ARGS["lr"])
    for step in range(ARGS["steps"]):
        x, y, _ = make_batch(ARGS["model"], step, ARGS["batch"], ARGS["side"], ARGS["seed"])
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def _wait(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.cgroup
def test_limit_lowered_below_the_working_set_shrinks_the_micro_batch_and_keeps_the_job(tmp_path: Path) -> None:
    group = JobGroup.create(f"pid-{os.getpid()}-test", "adapts")
    status, samples, weights = tmp_path / "status.json", tmp_path / "samples", tmp_path / "w.pt"
    try:
        group.set_memory_limit(2 << 30)
        cmd = [sys.executable, "-m", "autoglm_rt.trainers.tenant_job", "--status", str(status)]
        cmd += ["--samples-log", str(samples), "--save", str(weights)]
        cmd += [f"--{k}={v}" for k, v in ARGS.items()]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "MALLOC_MMAP_THRESHOLD_": "131072"}
        job = subprocess.Popen(cmd, env=env, preexec_fn=lambda: group.add(os.getpid()))

        def read() -> dict[str, object] | None:
            try:
                return json.loads(status.read_text())  # type: ignore[no-any-return]
            except (OSError, ValueError):
                return None

        first = _wait(lambda: (s := read()) and s["step"] >= 2 and s, 120, "two steps")
        assert first["micro_batch"] == ARGS["batch"]
        peak = int(first["peak_bytes"])  # type: ignore[call-overload]
        target = int(peak * 0.8) // 4096 * 4096  # below the whole batch's working set; whole pages
        group.set_memory_target(target)
        shrunk = _wait(
            lambda: (s := read()) and s["micro_batch"] < ARGS["batch"] and s["peak_bytes"] < target and s,
            120,
            "a step under the target with a smaller micro-batch",
        )

        def enforce() -> bool:
            try:
                group.set_memory_limit(target)
            except ResourceError:
                return False  # v1 refuses while usage is above; the job is between steps
            return True

        _wait(enforce, 30, "the kernel to accept the lowered hard limit")
        assert job.wait(timeout=180) == 0
        assert group.memory_limit() == target and group.oom_kills() == 0
        assert shrunk["accumulation"] >= 2
    finally:
        group.remove()
    seen = [int(i) for line in samples.read_text().splitlines() for i in line.split()]
    assert sorted(seen) == list(range(ARGS["steps"] * ARGS["batch"]))  # none lost, none repeated
    got = torch.load(weights)["model"]
    ref = _reference_weights()
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5)


def test_tenant_job_without_a_cgroup_still_trains_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    out = subprocess.run(
        [sys.executable, "-m", "autoglm_rt.trainers.tenant_job", "--steps=1", "--batch=4", "--side=8", "--width=4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    kind, reason = resources.availability()
    expected = reason if kind == "none" else "this process is not in an autoglm_rt job group"
    assert f"running without a memory signal: {expected}" in out.stderr


def test_tenant_job_trains_with_what_it_built_before_training_frozen_out_of_the_collector() -> None:
    code = (
        "import gc; from autoglm_rt.trainers import tenant_job; assert gc.get_freeze_count() == 0; "
        "rc = tenant_job.main(['--steps=2', '--batch=4', '--side=8', '--width=4']); "
        "print(rc, gc.get_freeze_count(), gc.isenabled())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rc, frozen, enabled = out.stdout.split()
    # torch and the model are out of the generations; the collector still runs for what training makes.
    assert rc == "0" and int(frozen) > 10_000 and enabled == "True"
