"""``autoglm-rt monitor``: the terminal view and its JSON form, run for a fixed number of frames."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from autoglm_rt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_once_prints_one_frame(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["monitor", "--once", "--period", "0.05", "--no-gpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("load level:") == 1
    assert "cpu" in out and "load / core" in out and "memory used" in out
    assert f"{psutil.cpu_count(logical=True)} logical CPUs" in out
    assert "GPUs: none" in out
    assert "\x1b[2J" not in out  # not a terminal: no screen clearing


def test_json_iterations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["monitor", "--iterations", "3", "--period", "0.05", "--json", "--no-gpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d["index"] for d in docs] == [0, 1, 2]
    for d in docs:
        assert d["level"] in ("low", "medium", "high")
        assert 0.0 <= d["series"]["cpu_ratio"] <= 1.0
        assert d["series"]["load_per_core"] == pytest.approx(psutil.getloadavg()[0] / psutil.cpu_count(), abs=4.0)
        assert set(d["ewma"]) == set(d["series"])
    assert docs[-1]["window"]["cpu_ratio"]["count"] == 3


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["monitor", "--once", "--period", "0", "--no-gpu"]) == 2
    assert "period" in capsys.readouterr().err
    assert main(["monitor", "--iterations", "-1", "--no-gpu"]) == 2
    with pytest.raises(SystemExit):
        main(["monitor", "--once", "--iterations", "2"])  # mutually exclusive


def test_serve_exposes_metrics_while_running() -> None:
    code = (
        "import sys\n"
        "from autoglm_rt.cli import main\n"
        "sys.exit(main(['monitor', '--iterations', '4', '--period', '0.3', '--no-gpu', '--json', '--serve', '0']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving metrics on http://127.0.0.1:" in line, line
    url = line.split("serving metrics on ", 1)[1].strip()
    body = ""
    for _ in range(20):
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if "autoglm_rt_host_cpu_utilization_ratio" in body:
            break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "autoglm_rt_host_cpu_utilization_ratio" in body
    assert len(out.strip().splitlines()) == 4
