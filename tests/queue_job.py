"""A job for the queue tests that honours the checkpoint contract: it counts ``STEPS`` steps of
``DT`` seconds, saves ``{"step": n}`` atomically in $AUTOGLM_RT_CHECKPOINT_DIR after every step,
resumes from it on start, and on SIGTERM finishes its step, saves and exits 0. Every completed step
is appended to OUT as "name step slots attempt", so a test can check that no step ran twice
after a checkpoint and none was skipped.

    python queue_job.py OUT STEPS DT [--ignore-term-on-first-attempt]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> int:
    out, steps, dt = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    stubborn = "--ignore-term-on-first-attempt" in sys.argv
    ckpt_dir = os.environ["AUTOGLM_RT_CHECKPOINT_DIR"]
    name = os.environ["AUTOGLM_RT_JOB_NAME"]
    attempt = os.environ["AUTOGLM_RT_JOB_ATTEMPT"]
    slots = os.environ["AUTOGLM_RT_SLOTS"]
    ckpt = os.path.join(ckpt_dir, "state.json")
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn and attempt == "1" else on_term)
    step = 0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            step = json.load(f)["step"]
    while step < steps:
        time.sleep(dt)
        step += 1
        with open(out, "a") as f:
            f.write(f"{name} {step} {slots} {attempt}\n")
        tmp = ckpt + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step}, f)
        os.replace(tmp, ckpt)
        if stop:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
