"""``autoglm-rt strategy check|simulate`` through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoglm_rt.cli import main
from autoglm_rt.policy import Strategy, bundled_strategy
from autoglm_rt.policy.simulate import MetricsFileError, read_metrics_csv, simulate


def test_check_prints_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    path = bundled_strategy("dynamic_balance")
    assert main(["strategy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 strategy rule(s), OK" in out
    assert "gpu_utilization > 0.8 and memory_usage > 0.75" in out
    assert "scale_up_replicas=2 -> scheduler" in out and "adjust_gpu_memory_limit=12884901888 -> pool" in out


def test_check_reports_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(bundled_strategy("dynamic_balance").read_text().replace("migrate_task", "migrate"))
    assert main(["strategy", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:8: strategy.actions[1].migrate: unknown action" in err
    assert main(["strategy", "check", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err


def write_series(path: Path, rows: list[str]) -> Path:
    path.write_text("time,gpu_utilization,memory_usage,phase\n" + "\n".join(rows) + "\n")
    return path


def test_simulate_prints_the_actions_over_a_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = write_series(
        tmp_path / "m.csv",
        [
            "0,70%,0.5,initial",
            "10,85%,0.8,initial",
            "20,90%,0.9,initial",
            "30,50%,,convergence",
            "40,0.95,95%,convergence",
        ],
    )
    assert (
        main(["strategy", "simulate", str(bundled_strategy("dynamic_balance")), "--metrics", str(csv_path), "--json"])
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["time"], x["action"]) for x in lines] == [
        (10.0, "scale_up_replicas"),
        (10.0, "migrate_task"),
        (10.0, "adjust_gpu_memory_limit"),
        (40.0, "scale_up_replicas"),
        (40.0, "migrate_task"),
        (40.0, "adjust_gpu_memory_limit"),
    ]
    assert lines[0]["evidence"] == {"gpu_utilization": 0.85, "memory_usage": 0.8}
    # the same through the library
    series = read_metrics_csv(csv_path)
    assert series[3].metrics == {"gpu_utilization": 0.5, "phase": "convergence"}
    assert len(simulate(Strategy.from_yaml(bundled_strategy("dynamic_balance")), series)) == 6
    assert main(["strategy", "simulate", str(bundled_strategy("dynamic_balance")), "--metrics", str(csv_path)]) == 0
    assert "6 action(s) over 5 observation(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("header", "row", "words"),
    [
        ("t,gpu_utilization", "0,0.5", "'time' column"),
        ("time,gpu_util", "0,0.5", "unknown metric column 'gpu_util'"),
        ("time,gpu_utilization", "x,0.5", "time: expected a number"),
        ("time,gpu_utilization", "0,high", ":2: gpu_utilization"),
        ("time,phase", "0,warmup", "phase: expected one of"),
        ("time,unstable", "0,maybe", "unstable"),
    ],
)
def test_simulate_rejects_malformed_series(
    tmp_path: Path, header: str, row: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(MetricsFileError, match=words):
        read_metrics_csv(path)
    assert main(["strategy", "simulate", str(bundled_strategy("dynamic_balance")), "--metrics", str(path)]) == 2
    assert words.split("'")[0].strip(":2 ") in capsys.readouterr().err


def test_time_going_backwards_is_rejected(tmp_path: Path) -> None:
    path = write_series(tmp_path / "m.csv", ["10,0.5,0.5,initial", "5,0.5,0.5,initial"])
    with pytest.raises(MetricsFileError, match=":3: time: expected a non-decreasing"):
        read_metrics_csv(path)


def test_the_policy_layer_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, autoglm_rt.policy, autoglm_rt.policy.simulate; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
