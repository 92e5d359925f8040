"""DDP step time and bytes per step of communication hooks across a real, bandwidth-limited link.

    sudo PYTHONPATH=python .venv/bin/python benches/ddp_netns.py [--rates 1gbit 10gbit] [--steps 8]

Makes two network namespaces joined by a veth pair shaped with ``tc qdisc ... tbf`` in both
directions, runs rank 0 in one and rank 1 in the other (gloo over the veth addresses,
``GLOO_SOCKET_IFNAME`` set), and removes the namespaces afterwards, also on failure. On loopback
compression cannot pay; across a 1 Gbit/s link it must. Needs root (CAP_NET_ADMIN). The model is
communication-heavy: 4 x Linear(2048, 2048) (16.8 M parameters, 67 MB of float32 gradients),
batch 8. ``no_comm`` (a hook that sends nothing) measures the compute floor every hook sits on.
Writes ``benches/results/ddp_netns.json`` and prints a table.

``--train``: time to quality instead. Over the same shaped link, trains the demo's CharGPT at the
``quick`` preset's size with AdamW for each of ``TRAIN_HOOKS``: first dense allreduce for the
preset's steps, whose final validation loss is the target; then every other hook until it
reaches the target or ``--max-factor`` times the steps. Reports wall seconds (training only; the
evaluations every ``--eval-every`` steps are excluded) and bytes to the target. Writes
``benches/results/ddp_netns_train.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ADDR = ("10.231.77.1", "10.231.77.2")
HOOKS = (
    "no_comm",
    "allreduce",
    "fp16_compress",
    "torch_topk_1pct",
    "autoglm_topk_1pct",
    "autoglm_onebit",
    "powersgd_r1",
    "powersgd_r4",
)
TRAIN_HOOKS = ("allreduce", "fp16_compress", "powersgd_r1", "autoglm_update_1pct", "autoglm_onebit")


def time_to_target(trace: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation in ``trace`` (dicts with step, wall_s, bytes, val_loss, in step order)
    whose validation loss is at most ``target``; None when none is (or the target is not finite)."""
    if not math.isfinite(target):
        return None
    for point in trace:
        if math.isfinite(point["val_loss"]) and point["val_loss"] <= target:
            return point
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Link:
    """Two namespaces and a shaped veth pair; a context manager that always tears them down."""

    def __init__(self, rate: str) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"agrt_r0_{tag}", f"agrt_r1_{tag}")
        self.dev = (f"agv0_{tag}", f"agv1_{tag}")
        self.rate = rate

    def __enter__(self) -> Link:
        try:
            for ns in self.ns:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, addr in zip(self.ns, self.dev, ADDR, strict=True):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    self.rate,
                    "burst",
                    "1mb",
                    "latency",
                    "50ms",
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns:  # deleting a namespace deletes the veth end inside it
            sh("ip", "netns", "del", ns, check=False)


def run_pair(
    link: Link, hooks: tuple[str, ...], port: int, steps: int, timeout: float, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Runs the two ranks on ``hooks``; a pair that hangs is killed after ``timeout`` seconds and its
    unfinished hooks are reported as such."""
    out = HERE / "results" / f".ddp_netns_{link.rate}_{port}.json"
    procs = []
    for rank in range(2):
        env = dict(os.environ, GLOO_SOCKET_IFNAME=link.dev[rank], OMP_NUM_THREADS="1")
        cmd = [
            "ip",
            "netns",
            "exec",
            link.ns[rank],
            sys.executable,
            __file__,
            "--worker",
            "--rank",
            str(rank),
            "--port",
            str(port),
            "--steps",
            str(steps),
            "--out",
            str(out),
            *extra,
            "--hooks",
            *hooks,
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # a hung pair: the finally kills it and its hooks are reported as unfinished below
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    out.unlink(missing_ok=True)
    codes = [p.returncode for p in procs]
    why = f"worker exit codes {codes}" if all(c is not None and c > 0 for c in codes) else "killed or died"
    for hook in hooks:
        result.setdefault(hook, {"error": f"no result ({why}; limit {timeout:.0f} s); see the workers' stderr"})
    return result


# ---------------------------------------------------------------------------------------- worker
def worker(rank: int, port: int, steps: int, out: str, hooks: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    import autoglm_rt
    from autoglm_rt import ddp, onebit

    torch.set_num_threads(1)
    autoglm_rt.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{ADDR[0]}:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )

    sent = {"bytes": 0}
    originals = {
        name: getattr(dist, name)
        for name in ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather")
        if hasattr(dist, name)
    }

    def counting(name: str) -> Any:
        fn = originals[name]

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tensor = args[1] if name in ("all_gather_into_tensor", "all_gather_single", "all_gather") else args[0]
            sent["bytes"] += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)

        return wrapped

    for name in originals:
        setattr(dist, name, counting(name))

    def torch_topk_hook(state: dict[str, Any], bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        res = state.setdefault(bucket.index(), torch.zeros_like(buf))
        if res.numel() != buf.numel():
            res = state[bucket.index()] = torch.zeros_like(buf)
        res.add_(buf)
        k = max(1, buf.numel() // 100)
        idx = torch.topk(res.abs(), k, sorted=False).indices
        vals = res[idx]
        res[idx] = 0
        msg = torch.cat([vals, idx.to(torch.int32).view(torch.float32)])  # indices bit-cast, exact
        gathered = torch.empty(2 * msg.numel())
        fut = dist.all_gather_into_tensor(gathered, msg, async_op=True).get_future()

        def done(f: Any) -> torch.Tensor:
            f.wait()
            g = gathered.view(2, -1)
            buf.zero_()
            buf.index_add_(0, g[:, k:].contiguous().view(torch.int32).reshape(-1), g[:, :k].reshape(-1), alpha=0.5)
            return buf

        return fut.then(done)

    torch_topk_hook.__annotations__ = {
        "state": object,
        "bucket": dist.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }

    def no_comm_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Sends nothing: the step time of compute alone, the floor every hook sits on."""
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    hook_time = {"seconds": 0.0}

    def timed(fn: Any) -> Any:
        """The hook, timing its synchronous part (compression; not the collective's wait)."""

        def wrapped(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            t = time.perf_counter()
            fut = fn(state, bucket)
            hook_time["seconds"] += time.perf_counter() - t
            return fut

        wrapped.__annotations__ = {
            "state": object,
            "bucket": dist.GradBucket,
            "return": torch.futures.Future[torch.Tensor],
        }
        return wrapped

    results: dict[str, Any] = {}
    for hook in hooks:
        torch.manual_seed(0)
        # PowerSGD issues its second all_reduce from the first one's callback; with several buckets
        # those callbacks interleave with the next bucket's collectives in a different order on
        # each gloo rank (a size-mismatch abort), so it gets the whole model in one bucket.
        bucket_cap_mb = 128 if hook.startswith("powersgd") else 25
        model = DDP(nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]), bucket_cap_mb=bucket_cap_mb)
        warm = 3
        if hook == "no_comm":
            model.register_comm_hook(None, timed(no_comm_hook))
        elif hook == "allreduce":
            model.register_comm_hook(None, timed(default_hooks.allreduce_hook))
        elif hook == "fp16_compress":
            model.register_comm_hook(None, timed(default_hooks.fp16_compress_hook))
        elif hook.startswith("powersgd"):
            st = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=int(hook[-1]),
                start_powerSGD_iter=2,
                min_compression_rate=1,
            )
            model.register_comm_hook(st, timed(powerSGD_hook.powerSGD_hook))
        elif hook == "torch_topk_1pct":
            model.register_comm_hook({}, timed(torch_topk_hook))  # type: ignore[arg-type]
        elif hook == "autoglm_onebit":
            model.register_comm_hook(
                onebit.OneBitAdamState(onebit.OneBitAdam(start_iter=2)), timed(onebit.onebit_adam_hook)
            )
        else:
            state = ddp.TopKState(density=0.01, start_iter=2)
            model.register_comm_hook(state, timed(ddp.topk_hook))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(rank))
        times, step_bytes, hook_seconds = [], [], []
        try:
            for step in range(warm + steps):
                sent["bytes"] = 0
                hook_time["seconds"] = 0.0
                dist.barrier()
                t = time.perf_counter()
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
                dt = time.perf_counter() - t
                if step >= warm:
                    times.append(dt)
                    step_bytes.append(sent["bytes"])
                    hook_seconds.append(hook_time["seconds"])
            results[hook] = {
                "step_seconds_median": statistics.median(times),
                "step_seconds": times,
                "bytes_per_step": statistics.median(step_bytes),
                "hook_sync_seconds_median": statistics.median(hook_seconds),
            }
        except Exception as exc:  # a baseline that fails is reported, not fatal
            results[hook] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            dist.barrier()
        del model, opt
        if rank == 0:  # after every hook, so a later hang still leaves these figures
            Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def worker_train(rank: int, port: int, out: str, hooks: list[str], eval_every: int, max_factor: float) -> None:
    """Trains the demo model once per hook (dense allreduce first: its final loss is the target)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from autoglm_rt import ddp, onebit
    from autoglm_rt.demo.corpus import load_corpus
    from autoglm_rt.demo.model import CharGPT
    from autoglm_rt.demo.train import PRESETS, WEIGHT_DECAY, _batch_for, _evaluate, loss_fn

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{ADDR[0]}:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    cfg = PRESETS["quick"]
    corpus = load_corpus(cfg.corpus_chars)
    device = torch.device("cpu")
    sent = {"bytes": 0}
    for name in ("all_reduce", "all_gather_into_tensor", "all_gather_single"):
        if not hasattr(dist, name):
            continue
        original = getattr(dist, name)

        def counting(*args: Any, _fn: Any = original, _name: str = name, **kwargs: Any) -> Any:
            tensor = args[1] if _name != "all_reduce" else args[0]
            sent["bytes"] += tensor.numel() * tensor.element_size()
            return _fn(*args, **kwargs)

        setattr(dist, name, counting)
    results: dict[str, Any] = {}
    target = math.nan
    for hook in ["allreduce", *[h for h in hooks if h != "allreduce"]]:
        torch.manual_seed(cfg.seed)
        net = CharGPT(cfg.gpt())
        model = DDP(net, bucket_cap_mb=128 if hook.startswith("powersgd") else 25)
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        if hook == "allreduce":
            model.register_comm_hook(None, default_hooks.allreduce_hook)
        elif hook == "fp16_compress":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook == "powersgd_r1":
            st = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=5)
            model.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
        elif hook == "autoglm_onebit":  # the demo's setting: 1-bit Adam, 5 dense steps, SGD applies it
            model.register_comm_hook(onebit.OneBitAdamState(onebit.OneBitAdam(start_iter=5)), onebit.onebit_adam_hook)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        else:  # the top-k setting: AdamW's update, 1%, 5 dense steps, SGD applies it
            state = ddp.TopKState(density=0.01, start_iter=5, adam=ddp.AdamUpdate())
            model.register_comm_hook(state, ddp.topk_hook)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        max_steps = cfg.steps if hook == "allreduce" else int(cfg.steps * max_factor)
        trace: list[dict[str, float]] = []
        wall, total_bytes = 0.0, 0
        for step in range(max_steps):
            batch = _batch_for(corpus, cfg, rank, step, device)
            sent["bytes"] = 0
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()
            wall += time.perf_counter() - t
            total_bytes += sent["bytes"]
            if (step + 1) % eval_every == 0 or step + 1 == max_steps:
                val = _evaluate(net, corpus, cfg, device)  # the same on both ranks: no collective
                trace.append({"step": step + 1, "wall_s": wall, "bytes": total_bytes, "val_loss": val})
                if hook != "allreduce" and val <= target:
                    break
            dist.barrier()  # both ranks start each step together (the eval is outside the clock)
        if hook == "allreduce":
            target = trace[-1]["val_loss"]
        hit = time_to_target(trace, target)
        results[hook] = {"trace": trace, "target": target, "reached": hit}
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main_train(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"model": "demo CharGPT, quick preset, AdamW", "world_size": 2, "rates": {}}
    extra = ("--train", "--eval-every", str(args.eval_every), "--max-factor", str(args.max_factor))
    hooks = tuple(h for h in args.hooks if h in TRAIN_HOOKS) or TRAIN_HOOKS
    for rate in args.rates:
        with Link(rate) as link:
            rows = run_pair(link, hooks, 29_711, 0, args.timeout, extra)
        report["rates"][rate] = rows
        base = rows.get("allreduce", {}).get("reached") or {}
        fp16 = rows.get("fp16_compress", {}).get("reached") or {}
        print(f"\n== {rate} link: time to the dense run's final validation loss ==")
        print(f"{'hook':<22} {'target':>7} {'steps':>6} {'wall s':>8} {'MB':>9} {'vs allreduce':>13} {'vs fp16':>8}")
        for hook, r in rows.items():
            if "error" in r:
                print(f"{hook:<22} failed: {r['error']}")
                continue
            hit = r["reached"]
            if hit is None:
                last = r["trace"][-1]
                print(f"{hook:<22} {r['target']:7.4f} never (val {last['val_loss']:.4f} after {last['step']} steps, "
                      f"{last['wall_s']:.1f} s, {last['bytes'] / 1e6:.1f} MB)")  # fmt: skip
                continue
            vs_a = hit["wall_s"] / base["wall_s"] if base else math.nan
            vs_f = hit["wall_s"] / fp16["wall_s"] if fp16 else math.nan
            print(f"{hook:<22} {r['target']:7.4f} {hit['step']:6d} {hit['wall_s']:8.1f} {hit['bytes'] / 1e6:9.1f} "
                  f"{vs_a:12.2f}x {vs_f:7.2f}x")  # fmt: skip
    from autoglm_rt import benchmarking

    report["machine"] = benchmarking.machine_description()
    path = HERE / "results" / "ddp_netns_train.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29_611, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--hooks", nargs="+", default=None, choices=HOOKS + TRAIN_HOOKS, help="hooks to measure")
    ap.add_argument("--train", action="store_true", help="time to quality on the demo model (see above)")
    ap.add_argument("--eval-every", type=int, default=10, help="--train: steps between evaluations")
    ap.add_argument("--max-factor", type=float, default=2.0, help="--train: step limit, times the dense run's")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per hook (after 3 warm-up steps)")
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"], help="tc tbf rates of the link")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a pair of workers is killed")
    args = ap.parse_args()
    if args.hooks is None:
        args.hooks = list(TRAIN_HOOKS if args.train else HOOKS)
    if args.worker:
        if args.train:
            worker_train(args.rank, args.port, args.out, args.hooks, args.eval_every, args.max_factor)
        else:
            worker(args.rank, args.port, args.steps, args.out, args.hooks)
        return 0
    if os.geteuid() != 0:
        print("ddp_netns.py needs root (ip netns, tc); run it with sudo", file=sys.stderr)
        return 2
    if args.train:
        return main_train(args)
    report: dict[str, Any] = {"model": "4 x Linear(2048, 2048), batch 8, SGD", "world_size": 2, "rates": {}}
    for rate in args.rates:
        # PowerSGD runs in pairs of its own: on gloo it has failed or hung, which must not cost
        # the other hooks their figures.
        groups = [tuple(h for h in args.hooks if not h.startswith("powersgd"))]
        groups += [(h,) for h in args.hooks if h.startswith("powersgd")]
        rows: dict[str, Any] = {}
        with Link(rate) as link:
            for i, group in enumerate(g for g in groups if g):
                limit = args.timeout if not group[0].startswith("powersgd") else min(args.timeout, 150.0)
                rows.update(run_pair(link, group, 29_611 + i, args.steps, limit))
        report["rates"][rate] = rows
        base = rows.get("allreduce", {})
        fp16 = rows.get("fp16_compress", {})
        print(f"\n== {rate} link, 2 gloo ranks in separate namespaces ==")
        print(f"{'hook':<20} {'step (median)':>14} {'bytes/step':>12} {'vs allreduce bytes':>19} {'vs fp16 time':>13}")
        for hook, r in rows.items():
            if "error" in r:
                print(f"{hook:<20} failed: {r['error']}")
                continue
            fewer = base.get("bytes_per_step", 0) / r["bytes_per_step"] if r["bytes_per_step"] else float("nan")
            rel = r["step_seconds_median"] / fp16["step_seconds_median"] if "step_seconds_median" in fp16 else 0.0
            print(
                f"{hook:<20} {r['step_seconds_median'] * 1e3:11.1f} ms {r['bytes_per_step'] / 1e6:9.2f} MB "
                f"{fewer:18.1f}x {rel:12.2f}x"
            )
    from autoglm_rt import benchmarking

    report["machine"] = benchmarking.machine_description()
    path = HERE / "results" / "ddp_netns.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
