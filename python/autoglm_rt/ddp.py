"""Top-k gradient compression with error feedback as a DDP communication hook.

    state = autoglm_rt.ddp.TopKState(density=0.01)
    model.register_comm_hook(state, autoglm_rt.ddp.topk_hook)

Per bucket, every rank compresses ``bucket + residual`` to its k largest-magnitude entries with
the fused kernel (``autoglm_rt.ops.topk_compress``), sends values, indices and its local squared
norm in one fixed-size ``all_gather`` (gloo and NCCL), and scatter-adds everyone's entries divided
by the world size into the bucket. k depends only on the bucket size and the iteration, so every
rank sends the same number of bytes and no rank can wait for a message that never comes.
Dense allreduce is used for the first ``start_iter`` iterations (DDP rebuilds its buckets after
the first) and for buckets smaller than ``min_numel``.
"""

# No `from __future__ import annotations` here: DDP.register_comm_hook inspects the hook's
# annotations and wants the real dist.GradBucket and torch.futures.Future[torch.Tensor] objects.
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autoglm_rt.ops.topk import index_dtype_for, topk_compress, topk_decompress

__all__ = ["TopKState", "topk_hook"]

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class _Residual:
    layout: tuple[Any, ...]
    tensor: torch.Tensor


class TopKState:
    """Configuration, error-feedback residuals and counters of :func:`topk_hook`.

    density: fraction of each bucket's entries sent (0 < density <= 1).
    error_feedback: keep what was not sent and add it to the next step's gradient.
    value_dtype: dtype of the values on the wire (float32, float16 or bfloat16).
    start_iter: iterations run with dense allreduce first (>= 0).
    warmup: iterations after ``start_iter`` over which the density falls geometrically from
        ``warmup_start_density`` to ``density`` (Deep Gradient Compression's warm-up); 0 = none.
    min_numel: buckets with fewer elements are all-reduced densely.

    Residuals are keyed by bucket index and layout (element count, dtype, device, parameter
    shapes); one whose layout changed is dropped and counted in ``residual_resets``. A bucket
    whose accumulated gradient holds NaN or Inf is still sent (so the optimizer or a GradScaler
    sees it) but its residual is cleared and counted in ``nonfinite_resets``.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        density: float = 0.01,
        error_feedback: bool = True,
        value_dtype: torch.dtype = torch.float32,
        start_iter: int = 2,
        warmup: int = 0,
        min_numel: int = 4096,
        warmup_start_density: float = 0.25,
    ) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
        if value_dtype not in _VALUE_DTYPES:
            raise TypeError(f"value_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {value_dtype}")
        for name, value in (("start_iter", start_iter), ("warmup", warmup), ("min_numel", min_numel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        if warmup > 0 and not density <= warmup_start_density <= 1:
            raise ValueError(f"warmup_start_density: expected a number in [density, 1], got {warmup_start_density!r}")
        self.process_group = process_group
        self.density = float(density)
        self.error_feedback = bool(error_feedback)
        self.value_dtype = value_dtype
        self.start_iter = start_iter
        self.warmup = warmup
        self.min_numel = min_numel
        self.warmup_start_density = float(warmup_start_density)
        self.iter = 0
        self._residuals: dict[int, _Residual] = {}
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.compressed_buckets = 0
        self.dense_buckets = 0
        self.residual_resets = 0
        self.nonfinite_resets = 0
        self._pending_nonfinite: dict[int, torch.Tensor] = {}
        self.bucket_density: dict[int, float] = {}
        # Per iteration: squared norms per bucket, filled by the hook and its callbacks.
        self._norm_parts: dict[int, dict[str, list[torch.Tensor]]] = {}

    # -- schedule -------------------------------------------------------------------------------
    def density_at(self, iteration: int) -> float:
        """The density used at ``iteration`` (1.0 during the dense start)."""
        if iteration < self.start_iter:
            return 1.0
        step = iteration - self.start_iter
        if self.warmup > 0 and step < self.warmup:
            return self.warmup_start_density * (self.density / self.warmup_start_density) ** (step / self.warmup)
        return self.density

    def k_for(self, numel: int, iteration: int) -> int:
        """Entries sent for a bucket of ``numel`` elements: ceil(density * numel), at least 1."""
        # Rounded first so that 0.01 * 20000 is 200, not ceil(200.00000000000003).
        return max(1, min(numel, math.ceil(round(self.density_at(iteration) * numel, 6))))

    # -- counters -------------------------------------------------------------------------------
    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes actually passed to collectives, since construction (1.0 before
        anything was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0

    def norms(self) -> dict[str, float] | None:
        """Squared gradient norms of the last finished iteration, summed over its buckets:
        ``local_sq_norm`` (this rank's gradient), ``mean_local_sq_norm`` (mean over ranks of each
        rank's own) and ``global_sq_norm`` (of the averaged gradient the optimizer receives; for
        compressed buckets that is the sparse average), plus ``world_size``. These are the
        small-batch and large-batch norms a gradient-noise-scale estimator needs. None before
        the first iteration finished."""
        parts = self._norm_parts.get(self.iter - 1)
        if parts is None:
            return None
        out = {name: float(sum(float(t.item()) for t in ts)) for name, ts in parts.items()}
        out["world_size"] = float(self._group().size())
        return out

    def metrics(self) -> dict[str, float]:
        """The ``compression`` source of ``autoglm_rt.monitor.MetricsExporter`` (cumulative
        counters; ``ratio`` = dense_bytes / bytes_sent, ``density`` of the last iteration)."""
        return {
            "bytes_sent": float(self.bytes_sent),
            "dense_bytes": float(self.dense_bytes),
            "ratio": self.compression_ratio,
            "density": self.density_at(max(self.iter - 1, 0)),
            "compressed_buckets": float(self.compressed_buckets),
            "dense_buckets": float(self.dense_buckets),
            "residual_resets": float(self.residual_resets),
            "nonfinite_resets": float(self.nonfinite_resets),
            "iterations": float(self.iter),
        }

    # -- internals ------------------------------------------------------------------------------
    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD  # type: ignore[return-value]

    def _clear_if(self, index: int, nonfinite: torch.Tensor) -> None:
        if bool(nonfinite):
            self._residuals[index].tensor.zero_()
            self.nonfinite_resets += 1

    def _residual(self, bucket: dist.GradBucket, buffer: torch.Tensor) -> torch.Tensor:
        layout = (
            buffer.numel(),
            buffer.dtype,
            buffer.device,
            tuple(tuple(p.shape) for p in bucket.parameters()),
        )
        index = bucket.index()
        pending = self._pending_nonfinite.pop(index, None)
        if pending is not None and index in self._residuals:
            self._clear_if(index, pending)
        entry = self._residuals.get(index)
        if entry is None or entry.layout != layout:
            if entry is not None:
                self.residual_resets += 1
            entry = _Residual(layout, torch.zeros_like(buffer))
            self._residuals[index] = entry
        return entry.tensor

    def _norm_lists(self) -> dict[str, list[torch.Tensor]]:
        if self.iter not in self._norm_parts:
            self._norm_parts[self.iter] = {"local_sq_norm": [], "mean_local_sq_norm": [], "global_sq_norm": []}
            self._norm_parts.pop(self.iter - 2, None)
        return self._norm_parts[self.iter]

    def _finish_bucket(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            self.iter += 1


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a 0-dim float64 tensor, in one read of t (no temporaries, no sync)."""
    if t.dtype == torch.float32:
        return torch.dot(t, t).double()
    return torch.linalg.vector_norm(t, dtype=torch.float32).double().square()


def _all_gather(output: torch.Tensor, message: torch.Tensor, group: dist.ProcessGroup) -> Any:
    # torch >= 2.13 names it all_gather_single (and deprecates all_gather_into_tensor).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, message, group=group, async_op=True)


def _dense_allreduce(state: TopKState, bucket: dist.GradBucket, buffer: torch.Tensor) -> torch.futures.Future[Any]:
    group = state._group()
    world = group.size()
    norms = state._norm_lists()
    local_sq = _sq_norm(buffer).reshape(1)
    norms["local_sq_norm"].append(local_sq.clone())
    buffer.div_(world)
    state.bytes_sent += buffer.numel() * buffer.element_size() + local_sq.numel() * local_sq.element_size()
    state.dense_buckets += 1
    state.bucket_density[bucket.index()] = 1.0
    norm_fut = dist.all_reduce(local_sq, group=group, async_op=True).get_future()
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def done(f: torch.futures.Future[Any]) -> torch.Tensor:
        result: torch.Tensor = f.value()[0]
        norm_fut.wait()
        norms["mean_local_sq_norm"].append(local_sq / world)
        norms["global_sq_norm"].append(_sq_norm(result))
        return result

    return fut.then(done)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averages the bucket across ranks through top-k compression.

    Register with ``model.register_comm_hook(state, topk_hook)``. Every rank must use a state
    built with the same arguments. The returned future holds the averaged bucket."""
    buffer = bucket.buffer()
    numel = buffer.numel()
    state.dense_bytes += numel * buffer.element_size()
    try:
        if state.iter < state.start_iter or numel < state.min_numel:
            return _dense_allreduce(state, bucket, buffer)
        return _compressed(state, bucket, buffer, numel)
    finally:
        state._finish_bucket(bucket)


def _compressed(
    state: TopKState, bucket: dist.GradBucket, buffer: torch.Tensor, numel: int
) -> torch.futures.Future[torch.Tensor]:
    group = state._group()
    world = group.size()
    k = state.k_for(numel, state.iter)
    residual = state._residual(bucket, buffer) if state.error_feedback else None
    norms = state._norm_lists()
    local_sq = _sq_norm(buffer).reshape(1)
    norms["local_sq_norm"].append(local_sq)

    # One message per rank, as bytes: [local squared norm (float64) | indices | values]. The
    # kernel writes straight into it; in this order every field is aligned for its dtype.
    index_dtype = index_dtype_for(numel)
    index_bytes = k * torch.empty((), dtype=index_dtype).element_size()
    value_bytes = k * torch.empty((), dtype=state.value_dtype).element_size()
    message = torch.empty(8 + index_bytes + value_bytes, dtype=torch.uint8, device=buffer.device)
    message[:8].view(torch.float64).copy_(local_sq)
    indices = message[8 : 8 + index_bytes].view(index_dtype)
    values = message[8 + index_bytes :].view(state.value_dtype)
    topk_compress(buffer, residual, k, values_out=values, indices_out=indices)
    if residual is not None:
        # NaN/Inf rank first, so values holds one iff the accumulated bucket had one. Reading the
        # flag waits for the kernel: on a GPU that stall is left to the next use of the residual.
        nonfinite = ~torch.isfinite(values).all()
        if buffer.device.type == "cpu":
            state._clear_if(bucket.index(), nonfinite)
        else:
            state._pending_nonfinite[bucket.index()] = nonfinite

    gathered = torch.empty(world * message.numel(), dtype=torch.uint8, device=buffer.device)
    state.bytes_sent += message.numel()
    state.compressed_buckets += 1
    state.bucket_density[bucket.index()] = k / numel
    fut = _all_gather(gathered, message, group).get_future()

    def decompress(f: torch.futures.Future[Any]) -> torch.Tensor:
        f.wait()
        rows = gathered.view(world, -1)
        rank_sq = rows[:, :8].contiguous().view(torch.float64)
        all_indices = rows[:, 8 : 8 + index_bytes].contiguous().view(index_dtype).reshape(-1)
        all_values = rows[:, 8 + index_bytes :].contiguous().view(state.value_dtype).reshape(-1)
        buffer.zero_()
        # Every rank's indices come from topk_compress on a bucket of this size: no check, so on
        # a GPU the callback queues the scatter without waiting for the stream.
        topk_decompress(all_values, all_indices, buffer, scale=1.0 / world, check_indices=False)
        norms["mean_local_sq_norm"].append(rank_sq.sum() / world)
        # The average g is (1/W) sum_r s_r over the ranks' sparse tensors s_r, so
        # |g|^2 = (1/W) sum_r <s_r, g>: a gather of g at the sent indices, no deduplication.
        at_sent = buffer[all_indices.long()].double()
        norms["global_sq_norm"].append(torch.dot(all_values.double(), at_sent).reshape(1) / world)
        return buffer

    return fut.then(decompress)
