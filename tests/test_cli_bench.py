"""`autoglm-rt bench`: runs ratio suites side by side and prints a table or one JSON document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_json_reports_each_comparison(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "autoglm_rt.cli", "bench", "bandwidth", "--quick", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["bandwidth"]["read_gbps"] > 0
    rows = doc["suites"]["bandwidth"]
    assert {r["baseline_label"] for r in rows} == {"numpy.sum", "numpy.copyto"}
    assert all(r["ratio"] > 0 and r["case_seconds"] > 0 for r in rows)
    assert (tmp_path / "bandwidth_cpu_quick.json").is_file()


def test_bench_table_names_every_suite(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "autoglm_rt.cli", "bench", "bandwidth", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "== bandwidth (cpu) ==" in res.stdout and "ratio" in res.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "autoglm_rt.cli", "bench", "no_such_suite"], capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode != 0 and "no_such_suite" in unknown.stderr
