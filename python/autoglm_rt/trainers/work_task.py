"""A unit of device work for the multi-tenant comparison: ``--work`` seconds done in steps of
``--step`` seconds (it sleeps, so the figures measure scheduling, not this machine's CPU load).

It honours the checkpoint contract (resume from $AUTOGLM_RT_CHECKPOINT_DIR/progress, save after
every step, SIGTERM: finish the step, save, exit 0) and, like a request with a client-side
timeout, gives up with exit code 2 once the wall clock passes ``--deadline`` (a Unix time).
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=float, required=True, help="seconds of work in total")
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--deadline", type=float, default=None, help="Unix time after which the task fails")
    args = ap.parse_args(argv)
    ckpt_dir = os.environ.get("AUTOGLM_RT_CHECKPOINT_DIR")
    progress_file = os.path.join(ckpt_dir, "progress") if ckpt_dir else None
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    done = 0.0
    if progress_file and os.path.exists(progress_file):
        with open(progress_file) as f:
            done = float(f.read())
    while done < args.work - 1e-9:
        if args.deadline is not None and time.time() > args.deadline:
            print(f"deadline passed with {done:.2f}/{args.work:.2f} s done", file=sys.stderr)
            return 2
        chunk = min(args.step, args.work - done)
        time.sleep(chunk)
        done += chunk
        if progress_file:
            tmp = progress_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(repr(done))
            os.replace(tmp, progress_file)
        if stop:
            return 0
    if args.deadline is not None and time.time() > args.deadline:
        print("finished after the deadline", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
