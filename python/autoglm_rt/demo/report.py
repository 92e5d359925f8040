"""The demo's comparison: report.json, report.md and PNG plots from the two runs' records.

Each run directory holds ``result.json`` (the run's summary) and ``steps.jsonl`` (one record per
optimizer step: step, loss, phase, micro_batch, accumulation, activation_bytes, actions,
bytes_communicated, dense_bytes, ...). Fields a run does not have are simply absent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoglm_rt.demo.findings import comparison_sentences, plot_notes, timeline
from autoglm_rt.demo.projection import projection_document
from autoglm_rt.units import format_size

REQUIRED_RUN_FIELDS = ("val_loss", "bytes_communicated", "wall_seconds", "peak_memory_bytes", "energy_joules")
PLOTS = ("loss", "phase", "batch", "memory", "bytes_per_step")
PLOT_TITLES = {
    "loss": "Training loss",
    "phase": "Training phase",
    "batch": "Micro-batch and effective batch",
    "memory": "Memory",
    "bytes_per_step": "Bytes sent per step",
}


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(out: Path, runs: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Writes report.json, report.md and the plots; returns the report document."""
    for name, run in runs.items():
        missing = [f for f in REQUIRED_RUN_FIELDS if f not in run]
        if missing:
            raise ValueError(f"run {name!r} lacks {missing}")
    doc: dict[str, Any] = {"runs": runs, "meta": meta}
    a, b = runs.get("autoglm_rt"), runs.get("baseline")
    if a and b:
        doc["comparison"] = {
            "val_loss_ratio": a["val_loss"] / b["val_loss"],
            "bytes_ratio": b["bytes_communicated"] / max(1, a["bytes_communicated"]),
            "wall_ratio": a["wall_seconds"] / b["wall_seconds"],
            "peak_memory_ratio": a["peak_memory_bytes"] / max(1, b["peak_memory_bytes"]),
            "energy_ratio": a["energy_joules"] / b["energy_joules"] if b["energy_joules"] else None,
        }
    steps = {name: read_steps(out / name) for name in runs}
    projection = projection_document(a, steps.get("autoglm_rt", [])) if a else None
    if projection is not None:
        doc["projection"] = projection
    (out / "report.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    doc["plots"] = write_plots(out, steps)
    (out / "report.md").write_text(render_markdown(doc, steps))
    return doc


def render_markdown(doc: dict[str, Any], steps: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """report.md: the runs, the table (memory in MiB/GiB, energy marked when estimated), what is
    worse or slower and why, the timeline of phase changes and actions, the plots with notes."""
    runs = doc["runs"]
    steps = steps or {}
    names = list(runs)
    lines = ["# autoglm-rt demo report", ""]
    meta = doc.get("meta", {})
    for i, name in enumerate(names, 1):
        run_steps = runs[name].get("config", {}).get("steps", meta.get("steps", "?"))
        lines.append(f"- run {i} of {len(names)}: **{name}**, {run_steps} steps, output `{name}/`")
    if meta:
        lines += [f"- {k}: {v}" for k, v in sorted(meta.items())]
    lines.append("")
    estimated = any(runs[n].get("energy_estimated") for n in names)
    rows = [
        ("validation loss", lambda r: f"{r['val_loss']:.4f}"),
        ("bytes communicated", lambda r: f"{r['bytes_communicated']:,} ({format_size(r['bytes_communicated'])})"),
        ("wall time (s)", lambda r: f"{r['wall_seconds']:.1f}"),
        ("peak memory (largest rank)", lambda r: format_size(r["peak_memory_bytes"])),
        (
            "energy (J, estimate)" if estimated else "energy (J)",
            lambda r: f"{r['energy_joules']:.1f}" + (" (estimate)" if r.get("energy_estimated") else " (measured)"),
        ),
    ]
    if all("co2e_grams" in runs[n] for n in names):
        # Always an estimate: energy x PUE x an assumed carbon intensity of the grid.
        rows.append(("CO2e (g, estimate)", lambda r: f"{r['co2e_grams']:.3g} (estimate)"))
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(runs[n]) for n in names) + " |")
    sources = [(n, runs[n]) for n in names if runs[n].get("energy_source")]
    if sources:
        lines += [
            "",
            "Energy of the whole machine (rank 0's meter): measured where RAPL (CPU) and NVML (GPU) counters are "
            "readable, else an estimate from CPU busy time x watts per core; CO2e is an estimate in every case "
            "(energy x PUE x an assumed grid carbon intensity):",
        ]
        lines += [
            f"- {n} ({'estimate' if r.get('energy_estimated') else 'measured'}): {r['energy_source']}"
            for n, r in sources
        ]
    if "autoglm_rt" in runs and "baseline" in runs:
        lines += ["", "## autoglm_rt against the baseline", ""]
        lines += [f"- {s}" for s in comparison_sentences(runs, steps)]
        lines += ["", "## Timeline of the autoglm_rt run", "", *timeline(runs)]
    if doc.get("projection"):
        lines += ["", *projection_lines(doc["projection"])]
    for name in names:
        notes = runs[name].get("notes")
        if notes:
            lines += ["", f"**{name}**: " + "; ".join(notes)]
    if doc.get("plots"):
        notes_by_plot = plot_notes(runs, steps) if "autoglm_rt" in runs and "baseline" in runs else {}
        lines += ["", "## Plots"]
        for p in doc["plots"]:
            lines += ["", f"### {PLOT_TITLES.get(p, p)}", "", f"![{p}]({p}.png)"]
            if p in notes_by_plot:
                lines += ["", notes_by_plot[p]]
    return "\n".join(lines) + "\n"


def projection_lines(projection: dict[str, Any]) -> list[str]:
    """The "Projected step time" section: the measured inputs, the model, its error against the
    netns measurement, and a table of step times per rank count and link speed."""
    m, check = projection["model"], projection["check"]
    hook = projection.get("hook", "top-k")
    when = (
        f"median of {projection['steps_used']} steps after the density warm-up"
        if projection["settled"]
        else f"median of {projection['steps_used']} steps still in the density warm-up (the run is too short to "
        "reach its final density), so the message and the hook time are larger than they would settle at"
    )
    lines = [
        "## Projected step time",
        "",
        f"From this run's own measurements (rank 0): compute without communication {m['compute_s'] * 1e3:.1f} ms "
        f"per step (forward/backward under `no_sync`, timed after training), the {hook} hook "
        f"{m['compress_s'] * 1e3:.2f} ms per step and {format_size(m['message_bytes'])} sent per rank per step "
        f"({when}), its callbacks {m['callback_s'] * 1e3:.2f} ms per step plus {m['decompress_s'] * 1e3:.2f} ms per "
        f"rank's message, {format_size(m['dense_bytes'])} of gradients in {m['buckets']} bucket(s). Model "
        f"(`autoglm_rt.demo.projection`): ring all-reduce of the dense gradients against an all-gather of each "
        f"rank's fixed-size message, "
        f"{projection['latency_s'] * 1e6:.0f} us per message, no overlap of communication with compute.",
        "",
        f"Model error at P = {check['ranks']}, {check['gbit_s']:g} Gbit/s against steps measured across a shaped "
        f"link (`benches/ddp_netns.py`, benches/RESULTS.md): all-reduce {check['allreduce_error']:+.1%}, 1-bit "
        f"{check['onebit_error']:+.1%}, top-k {check['topk_error']:+.1%}. {check.get('note', '')}".rstrip(),
        "",
    ]
    gbits = sorted({r["gbit_s"] for r in projection["rows"]})
    ranks = sorted({r["ranks"] for r in projection["rows"]})
    by_key = {(r["gbit_s"], r["ranks"]): r for r in projection["rows"]}
    header = "| ranks | " + " | ".join(f"{g:g} Gbit/s: all-reduce / {hook} (ms) | speedup" for g in gbits) + " |"
    lines += [header, "|---:|" + "---:|---:|" * len(gbits)]
    for p in ranks:
        cells = []
        for g in gbits:
            r = by_key[(g, p)]
            cells.append(f"{r['allreduce_step_s'] * 1e3:.1f} / {r['topk_step_s'] * 1e3:.1f} | {r['speedup']:.2f}x")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def write_plots(out: Path, steps: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One PNG per plot in PLOTS; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ["initial", "convergence", "fine_tuning"]
    series = {
        "loss": ("loss", "training loss"),
        "batch": ("effective_batch", "micro-batch x accumulation (samples per rank)"),
        "memory": ("activation_bytes", "activation memory per step (MiB)"),
        "bytes_per_step": ("bytes_communicated_step", "bytes sent per step per rank"),
    }
    written = []
    for plot in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
        for name, recs in steps.items():
            xs = [r["step"] for r in recs]
            if plot == "phase":
                ys = [phases.index(r["phase"]) if r.get("phase") in phases else -1 for r in recs]
                ax.set_yticks(range(-1, 3), ["none", *phases])
                ax.step(xs, ys, where="post", label=name)
                ax.set_title("training phase")
            elif plot == "batch":
                ax.plot(
                    xs, [r.get("micro_batch", 0) * r.get("accumulation", 1) for r in recs], label=f"{name} effective"
                )
                ax.plot(xs, [r.get("micro_batch", 0) for r in recs], "--", label=f"{name} micro-batch")
                ax.set_title(series[plot][1])
            elif plot == "memory":
                ax.plot(
                    xs, [r.get("activation_bytes", float("nan")) / 2**20 for r in recs], label=f"{name} activations"
                )
                title = series[plot][1]
                if any("memory_limit_bytes" in r for r in recs):
                    limits = [r.get("memory_limit_bytes", float("nan")) / 2**20 for r in recs]
                    ax.plot(xs, limits, ":", label=f"{name} pool limit")
                    title = "activation memory and pool limit (MiB)"
                ax.set_title(title)
            else:
                key, title = series[plot]
                ax.plot(xs, [r.get(key, float("nan")) for r in recs], label=name)
                ax.set_title(title)
                if plot == "bytes_per_step":
                    ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{plot}.png")
        plt.close(fig)
        written.append(plot)
    return written
