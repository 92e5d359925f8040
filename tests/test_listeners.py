"""Nothing listens beyond loopback: the stores and process groups of the demo and of elastic jobs
bind 127.0.0.1 (or the one address given), never every interface."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm_rt import distributed
from autoglm_rt.trainers import elastic_trainer as trainer
from tests.listeners import listening_sockets


def test_store_listens_on_the_given_address_only() -> None:
    store = distributed.create_store("127.0.0.1", 0, is_master=True)
    mine = {(addr, port) for _, addr, port in listening_sockets(os.getpid())}
    assert ("127.0.0.1", store.port) in mine
    assert not {(a, p) for a, p in mine if p == store.port and a != "127.0.0.1"}
    client = distributed.create_store("127.0.0.1", store.port, is_master=False)
    client.set("k", "v")
    assert store.get("k") == b"v"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "*"])
def test_wildcard_bind_addresses_are_refused(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="every interface"):
        distributed.listen_socket(host, 0)
    monkeypatch.setenv(distributed.BIND_ADDR_ENV, host or " ")
    if host:
        with pytest.raises(ValueError, match="every interface"):
            distributed.bind_address()
    else:
        assert distributed.bind_address() == "127.0.0.1"


def test_bind_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.BIND_ADDR_ENV, raising=False)
    assert distributed.bind_address() == "127.0.0.1"
    monkeypatch.setenv(distributed.BIND_ADDR_ENV, "127.0.0.2")
    assert distributed.bind_address() == "127.0.0.2"
    store = distributed.create_store(distributed.bind_address(), 0, is_master=True)
    assert ("127.0.0.2", store.port) in {(a, p) for _, a, p in listening_sockets(os.getpid())}


def test_a_busy_port_names_the_address() -> None:
    taken = distributed.listen_socket("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+"):
            distributed.listen_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_init_process_group_from_env_needs_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        distributed.init_process_group_from_env("gloo")


# The demo's and an elastic scale-up's listeners are watched in test_demo.py's smoke run and
# test_elastic.py's scale test (no second training run for this check).


@pytest.mark.slow
@pytest.mark.distributed
def test_the_elastic_trainer_runs_under_a_plain_torchrun(tmp_path: Path) -> None:
    """Plain torchrun shares its agent's store with the workers (TORCHELASTIC_USE_AGENT_STORE):
    rank 0 must connect to it, not try to host a store on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    cmd += [f"--rdzv-endpoint=127.0.0.1:{port}", trainer.__file__, "--checkpoint-dir", str(tmp_path), "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    res = subprocess.run([*cmd, "--features", "4"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / trainer.STEP_LOG).read_text().splitlines()]
    assert steps == [1, 2]


def test_exit_rank_flushes_and_skips_the_interpreter_teardown() -> None:
    """A rank leaves with its code and its buffered output, and nothing registered for the
    interpreter's exit runs (that teardown is where torch's threads abort a finished rank)."""
    code = (
        "import atexit, sys\n"
        "from autoglm_rt.distributed import exit_rank\n"
        "atexit.register(lambda: print('TEARDOWN RAN'))\n"
        "sys.stdout.write('out-buffered'); sys.stderr.write('err-buffered')\n"
        "exit_rank(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "python")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "out-buffered" and proc.stderr == "err-buffered"
