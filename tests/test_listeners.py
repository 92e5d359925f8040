"""Nothing listens beyond loopback: the stores and process groups of the demo and of elastic jobs
bind 127.0.0.1 (or the one address given), never every interface."""

from __future__ import annotations

import os

import pytest

from autoglm_rt import distributed
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
