"""Density-vs-validation-loss sweep on the demo's model and data (2 gloo ranks, CPU).

Trains the demo's CharGPT at a preset's size (``--preset quick``: 150 steps) with dense allreduce
and with the top-k hook under several settings, for AdamW (the demo's optimizer; "update" runs
compress AdamW's preconditioned update with ``ddp.AdamUpdate`` and step SGD) and SGD with
momentum, and prints one row per run: validation loss, its ratio to the same optimizer's dense
run, and the compression ratio (dense bytes / bytes sent). Every run sees the same batches.

    PYTHONPATH=python python benches/compression_sweep.py --preset quick [--only "adamw dense,update"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt import ddp
from autoglm_rt.demo.corpus import load_corpus
from autoglm_rt.demo.model import CharGPT
from autoglm_rt.demo.train import PRESETS, DemoConfig, _batch_for, _evaluate, free_port, loss_fn
from autoglm_rt.policy.compression import DensityController, DensityControllerConfig

# name -> (optimizer, hook settings or None for dense). Optimizer "sgdm": SGD momentum 0.9 in the
# optimizer (dense, plain top-k) or in the hook (momentum correction, optimizer without momentum).
RUNS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "adamw dense": ("adamw", None),
    "adamw topk 1% (demo today)": ("adamw", {"density": 0.01, "start_iter": 5, "warmup": 20}),
    "adamw topk 2%": ("adamw", {"density": 0.02, "start_iter": 5, "warmup": 20}),
    "adamw topk 5%": ("adamw", {"density": 0.05, "start_iter": 5, "warmup": 20}),
    "adamw regime 0.5-5%": ("adamw", {"controller": (0.005, 0.05), "start_iter": 5}),
    "adamw regime 1-10%": ("adamw", {"controller": (0.01, 0.1), "start_iter": 5}),
    "adamw topk 1% + hook momentum": ("adamw", {"density": 0.01, "start_iter": 5, "warmup": 20, "momentum": 0.9}),
    "sgdm dense": ("sgdm", None),
    "sgdm topk 1% (no correction)": ("sgdm", {"density": 0.01, "start_iter": 5, "warmup": 20}),
    "sgdm dgc 1%": ("sgdm", {"density": 0.01, "start_iter": 5, "warmup": 20, "momentum": 0.9}),
    "sgdm dgc 0.5%": ("sgdm", {"density": 0.005, "start_iter": 5, "warmup": 20, "momentum": 0.9}),
    "sgdm dgc regime 0.5-5%": ("sgdm", {"controller": (0.005, 0.05), "start_iter": 5, "momentum": 0.9}),
    "adamw regime 0.5-10% eta .15": ("adamw", {"controller": (0.005, 0.1, 0.15), "start_iter": 5}),
    "sgdm dgc regime 0.5-5% eta .15": ("sgdm", {"controller": (0.005, 0.05, 0.15), "start_iter": 5, "momentum": 0.9}),
    # AdamW's update compressed (ddp.AdamUpdate; the optimizer is SGD with AdamW's lr and decay).
    "adamw update 1% frozen": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {}}),
    "adamw update 1% local": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"variance": "local"}}),
    "adamw update 0.5% frozen": ("adamw", {"density": 0.005, "start_iter": 5, "adam": {}}),
    "adamw update 2% frozen": ("adamw", {"density": 0.02, "start_iter": 5, "adam": {}}),
    "adamw update 5% frozen": ("adamw", {"density": 0.05, "start_iter": 5, "adam": {}}),
    "adamw update 10% frozen": ("adamw", {"density": 0.1, "start_iter": 5, "adam": {}}),
    "adamw update 1% nomask": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"masking": False}}),
    "adamw update 1% global m": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"momentum": "global"}}),
    "adamw update 5% global m": ("adamw", {"density": 0.05, "start_iter": 5, "adam": {"momentum": "global"}}),
    "adamw update 0.5% global m": ("adamw", {"density": 0.005, "start_iter": 5, "adam": {"momentum": "global"}}),
    # Isolates freezing v: every entry sent every step (exact), so only the frozen v differs.
    "adamw update 100% global m (frozen v only)": (
        "adamw",
        {"density": 1.0, "start_iter": 5, "adam": {"momentum": "global"}},
    ),
    "adamw update regime 0.5-5%": ("adamw", {"controller": (0.005, 0.05), "start_iter": 5, "adam": {}}),
    "adamw onebit prototype, 5 fp16 dense": ("adamw", {"onebit": {}}),
    "adamw onebit prototype, 5 fp32 dense": ("adamw", {"onebit": {"fp16_start": False}}),
    "adamw onebit prototype, v refreshed": ("adamw", {"onebit": {"refresh": True}}),
    "adamw onebit prototype, v refreshed at 20, 80, 320": ("adamw", {"onebit": {"refresh": True, "refresh_first": 20}}),
    "adamw onebit prototype, int8 dense, v refreshed": ("adamw", {"onebit": {"refresh": True, "dense_bits": 8}}),
    "adamw onebit prototype, chunk 256": ("adamw", {"onebit": {"chunk": 256}}),
    "adamw onebit prototype, chunk 64": ("adamw", {"onebit": {"chunk": 64}}),
    "adamw update 1% frozen, 10 dense": ("adamw", {"density": 0.01, "start_iter": 10, "adam": {}}),
    "adamw update 1% frozen, 20 dense": ("adamw", {"density": 0.01, "start_iter": 20, "adam": {}}),
    "adamw update 1% beta1 0": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"beta1": 0.0}}),
    "adamw update 1% beta1 .5": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {"beta1": 0.5}}),
    "adamw update 1% lr x1.5": ("adamw", {"density": 0.01, "start_iter": 5, "adam": {}, "lr_scale": 1.5}),
    "adamw update 1% frozen fp16": (
        "adamw",
        {"density": 0.01, "start_iter": 5, "adam": {}, "value_dtype": "fp16"},
    ),
}
SGD_LR = 0.5


class OneBitPrototype:
    """A sweep-only prototype (not in the package): 1-bit Adam-style compression in the space of
    ``ddp.AdamUpdate``. ``start_iter`` dense steps are exact AdamW (sent as ``dense_bits``: 16 or
    8 when ``fp16_start``, else 32); then v is frozen (or, with ``refresh``, updated by dense steps
    at ``refresh_first`` and its doublings), each rank preconditions its gradient, keeps the momentum
    ``u = beta1 u + (1 - beta1) p`` started from the synced one, and sends ``sign(u + e)`` times
    the mean |u + e| of each chunk of ``chunk`` entries (error feedback ``e``); the average of the
    ranks' messages becomes the synced momentum and the delivered update is it over
    ``1 - beta1^t``. Sent bits are counted as a real implementation would send them (1 bit per
    entry plus one float32 scale per chunk); the prototype itself all-reduces float32."""

    def __init__(
        self,
        start_iter: int = 5,
        chunk: int = 2048,
        fp16_start: bool = True,
        refresh: bool = False,
        refresh_first: int = 0,
        dense_bits: int = 16,
    ) -> None:
        self.start_iter, self.chunk, self.fp16_start, self.refresh = start_iter, chunk, fp16_start, refresh
        self.refresh_first = refresh_first or 2 * start_iter  # then every x2 (x4 with refresh_first set)
        self.dense_wire_bits = dense_bits if fp16_start else 32
        self.v_at: dict[int, int] = {}  # the iteration v was last updated at
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.u: dict[int, torch.Tensor] = {}
        self.e: dict[int, torch.Tensor] = {}
        self.t: dict[int, int] = {}
        self.sent_bits = 0.0
        self.dense_bits = 0.0
        self.controller = None
        self.adam = True

    def _dense_average(self, mine: torch.Tensor) -> torch.Tensor:
        """The ranks' sum of ``mine`` sent dense: float32, float16, or int8 with one float32 scale
        per chunk (absmax / 127; simulated: the dequantized values are all-reduced)."""
        bits = self.dense_wire_bits
        if bits == 32:
            send = mine.clone()
        elif bits == 16:
            send = mine.half()
        else:
            send = torch.empty_like(mine)
            for a in range(0, mine.numel(), self.chunk):
                c = mine[a : a + self.chunk]
                scale = c.abs().max().clamp_min(1e-30) / 127
                send[a : a + c.numel()] = torch.round(c / scale) * scale
            self.sent_bits += 32.0 * ((mine.numel() + self.chunk - 1) // self.chunk)
        dist.all_reduce(send)
        self.sent_bits += float(bits) * mine.numel()
        return send.float()

    def _is_refresh(self, t: int) -> bool:
        """v is refreshed at refresh_first, then x2 each time (x4 when refresh_first was given)."""
        if t < self.refresh_first:
            return False
        q, r = divmod(t, self.refresh_first)
        if r:
            return False
        if self.refresh_first != 2 * self.start_iter:
            while q % 4 == 0:
                q //= 4
            return q == 1
        return q & (q - 1) == 0

    def _denom(self, pid: int) -> torch.Tensor:
        v = self.v[pid] / (1 - self.beta2 ** (self.v_at[pid] + 1))
        if (v == 0).any():  # never saw a gradient: the parameter's mean v (as AdamUpdate)
            v = torch.where(v == 0, v.mean(), v)
        return v.sqrt() + self.eps

    @property
    def compression_ratio(self) -> float:
        return self.dense_bits / self.sent_bits if self.sent_bits else 1.0

    def hook(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        world = dist.get_world_size()
        out = torch.empty_like(buf)
        slices, off = [], 0
        for p in bucket.parameters():
            slices.append((id(p), slice(off, off + p.numel())))
            off += p.numel()
        t = self.t.get(slices[0][0], 0)
        self.dense_bits += 32.0 * buf.numel()
        b1, b2 = self.beta1, self.beta2
        if self.refresh and t >= self.start_iter and self._is_refresh(t):
            # A dense fp16 step refreshes v (0/1 Adam's idea): the gap since the last update is
            # folded in as if every step in it had this gradient; u and e move to the new scale.
            g = self._dense_average(buf / world)
            for pid, sl in slices:
                gi = g[sl]
                gap = t - self.v_at[pid]
                old = self._denom(pid)
                keep = b2**gap
                self.v[pid].mul_(keep).addcmul_(gi, gi, value=1 - keep)
                self.v_at[pid] = t
                new = self._denom(pid)
                self.u[pid] = self.u[pid] * old / new * b1 + gi / new * (1 - b1)
                self.e[pid] = self.e[pid] * old / new
                out[sl] = self.u[pid] / (1 - b1 ** (t + 1))
        elif t < self.start_iter:
            g = self._dense_average(buf / world)
            for pid, sl in slices:
                gi = g[sl]
                m = self.m.setdefault(pid, torch.zeros_like(gi)).mul_(b1).add_(gi, alpha=1 - b1)
                v = self.v.setdefault(pid, torch.zeros_like(gi)).mul_(b2).addcmul_(gi, gi, value=1 - b2)
                denom = (v / (1 - b2 ** (t + 1))).sqrt_().add_(self.eps)
                out[sl] = m / (1 - b1 ** (t + 1)) / denom
                self.u[pid] = m / denom  # the momentum in the preconditioned space, uncorrected
                self.e[pid] = torch.zeros_like(gi)
                self.v_at[pid] = t
        else:
            comp = torch.empty_like(buf)
            for pid, sl in slices:
                p_local = buf[sl] / self._denom(pid)
                comp[sl] = self.u[pid] * b1 + p_local * (1 - b1) + self.e[pid]
            msg = torch.empty_like(comp)
            nchunks = 0
            for _, sl in slices:
                for a in range(sl.start, sl.stop, self.chunk):
                    c = comp[a : min(sl.stop, a + self.chunk)]
                    msg[a : a + c.numel()] = torch.sign(c) * c.abs().mean()
                    nchunks += 1
            for pid, sl in slices:
                self.e[pid] = comp[sl] - msg[sl]
            dist.all_reduce(msg)
            msg /= world
            self.sent_bits += 1.0 * buf.numel() + 32.0 * nchunks
            for pid, sl in slices:
                self.u[pid] = msg[sl].clone()
                out[sl] = msg[sl] / (1 - b1 ** (t + 1))
        for pid, _ in slices:
            self.t[pid] = t + 1
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(out)
        return fut


def _state(settings: dict[str, Any]) -> ddp.TopKState:
    s = dict(settings)
    bounds = s.pop("controller", None)
    if "adam" in s:
        s["adam"] = ddp.AdamUpdate(**s["adam"])
    if s.get("value_dtype") == "fp16":
        s["value_dtype"] = torch.float16
    if bounds is not None:
        threshold = bounds[2] if len(bounds) > 2 else 0.5
        s["controller"] = DensityController(
            DensityControllerConfig(floor=bounds[0], ceiling=bounds[1], interval=10, threshold=threshold)
        )
    return ddp.TopKState(**s)


def _worker(rank: int, port: int, cfg: DemoConfig, names: list[str], out: Any) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=300)
    )
    corpus = load_corpus(cfg.corpus_chars)
    device = torch.device("cpu")
    for name in names:
        opt_name, settings = RUNS[name]
        torch.manual_seed(cfg.seed)
        net = CharGPT(cfg.gpt())
        model = DDP(net)
        state = None
        if settings is None:
            model.register_comm_hook(None, allreduce_hook)
        elif "onebit" in settings:
            state = OneBitPrototype(**settings["onebit"])  # type: ignore[assignment]
            # A lambda: DDP refuses a hook whose bucket annotation is not dist.GradBucket itself.
            model.register_comm_hook(state, lambda st, bucket: st.hook(bucket))
        else:
            state = _state({k: v for k, v in settings.items() if k != "lr_scale"})
            model.register_comm_hook(state, ddp.topk_hook)
        if state is not None and state.adam is not None:
            # The hook delivers AdamW's direction: SGD's L2 term on it is AdamW's decoupled decay.
            lr = cfg.lr * settings.get("lr_scale", 1.0)
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.01)
        elif opt_name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        else:
            in_hook = settings is not None and settings.get("momentum", 0) > 0
            opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=0.0 if in_hook else 0.9)
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            batch = _batch_for(corpus, cfg, rank, step, device)
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()
        wall = time.perf_counter() - t0
        val = _evaluate(net, corpus, cfg, device)
        if rank == 0:
            out.put(
                {
                    "run": name,
                    "val_loss": val,
                    "ratio": state.compression_ratio if state else 1.0,
                    "critical_windows": state.controller.critical_windows_seen if state and state.controller else None,
                    "wall_s": wall,
                }
            )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--only", default="", help="comma-separated substrings of the run names to keep")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--seed", type=int, default=None, help="DemoConfig.seed (default: the preset's)")
    args = p.parse_args()
    cfg = PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    names = [n for n in RUNS if any(part in n for part in args.only.split(","))]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, cfg, names, q)) for r in range(2)]
    for proc in procs:
        proc.start()
    rows = []
    dense: dict[str, float] = {}
    print(f"preset {args.preset}: {cfg.steps} steps, batch {cfg.batch}x{cfg.block}, load {os.getloadavg()[0]:.1f}")
    print(f"{'run':34s} {'val_loss':>9s} {'vs dense':>9s} {'bytes x':>8s} {'crit':>5s} {'wall s':>7s}")
    for _ in names:
        row = q.get(timeout=3600)
        opt_name = RUNS[row["run"]][0]
        if RUNS[row["run"]][1] is None:
            dense[opt_name] = row["val_loss"]
        base = dense.get(opt_name)
        row["vs_dense"] = row["val_loss"] / base if base else None
        rows.append(row)
        vs = f"{row['vs_dense']:.3f}" if row["vs_dense"] else "-"
        crit = "-" if row["critical_windows"] is None else str(row["critical_windows"])
        print(f"{row['run']:34s} {row['val_loss']:9.4f} {vs:>9s} {row['ratio']:8.1f} {crit:>5s} {row['wall_s']:7.1f}")
        sys.stdout.flush()
    for proc in procs:
        proc.join()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
