"""A queue job whose Runtime strategy asks to migrate it on its first attempt.

    python queue_strategy_job.py OUT

Appends each action result (attempt, slots, applied, detail) to OUT as JSON lines and trains a
small model until SIGTERM, then exits 0 (the checkpoint contract, with nothing to save).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from torch import nn

from autoglm_rt.policy import Strategy
from autoglm_rt.runtime import Runtime

STRATEGY = """
strategy:
  name: move-me
  trigger: {phase: initial}
  actions: [{migrate_task: true}]
"""


def main() -> int:
    out = sys.argv[1]
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    attempt = os.environ["AUTOGLM_RT_JOB_ATTEMPT"]
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    strategy = Strategy.from_yaml(STRATEGY) if attempt == "1" else None
    runtime = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.01), strategy=strategy)
    while not stop:
        x = torch.randn(8, 4)
        runtime.forward_backward((x, x.sum(1, keepdim=True)), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        for r in runtime.step().actions:
            line = {
                "attempt": attempt,
                "slots": os.environ["AUTOGLM_RT_SLOTS"],
                "applied": r.applied,
                "detail": r.detail,
            }
            with open(out, "a") as f:
                f.write(json.dumps(line) + "\n")
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
