"""What the demo's report says in words, from the two runs' results and step records: where the
runtime is worse or slower than the baseline and why, which plots show no effect and why, and the
timeline of the phase changes and strategy actions (applied or not, and what carried them out).

Pure functions over the documents ``report`` reads; nothing here trains or plots.
"""

from __future__ import annotations

from statistics import median
from typing import Any

from autoglm_rt.units import format_size

SAME_LOSS = 0.005  # a validation loss within 0.5% of the baseline's counts as the same
SAME_TIME = 0.05  # wall times within 5% count as the same (shared machines are noisy)


def comparison_sentences(runs: dict[str, dict[str, Any]], steps: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One sentence per figure where autoglm_rt differs from the baseline, saying why."""
    a, b = runs["autoglm_rt"], runs["baseline"]
    cfg = a.get("config", {})
    out: list[str] = []
    ratio = b["bytes_communicated"] / max(1, a["bytes_communicated"])
    onebit = cfg.get("compressor", "topk") == "onebit"
    update = cfg.get("compress_update", "off")
    what = (
        "of AdamW's update in each bucket (each rank's momentum divided by Adam's second moment, "
        f"{'frozen after the dense steps' if update == 'frozen' else 'kept per rank'}; SGD applies the average)"
        if update in ("frozen", "local")
        else "of each gradient bucket"
    )
    how = (
        f"after {cfg.get('dense_steps', '?')} dense int8 steps the 1-bit Adam hook sends each rank's momentum in "
        "AdamW's preconditioned space as one bit per entry plus a scale per chunk, with dense int8 steps that "
        "refresh the second moment at doubling intervals"
        if onebit
        else f"after {cfg.get('dense_steps', '?')} dense steps the top-k hook sends {cfg.get('density', '?')} {what} "
        f"(after a {cfg.get('warmup_steps', '?')}-step warm-up)"
    )
    out.append(
        f"**Bytes**: autoglm_rt sent {ratio:.1f}x fewer bytes ({format_size(a['bytes_communicated'])} vs "
        f"{format_size(b['bytes_communicated'])}): {how}."
    )
    loss = a["val_loss"] / b["val_loss"]
    if loss > 1 + SAME_LOSS:
        why = (
            "Each rank sends only the sign of its momentum (the error feedback sends the rest later) and the "
            "second moment is only refreshed at dense steps, so each update approximates AdamW's"
            if onebit
            else "Top-k keeps what it does not send as a residual and sends it later, so each update lags the full "
            "gradient"
        )
        out.append(
            f"**Worse: validation loss** {a['val_loss']:.4f} vs {b['val_loss']:.4f} ({loss - 1:+.1%}). {why}; "
            "the gap is the price of the bytes saved at this compression and run length."
        )
    elif loss < 1 - SAME_LOSS:
        out.append(f"**Validation loss** {a['val_loss']:.4f} vs {b['val_loss']:.4f} ({loss - 1:+.1%}): lower.")
    else:
        out.append(
            f"**Validation loss**: the same within {SAME_LOSS:.1%} ({a['val_loss']:.4f} vs {b['val_loss']:.4f})."
        )
    wall = a["wall_seconds"] / b["wall_seconds"] if b["wall_seconds"] else float("nan")
    ta, tb = _median_step_ms(steps.get("autoglm_rt", [])), _median_step_ms(steps.get("baseline", []))
    step_txt = f" (median step {ta:.0f} ms vs {tb:.0f} ms)" if ta is not None and tb is not None else ""
    if wall > 1 + SAME_TIME:
        why = (
            "over 127.0.0.1 sending bytes costs almost nothing, so the compression, the all-gather of every rank's "
            "message and the runtime's per-step statistics cost more than the smaller messages save"
            if a.get("config", {}).get("device", "cpu") == "cpu"
            else "the compression and the runtime's per-step work cost more than the smaller messages save here"
        )
        out.append(f"**Slower: wall time** {wall:.2f}x the baseline's{step_txt}: {why}.")
        shrunk = _micro_batch_changes(steps.get("autoglm_rt", []))
        if shrunk:
            first = shrunk[0]
            out.append(
                f"From step {first['step']} the strategy halved the micro-batch, so each step runs "
                f"{first['accumulation']} forward/backward passes instead of fewer, larger ones: less activation "
                "memory for a little more time per step."
            )
    elif wall < 1 - SAME_TIME:
        out.append(f"**Wall time** {wall:.2f}x the baseline's{step_txt}: faster.")
    else:
        out.append(f"**Wall time**: the same within {SAME_TIME:.0%} ({wall:.2f}x){step_txt}.")
    mem = a["peak_memory_bytes"] / max(1, b["peak_memory_bytes"])
    if mem > 1 + SAME_TIME:
        out.append(
            f"**More memory**: peak {format_size(a['peak_memory_bytes'])} vs {format_size(b['peak_memory_bytes'])} "
            "(the largest rank): the compression hook's state (a few floats per gradient element: error feedback "
            "and moments), its sampler thread and its metrics server."
        )
    if a.get("energy_joules") and b.get("energy_joules"):
        kind = "estimated " if a.get("energy_estimated") or b.get("energy_estimated") else ""
        out.append(
            f"**Energy** ({kind}whole machine): {a['energy_joules'] / b['energy_joules']:.2f}x the baseline's; "
            "it follows the wall time (other work on a shared machine counts too)."
        )
    return out


def plot_notes(runs: dict[str, dict[str, Any]], steps: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """For each plot that shows no effect (or needs reading help), why."""
    a = runs["autoglm_rt"]
    recs = steps.get("autoglm_rt", [])
    cpu = a.get("config", {}).get("device", "cpu") == "cpu"
    notes: dict[str, str] = {}
    phases = [p for p in a.get("phases", []) if p.get("kind") == "phase"]
    if not phases:
        notes["phase"] = (
            f"No effect: the phase detector saw no phase change in {len(recs)} steps (the loss was still falling "
            "fast, so the run stayed in its initial phase; longer runs such as the default preset reach "
            "convergence). The baseline has no phase detector (shown as none)."
        )
    else:
        notes["phase"] = "Phase changes: " + "; ".join(
            f"step {p['step']}: {p['before']} -> {p['after']}" for p in phases
        )
    changes = _micro_batch_changes(recs)
    if not changes:
        notes["batch"] = (
            "No effect: the micro-batch never changed (the demo strategy halves it when the phase changes, "
            "and no phase change happened); the effective batch is the same in both runs by design."
        )
    else:
        notes["batch"] = (
            "Micro-batch (dashed) "
            + "; ".join(f"step {c['step']}: {c['micro_batch']} x {c['accumulation']}" for c in changes)
            + "; the effective batch (solid) never changes, so neither does the gradient."
        )
    memory = (
        "Activation memory: the bytes autograd saved for backward in each step's largest forward pass "
        "(measured, parameters excluded)."
    )
    if cpu:
        memory += (
            " No memory limit is shown: on CPU the runtime has no pool to limit (torch's CPU allocator is not "
            "pluggable, so a pool would hold none of the model's tensors and a limit on it would limit nothing)."
        )
    if not changes:
        memory += " No effect: both runs hold the same activations, since the micro-batch never changed."
    notes["memory"] = memory
    return notes


def timeline(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: the phase changes and every strategy action, in step order, with whether
    it was carried out and what carried it out (or why not)."""
    a = runs["autoglm_rt"]
    rows: list[tuple[int, str, str, str]] = []
    for p in a.get("phases", []):
        if "kind" in p:  # results of older demos hold the event as one string; they are left out
            rows.append((p["step"], f"{p['kind']}: {p['before']} -> {p['after']}", "phase detector", p["reason"]))
    actions = [x for x in a.get("actions", []) if isinstance(x, dict)]  # older demos: strings, left out
    for act in actions:
        done = "applied" if act["applied"] else "**not applied**"
        rows.append((act["step"], f"`{act['action']}: {act['value']}` (rule {act['rule']})", done, act["detail"]))
    lines: list[str] = []
    if len(actions) < len(a.get("actions", [])) or any("kind" not in p for p in a.get("phases", [])):
        lines.append("This result was written by an older demo, without a timeline; rerun with a fresh --out.")
    elif not actions:
        why = "and none happened in this run" if not a.get("phases") else "but none of its rules matched them"
        name = a.get("strategy", "demo")
        lines.append(f"No strategy action fired: the {name!r} strategy acts on phase changes and instability, {why}.")
    if rows:
        lines += ["", "| step | event | carried out | detail |", "|---|---|---|---|"]
        lines += [f"| {s} | {what} | {done} | {detail} |" for s, what, done, detail in sorted(rows, key=lambda r: r[0])]
    return lines


def _micro_batch_changes(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, prev = [], None
    for r in recs:
        if prev is not None and r.get("micro_batch") != prev:
            out.append(r)
        prev = r.get("micro_batch")
    return out


def _median_step_ms(recs: list[dict[str, Any]]) -> float | None:
    times = [r["step_seconds"] for r in recs if r.get("step_seconds") is not None]
    return 1000 * median(times) if times else None


__all__ = ["comparison_sentences", "plot_notes", "timeline"]
