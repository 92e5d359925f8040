"""GPU check of the caching pool under a real torch training loop (run by benches/gpu_check.sh).

Each configuration runs in its own process, because torch can switch allocators only before CUDA
starts: (1) torch's native allocator, recording its allocation history; (2) autoglm_rt's pool via
install_torch_allocator. Both train the same transformer encoder for the same steps. Reported:
median step time and peak reserved of each, the pool's stats, a live limit change, torch's known
pluggable-allocator traps explained, and the replay of the native run's snapshot through the pool.

    python benches/gpu_memory.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
import torch
mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
result = {"mode": mode}
if mode == "pool":
    import autoglm_rt.memory as m
    m.install_torch_allocator(limit="100Gi")
else:
    # Python stacks only: C++ stacks (the default "all") can make _snapshot() take longer than the
    # child's timeout on a large history.
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096, batch_first=True)
net = torch.nn.TransformerEncoder(layer, num_layers=6).cuda()
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
times = []
for step in range(steps):
    bsz = 16 + 8 * (step % 3)  # varying shapes, as real loaders produce
    x = torch.randn(bsz, 512, 1024, device="cuda")
    torch.cuda.synchronize(); t = time.perf_counter()
    loss = net(x).float().square().mean()
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
result["median_step_s"] = statistics.median(times[3:])
if mode == "pool":
    pool = m.torch_pool(0)
    s = pool.stats()
    result["upstream"] = pool.upstream
    result["peak_reserved_bytes"] = s["peak_reserved_bytes"]
    result["peak_requested_bytes"] = s["peak_requested_bytes"]
    result["stats"] = s
    pool.check()
    # A live limit change: lower to the current reserved minus what is cached, train on.
    pool.set_limit(s["allocated_bytes"] + (s["peak_reserved_bytes"] - s["allocated_bytes"]) // 2)
    after = pool.stats(); result["after_set_limit"] = after
    try:
        loss = net(torch.randn(16, 512, 1024, device="cuda")).float().square().mean(); loss.backward()
        result["step_under_lower_limit"] = "ok"
    except Exception as e:  # the pool's out-of-memory reaches Python as MemoryError or RuntimeError
        from autoglm_rt.policy.oom import is_out_of_memory
        if not is_out_of_memory(e):
            raise
        result["step_under_lower_limit"] = f"out of memory ({type(e).__name__}): {e}"
    torch.cuda.synchronize(); pool.check()
    result["trimmed_bytes"] = pool.trim()
    try:
        torch.cuda.memory_stats()
        result["memory_stats_trap"] = "torch.cuda.memory_stats() worked"
    except Exception as e:
        result["memory_stats_trap"] = m.explain_torch_error(e) or f"unexplained: {e}"
else:
    result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    result["peak_requested_bytes"] = torch.cuda.max_memory_allocated()
    snap = torch.cuda.memory._snapshot()
    import autoglm_rt.memory as m
    rows = m.trace_from_torch_snapshot(snap, path=out + "/native_trace.csv")
    result["trace_rows"] = len(rows)
    result["replay_of_native_trace"] = m.replay(out + "/native_trace.csv", repeat=2, granularity="2Mi")
json.dump(result, open(out + f"/{mode}.json", "w"), indent=2, default=str)
print(json.dumps({k: v for k, v in result.items() if k != "stats"}, default=str))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/gpu_check/results")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--child-timeout", type=float, default=50.0, help="seconds per configuration's process")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("native", "pool"):
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, mode, str(args.steps), tmp],
                    capture_output=True,
                    text=True,
                    timeout=args.child_timeout,
                )
            except subprocess.TimeoutExpired as e:
                # Still write what the other configuration produced: the JSON below always exists.
                tail = (
                    e.stderr[-4000:]
                    if isinstance(e.stderr, str)
                    else (e.stderr or b"")[-4000:].decode(errors="replace")
                )
                print(f"[{mode}] timed out after {args.child_timeout} s:\n{tail}")
                failed = 1
                continue
            print(proc.stdout, end="")
            if proc.returncode != 0:
                print(f"[{mode}] failed:\n{proc.stderr[-4000:]}")
                failed = 1
        results = {}
        for mode in ("native", "pool"):
            p = Path(tmp) / f"{mode}.json"
            if p.exists():
                results[mode] = json.loads(p.read_text())
    if "native" in results and "pool" in results:
        n, p = results["native"], results["pool"]
        results["summary"] = {
            "step_time_ratio_native_over_pool": n["median_step_s"] / p["median_step_s"],
            "peak_reserved_native": n["peak_reserved_bytes"],
            "peak_reserved_pool": p["peak_reserved_bytes"],
            "peak_reserved_ratio_native_over_pool": n["peak_reserved_bytes"] / p["peak_reserved_bytes"],
        }
        print(json.dumps(results["summary"], indent=2))
    (out / "memory_gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
