"""Process groups and key-value stores that listen on one address, 127.0.0.1 unless told otherwise.

torch's ``TCPStore`` server binds every interface (``*:PORT``) whatever host name it is given, and
its stores are unauthenticated: anyone who reaches the port can read and write the rendezvous
state. Here the listening socket is created first, bound to the address the peers are told to
connect to, and handed to the store (``master_listen_fd``), so the store listens there and nowhere
else. Gloo (and NCCL's bootstrap) are pointed at the loopback interface when that address is a
loopback one.

Multi-host runs: set ``AUTOGLM_RT_BIND_ADDR`` (or pass ``host=``) to an address of this machine
that the other hosts can reach; the store then listens on that address only.

Plain ``torchrun``: its agents host the rendezvous store and (torch >= 2.4) share it with the
workers, and torch creates those stores itself, on every interface. :class:`autoglm_rt.elastic.
ElasticJob` avoids both: it hosts the rendezvous store here and sets
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, so rank 0's worker store comes from
:func:`init_process_group_from_env`. Under a plain ``torchrun`` that function still works (every
rank is a client of the agent's store), but the agent's listeners are torch's.

    store = init_process_group("gloo", rank=rank, world_size=2, port=port)   # listens on 127.0.0.1
    init_process_group_from_env("gloo")     # under torchrun: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from datetime import timedelta
from typing import Any, NoReturn

__all__ = [
    "BIND_ADDR_ENV",
    "LOOPBACK",
    "bind_address",
    "create_store",
    "exit_rank",
    "init_process_group",
    "init_process_group_from_env",
    "is_loopback",
    "listen_socket",
]

LOOPBACK = "127.0.0.1"
BIND_ADDR_ENV = "AUTOGLM_RT_BIND_ADDR"
_WILDCARDS = {"", "0.0.0.0", "::", "*"}


def bind_address() -> str:
    """The address stores listen on: ``$AUTOGLM_RT_BIND_ADDR`` if set, else 127.0.0.1. A wildcard
    (``0.0.0.0``, ``::``) is refused: name the one interface the other hosts reach."""
    addr = os.environ.get(BIND_ADDR_ENV, "").strip() or LOOPBACK
    _check_host(addr, BIND_ADDR_ENV)
    return addr


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one) and listening. Raises ValueError on
    a wildcard host and OSError (with the address) when the address cannot be bound."""
    _check_host(host, "host")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port: expected an int in 0..65535, got {port!r}")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def create_store(
    host: str,
    port: int,
    *,
    is_master: bool,
    world_size: int | None = None,
    timeout: timedelta = timedelta(seconds=300),
    wait_for_workers: bool = False,
    multi_tenant: bool = False,
) -> Any:
    """A ``torch.distributed.TCPStore``. The master's server listens on ``host:port`` only (port 0:
    a free one, read it from ``store.port``); a client connects to ``host:port``, retrying until
    ``timeout`` while the master is not up yet."""
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(
            host, port, world_size, is_master=False, timeout=timeout, wait_for_workers=False, multi_tenant=multi_tenant
        )
    sock = listen_socket(host, port)
    bound_port = sock.getsockname()[1]
    try:
        store = dist.TCPStore(
            host,
            bound_port,
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=wait_for_workers,
            multi_tenant=multi_tenant,
            master_listen_fd=sock.fileno(),
            use_libuv=_libuv_takes_a_listen_fd(),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    return store


def init_process_group(
    backend: str,
    *,
    rank: int,
    world_size: int,
    port: int,
    host: str | None = None,
    timeout: timedelta = timedelta(seconds=300),
) -> Any:
    """``torch.distributed.init_process_group`` over a store whose server (rank 0) listens on
    ``host:port`` only (default :func:`bind_address`). Returns the store."""
    host = bind_address() if host is None else host
    _restrict_transports(host)
    store = create_store(
        host, port, is_master=rank == 0, world_size=world_size, timeout=timeout, wait_for_workers=False
    )
    import torch.distributed as dist

    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return store


def init_process_group_from_env(backend: str, *, timeout: timedelta = timedelta(seconds=300)) -> Any:
    """As :func:`init_process_group`, from torchrun's ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``
    and ``WORLD_SIZE``: rank 0's store listens on ``MASTER_ADDR`` (the address every rank connects
    to), not on every interface as ``init_method="env://"`` would."""
    values = {}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        value = os.environ.get(name)
        if not value:
            raise ValueError(f"environment variable {name} is not set: run under torchrun or set it")
        values[name] = value
    try:
        port, rank, world = int(values["MASTER_PORT"]), int(values["RANK"]), int(values["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"MASTER_PORT, RANK and WORLD_SIZE must be integers, got {values}") from None
    host = values["MASTER_ADDR"]
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent already hosts the store at MASTER_ADDR:MASTER_PORT: every rank is a client.
        _restrict_transports(host)
        store = create_store(host, port, is_master=False, world_size=world, timeout=timeout)
        import torch.distributed as dist

        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return store
    return init_process_group(backend, rank=rank, world_size=world, port=port, host=host, timeout=timeout)


def exit_rank(code: int = 0) -> NoReturn:
    """Ends a rank's process now with ``code``, after flushing stdout and stderr, without the
    interpreter's teardown. There, torch's store and gloo threads are sometimes destroyed while
    still joinable ("terminate called without an active exception", SIGABRT: about 1 in 5 smoke
    demos on dev-cpu), which turns a finished rank into a failed one for its launcher. Call it
    after ``destroy_process_group()``, once everything the rank produces is written and closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _libuv_takes_a_listen_fd() -> bool:
    """torch's libuv store server listens on a given descriptor from 2.8 on (pytorch#150215);
    before, only the classic server does."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


def _check_host(host: str, what: str) -> None:
    if host.strip() in _WILDCARDS:
        raise ValueError(f"{what}: {host!r} would listen on every interface; give one address (e.g. 127.0.0.1)")


def _restrict_transports(host: str) -> None:
    """Gloo's pairs and NCCL's bootstrap listen on the interface they pick from the host name; on a
    loopback run, pin them to ``lo`` (unless the user chose an interface)."""
    if is_loopback(host):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
