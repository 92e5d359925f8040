"""A Runtime training job for tests/test_runtime_offload_cgroup.py, run inside an autoglm_rt job
group: one large linear layer under AdamW, the Runtime's memory signal is its own cgroup
(``CgroupMemory.own()``), and with ``--offload`` the Runtime may move the optimizer state to disk.
After every step it writes a status file (JSON, replaced atomically); between steps it waits a
little, as a data loader would. Ends after ``--steps`` steps, or one step after the Runtime
restored the state it had offloaded."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from autoglm_rt.offload import EscalationConfig, OptimizerOffload
from autoglm_rt.policy.phase import PhaseDetector
from autoglm_rt.resources.pool import CgroupMemory
from autoglm_rt.runtime import BatchConfig, MemoryConfig, Runtime

BATCH = 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--status", required=True)
    ap.add_argument("--directory", required=True)
    ap.add_argument("--dim", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--offload", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(args.dim, args.dim, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    offload = OptimizerOffload(opt, tier="disk", directory=args.directory, block_bytes="4Mi") if args.offload else None
    pool = CgroupMemory.own()
    rt = Runtime(
        model,
        opt,
        pool=pool,
        phase_detector=PhaseDetector(window=10_000),
        precision_by_phase={},
        batch=BatchConfig(effective_batch=BATCH, micro_batch=BATCH, min_micro_batch=BATCH),
        memory=MemoryConfig(
            capacity=2**40,
            limits={"initial": 1.0, "convergence": 1.0, "fine_tuning": 1.0},
            threads_by_phase=False,
            offload=offload,
            escalation=EscalationConfig(high_ratio=0.95, low_ratio=0.7, calm_steps=2),
        ),
    )
    gen = torch.Generator().manual_seed(1)
    actions: list[dict[str, object]] = []
    restored_at = None
    for step in range(args.steps):
        x = torch.randn(BATCH, args.dim, generator=gen)
        rt.forward_backward((x, x.roll(1, dims=1)), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        report = rt.step()
        for r in report.actions:
            actions.append(
                {
                    "step": step,
                    "name": r.action.name,
                    "value": r.action.value,
                    "by": r.action.strategy,
                    "applied": r.applied,
                    "limit_bytes": r.action.evidence.get("limit_bytes"),
                }
            )
            if r.applied and r.action.value is False:
                restored_at = step
        status = {
            "step": step,
            "offloaded": report.optimizer_offloaded,
            "peak_bytes": report.metrics.get("pool.peak_allocated_bytes"),
            "limit_bytes": report.metrics.get("pool.limit_bytes"),
            "usage_after_step": pool.group.memory_usage(),
            "state_bytes": rt.offloading.state_bytes() if rt.offloading is not None else 2 * model.weight.numel() * 4,
            "param_bytes": model.weight.numel() * 4,
            "resident_bytes": rt.offloading.offload.resident_bytes() if rt.offloading is not None else None,
            "actions": actions,
            "done": (restored_at is not None and step > restored_at) or step == args.steps - 1,
        }
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, args.status)
        if status["done"]:
            break
        time.sleep(0.05)  # the data loader's share of a step: the job holds no gradient meanwhile


if __name__ == "__main__":
    main()
