"""The main job end to end: `autoglm-rt demo --smoke` on 2 gloo ranks over 127.0.0.1, the report's
fields, valid PNG plots, and SIGTERM -> checkpoint -> rerun resumes with no step lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

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


def test_smoke_demo_writes_the_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "autoglm_rt.cli", "demo", "--smoke", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ListenerWatch(proc.pid) as listeners:
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
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
    a, b = doc["runs"]["autoglm_rt"], doc["runs"]["baseline"]
    assert a["bytes_communicated"] < b["bytes_communicated"]  # top-k sent less than dense allreduce
    assert b["bytes_communicated"] == b["dense_bytes"]
    for plot in PLOTS:
        assert_valid_png(out / f"{plot}.png")
    md = (out / "report.md").read_text()
    assert "validation loss" in md and "bytes communicated" in md


def test_sigterm_checkpoints_and_a_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    steps = 60
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoglm_rt.cli", "demo", "--smoke", "--steps", str(steps), "--out", str(out),
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    steps_file = out / "autoglm_rt" / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if steps_file.exists() and len(steps_file.read_text().splitlines()) >= 8:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the demo did not reach step 8 in 120 s")
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "interrupted" in output
    assert sorted(p.name for p in (out / "autoglm_rt").glob("ckpt_rank*.pt")) == ["ckpt_rank0.pt", "ckpt_rank1.pt"]
    done_before = len(steps_file.read_text().splitlines())
    assert 8 <= done_before < steps
    assert not (out / "report.json").exists()

    res = run_cli("--smoke", "--steps", str(steps), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in steps_file.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(steps))  # nothing lost, nothing twice
    assert not list((out / "autoglm_rt").glob("ckpt_rank*.pt"))
    # The hook's byte counters survived the restart: per-step deltas never go negative and add up.
    deltas = [r["bytes_communicated_step"] for r in records]
    assert min(deltas) >= 0
    doc = json.loads((out / "report.json").read_text())
    assert (
        sum(deltas)
        == records[-1]["bytes_communicated_total"]
        == doc["runs"]["autoglm_rt"]["per_rank"][0]["bytes_communicated"]
    )
