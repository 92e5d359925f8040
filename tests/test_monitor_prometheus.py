"""The deploy files against the real Prometheus tools: promtool checks and rule unit tests, and a
real Prometheus server (127.0.0.1, 1 s scrape interval, temporary storage) that scrapes the
exporter and answers queries through its HTTP API.

The binaries come from the Debian package ``prometheus`` (deploy/install_prometheus.sh). Where
they are missing the tests skip, except in CI (env CI=true), where they must be present.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_rt.monitor import HostProbe, MetricsExporter, Sampler, start_metrics_server
from tests.monitor_reference import FakePsutil, ManualClock

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not on PATH; install it with deploy/install_prometheus.sh (Debian package 'prometheus')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {msg}")
        pytest.skip(msg)
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=PROM_DIR)


def test_promtool_check_rules() -> None:
    r = _promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_config() -> None:
    r = _promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests() -> None:
    r = _promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


class Prometheus:
    def __init__(self, base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.base, self.proc, self.log = base, proc, log

    def check_alive(self) -> None:
        assert self.proc.poll() is None, self.log.read_text()

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = _get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def wait_for(self, expr: str, ok: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: no satisfying answer within {timeout} s; last: {result}")


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, targets: list[str]) -> Iterator[Prometheus]:
    """A real Prometheus on 127.0.0.1 with deploy/'s config and alert rules, scraping ``targets``
    every second with temporary storage; yields once it is ready, stops it afterwards."""
    prometheus = _binary("prometheus")
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web_port = _free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            prom = Prometheus(f"http://127.0.0.1:{web_port}", proc, log_path)
            deadline = time.monotonic() + 30
            while True:
                prom.check_alive()
                try:
                    with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass  # not listening yet: retry until the deadline below
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.2)
            yield prom
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def exporter_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MetricsExporter, dict[str, Any], int]]:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ps = FakePsutil(cores=4)
    ps.cpu_percent_values = [97.0] * 10_000
    ps.load = (6.0, 6.0, 6.0)
    sampler = Sampler(0.2, host_probe=HostProbe(ps), gpus=False, clock=ManualClock())
    sampler.sample_once()
    pool: dict[str, Any] = {"allocated_bytes": 3 * 2**30, "limit_bytes": 4 * 2**30, "num_ooms": 0}
    exporter = MetricsExporter(sampler=sampler, rank=3, host_metrics=True)
    exporter.add_source("pool", lambda: dict(pool), labels={"device": "cpu"})
    exporter.add_source("policy", lambda: {"phase": "convergence", "micro_batch": 32})
    for d in (0.2, 0.4, 0.4, 1.5):
        exporter.observe_step(d)
    with start_metrics_server(0, exporter=exporter) as server:
        yield exporter, pool, server.port


def test_real_prometheus_scrapes_the_exporter(tmp_path: Path, exporter_server: Any) -> None:
    _exporter, pool, port = exporter_server
    with running_prometheus(tmp_path, [f"127.0.0.1:{port}"]) as prom:
        got = prom.wait_for("autoglm_rt_pool_allocated_bytes", lambda r: len(r) == 1)
        labels = got[0]["metric"]
        assert labels["job"] == "autoglm_rt" and labels["instance"] == f"127.0.0.1:{port}"
        assert labels["rank"] == "3" and labels["device"] == "cpu"
        assert float(got[0]["value"][1]) == 3 * 2**30

        # a change in the source reaches Prometheus on a later scrape
        pool["allocated_bytes"] = 2**30
        prom.wait_for("autoglm_rt_pool_allocated_bytes", lambda r: r and float(r[0]["value"][1]) == 2**30)

        # recording rules evaluate over the scraped series
        ratio = prom.wait_for("autoglm_rt:pool_allocated_over_limit:ratio", lambda r: len(r) == 1)
        assert float(ratio[0]["value"][1]) in (0.75, 0.25)
        high = prom.wait_for("autoglm_rt:host_load_high:hysteresis", lambda r: len(r) == 1)
        assert high[0]["metric"]["Hostname"] and float(high[0]["value"][1]) == 1
        phase = prom.query("autoglm_rt_training_phase == 1")
        assert [p["metric"]["phase"] for p in phase] == ["convergence"]
        count = prom.query("autoglm_rt_step_duration_seconds_count")
        assert float(count[0]["value"][1]) == 4
        le1 = prom.query('autoglm_rt_step_duration_seconds_bucket{le="1.28"}')
        assert float(le1[0]["value"][1]) == 3

        # an OOM counted by the pool fires the (for-less) OOM alert end to end
        pool["num_ooms"] = 1
        deadline = time.monotonic() + 30
        while True:
            alerts = _get(f"{prom.base}/api/v1/alerts")["data"]["alerts"]
            oom = [a for a in alerts if a["labels"]["alertname"] == "AutoglmRtPoolOutOfMemory"]
            if oom and oom[0]["state"] == "firing":
                break
            assert time.monotonic() < deadline, f"OOM alert did not fire; alerts: {alerts}"
            time.sleep(0.25)
        assert oom[0]["labels"]["rank"] == "3" and oom[0]["labels"]["severity"] == "critical"

        targets = _get(f"{prom.base}/api/v1/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        groups = _get(f"{prom.base}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 10
        assert all(r["health"] in ("ok", "unknown") for r in rules), [r for r in rules if r["health"] == "err"]
