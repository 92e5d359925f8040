"""1-bit Adam as a DDP communication hook: every entry every step, one bit each.

    state = autoglm_rt.onebit.OneBitAdamState(autoglm_rt.onebit.OneBitAdam())
    model.register_comm_hook(state, autoglm_rt.onebit.onebit_adam_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)  # no momentum

The hook delivers AdamW's step direction, so the optimizer is plain SGD; its L2 term on a
momentum-free step equals AdamW's decoupled decay. After 1-bit Adam (Tang et al., ICML 2021) and
0/1 Adam (Lu et al., ICLR 2023):

- **Dense steps** (the first ``start_iter`` and the refreshes) average the gradient (int8 with one
  float32 scale per chunk, or float32) and run exact AdamW on the average, whose moments ``m``, ``v``
  live in the hook, identical on every rank.
- **Sign steps** (all others): each rank preconditions its own gradient by the last dense step's
  denominator, ``p = g / (sqrt(v_hat) + eps)``, forms ``c = beta1 u + (1 - beta1) p + e`` from
  the synced momentum ``u`` and its error feedback ``e``, and sends ``sign(c)`` with the mean
  ``|c|`` of each chunk (``autoglm_rt.ops.onebit_adam_compress``, one pass over g: 1 bit per
  entry plus one float32 per chunk) in one fixed-size ``all_gather``. The ranks' average
  (``onebit_adam_decompress``, decoded in rank order, so it is bit-identical everywhere) becomes
  ``u``; the delivered step is ``u / (1 - beta1^t)``.
- **v is refreshed** at dense steps ``refresh_first``, then at its doublings: the gap since the
  last update is folded in as if each step in it had this gradient,
  ``v = beta2^gap v + (1 - beta2^gap) g^2``, and ``u`` and ``e`` are rescaled to the new
  denominator. Frozen ``v`` alone cost 2.8% validation loss on the demo (docs/compression.md).

Every message has the same size on every rank for a given bucket and iteration, so no rank waits
for a message that never comes.
"""

# No `from __future__ import annotations` here: DDP.register_comm_hook inspects the hook's
# annotations and wants the real dist.GradBucket and torch.futures.Future[torch.Tensor] objects.
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autoglm_rt.bucket_tables import BucketEntry, BucketTables, table_from, table_state
from autoglm_rt.hook_support import (
    SKETCH_SIZE,
    IterationNorms,
    all_gather,
    check_adam_hyperparameters,
    fill_unmeasured,
    sketch_indices,
    sq_norm,
)
from autoglm_rt.ops.onebit import onebit_adam_compress, onebit_adam_decompress, sign_message_sizes

__all__ = ["OneBitAdam", "OneBitAdamState", "onebit_adam_hook"]

_COUNTERS = ("bytes_sent", "dense_bytes", "compressed_buckets", "dense_buckets", "residual_resets")
_TABLES = ("m", "v", "denom", "u", "e")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class OneBitAdam:
    """Settings of :func:`onebit_adam_hook`.

    start_iter: dense AdamW steps first (>= 1: they measure ``v``).
    refresh_first: the first dense step after the start that refreshes ``v``; then every doubling
        of it (10, 20, 40, ...). None: ``2 * start_iter``; 0: ``v`` stays frozen after the start.
    chunk: entries per scale in sign and int8 messages (>= 1).
    dense_bits: 8 (int8 with a float32 scale per chunk, gathered) or 32 (float32 all-reduce).
    beta1, beta2, eps: AdamW's."""

    start_iter: int = 5
    refresh_first: int | None = None
    chunk: int = 2048
    dense_bits: int = 8
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_int("start_iter", self.start_iter, 1)
        _check_int("chunk", self.chunk, 1)
        if self.refresh_first is not None:
            _check_int("refresh_first", self.refresh_first, 0)
            if 0 < self.refresh_first < self.start_iter:
                raise ValueError(
                    f"refresh_first: expected 0 or >= start_iter ({self.start_iter}), got {self.refresh_first}"
                )
        if isinstance(self.dense_bits, bool) or self.dense_bits not in (8, 32):
            raise ValueError(f"dense_bits: expected 8 or 32, got {self.dense_bits!r}")
        check_adam_hyperparameters(self.beta1, self.beta2, self.eps)

    @property
    def first_refresh(self) -> int:
        return 2 * self.start_iter if self.refresh_first is None else self.refresh_first

    def is_dense(self, iteration: int) -> bool:
        """Whether ``iteration`` (0-based) is a dense step: the start, or a refresh of ``v``."""
        if iteration < self.start_iter:
            return True
        first = self.first_refresh
        if first == 0 or iteration < first or iteration % first:
            return False
        q = iteration // first
        return q & (q - 1) == 0


class OneBitAdamState:
    """Configuration, per-bucket AdamW state and counters of :func:`onebit_adam_hook`.

    Per bucket (flat, keyed by bucket index and carried over DDP's bucket rebuilds by parameter,
    see :mod:`autoglm_rt.bucket_tables`): ``m`` (the dense start's first moment; dropped after
    it), ``v``, ``denom`` (``sqrt(v_hat) + eps`` of the last dense step, with entries the dense
    steps never saw filled from their parameter's mean ``v``), ``u`` and ``e``. A bucket whose
    gradient holds NaN or Inf on any rank is delivered non-finite (so the optimizer or a
    GradScaler sees it and can skip the step). A dense step then keeps ``m``, ``v``, ``denom``
    and ``u``; a sign step keeps ``u`` where the decoded average is non-finite (the offending
    rank's chunks) and updates it elsewhere, and the offending rank clears its error feedback
    ``e`` (counted in ``nonfinite_resets``)."""

    def __init__(self, config: OneBitAdam | None = None, process_group: dist.ProcessGroup | None = None) -> None:
        if config is None:
            config = OneBitAdam()
        if not isinstance(config, OneBitAdam):
            raise TypeError(f"config: expected a OneBitAdam or None, got {type(config).__name__}")
        self.config = config
        self.process_group = process_group
        self.iter = 0
        self._last_dense = -1  # the last iteration that updated v
        self._tables = BucketTables()
        self._state: dict[str, dict[int, BucketEntry]] = {name: {} for name in _TABLES}
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.compressed_buckets = 0
        self.dense_buckets = 0
        self.residual_resets = 0
        self.nonfinite_resets = 0
        self._norms = IterationNorms()
        self._in_iteration = False

    # -- counters -------------------------------------------------------------------------------
    @property
    def compression_ratio(self) -> float:
        """Dense float32 bytes over bytes passed to collectives, since construction (1.0 before
        anything was sent); the same definition as ``TopKState.compression_ratio``."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0

    def metrics(self) -> dict[str, float]:
        """The counters under ``TopKState.metrics``' names; ``density`` is 1.0 (every entry is
        sent every step, as one bit on sign steps)."""
        return {
            "bytes_sent": float(self.bytes_sent),
            "dense_bytes": float(self.dense_bytes),
            "ratio": self.compression_ratio,
            "density": 1.0,
            "compressed_buckets": float(self.compressed_buckets),
            "dense_buckets": float(self.dense_buckets),
            "residual_resets": float(self.residual_resets),
            "nonfinite_resets": float(self.nonfinite_resets),
            "iterations": float(self.iter),
        }

    def norms(self) -> dict[str, float] | None:
        """Squared gradient norms of the last finished iteration, summed over its buckets, as
        ``TopKState.norms``: ``local_sq_norm``, ``mean_local_sq_norm`` (exact) and
        ``global_sq_norm`` (exact on dense steps; on sign steps estimated from ``SKETCH_SIZE``
        raw gradient entries per bucket, since what is delivered is an update), ``world_size``."""
        return self._norms.summary(self.iter - 1, self._group().size())

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-exactly (tensors cloned). Take it between
        iterations, not during a backward pass."""
        if self._in_iteration:
            raise RuntimeError("state_dict: called during an iteration; take it between optimizer steps")
        return {
            "iteration": self.iter,
            "last_dense": self._last_dense,
            "tables": {name: table_state(t) for name, t in self._state.items()},
            "counters": {name: int(getattr(self, name)) for name in (*_COUNTERS, "nonfinite_resets")},
            "last_norms": self._norms.state(self.iter - 1),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output (on a state built with the same config)."""
        expected = {"iteration", "last_dense", "tables", "counters", "last_norms"}
        if not isinstance(sd, dict) or set(sd) != expected:
            got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"state dict: expected keys {sorted(expected)}, got {got}")
        if not isinstance(sd["tables"], dict) or set(sd["tables"]) != set(_TABLES):
            raise ValueError(f"state dict: expected tables {sorted(_TABLES)}")
        try:
            state = {name: table_from(sd["tables"][name]) for name in _TABLES}
            counters = {name: int(sd["counters"][name]) for name in (*_COUNTERS, "nonfinite_resets")}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"state dict: malformed tables or counters ({type(exc).__name__}: {exc})") from None
        self.iter = int(sd["iteration"])
        self._last_dense = int(sd["last_dense"])
        self._state = state
        self._tables.end_iteration()
        for name, value in counters.items():
            setattr(self, name, value)
        self._norms.load(self.iter - 1, sd["last_norms"])
        self._in_iteration = False

    # -- internals ------------------------------------------------------------------------------
    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD  # type: ignore[return-value]

    def _table(self, name: str, bucket: dist.GradBucket, buffer: torch.Tensor) -> torch.Tensor:
        tensor, lost = self._tables.buffer_for(self._state[name], bucket, buffer)
        if lost and name == "e":
            self.residual_resets += 1
        return tensor

    def _norm_lists(self) -> dict[str, list[torch.Tensor]]:
        return self._norms.lists(self.iter)

    def _finish_bucket(self, bucket: dist.GradBucket) -> None:
        self._in_iteration = True
        if bucket.is_last():
            if self.config.is_dense(self.iter):
                self._last_dense = self.iter
            self.iter += 1
            if self.iter == self.config.start_iter:
                self._state["m"].clear()  # only the start needs it (u carries the momentum on)
            self._in_iteration = False
            self._tables.end_iteration()


def _denominator(v: torch.Tensor, sizes: list[int], t: int, cfg: OneBitAdam) -> torch.Tensor:
    """``sqrt(v / (1 - beta2^t)) + eps`` with entries never measured filled from their parameter."""
    filled = v.clone()
    fill_unmeasured(filled, sizes)
    return filled.div_(1 - cfg.beta2**t).sqrt_().add_(cfg.eps)


def _keep_if(ok: torch.Tensor, target: torch.Tensor, new: torch.Tensor) -> None:
    """``target = new`` where the 0-dim bool ``ok`` is set (no host wait on a GPU)."""
    if ok.device.type == "cpu":
        if bool(ok):
            target.copy_(new)
    else:
        target.copy_(torch.where(ok, new, target))


def _chunk_ids(sizes: list[int], chunk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Each entry's chunk, with chunks restarting at every parameter (so a parameter's chunks do
    not depend on which bucket holds it, or where); and the number of chunks."""
    ids, base = [], 0
    for size in sizes:
        ids.append(torch.arange(size, device=device) // chunk + base)
        base += -(-size // chunk)
    return torch.cat(ids), base


def _quantize_int8(g: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> None:
    """``q = round(g / s)`` with ``s = max|g| / 127`` per chunk (written to ``scales``). A chunk
    holding NaN or Inf gets a NaN scale, so it decodes as NaN."""
    scales.zero_().scatter_reduce_(0, ids, g.abs(), "amax")
    scales.div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
    bad = torch.zeros_like(scales).index_add_(0, ids, (~torch.isfinite(g)).float())
    scales.masked_fill_(bad > 0, float("nan"))
    q.copy_((g / scales[ids]).round_().nan_to_num_(0.0))


def _dequantize_mean(q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out = (1/W) sum_r q_r s_r`` over the W gathered rows, summed in rank order."""
    out.zero_()
    for r in range(q.shape[0]):
        out.addcmul_(q[r].float(), scales[r][ids])
    out.div_(q.shape[0])


def _field(rows: torch.Tensor, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``a:b`` of every gathered row as a fresh [W, ...] tensor of ``dtype``."""
    return rows[:, a:b].clone(memory_format=torch.contiguous_format).view(dtype)


def _dense_step(
    state: OneBitAdamState, bucket: dist.GradBucket, buffer: torch.Tensor, iteration: int
) -> torch.futures.Future[torch.Tensor]:
    cfg = state.config
    group = state._group()
    world = group.size()
    n = buffer.numel()
    norms = state._norm_lists()
    local_sq = sq_norm(buffer).reshape(1)
    norms["local_sq_norm"].append(local_sq.clone())
    start = iteration < cfg.start_iter
    gap = iteration - state._last_dense
    m = state._table("m", bucket, buffer) if start else None
    v = state._table("v", bucket, buffer)
    denom = state._table("denom", bucket, buffer)
    u = state._table("u", bucket, buffer)
    e = state._table("e", bucket, buffer)
    sizes = [math.prod(p.shape) for p in bucket.parameters()]
    if sum(sizes) != n:  # not DDP's bucket of these parameters: one segment
        sizes = [n]
    state.dense_buckets += 1

    if cfg.dense_bits == 32:
        message = buffer.div_(world)
        state.bytes_sent += message.numel() * 4 + 8
        norm_fut = dist.all_reduce(local_sq, group=group, async_op=True).get_future()
        fut = dist.all_reduce(message, group=group, async_op=True).get_future()

        def average() -> tuple[torch.Tensor, torch.Tensor]:
            norm_fut.wait()
            return buffer, local_sq / world
    else:
        ids, nc = _chunk_ids(sizes, cfg.chunk, buffer.device)
        size = 8 + 4 * nc + n
        message = torch.empty(size, dtype=torch.uint8, device=buffer.device)
        message[:8].view(torch.float64).copy_(local_sq)
        scales = message[8 : 8 + 4 * nc].view(torch.float32)
        _quantize_int8(buffer, ids, scales, message[8 + 4 * nc :].view(torch.int8))
        gathered = torch.empty(world * size, dtype=torch.uint8, device=buffer.device)
        state.bytes_sent += size
        fut = all_gather(gathered, message, group).get_future()

        def average() -> tuple[torch.Tensor, torch.Tensor]:
            rows = gathered.view(world, size)
            scales = _field(rows, 8, 8 + 4 * nc, torch.float32)
            _dequantize_mean(_field(rows, 8 + 4 * nc, size, torch.int8), scales, ids, buffer)
            return buffer, _field(rows, 0, 8, torch.float64).sum().reshape(1) / world

    def done(f: torch.futures.Future[Any]) -> torch.Tensor:
        f.wait()
        g, mean_local = average()
        norms["mean_local_sq_norm"].append(mean_local)
        norms["global_sq_norm"].append(sq_norm(g).reshape(1))
        ok = torch.isfinite(g).all()
        b1, b2 = cfg.beta1, cfg.beta2
        if m is not None:  # the start: exact AdamW on the average
            t = iteration + 1
            new_m = m.mul(b1).add_(g, alpha=1 - b1)
            new_v = v.mul(b2).addcmul_(g, g, value=1 - b2)
            new_denom = _denominator(new_v, sizes, t, cfg)
            new_u = new_m / new_denom
            _keep_if(ok, m, new_m)
            delivered = new_u / (1 - b1**t)
        else:  # a refresh: fold the gap into v, move u and e to the new denominator
            keep = b2**gap
            new_v = v.mul(keep).addcmul_(g, g, value=1 - keep)
            new_denom = _denominator(new_v, sizes, iteration + 1, cfg)
            new_u = (u * denom).div_(new_denom).mul_(b1).add_(g.div(new_denom), alpha=1 - b1)
            _keep_if(ok, e, e * denom / new_denom)
            delivered = new_u / (1 - b1 ** (iteration + 1))
        _keep_if(ok, v, new_v)
        _keep_if(ok, denom, new_denom)
        _keep_if(ok, u, new_u)
        if start:
            e.zero_()
        return buffer.copy_(delivered)

    return fut.then(done)


def _sign_step(
    state: OneBitAdamState, bucket: dist.GradBucket, buffer: torch.Tensor, iteration: int
) -> torch.futures.Future[torch.Tensor]:
    cfg = state.config
    group = state._group()
    world = group.size()
    n = buffer.numel()
    norms = state._norm_lists()
    denom = state._table("denom", bucket, buffer)
    u = state._table("u", bucket, buffer)
    e = state._table("e", bucket, buffer)
    # Chunks restart at every parameter, so what each entry sends does not depend on the bucket
    # layout (DDP's first iteration, a resumed run). Per parameter: (offset, size, scales' offset,
    # chunks, bits' offset, bytes).
    layout, nc, nbytes, at = [], 0, 0, 0
    for p in bucket.parameters():
        size_p = math.prod(p.shape)
        bytes_p, chunks_p = sign_message_sizes(size_p, cfg.chunk)
        layout.append((at, size_p, nc, chunks_p, nbytes, bytes_p))
        at, nc, nbytes = at + size_p, nc + chunks_p, nbytes + bytes_p
    if at != n:  # not DDP's bucket of these parameters: one chunked segment
        bytes_p, chunks_p = sign_message_sizes(n, cfg.chunk)
        layout, nc, nbytes = [(0, n, 0, chunks_p, 0, bytes_p)], chunks_p, bytes_p
    # One message per rank: [local squared norm (float64) | gradient sketch (float32) |
    # scales (float32) | sign bits]; in this order every field is aligned for its dtype.
    head = 8 + 4 * SKETCH_SIZE
    size = head + 4 * nc + nbytes
    message = torch.empty(size, dtype=torch.uint8, device=buffer.device)
    sketch_at = sketch_indices(n, iteration, bucket.index(), buffer.device)
    message[8:head].view(torch.float32).copy_(buffer[sketch_at])
    # One fused pass per parameter: c = beta1 u + (1 - beta1) g / denom + e to signs, scales and
    # the new e, with each parameter's sum of g^2 on the side (the buffer is only read).
    scales = message[head : head + 4 * nc].view(torch.float32)
    bits = message[head + 4 * nc :]
    part_sq = torch.empty(len(layout), dtype=torch.float64, device=buffer.device)
    for i, (at, size_p, s_at, chunks_p, b_at, bytes_p) in enumerate(layout):
        onebit_adam_compress(
            buffer[at : at + size_p],
            denom[at : at + size_p],
            u[at : at + size_p],
            e[at : at + size_p],
            cfg.beta1,
            cfg.chunk,
            bits_out=bits[b_at : b_at + bytes_p],
            scales_out=scales[s_at : s_at + chunks_p],
            sq_norm_out=part_sq[i : i + 1],
        )
    local_sq = message[:8].view(torch.float64)
    torch.sum(part_sq, dim=0, keepdim=True, out=local_sq)
    norms["local_sq_norm"].append(local_sq.clone())
    local_ok = torch.isfinite(scales).all()
    if local_ok.device.type == "cpu":
        if not bool(local_ok):
            e.zero_()
            state.nonfinite_resets += 1
    else:
        e.masked_fill_(~local_ok, 0)
    gathered = torch.empty(world * size, dtype=torch.uint8, device=buffer.device)
    state.bytes_sent += size
    state.compressed_buckets += 1
    fut = all_gather(gathered, message, group).get_future()

    def decompress(f: torch.futures.Future[Any]) -> torch.Tensor:
        f.wait()
        rows = gathered.view(world, size)
        all_scales = _field(rows, head, head + 4 * nc, torch.float32)
        all_bits = rows[:, head + 4 * nc :]
        bias = 1.0 / (1 - cfg.beta1 ** (iteration + 1))
        for at, size_p, s_at, chunks_p, b_at, bytes_p in layout:
            onebit_adam_decompress(  # u = average where finite; the buffer gets average * bias
                all_bits[:, b_at : b_at + bytes_p],  # row-strided views: no copy
                all_scales[:, s_at : s_at + chunks_p],
                buffer[at : at + size_p],
                u[at : at + size_p],
                cfg.chunk,
                scale=1.0 / world,
                bias=bias,
            )
        norms["mean_local_sq_norm"].append(_field(rows, 0, 8, torch.float64).sum().reshape(1) / world)
        sketch = _field(rows, 8, head, torch.float32).double().mean(0)
        norms["global_sq_norm"].append((sketch.square().sum() * (n / SKETCH_SIZE)).reshape(1))
        return buffer

    return fut.then(decompress)


def onebit_adam_hook(state: OneBitAdamState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: delivers AdamW's step direction for the bucket, averaged across
    ranks through 1-bit messages (see the module docstring).

    Register with ``model.register_comm_hook(state, onebit_adam_hook)`` and step with
    ``torch.optim.SGD(params, lr=lr, weight_decay=wd)``. Every rank must use a state built with
    the same config. Buckets must be float32 (raises TypeError otherwise)."""
    buffer = bucket.buffer()
    if buffer.dtype != torch.float32:
        raise TypeError(f"onebit_adam_hook: expected float32 gradients, got {buffer.dtype}")
    iteration = state.iter
    state.dense_bytes += buffer.numel() * 4
    try:
        if state.config.is_dense(iteration):
            return _dense_step(state, bucket, buffer, iteration)
        return _sign_step(state, bucket, buffer, iteration)
    finally:
        state._finish_bucket(bucket)
