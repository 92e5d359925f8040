"""Runs one queued job's command and records its exit status in a file, so that a runner that was
restarted (and is no longer this process's parent) still learns how the job ended.

    python _job_wrapper.py EXIT_FILE PID_FILE -- COMMAND [ARG ...]

Standard library only: it runs as a plain script, without importing autoglm_rt. SIGTERM and SIGINT
are forwarded to the command (the checkpoint contract: the command saves and exits 0). The exit
file holds the command's return code (negative: killed by that signal; 127: could not start, with
the reason on a second line) and is written atomically; it is missing only if this wrapper itself
was killed. The wrapper leads the job's process group (the runner starts it in a new session), so
the command and anything it forks can be stopped together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: _job_wrapper.py EXIT_FILE PID_FILE -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    exit_file, pid_file, command = argv[0], argv[1], argv[3:]
    _write_atomically(pid_file, f"{os.getpid()}\n")
    reason = ""
    try:
        # The job's cgroup (autoglm_rt.jobqueue.placement), joined before the command starts.
        for procs in filter(None, os.environ.pop("AUTOGLM_RT_CGROUP_PROCS", "").split(":")):
            with open(procs, "w") as f:
                f.write(f"{os.getpid()}\n")
        child = subprocess.Popen(command)
    except (OSError, ValueError) as exc:
        reason = f"cannot start {command[0]!r}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        print(f"autoglm-rt queue: {reason}", file=sys.stderr, flush=True)
        rc = 127
    else:

        def forward(signum: int, _frame: object) -> None:
            if child.poll() is None:
                child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        rc = child.wait()
    _write_atomically(exit_file, f"{rc}\n{reason}\n" if reason else f"{rc}\n")
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
