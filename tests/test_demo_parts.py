"""The demo's parts without training: activation metering against hand-counted bytes, progress
lines on a non-terminal, checkpoint files and markers, RNG streams, the report's words, the demo
strategy through the real actuators, and the CLI's exit codes for an interrupted demo."""

from __future__ import annotations

import io
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoglm_rt import cli
from autoglm_rt.demo import checkpoint
from autoglm_rt.demo.activations import ActivationMeter
from autoglm_rt.demo.driver import Interrupted
from autoglm_rt.demo.findings import comparison_sentences, plot_notes, timeline
from autoglm_rt.demo.progress import Progress
from autoglm_rt.demo.report import render_markdown
from autoglm_rt.policy import bundled_strategy
from autoglm_rt.policy.actuators import Actuators
from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.strategy import Strategy


# -- activation memory -----------------------------------------------------------------------------
def test_activation_meter_counts_saved_inputs_not_parameters() -> None:
    lin = torch.nn.Linear(4, 3)
    meter = ActivationMeter(lin.parameters())
    measured = meter.wrap(lambda m, x: m(x).sum())
    for n in (8, 4):
        x = torch.randn(n, 4)
        measured(lin, x).backward()
        # addmm saves its input (n x 4 float32) and the weight (a parameter: not counted).
        assert meter.take_step_peak() == x.nbytes == 16 * n
    assert meter.take_step_peak() == 0  # taken: nothing since


def test_activation_meter_keeps_the_largest_forward_of_a_step() -> None:
    lin = torch.nn.Linear(4, 3)
    meter = ActivationMeter(lin.parameters())
    measured = meter.wrap(lambda m, x: m(x).sum())
    for n in (8, 2, 4):
        measured(lin, torch.randn(n, 4)).backward()
    assert meter.take_step_peak() == 16 * 8


def test_activation_meter_ignores_tensors_that_are_parameters() -> None:
    w = torch.nn.Parameter(torch.randn(100))
    meter = ActivationMeter([w])
    meter.wrap(lambda m, _: (w * w).sum())(None, None).backward()  # type: ignore[arg-type]
    assert meter.take_step_peak() == 0


# -- progress --------------------------------------------------------------------------------------
def test_progress_on_a_file_writes_short_lines_every_tenth() -> None:
    stream = io.StringIO()
    progress = Progress("autoglm_rt", 100, 0, stream=stream)
    for step in range(100):
        progress.update(step, {"loss": 2.5, "phase": "initial", "micro_batch": 16, "accumulation": 1})
    progress.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10
    assert all(len(line) < 120 for line in lines)
    assert lines[-1].startswith("[autoglm_rt] step 100/100 ")


def test_progress_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    progress = Progress("baseline", 10, 0, enabled=False, stream=stream)
    progress.update(9, {"loss": 1.0, "micro_batch": 1, "accumulation": 1})
    progress.close()
    assert stream.getvalue() == ""


def test_progress_on_a_terminal_uses_a_tqdm_bar_from_the_resumed_step() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = Progress("autoglm_rt", 20, 15, stream=stream)
    for step in range(15, 20):
        progress.update(step, {"loss": 1.0, "phase": "initial", "micro_batch": 4, "accumulation": 2})
    progress.close()
    assert "20/20" in stream.getvalue() and "initial 4x2" in stream.getvalue()


# -- checkpoints -----------------------------------------------------------------------------------
def test_a_checkpoint_counts_only_with_its_marker_and_every_rank(tmp_path: Path) -> None:
    assert checkpoint.committed(tmp_path) is None
    checkpoint.save_rank(tmp_path, 0, {"x": torch.arange(3)})
    assert checkpoint.committed(tmp_path) is None  # no marker: an interrupted save
    checkpoint.commit(tmp_path, 7, 2, "SIGINT")
    assert checkpoint.committed(tmp_path) is None  # rank 1's file is missing
    checkpoint.save_rank(tmp_path, 1, {"x": torch.arange(4)})
    assert checkpoint.committed(tmp_path) == {"step": 7, "world": 2, "signal": "SIGINT"}
    assert torch.equal(checkpoint.load_rank(tmp_path, 1, torch.device("cpu"))["x"], torch.arange(4))
    assert not list(tmp_path.glob("*.tmp"))
    checkpoint.clear(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rng_streams_continue_exactly_after_a_restore() -> None:
    state = checkpoint.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# -- the demo strategy, carried out by the real batch controller ----------------------------------
def test_demo_strategy_halves_the_micro_batch_once_per_phase_change() -> None:
    strategy = Strategy.from_yaml(bundled_strategy("demo"))
    controller = BatchController(16)
    actuators = Actuators(batch=controller)
    phases = ["initial"] * 5 + ["convergence"] * 5 + ["fine_tuning"] * 5
    results = []
    for step, phase in enumerate(phases):
        for action in strategy.evaluate({"phase": phase, "unstable": False}, float(step)):
            results.append((step, actuators.dispatch(action)))
    assert [(s, r.action.name, r.applied, r.detail) for s, r in results] == [
        (5, "shrink_micro_batch", True, "micro-batch 16 -> 8"),
        (10, "shrink_micro_batch", True, "micro-batch 8 -> 4"),
    ]
    assert (controller.micro_batch, controller.accumulation, controller.effective_batch) == (4, 4, 16)


# -- the report's words ----------------------------------------------------------------------------
def _runs(**autoglm: Any) -> dict[str, dict[str, Any]]:
    cfg = {"device": "cpu", "density": 0.01, "dense_steps": 5, "warmup_steps": 20, "steps": 4}
    base = {"val_loss": 2.0, "bytes_communicated": 8 * 2**20, "dense_bytes": 8 * 2**20, "wall_seconds": 10.0,
            "peak_memory_bytes": 3 * 2**30, "energy_joules": 100.0, "energy_estimated": True,
            "energy_source": "CPU [estimate: busy fraction]", "config": cfg}  # fmt: skip
    a = {**base, "bytes_communicated": 2**20, "strategy": "demo", "phases": [], "actions": [], **autoglm}
    return {"autoglm_rt": a, "baseline": base}


def _steps(micro: list[int]) -> list[dict[str, Any]]:
    return [
        {"step": i, "micro_batch": m, "accumulation": 16 // m, "step_seconds": 0.05, "phase": "initial"}
        for i, m in enumerate(micro)
    ]


def test_report_says_where_autoglm_rt_is_worse_and_slower_and_why() -> None:
    runs = _runs(val_loss=2.2, wall_seconds=15.0)
    text = " ".join(comparison_sentences(runs, {"autoglm_rt": _steps([16] * 4), "baseline": _steps([16] * 4)}))
    assert "8.0x fewer bytes" in text and "1.00 MiB vs 8.00 MiB" in text
    assert "Worse: validation loss" in text and "+10.0%" in text and "residual" in text
    assert "Slower: wall time** 1.50x" in text and "127.0.0.1" in text
    assert "estimated" in text


def test_report_says_what_the_hook_compresses() -> None:
    runs = _runs()
    runs["autoglm_rt"]["config"] = {**runs["autoglm_rt"]["config"], "compress_update": "frozen"}
    assert "of AdamW's update in each bucket" in comparison_sentences(runs, {})[0]
    assert "frozen after the dense steps" in comparison_sentences(runs, {})[0]
    runs["autoglm_rt"]["config"]["compress_update"] = "off"
    assert "of each gradient bucket" in comparison_sentences(runs, {})[0]
    runs["autoglm_rt"]["config"]["compressor"] = "onebit"
    first = comparison_sentences(runs, {})[0]
    assert "1-bit Adam hook sends each rank's momentum" in first and "top-k" not in first


def test_report_says_the_same_when_it_is_the_same() -> None:
    text = " ".join(comparison_sentences(_runs(val_loss=2.001, wall_seconds=10.2), {}))
    assert "the same within 0.5%" in text and "Wall time**: the same" in text
    assert "Worse" not in text and "Slower" not in text


def test_plots_without_effect_say_so_and_why() -> None:
    notes = plot_notes(_runs(), {"autoglm_rt": _steps([16] * 4)})
    assert notes["phase"].startswith("No effect: the phase detector saw no phase change in 4 steps")
    assert notes["batch"].startswith("No effect: the micro-batch never changed")
    assert "No memory limit is shown" in notes["memory"] and "No effect" in notes["memory"]
    changed = plot_notes(_runs(), {"autoglm_rt": _steps([16, 16, 8, 8])})
    assert changed["batch"].startswith("Micro-batch (dashed) step 2: 8 x 2")
    assert "No effect" not in changed["memory"]


def test_timeline_lists_actions_applied_or_not_with_their_detail() -> None:
    runs = _runs(
        phases=[{"step": 3, "kind": "phase", "before": "initial", "after": "convergence", "reason": "loss settled"}],
        actions=[
            {"step": 3, "rule": "convergence-halves-activations", "action": "shrink_micro_batch", "value": True,
             "applied": True, "detail": "micro-batch 16 -> 8"},
            {"step": 9, "rule": "r", "action": "migrate_task", "value": True, "applied": False,
             "detail": "not carried out: no scheduler attached"},
        ],
    )  # fmt: skip
    lines = timeline(runs)
    assert lines[-3] == "| 3 | phase: initial -> convergence | phase detector | loss settled |"
    assert "| applied | micro-batch 16 -> 8 |" in lines[-2]
    assert (
        lines[-1] == "| 9 | `migrate_task: True` (rule r) | **not applied** | not carried out: no scheduler attached |"
    )
    assert timeline(_runs())[0].startswith("No strategy action fired")


def test_timeline_reads_the_results_of_older_demos() -> None:
    """A demo directory from before this format (phases and actions as strings) still reports."""
    old = _runs(phases=[{"step": 130, "event": "PhaseEvent(...)"}], actions=["ActionResult(...)"])
    assert timeline(old) == ["This result was written by an older demo, without a timeline; rerun with a fresh --out."]


def test_markdown_has_run_headers_human_sizes_and_marks_estimated_energy() -> None:
    doc = {"runs": _runs(), "meta": {"steps": 4}, "plots": ["memory"]}
    md = render_markdown(doc, {"autoglm_rt": _steps([16] * 4), "baseline": _steps([16] * 4)})
    assert "- run 1 of 2: **autoglm_rt**, 4 steps, output `autoglm_rt/`" in md
    assert "- run 2 of 2: **baseline**" in md
    assert "| peak memory (largest rank) | 3.00 GiB | 3.00 GiB |" in md
    assert "| energy (J, estimate) | 100.0 (estimate) | 100.0 (estimate) |" in md
    assert "- autoglm_rt (estimate): CPU [estimate: busy fraction]" in md
    assert "No memory limit is shown" in md


def test_every_energy_and_co2_figure_says_estimate_where_it_is_one() -> None:
    runs = _runs(energy_estimated=False, energy_source="CPU 90.0 J [rapl]", co2e_grams=0.0125)
    runs["baseline"]["co2e_grams"] = 0.0139
    md = render_markdown({"runs": runs, "meta": {}})
    # RAPL-measured energy is "measured"; the TDP/busy-time model is "estimate"; CO2e always is.
    assert "| energy (J, estimate) | 100.0 (measured) | 100.0 (estimate) |" in md
    assert "| CO2e (g, estimate) | 0.0125 (estimate) | 0.0139 (estimate) |" in md
    assert "- autoglm_rt (measured): CPU 90.0 J [rapl]" in md
    assert "- baseline (estimate): CPU [estimate: busy fraction]" in md
    figures = [line for line in md.splitlines() if re.search(r"energy|CO2e|\bJ\b", line, re.IGNORECASE)]
    assert figures and all("estimate" in line or "measured" in line for line in figures), figures
    runs["baseline"].update(energy_estimated=False, energy_source="CPU 95.0 J [rapl]")
    measured = render_markdown({"runs": runs, "meta": {}})
    assert "| energy (J) | 100.0 (measured) | 100.0 (measured) |" in measured
    assert "| CO2e (g, estimate) |" in measured  # the carbon intensity is an assumption either way


# -- exit codes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_demo_exits_128_plus_the_signal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int, code: int
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise Interrupted(f"{signal.Signals(signum).name}: checkpointed at step 3", signum)

    monkeypatch.setattr("autoglm_rt.demo.run_demo", interrupted)
    assert cli.main(["demo", "--smoke"]) == code
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [f"{signal.Signals(signum).name}: checkpointed at step 3"]


# -- energy reaches the exporter ---------------------------------------------------------------------
@pytest.mark.usefixtures("single_rank_group")
def test_the_autoglm_run_exports_its_energy_meter_on_the_rank_that_meters() -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from autoglm_rt.demo.autoglm_run import AutoglmRun
    from autoglm_rt.demo.train import PRESETS
    from autoglm_rt.monitor.energy import EnergyMeter

    cfg = PRESETS["smoke"]
    rendered = {}
    for with_meter in (True, False):
        model = DDP(torch.nn.Linear(4, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        meter = EnergyMeter(gpus=False).start() if with_meter else None
        run = AutoglmRun(model, optimizer, cfg, torch.device("cpu"), 0, energy=meter)
        try:
            rendered[with_meter] = run.exporter.render().decode()
        finally:
            run.close()
    assert "autoglm_rt_energy_cpu_joules_total" in rendered[True]
    assert re.search(r"^autoglm_rt_energy_cpu_estimated\{.*\} [01](\.0)?$", rendered[True], re.MULTILINE)
    assert "autoglm_rt_energy_co2e_grams_total" in rendered[True]
    assert "autoglm_rt_energy_" not in rendered[False]  # only rank 0 meters the machine
