"""Every command-line error is one line, ``autoglm-rt: error: <what>, <what to do>``, with exit
code 2 and no traceback; ``--debug`` or ``AUTOGLM_RT_DEBUG=1`` shows the traceback. Each case runs
the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import autoglm_rt
from autoglm_rt.jobqueue import QueueStore
from autoglm_rt.jobqueue.store import RunnerLock

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT / "python"), **(env or {})}
    full.pop("AUTOGLM_RT_DEBUG", None) if "AUTOGLM_RT_DEBUG" not in (env or {}) else None
    return subprocess.run([PY, "-m", "autoglm_rt.cli", *args], env=full, capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("autoglm-rt: error: ") and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_replay_errors(tmp_path: Path) -> None:
    assert_one_line_error(cli("replay", str(tmp_path / "missing.csv")), "no trace file at", "op,id,bytes,stream")
    (tmp_path / "wrong.csv").write_text("x,y\n1,2\n")
    assert_one_line_error(cli("replay", str(tmp_path / "wrong.csv")), "expected the header")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    assert_one_line_error(cli("replay", str(tmp_path / "binary.csv")), "not a text file")
    trace = str(ROOT / "benches" / "traces" / "mlp_train.csv")
    assert_one_line_error(cli("replay", trace, "--repeat", "0"), "--repeat must be >= 1")
    assert_one_line_error(cli("replay", trace, "--granularity", "lots"), "granularity", "cannot parse")
    assert_one_line_error(cli("replay", trace, "--repeat", "x"), "invalid int value", "--help")
    assert_one_line_error(cli("replay"), "required: trace", "--help")


def test_demo_errors_are_caught_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert_one_line_error(cli("demo", "--steps", "0", "--out", str(out)), "--steps must be >= 1")
    assert_one_line_error(cli("demo", "--gpus", "1", "--out", str(out)), "--gpus must be 0")
    ok, reason = autoglm_rt.cuda_available(return_reason=True)
    if not ok:  # the check names the library's reason, and nothing was written
        assert_one_line_error(cli("demo", "--gpus", "2", "--out", str(out)), "--gpus 2 needs CUDA", reason)
    assert not out.exists()
    parent_is_a_file = tmp_path / "file"
    parent_is_a_file.write_text("")
    assert_one_line_error(cli("demo", "--out", str(parent_is_a_file / "demo")), "cannot write to --out")
    if os.geteuid() == 0 and Path("/sys").is_dir():  # root ignores permission bits; sysfs is read-only
        assert_one_line_error(cli("demo", "--out", "/sys/autoglm_rt_demo"), "cannot write to --out")
    # A directory holding a smoke run with 7 steps: the exact flags to resume it.
    from dataclasses import asdict, replace

    from autoglm_rt.demo.train import PRESETS

    out.mkdir()
    (out / "config.json").write_text(json.dumps(asdict(replace(PRESETS["smoke"], steps=7))))
    assert_one_line_error(cli("demo", "--quick", "--out", str(out)), "rerun with --smoke --steps 7 to resume it")


def test_monitor_on_a_busy_port_names_it(busy_port: int) -> None:
    line = assert_one_line_error(cli("monitor", "--serve", str(busy_port), "--no-gpu", "--once"))
    assert f"127.0.0.1:{busy_port}" in line and "another port" in line


def test_bench_on_cuda_without_cuda() -> None:
    ok, reason = autoglm_rt.cuda_available(return_reason=True)
    if ok:
        pytest.skip("CUDA is available here")  # the error case does not exist on this machine
    assert_one_line_error(cli("bench", "--device", "cuda"), "--device cuda", reason, "--device cpu")


def test_queue_state_errors(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("slots: 1\njobs: [{name: a, command: ['true']}]\n")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not sqlite" * 100)
    assert_one_line_error(cli("queue", str(jobs), "--state", str(corrupt)), "not a database", "another --state")
    assert_one_line_error(cli("queue-migrate", "--state", str(corrupt), "a"), "not a database")
    held = tmp_path / "held.db"
    lock = RunnerLock(held)
    try:
        assert_one_line_error(cli("queue", str(jobs), "--state", str(held)), f"held by pid {os.getpid()}")
    finally:
        lock.release()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("slots: 1\njobs: [{name: caf\xe9, command: ['true']}]\n".encode("latin-1"))
    assert_one_line_error(cli("queue", str(latin1)), "not UTF-8 text")


def test_a_read_only_queue_state(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("slots: 1\njobs: [{name: a, command: ['true']}]\n")
    state = tmp_path / "ro.db"
    QueueStore(state).close()
    if os.geteuid() != 0:
        state.chmod(0o444)
        tmp_path.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(state)]).returncode != 0:
        pytest.skip("root ignores permission bits and this file system has no immutable flag")
    try:
        assert_one_line_error(cli("queue", str(jobs), "--state", str(state)), "readonly", "writable")
    finally:
        tmp_path.chmod(0o755)
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(state)])


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.csv")
    for r in (cli("--debug", "replay", missing), cli("replay", missing, env={"AUTOGLM_RT_DEBUG": "1"})):
        assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr
        assert "CliError: no trace file at" in r.stderr


def test_version_and_user_help() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"autoglm-rt {autoglm_rt.__version__}"
    r = cli("--help")
    assert r.returncode == 0 and "autoglm-rt demo --quick" in r.stdout and "subcommand is a small" not in r.stdout
