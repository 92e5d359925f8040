"""The main job end to end: `autoglm-rt demo --smoke` on 2 gloo ranks over 127.0.0.1, the report's
fields, valid PNG plots, progress on a pipe, and SIGTERM / Ctrl-C -> checkpoint -> rerun ends
exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from autoglm_rt.demo.corpus import HELD_OUT_EVERY, load_corpus, stdlib_files
from autoglm_rt.demo.report import PLOTS, REQUIRED_RUN_FIELDS
from tests.listeners import ListenerWatch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def assert_valid_png(path: Path) -> None:
    """PNG signature, an IHDR with a non-empty image, and every chunk's CRC correct."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoglm_rt.cli", "demo", *args], capture_output=True, text=True, timeout=timeout
    )


def test_corpus_is_deterministic_with_a_held_out_split() -> None:
    a, b = load_corpus(300_000), load_corpus(300_000)
    assert a.files == b.files and (a.train == b.train).all() and (a.val == b.val).all()
    assert a.val.size > 0 and a.train.max() < 128
    names = [p.name for p in stdlib_files()]
    held_out = {n for i, n in enumerate(names[: len(a.files)]) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1}
    assert held_out and held_out <= set(a.files)


SMOKE_STEPS = 36  # smoke-sized model; enough steps to interrupt after the dense start, mid warm-up


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted smoke demo, with progress on (stdout is a pipe, not a terminal)."""
    out = tmp_path_factory.mktemp("reference") / "demo"
    cmd = [sys.executable, "-m", "autoglm_rt.cli", "demo", "--smoke", "--steps", str(SMOKE_STEPS), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ListenerWatch(proc.pid) as listeners:
        stdout, stderr = proc.communicate(timeout=300)
    return {"out": out, "rc": proc.returncode, "stdout": stdout, "stderr": stderr, "listeners": listeners}


def test_smoke_demo_writes_the_report_and_plots(reference: dict[str, Any]) -> None:
    out, listeners = reference["out"], reference["listeners"]
    assert reference["rc"] == 0, reference["stderr"][-3000:]
    # Process-group stores, gloo and the metrics endpoint: loopback only, never every interface.
    assert "127.0.0.1" in {addr for _, addr, _ in listeners.seen}
    assert not listeners.wildcard(), listeners.seen
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["runs"]) == {"autoglm_rt", "baseline"}
    for name, run in doc["runs"].items():
        for field in REQUIRED_RUN_FIELDS:
            assert isinstance(run[field], (int, float)) and run[field] >= 0, (name, field)
        assert run["val_loss"] < 5.0  # below the loss of a uniform guess over 128 characters (4.85 nats)...
        steps = [json.loads(line) for line in (out / name / "steps.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == list(range(doc["meta"]["steps"]))
        assert all(s["activation_bytes"] > 0 for s in steps)
    a, b = doc["runs"]["autoglm_rt"], doc["runs"]["baseline"]
    assert a["bytes_communicated"] < b["bytes_communicated"]  # top-k sent less than dense allreduce
    assert b["bytes_communicated"] == b["dense_bytes"]
    for plot in PLOTS:
        assert_valid_png(out / f"{plot}.png")
    md = (out / "report.md").read_text()
    assert "validation loss" in md and "bytes communicated" in md and "MiB" in md
    assert "- run 1 of 2: **autoglm_rt**" in md and "## Timeline of the autoglm_rt run" in md
    assert "No memory limit is shown" in md  # CPU: nothing to limit, and the report says so
    assert ("energy (J, estimate)" in md) == bool(a.get("energy_estimated"))
    # Progress on a pipe: a header per run and short lines, never one endless carriage-return line.
    lines = reference["stdout"].splitlines()
    assert any(line.startswith("run 1 of 2: autoglm_rt, 36 steps") for line in lines)
    assert any(line.startswith("run 2 of 2: baseline, 36 steps") for line in lines)
    assert "[autoglm_rt] step 36/36 " in reference["stdout"] and "\r" not in reference["stdout"]
    progress = [line for line in lines if line.startswith(("[autoglm_rt] step", "[baseline] step"))]
    assert len(progress) == 2 * 12 and max(len(line) for line in progress) < 120  # every 3rd of 36 steps


def _interrupt(out: Path, run: str, at_step: int, signum: int) -> tuple[int, str]:
    """Runs the smoke demo and, once ``run`` has recorded ``at_step`` steps, sends ``signum``: SIGINT
    to the whole process group as a terminal's Ctrl-C does, SIGTERM to the demo process alone."""
    cmd = [sys.executable, "-m", "autoglm_rt.cli", "demo", "--smoke", "--steps", str(SMOKE_STEPS), "--out", str(out),
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    steps_file = out / run / "steps.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if steps_file.exists() and len(steps_file.read_text().splitlines()) >= at_step:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"the demo did not reach step {at_step} of {run} in 180 s")
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    output, _ = proc.communicate(timeout=180)
    return proc.returncode, output


def _assert_checkpointed(out: Path, run: str, rc: int, output: str, signum: int) -> int:
    name = signal.Signals(signum).name
    assert rc == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert [line for line in output.splitlines() if not line.startswith("run ")] == [
        line for line in output.splitlines() if line.startswith(f"{name}: {run} checkpointed at step ")
    ]  # one line besides the run headers
    marker = json.loads((out / run / "checkpoint.json").read_text())
    assert sorted(p.name for p in (out / run).glob("ckpt_rank*.pt")) == ["ckpt_rank0.pt", "ckpt_rank1.pt"]
    assert not (out / "report.json").exists()
    return int(marker["step"])


def test_interrupted_and_resumed_demo_equals_the_uninterrupted_one(reference: dict[str, Any], tmp_path: Path) -> None:
    """SIGTERM in the autoglm_rt run, Ctrl-C in the baseline run, each at a random (seeded) step,
    resumed: the report's validation losses and byte counters, and every step's loss, are equal."""
    assert reference["rc"] == 0, reference["stderr"][-3000:]
    rng = random.Random(13)
    out = tmp_path / "demo"
    rc, output = _interrupt(out, "autoglm_rt", rng.randint(7, 20), signal.SIGTERM)
    first = _assert_checkpointed(out, "autoglm_rt", rc, output, signal.SIGTERM)
    rc, output = _interrupt(out, "baseline", rng.randint(3, 20), signal.SIGINT)
    assert f"(resuming at step {first})" in output
    second = _assert_checkpointed(out, "baseline", rc, output, signal.SIGINT)
    assert 7 <= first < SMOKE_STEPS and 3 <= second < SMOKE_STEPS
    assert (out / "autoglm_rt" / "result.json").exists() and not (out / "autoglm_rt" / "checkpoint.json").exists()

    res = run_cli("--smoke", "--steps", str(SMOKE_STEPS), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "autoglm_rt, 36 steps" in res.stdout and "already finished" in res.stdout
    assert f"(resuming at step {second})" in res.stdout
    got = json.loads((out / "report.json").read_text())["runs"]
    want = json.loads((reference["out"] / "report.json").read_text())["runs"]
    for name in ("autoglm_rt", "baseline"):
        for key in ("val_loss", "bytes_communicated", "dense_bytes"):
            assert got[name][key] == want[name][key], (name, key)
        assert [r["bytes_communicated"] for r in got[name]["per_rank"]] == [
            r["bytes_communicated"] for r in want[name]["per_rank"]
        ]
        mine = [json.loads(line) for line in (out / name / "steps.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (reference["out"] / name / "steps.jsonl").read_text().splitlines()]
        assert [r["step"] for r in mine] == list(range(SMOKE_STEPS))  # nothing lost, nothing twice
        keys = ("loss", "micro_batch", "bytes_communicated_total", "bytes_communicated_step", "activation_bytes")
        assert [[r[k] for k in keys] for r in mine] == [[r[k] for k in keys] for r in theirs], name
        assert not list((out / name).glob("ckpt_rank*.pt")) and not (out / name / "checkpoint.json").exists()
