"""The ``autoglm-rt`` command. Each subcommand is a small function; heavy imports stay inside it.

Errors: a subcommand raises :class:`CliError` (or lets a library error through); :func:`main`
prints one line, ``autoglm-rt: error: <what>, <what to do>``, and exits 2. ``--debug`` or
``AUTOGLM_RT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from autoglm_rt.jobqueue.multi_tenant import Workload

USAGE_TEXT = """\
autoglm_rt keeps data-parallel PyTorch training inside its memory and bandwidth while it runs:
top-k gradient compression, a caching memory pool with a hard limit, batch and memory policies.

Start here:
  autoglm-rt info                  what this installation contains, whether CUDA is usable
  autoglm-rt demo --quick          train a small GPT with and without autoglm_rt, compare them
  autoglm-rt monitor               live view of this machine's load
  autoglm-rt strategy check FILE   check a strategy file
  autoglm-rt queue JOBS.yaml       run a queue of training jobs on this machine's GPUs or CPU slots

Run 'autoglm-rt COMMAND --help' for a command's options.
"""
DEBUG_ENV = "AUTOGLM_RT_DEBUG"

Command = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user error: the message says what was wrong and what to do, on one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``autoglm-rt: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        print(f"autoglm-rt: error: {message}, see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> NoReturn:
        from autoglm_rt import __version__

        print(f"autoglm-rt {__version__}")
        raise SystemExit(0)


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


def _strategy_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="strategy_command", required=True, metavar="{check,simulate}")
    check = sub.add_parser("check", help="parse a strategy file and print its rules")
    check.add_argument("file", help="strategy YAML")
    sim = sub.add_parser("simulate", help="print the actions a strategy would take over a recorded metric series")
    sim.add_argument("file", help="strategy YAML")
    sim.add_argument("--metrics", required=True, help="CSV with a time column and one column per metric")
    sim.add_argument("--json", action="store_true", help="print the actions as JSON lines")


@command("strategy", _strategy_args)
def _strategy(args: argparse.Namespace) -> int:
    """Checks a strategy file, or simulates it over a recorded metric series."""
    from pathlib import Path

    from autoglm_rt.policy import ConfigError, Strategy
    from autoglm_rt.policy.simulate import MetricsFileError, read_metrics_csv, simulate

    try:
        strategy = Strategy.from_yaml(Path(args.file))
    except ConfigError as exc:
        raise CliError(f"{exc}, see docs/policy.md for the format") from exc
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}, give a strategy YAML file") from exc
    if args.strategy_command == "check":
        print(f"{args.file}: {len(strategy.rules)} strategy rule(s), OK")
        for rule in strategy.rules:
            extra = [f"for {rule.for_seconds:g}s"] if rule.for_seconds else []
            if rule.clear is not None:
                extra.append("clear: " + _describe_trigger(rule.clear))
            if rule.cooldown_seconds:
                extra.append(f"cooldown {rule.cooldown_seconds:g}s")
            print(f"- {rule.name} (line {rule.line})")
            print(f"    when    {_describe_trigger(rule.trigger)}" + (f"  [{'; '.join(extra)}]" if extra else ""))
            for spec in rule.actions:
                print(f"    action  {spec.name}={spec.value!r} -> {spec.target}")
        return 0
    try:
        series = read_metrics_csv(args.metrics)
    except (MetricsFileError, OSError) as exc:
        raise CliError(f"{exc}, give a CSV with a time column and one column per metric") from exc
    actions = simulate(strategy, series)
    for a in actions:
        if args.json:
            print(
                json.dumps(
                    {
                        "time": a.time,
                        "strategy": a.strategy,
                        "action": a.name,
                        "value": a.value,
                        "target": a.target,
                        "evidence": a.evidence,
                    },
                    default=str,
                )
            )
        else:
            evidence = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.evidence.items())
            print(f"t={a.time:<10g} {a.strategy:<24} {a.name}={a.value!r} -> {a.target}  ({evidence})")
    if not args.json:
        print(f"{len(actions)} action(s) over {len(series)} observation(s)")
    return 0


def _describe_trigger(trigger: object) -> str:
    from autoglm_rt.policy.strategy_rules import Trigger

    assert isinstance(trigger, Trigger)
    parts = [str(c) for c in trigger.conditions]
    if trigger.any_of:
        parts.append("any(" + " | ".join(_describe_trigger(g) for g in trigger.any_of) + ")")
    return " and ".join(parts)


def _monitor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--period", type=float, default=2.0, help="seconds between samples (default 2)")
    p.add_argument("--window", type=float, default=60.0, help="sliding window in seconds (default 60)")
    p.add_argument("--halflife", type=float, default=10.0, help="EWMA half-life in seconds (default 10)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N frames (default: run)")
    n.add_argument("--once", action="store_true", help="one frame, then exit (same as --iterations 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample instead of the view")
    p.add_argument("--no-gpu", action="store_true", help="do not query NVML")
    p.add_argument(
        "--serve", type=int, default=None, metavar="PORT", help="also serve Prometheus metrics on 127.0.0.1:PORT"
    )


@command("monitor", _monitor_args)
def _monitor(args: argparse.Namespace) -> int:
    """Live view of the smoothed host/GPU metrics and the load level (Ctrl-C to stop)."""
    import time

    from autoglm_rt.monitor import MetricsExporter, Sampler, start_metrics_server
    from autoglm_rt.monitor.probes import hostname
    from autoglm_rt.monitor.view import CLEAR, as_dict, render

    iterations = 1 if args.once else args.iterations
    if iterations < 0:
        print("autoglm-rt monitor: --iterations must be >= 0", file=sys.stderr)
        return 2
    try:
        sampler = Sampler(args.period, window=args.window, halflife=args.halflife, gpus=not args.no_gpu)
    except (TypeError, ValueError) as exc:
        print(f"autoglm-rt monitor: {exc}", file=sys.stderr)
        return 2
    server = None
    if args.serve is not None:
        try:
            server = start_metrics_server(args.serve, exporter=MetricsExporter(sampler=sampler))
        except OSError as exc:
            sampler.close()
            raise CliError(
                f"cannot serve metrics on 127.0.0.1:{args.serve}: {exc.strerror or exc}, "
                "choose another port with --serve PORT (0: any free one)"
            ) from exc
        except ValueError as exc:
            sampler.close()
            raise CliError(f"--serve: {exc}") from exc
        print(f"serving metrics on {server.url}", file=sys.stderr)
    clear = sys.stdout.isatty() and not args.json
    host = hostname()
    done = 0
    try:
        while iterations == 0 or done < iterations:
            time.sleep(args.period)  # the first CPU figure needs an interval after priming
            snap = sampler.sample_once()
            if args.json:
                print(json.dumps(as_dict(snap), sort_keys=True), flush=True)
            else:
                print((CLEAR if clear else "") + render(snap, sampler, host) + ("" if clear else "\n"), flush=True)
            done += 1
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the live view ends; the finally block cleans up
    finally:
        sampler.close()
        if server is not None:
            server.close()
    return 0


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace CSV (op,id,bytes,stream)")
    p.add_argument("--repeat", type=int, default=3, help="passes over the trace (default 3)")
    p.add_argument("--segments", action="store_true", help="plain segments instead of growable arenas")
    p.add_argument("--granularity", default="64Ki", help="arena growth step (default 64Ki; CUDA uses 2Mi)")
    p.add_argument(
        "--small-size", default=None, help="largest request of the small class (default 128Ki, 1Mi with --segments)"
    )
    p.add_argument("--limit", default=None, help="hard limit of the pool, e.g. 64Mi (default: none)")
    p.add_argument(
        "--decommit", action="store_true", help="unmap free granules before mapping more (smaller, more upstream calls)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


@command("replay", _replay_args)
def _replay(args: argparse.Namespace) -> int:
    """Replays an allocation trace through a fresh caching pool and reports its footprint."""
    from autoglm_rt.memory import OutOfMemoryError, replay
    from autoglm_rt.units import format_size

    trace = Path(args.trace)
    expected = "give a CSV with the header op,id,bytes,stream (benches/traces/ has examples)"
    if not trace.is_file():
        raise CliError(f"no trace file at {trace}, {expected}")
    try:
        with open(trace, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise CliError(f"cannot read the trace {trace}: {exc.strerror}, {expected}") from exc
    if args.repeat < 1:
        raise CliError(f"--repeat must be >= 1, got {args.repeat}")
    try:
        result = replay(
            args.trace,
            repeat=args.repeat,
            expandable=not args.segments,
            granularity=args.granularity,
            small_size=args.small_size,
            decommit=args.decommit,
            limit=args.limit,
        )
    except OutOfMemoryError as exc:
        first = str(exc).splitlines()[0]
        raise CliError(f"{first}, raise --limit or leave it out") from None
    except UnicodeDecodeError:
        raise CliError(f"{trace} is not a text file, {expected}") from None
    except ValueError as exc:
        raise CliError(f"{exc}, check the trace file and the options (autoglm-rt replay --help)") from exc
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(f"trace                             {args.trace} ({result['ops']} ops over {args.repeat} passes)")
    print(f"peak requested                    {format_size(result['peak_requested_bytes'])}")
    print(f"peak reserved                     {format_size(result['peak_reserved_bytes'])}")
    print(f"reserved / requested              {result['reserved_to_requested']:.3f}")
    print(f"upstream allocations              {result['upstream_allocs']}")
    print(f"upstream allocations after pass 1 {result['upstream_allocs_after_first_pass']}")
    if args.limit is not None:
        print(f"reclaims under the limit          {result['pressure_reclaims']}")
    print(f"ns per operation                  {result['ns_per_op']:.1f}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a short run (under 3 minutes on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="a tiny run that only shows everything works")
    p.add_argument("--out", default="autoglm_rt_demo", help="output directory (default: ./autoglm_rt_demo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (overrides the preset)")
    p.add_argument("--gpus", type=int, default=0, help="train on N >= 2 GPUs with NCCL (default: 2 CPU ranks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("demo", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """Trains a small GPT with autoglm_rt and without, and compares them (report.md, plots)."""
    preset = "quick" if args.quick else "smoke" if args.smoke else "default"
    _check_demo_args(args, preset)
    from autoglm_rt.demo import run_demo
    from autoglm_rt.demo.driver import Interrupted

    try:
        doc = run_demo(args.out, preset, steps=args.steps, gpus=args.gpus, show_progress=not args.no_progress)
    except Interrupted as exc:
        print(exc, flush=True)  # one line; the checkpoint is in place
        return 128 + exc.signum  # 130 for SIGINT (Ctrl-C), 143 for SIGTERM: never 0
    except KeyboardInterrupt:  # Ctrl-C between the runs (e.g. while the report is written)
        print("SIGINT: stopped; rerun the same command to continue", flush=True)
        return 130
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {Path(args.out).resolve()}/report.md, report.json, {len(doc['plots'])} plots")
    return 0


def _check_demo_args(args: argparse.Namespace, preset: str) -> None:
    """Everything the demo needs, checked before anything starts or is written."""
    import importlib.util

    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.gpus < 0 or args.gpus == 1:
        raise CliError(f"--gpus must be 0 (2 CPU ranks) or at least 2 (data-parallel on GPUs), got {args.gpus}")
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError(
            "the demo draws its plots with matplotlib, which is not installed, pip install 'autoglm-rt[demo]'"
        )
    if args.gpus:
        from autoglm_rt import cuda_available

        ok, reason = cuda_available(return_reason=True)
        if not ok:
            raise CliError(f"--gpus {args.gpus} needs CUDA: {reason}, run without --gpus to train on 2 CPU ranks")
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise CliError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s), ask for fewer")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CliError(f"cannot write to --out {out}: {exc.strerror or exc}, choose a writable directory") from exc
    _check_demo_config(out, preset, args)


def _check_demo_config(out: Path, preset: str, args: argparse.Namespace) -> None:
    """``out`` holds no demo, or one with the configuration asked for (then it resumes)."""
    from dataclasses import asdict, replace

    from autoglm_rt.demo.train import PRESETS

    path = out / "config.json"
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
        assert isinstance(stored, dict)
    except (OSError, ValueError, AssertionError):
        raise CliError(f"{path} is not a demo configuration, delete it or choose another --out") from None
    cfg = PRESETS[preset]
    cfg = replace(cfg, steps=args.steps) if args.steps is not None else cfg
    cfg = replace(cfg, device="cuda", world=args.gpus) if args.gpus else cfg
    if stored == asdict(cfg):
        return
    flags = None
    for name, base in PRESETS.items():
        candidate = replace(base, steps=stored.get("steps", base.steps))
        if stored.get("device") == "cuda":
            candidate = replace(candidate, device="cuda", world=stored.get("world", 2))
        if asdict(candidate) == stored:
            parts = [] if name == "default" else [f"--{name}"]
            parts += [] if candidate.steps == base.steps else [f"--steps {candidate.steps}"]
            parts += [f"--gpus {candidate.world}"] if candidate.device == "cuda" else []
            flags = " ".join(parts) or "no preset flags"
            break
    resume = f"rerun with {flags} to resume it" if flags else "it was made by another version"
    raise CliError(f"{out} holds a demo with another configuration, {resume}, or choose another --out")


def _queue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", metavar="JOBS.yaml", help="the queue file: slots or gpus, and jobs")
    p.add_argument(
        "--state",
        metavar="FILE.db",
        help="SQLite state file (default: JOBS.yaml with suffix .db); rerun with the same file to resume: "
        "jobs that finished keep their result",
    )
    p.add_argument("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL (default: file)")
    p.add_argument("--retry-failed", action="store_true", help="run the jobs the state file records as failed again")


@command("queue", _queue_args)
def _queue(args: argparse.Namespace) -> int:
    """Runs a queue of jobs on this machine's GPUs or CPU slots by priority; exits 1 if any failed."""
    from autoglm_rt.jobqueue import QueueRunner, load_queue_spec

    spec = load_queue_spec(args.jobs)
    state = args.state or str(Path(args.jobs).with_suffix(".db"))
    with _state_errors(state):
        runner = QueueRunner(spec, state, grace_period=args.grace, retry_failed=args.retry_failed)
    try:
        return runner.run()
    except KeyboardInterrupt:
        print(f"autoglm-rt queue: interrupted; running jobs continue. Resume with --state {state}", file=sys.stderr)
        return 130
    finally:
        runner.close()


@contextlib.contextmanager
def _state_errors(state: str) -> Iterator[None]:
    """SQLite's errors about the state file, as one line naming the file and what to do."""
    import sqlite3

    try:
        yield
    except sqlite3.DatabaseError as exc:
        what = str(exc)
        if "locked" in what or "busy" in what:
            hint = "another process holds it; wait for it or use another --state"
        elif "readonly" in what or "read-only" in what:
            hint = "make it (and its directory) writable or use another --state"
        else:
            hint = "it is not a queue state file or it is damaged; move it away or use another --state"
        raise CliError(f"queue state {state}: {what}, {hint}") from exc


@contextlib.contextmanager
def _open_state(state: str) -> Iterator[Any]:
    from autoglm_rt.jobqueue import QueueStore

    with _state_errors(state):
        store = QueueStore(state)
        try:
            yield store
        finally:
            store.close()


def _queue_migrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="FILE.db", required=True, help="the state file of the running queue")
    p.add_argument("job", help="name of the running job to move")
    p.add_argument("--to", default=None, help="target slots, comma-separated (default: any free ones)")
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for the runner's answer (default 30); a request no runner took by then is dropped",
    )


@command("queue-migrate", _queue_migrate_args)
def _queue_migrate(args: argparse.Namespace) -> int:
    """Asks a running queue to move a job to other slots (it checkpoints, stops and restarts)."""
    import math
    import time

    if not math.isfinite(args.wait) or args.wait <= 0:
        raise CliError(f"--wait must be a finite number of seconds > 0, got {args.wait}")
    if not Path(args.state).is_file():
        raise CliError(f"no queue state file {args.state}, give the --state of a running queue")
    try:
        to = tuple(int(x) for x in args.to.split(",")) if args.to else None
    except ValueError:
        raise CliError(f"--to expects slot numbers like 2,3, got {args.to!r}") from None
    with _open_state(args.state) as store:
        now = time.time()
        request_id = store.request("migrate", args.job, to, now, expires_at=now + args.wait)
        deadline = time.monotonic() + args.wait
        while not (req := store.get_request(request_id)).answered:
            # Past the deadline, withdraw it unless a runner took it meanwhile (then its answer comes).
            if time.monotonic() > deadline and store.cancel_request(request_id, time.time()):
                print(
                    f"autoglm-rt queue-migrate: no answer in {args.wait:g} s (is a runner running?); "
                    "the request was withdrawn",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.1)
    print(req.answer)
    return 0 if req.ok else 1


def _multi_tenant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short trace (under 3 minutes for both modes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival trace")
    p.add_argument("--memory", default="2Gi", help="memory all tenants share (bytes or '2Gi')")
    p.add_argument("--cores", type=float, default=2.0, help="CPU cores all tenants share")
    p.add_argument("--request-passes", type=int, default=None, help="forward passes per request (default: Workload's)")
    p.add_argument("--work-dir", default=None, help="where tenants keep status, checkpoints and logs")
    p.add_argument(
        "--tenant-weight",
        type=int,
        default=None,
        help="CPU weight of all tenants together against other processes, both modes (100: one process)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run both modes this many times, alternating which goes first, and report medians",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write every figure to FILE as JSON")
    p.add_argument("--png", metavar="FILE", default=None, help="write the per-job memory/CPU timeline to FILE")


def _multi_tenant_workload(args: argparse.Namespace) -> Workload:
    """The trace ``bench-multi-tenant``'s arguments describe (ValueError/TypeError on bad ones)."""
    from autoglm_rt.jobqueue.multi_tenant import Workload
    from autoglm_rt.units import parse_size

    return Workload(
        memory=parse_size(args.memory, name="--memory"),
        cores=args.cores,
        seed=args.seed,
        training_jobs=4 if args.quick else 8,
        job_rate=0.4 if args.quick else 0.25,
        request_window=20.0 if args.quick else 60.0,
        tenant_weight=args.tenant_weight,
        **({"request_passes": args.request_passes} if args.request_passes is not None else {}),
    )


def _multi_tenant_command(args: argparse.Namespace) -> str:
    """The command line that runs the same trace again (every argument that shapes it)."""
    return (
        "autoglm-rt bench-multi-tenant"
        + (" --quick" if args.quick else "")
        + f" --seed {args.seed} --memory {shlex.quote(args.memory)} --cores {args.cores!r}"
        + (f" --tenant-weight {args.tenant_weight}" if args.tenant_weight is not None else "")
        + (f" --request-passes {args.request_passes}" if args.request_passes is not None else "")
        + (f" --rounds {args.rounds}" if args.rounds != 1 else "")
    )


@command("bench-multi-tenant", _multi_tenant_args)
def _bench_multi_tenant(args: argparse.Namespace) -> int:
    """Real training tenants under live cgroup limits: static partitions vs. the dynamic policy."""
    import tempfile
    from pathlib import Path

    from autoglm_rt.benchmarking import machine_description
    from autoglm_rt.jobqueue.multi_tenant import format_comparison, run_comparison, write_timeline_png
    from autoglm_rt.policy.memory import available_cores

    try:
        workload = _multi_tenant_workload(args)
        cpus = available_cores()
        if workload.cores > cpus:
            # Quotas could never bind and utilisation (CPU-seconds / (cores x makespan)) would
            # count cores that do not exist.
            raise ValueError(f"--cores {workload.cores:g} is more than the {cpus} CPUs this process may use")
        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    except (TypeError, ValueError) as exc:
        print(f"autoglm-rt bench-multi-tenant: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="agrt-mt-") as tmp:
        doc = run_comparison(
            workload, args.work_dir or tmp, log=lambda line: print(line, flush=True), rounds=args.rounds
        )
    print(format_comparison(doc))
    if doc["enforcement"] == "none":
        return 1
    if args.png:
        write_timeline_png(doc, args.png)
        print(f"wrote {args.png}")
    if args.json:
        doc["machine"] = machine_description()
        doc["command"] = _multi_tenant_command(args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="*", help="suites (default: memory grad_stats topk; see benches/ratios_*.py)")
    p.add_argument("--all", action="store_true", help="every suite in benches/")
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    p.add_argument("--out", default="autoglm_rt_bench", help="where the JSON files go (default ./autoglm_rt_bench)")


KEY_SUITES = ("memory", "grad_stats", "topk")


@command("bench", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    """Runs the key benchmarks side by side with their baselines and prints the ratio table."""
    import importlib.util

    if args.device == "cuda":
        from autoglm_rt import cuda_available

        ok, reason = cuda_available(return_reason=True)
        if not ok:
            raise CliError(f"--device cuda: {reason}, run with --device cpu")
    runner = Path(__file__).resolve().parents[2] / "benches" / "run_ratios.py"
    if not runner.is_file():
        raise CliError(
            "the benchmark suites ship with the source, not the package, "
            "run 'pip install -e .' in a clone of the repository and rerun"
        )
    spec = importlib.util.spec_from_file_location("autoglm_rt_run_ratios", runner)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    suites = [] if args.all else (args.suite or list(KEY_SUITES))
    argv = [*suites, "--device", args.device, "--out", args.out] + ["--quick"] * args.quick + ["--json"] * args.json
    return int(module.main(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoglm-rt",
        description=USAGE_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true", help=f"show tracebacks instead of one-line errors (or {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0], description=fn.__doc__)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        configure(p)
        p.set_defaults(_run=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(args.debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print("autoglm-rt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"autoglm-rt: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """What went wrong and what to do, on one line."""
    import sqlite3

    if isinstance(exc, CliError):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}" if exc.strerror else str(exc)
    elif isinstance(exc, sqlite3.DatabaseError):
        text = f"database: {exc}, check the --state file or use another"
    elif isinstance(exc, UnicodeDecodeError):
        text = f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}), save it as UTF-8"
    elif isinstance(exc, ValueError | TypeError | LookupError | RuntimeError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc} (unexpected; rerun with --debug and report the traceback)"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
