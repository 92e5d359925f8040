"""The GPU check scripts' failure paths, exercised on the CPU: a configuration that hangs still
leaves the JSON behind, and the shell driver's pytest stage keeps warnings as warnings and bounds
each test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHES = Path(__file__).resolve().parents[1] / "benches"


def load_gpu_memory():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_memory", BENCHES / "gpu_memory.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_child_that_times_out_still_writes_the_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_gpu_memory()
    calls: list[Any] = []

    def hang(cmd: list[str], **kw: Any) -> Any:
        calls.append(kw["timeout"])
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output="", stderr=b"stuck in _snapshot()")

    monkeypatch.setattr(mod.subprocess, "run", hang)
    monkeypatch.setattr(sys, "argv", ["gpu_memory.py", "--out", str(tmp_path), "--child-timeout", "7"])
    assert mod.main() == 1
    assert calls == [7.0, 7.0]  # both configurations tried, each under the given timeout
    assert json.loads((tmp_path / "memory_gpu.json").read_text()) == {}


def test_the_history_is_recorded_with_python_stacks_only() -> None:
    mod = load_gpu_memory()
    assert 'stacks="python"' in mod.CHILD


def test_gpu_check_keeps_warnings_as_warnings_and_bounds_each_test() -> None:
    script = (BENCHES / "gpu_check.sh").read_text()
    pytest_line = next(line for line in script.splitlines() if "-W default" in line and not line.startswith("#"))
    assert "PER_TEST" in pytest_line
    assert "--timeout=60" in script
    subprocess.run(["bash", "-n", str(BENCHES / "gpu_check.sh")], check=True)
