"""The ``autoglm-rt`` command. Each subcommand is a small function; heavy imports stay inside it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Registers a subcommand: ``configure`` adds its arguments, the function runs it."""

    def register(fn: Command) -> Command:
        _COMMANDS[name] = (configure, fn)
        return fn

    return register


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the build information as JSON")


@command("info", _info_args)
def _info(args: argparse.Namespace) -> int:
    """Prints what this build contains and whether CUDA is usable here."""
    from autoglm_rt import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in info)
        for key in sorted(info):
            print(f"{key:<{width}}  {info[key]}")
    return 0


def _queue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", metavar="JOBS.yaml", help="the queue file: slots or gpus, and jobs")
    p.add_argument(
        "--state",
        metavar="FILE.db",
        help="SQLite state file (default: JOBS.yaml with suffix .db); rerun with the same file to resume",
    )
    p.add_argument("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL (default: file)")


@command("queue", _queue_args)
def _queue(args: argparse.Namespace) -> int:
    """Runs a queue of jobs on this machine's GPUs or CPU slots by priority; exits 1 if any failed."""
    from pathlib import Path

    from autoglm_rt.jobqueue import QueueRunner, QueueSpecError, load_queue_spec

    try:
        spec = load_queue_spec(args.jobs)
    except QueueSpecError as exc:
        print(f"autoglm-rt queue: {exc}", file=sys.stderr)
        return 2
    state = args.state or str(Path(args.jobs).with_suffix(".db"))
    runner = QueueRunner(spec, state, grace_period=args.grace)
    try:
        return runner.run()
    except KeyboardInterrupt:
        print(f"autoglm-rt queue: interrupted; running jobs continue. Resume with --state {state}", file=sys.stderr)
        return 130
    finally:
        runner.close()


def _queue_migrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="FILE.db", required=True, help="the state file of the running queue")
    p.add_argument("job", help="name of the running job to move")
    p.add_argument("--to", default=None, help="target slots, comma-separated (default: any free ones)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the runner's answer")


@command("queue-migrate", _queue_migrate_args)
def _queue_migrate(args: argparse.Namespace) -> int:
    """Asks a running queue to migrate a job: checkpoint (SIGTERM), stop, restart on other slots."""
    import time
    from pathlib import Path

    from autoglm_rt.jobqueue import QueueStore

    if not Path(args.state).is_file():
        print(f"autoglm-rt queue-migrate: no queue state file {args.state}", file=sys.stderr)
        return 2
    try:
        to = tuple(int(x) for x in args.to.split(",")) if args.to else None
    except ValueError:
        print(f"autoglm-rt queue-migrate: --to expects slot numbers like 2,3, got {args.to!r}", file=sys.stderr)
        return 2
    with QueueStore(args.state) as store:
        request_id = store.request("migrate", args.job, to, time.time())
        deadline = time.monotonic() + args.wait
        while not (req := store.get_request(request_id)).answered:
            if time.monotonic() > deadline:
                print(f"autoglm-rt queue-migrate: no answer in {args.wait:g} s (is a runner running?)", file=sys.stderr)
                return 1
            time.sleep(0.1)
    print(req.answer)
    return 0 if req.ok else 1


def _multi_tenant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short workload (about 10 s per mode)")
    p.add_argument("--rounds", type=int, default=1, help="static/dynamic runs each, alternating (median reported)")
    p.add_argument("--slots", type=int, default=4, help="CPU slots shared by the workload")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival trace")
    p.add_argument("--work-dir", default=None, help="where the queues keep state and logs (default: a temp dir)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write every figure to FILE as JSON")


@command("bench-multi-tenant", _multi_tenant_args)
def _bench_multi_tenant(args: argparse.Namespace) -> int:
    """Measures a mixed training/request workload under static slots vs. autoglm_rt's scheduler."""
    import tempfile
    from pathlib import Path

    from autoglm_rt.benchmarking import machine_description
    from autoglm_rt.jobqueue.multi_tenant import Workload, format_comparison, run_comparison

    if args.rounds < 1:
        print("autoglm-rt bench-multi-tenant: --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        workload = Workload(
            slots=args.slots,
            seed=args.seed,
            static_request_slots=max(1, args.slots // 2),
            request_window=6.0 if args.quick else Workload.request_window,
            training_work=3.0 if args.quick else Workload.training_work,
        )
    except ValueError as exc:
        print(f"autoglm-rt bench-multi-tenant: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="agrt-mt-") as tmp:
        doc = run_comparison(workload, args.work_dir or tmp, rounds=args.rounds)
    print(format_comparison(doc))
    if args.json:
        doc["machine"] = machine_description()
        doc["command"] = "autoglm-rt bench-multi-tenant" + (" --quick" if args.quick else "")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        configure(p)
        p.set_defaults(_run=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
