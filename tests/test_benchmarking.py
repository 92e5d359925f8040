"""The side-by-side runner measures what it says (a deliberately slower baseline shows up)."""

from __future__ import annotations

import json
import time

from autoglm_rt import benchmarking


def test_compare_detects_a_slower_baseline() -> None:
    c = benchmarking.compare(
        "sleep", lambda: time.sleep(0.001), lambda: time.sleep(0.004), rounds=3, min_time=0.01, bytes_read=10**6
    )
    assert 2.0 < c.ratio < 6.0
    assert c.case_seconds < c.baseline_seconds
    assert c.case_gbps is not None and c.case_gbps > 0


def test_bandwidth_probe_and_results_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bw = benchmarking.measure_bandwidth(nbytes=8 * 2**20, rounds=2)
    assert bw["read_gbps"] > 0.1 and bw["copy_gbps"] > 0.1
    c = benchmarking.compare("noop", lambda: None, lambda: None, rounds=2, min_time=0.001)
    out = benchmarking.write_results(tmp_path / "r.json", "unit", [c], bandwidth=bw)
    doc = json.loads(out.read_text())
    assert doc["suite"] == "unit" and doc["comparisons"][0]["name"] == "noop"
    assert doc["machine"]["autoglm_rt"]["version"]
    assert "ratio" in benchmarking.format_table([c])
