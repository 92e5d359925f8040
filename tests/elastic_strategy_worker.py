"""A torchrun worker whose Runtime strategy asks for one more replica while in its initial phase.

    torchrun ... elastic_strategy_worker.py OUT_DIR

Each process appends its strategy's action results (``applied``, ``detail``, world size, rank)
to ``OUT_DIR/actions.jsonl`` and trains a small model until SIGTERM (the agent's restart on a
membership change, or the job's close), then exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from autoglm_rt.distributed import exit_rank, init_process_group_from_env
from autoglm_rt.policy import Strategy
from autoglm_rt.runtime import Runtime

STRATEGY = """
strategy:
  name: grow-while-learning
  trigger: {phase: initial}
  actions: [{scale_up_replicas: 1}]
"""


def main() -> None:
    out = Path(sys.argv[1])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    torch.set_num_threads(1)
    init_process_group_from_env("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    runtime = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.01), strategy=Strategy.from_yaml(STRATEGY))
    g = torch.Generator().manual_seed(rank)
    try:
        while not stop:
            x = torch.randn(8, 4, generator=g)
            runtime.forward_backward((x, x.sum(1, keepdim=True)), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
            report = runtime.step()
            for r in report.actions:
                line = {"pid": os.getpid(), "rank": rank, "world": world, "applied": r.applied, "detail": r.detail}
                with (out / "actions.jsonl").open("a") as f:
                    f.write(json.dumps(line) + "\n")
            time.sleep(0.05)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank(0)
