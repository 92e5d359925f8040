"""The metrics endpoint under misuse: idle connections are dropped after the header timeout, the
number of request threads is bounded (extra connections get 503), LOCAL_RANK must be an int >= 0."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from autoglm_rt.monitor import MetricsExporter, start_metrics_server


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def scrape(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_an_idle_connection_is_closed_after_the_header_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with start_metrics_server(0, exporter=MetricsExporter(), header_timeout=0.3) as server:
        idle = connect(server.port)
        idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # ... and never finishes its headers
        t0 = time.monotonic()
        idle.settimeout(5)
        assert idle.recv(1024) == b""  # the server hung up
        assert time.monotonic() - t0 < 3
        idle.close()
        assert scrape(server.url) == 200


def test_request_threads_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    before = threading.active_count()
    with start_metrics_server(0, exporter=MetricsExporter(), header_timeout=30, max_concurrent=2) as server:
        idle = [connect(server.port) for _ in range(2)]
        for s in idle:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # both workers wait for the rest of the headers
        deadline = time.monotonic() + 5
        while threading.active_count() < before + 3:  # the serve loop + two request threads
            assert time.monotonic() < deadline
            time.sleep(0.01)
        extra = [connect(server.port) for _ in range(20)]
        for s in extra:  # refused at once with 503, without a thread each
            s.settimeout(5)
            assert s.recv(64).startswith(b"HTTP/1.1 503")
            s.close()
        assert threading.active_count() <= before + 3
        assert scrape(server.url) == 503
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while scrape(server.url) != 200:  # the slots come back once the idle clients leave
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("value", ["-5", "abc", "1.5", "-1"])
def test_a_bad_local_rank_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(ValueError, match=f"LOCAL_RANK={value!r}: expected an int >= 0"):
        start_metrics_server(0, exporter=MetricsExporter())


def test_local_rank_offsets_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    base = probe.getsockname()[1]
    probe.close()
    monkeypatch.setenv("LOCAL_RANK", "1")
    try:
        server = start_metrics_server(base, exporter=MetricsExporter())
    except OSError:
        pytest.skip(f"port {base + 1} was taken by another process meanwhile")
    with server:
        assert server.port == base + 1 and scrape(server.url) == 200


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"header_timeout": 0}, "header_timeout"), ({"header_timeout": float("inf")}, "finite"),
     ({"max_concurrent": 0}, "max_concurrent")],
)  # fmt: skip
def test_bad_limits_are_refused(kwargs: dict[str, float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        start_metrics_server(0, exporter=MetricsExporter(), **kwargs)  # type: ignore[arg-type]
