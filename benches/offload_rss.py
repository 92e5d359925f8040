"""Peak memory of a training job with its AdamW state in RAM vs on disk, by metric.

Runs ``tests/offload_memory_job.py`` (one float32 parameter of ``--numel`` elements, its gradient,
AdamW, 3 fused steps) once with the state in RAM and once per disk block size, each in a fresh
cgroup v1 memory group when one is writable (no limit; for the group's peak). Prints, per run:
peak RSS (``ru_maxrss``), resident anonymous and file-backed bytes after the last step
(``/proc/self/status``), the group's peak (``memory.max_usage_in_bytes``: anonymous + page
cache), the steps' wall time, and each figure's drop against the in-RAM run next to the state's
size. Usage: ``PYTHONPATH=python:. python benches/offload_rss.py [--numel N] [--blocks 4Mi 1Mi]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from autoglm_rt import resources

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def run(numel: int, block: str | None, directory: str) -> dict[str, float]:
    group = resources.JobGroup.create(f"pid-{os.getpid()}-bench", "offload-rss") if resources.detect() else None
    try:
        cmd = [sys.executable, str(ROOT / "tests" / "offload_memory_job.py"), "--numel", str(numel)]
        cmd += ["--directory", directory] + (["--offload", "--block-bytes", block] if block else [])
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'python'}{os.pathsep}{ROOT}")
        enter = (lambda: group.add(os.getpid())) if group is not None else None
        out = subprocess.run(cmd, input="go\n", capture_output=True, text=True, env=env, check=True, preexec_fn=enter)
        fields = dict(kv.split("=") for kv in out.stdout.split("\n")[1].split()[2:])
        result = {k: float(v) for k, v in fields.items()}
        result["checksum"] = float(out.stdout.split("\n")[1].split()[1])
        if group is not None:
            result["cgroup_peak"] = float(group.memory_peak())
        return result
    finally:
        if group is not None:
            group.remove()  # kills what is left, then removes the group from every hierarchy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=25165824)
    ap.add_argument("--blocks", nargs="+", default=["4Mi", "1Mi", "256Ki"])
    args = ap.parse_args()
    state = 2 * 4 * args.numel
    print(f"state {state / MiB:.1f} MiB; load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="agrt_offload_rss_") as tmp:
        base = run(args.numel, None, tmp)
        rows = [("in RAM", base)] + [(f"disk, {b} blocks", run(args.numel, b, tmp)) for b in args.blocks]
    metrics = [("peak_rss", "peak RSS"), ("rss_anon", "anon after"), ("rss_file", "file after")]
    if "cgroup_peak" in base:
        metrics.append(("cgroup_peak", "cgroup peak"))
    head = " | ".join(f"{label} MiB (drop)" for _, label in metrics)
    print(f"| run | {head} | steps s | checksum |")
    for name, r in rows:
        cells = " | ".join(
            f"{r[k] / MiB:.1f}" + ("" if r is base else f" ({(base[k] - r[k]) / MiB:+.1f})") for k, _ in metrics
        )
        print(f"| {name} | {cells} | {r['seconds']:.2f} | {r['checksum']:.6e} |")
    print(f"drops are against the in-RAM run; the state is {state / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
