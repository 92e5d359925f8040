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

from autoglm_rt.bucket_tables import BucketEntry, BucketTables, table_from, table_state
from autoglm_rt.hook_support import (
    IterationNorms,
    all_gather,
    check_adam_hyperparameters,
    fill_unmeasured,
    group_device,
    sketch_indices,
    sq_norm,
)
from autoglm_rt.ops.topk import index_dtype_for, topk_compress, topk_decompress
from autoglm_rt.policy.compression import DensityController

__all__ = ["AdamUpdate", "TopKState", "topk_hook"]

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AdamUpdate:
    """Compress the Adam *update* instead of the raw gradient (:class:`TopKState`'s ``adam``).

    During the dense start the hook all-reduces the gradient and returns AdamW's direction
    ``m_hat / (sqrt(v_hat) + eps)`` of the averaged gradient (so with
    ``torch.optim.SGD(params, lr, weight_decay=wd)`` the start is AdamW exactly: SGD's L2 term on
    a momentum-free step equals AdamW's decoupled decay). Afterwards each rank preconditions its
    own gradient, ``p = g / (sqrt(v_hat) + eps)``, keeps the momentum in that space
    (``u = beta1 u + (1 - beta1) p``, started from the dense phase's ``m / denominator``), and
    sends top-k of ``u`` + residual with DGC's error feedback and factor masking; the delivered
    average is divided by ``1 - beta1^t``. variance: ``"frozen"`` keeps ``v`` of the averaged
    gradient as it stood after the dense start, identical on every rank (1-bit Adam / 0/1 Adam),
    except for coordinates whose gradient was zero throughout the start: those take the mean
    ``v`` of their parameter's other entries (so a step is never ``g / eps``);
    ``"local"`` goes on updating it from each rank's own gradient (the ranks' preconditioners
    then differ; the update every rank applies is still the same gathered average).
    momentum: ``"local"`` is the DGC-style per-rank momentum above; ``"global"`` compresses the
    preconditioned gradient ``p`` itself (error feedback, no masking) and keeps Adam's momentum
    of the delivered average, ``m = beta1 m + (1 - beta1) avg``, identical on every rank (needs
    frozen variance, so that every rank's ``m`` is in the same space)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    variance: str = "frozen"
    momentum: str = "local"
    masking: bool = True

    def __post_init__(self) -> None:
        check_adam_hyperparameters(self.beta1, self.beta2, self.eps)
        if self.variance not in ("frozen", "local"):
            raise ValueError(f"variance: expected 'frozen' or 'local', got {self.variance!r}")
        if self.momentum not in ("local", "global"):
            raise ValueError(f"momentum: expected 'local' or 'global', got {self.momentum!r}")
        if self.momentum == "global" and self.variance != "frozen":
            raise ValueError("momentum: 'global' needs variance='frozen' (every rank's m in the same space)")


_COUNTERS = ("bytes_sent", "dense_bytes", "compressed_buckets", "dense_buckets", "residual_resets")


class TopKState:
    """Configuration, error-feedback residuals and counters of :func:`topk_hook`.

    density: fraction of each bucket's entries sent (0 < density <= 1) in the fixed-density mode.
    error_feedback: keep what was not sent and add it to the next step's gradient.
    value_dtype: dtype of the values on the wire (float32, float16 or bfloat16).
    start_iter: iterations run with dense allreduce first (>= 0).
    warmup: iterations after ``start_iter`` over which the density falls geometrically from
        ``warmup_start_density`` to ``density`` (Deep Gradient Compression's warm-up); 0 = none.
    min_numel: buckets with fewer elements are all-reduced densely.
    controller: a :class:`~autoglm_rt.policy.compression.DensityController` that chooses the
        density of every iteration after ``start_iter`` from the gradient norm (mean over ranks of
        each rank's squared norm; regime-aware density; replaces ``density`` and ``warmup``). Its inputs are computed
        from the same gathered data on every rank, and each decision is all-reduced (max) so
        every rank uses the same k.
    momentum: DGC momentum correction (Lin et al., ICLR 2018) for momentum SGD: each rank keeps
        a velocity ``u = momentum * u + grad`` per bucket and compresses ``u`` with error
        feedback (the residual accumulates velocities) and clears the velocity where entries
        were sent (DGC's momentum factor masking; without it the residual counts each velocity
        again every step, and the demo's model diverged to NaN at 1%); the optimizer then runs
        *without* momentum. 0 = off (the optimizer keeps its own momentum). Needs
        ``error_feedback``.
    adam: an :class:`AdamUpdate` to compress AdamW's update rather than the gradient: the hook
        delivers the update direction and the optimizer must be
        ``torch.optim.SGD(params, lr=lr, weight_decay=wd)`` (no momentum). Needs
        ``error_feedback``, ``momentum == 0`` and, with frozen variance, ``start_iter >= 1``.
        Under it each compressed message also carries ``hook_support.SKETCH_SIZE`` raw gradient entries at
        positions shared by all ranks (1 KiB per bucket), from which
        ``norms()["global_sq_norm"]`` is estimated (the delivered tensor is not a gradient).

    Residuals are keyed by bucket index and layout (element count, dtype, device, parameter
    shapes); one whose layout changed is dropped and counted in ``residual_resets``. A bucket
    whose accumulated gradient holds NaN or Inf is still sent (so the optimizer or a GradScaler
    sees it) but its residual (and velocity) is cleared and counted in ``nonfinite_resets``;
    on a GPU the clear and the count stay on the device (no host wait per bucket).
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
        controller: DensityController | None = None,
        momentum: float = 0.0,
        adam: AdamUpdate | None = None,
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
        if controller is not None and not isinstance(controller, DensityController):
            raise TypeError(f"controller: expected a DensityController or None, got {type(controller).__name__}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        if momentum > 0 and not error_feedback:
            raise ValueError("momentum: momentum correction needs error_feedback=True")
        if adam is not None:
            if not isinstance(adam, AdamUpdate):
                raise TypeError(f"adam: expected an AdamUpdate or None, got {type(adam).__name__}")
            if momentum > 0 or not error_feedback:
                raise ValueError("adam: needs momentum=0 (it keeps Adam's own momentum) and error_feedback=True")
            if adam.variance == "frozen" and start_iter < 1:
                raise ValueError(f"adam: frozen variance needs start_iter >= 1 to measure it, got {start_iter}")
        self.process_group = process_group
        self.density = float(density)
        self.error_feedback = bool(error_feedback)
        self.value_dtype = value_dtype
        self.start_iter = start_iter
        self.warmup = warmup
        self.min_numel = min_numel
        self.warmup_start_density = float(warmup_start_density)
        self.controller = controller
        self.momentum = float(momentum)
        self.adam = adam
        self.iter = 0
        self._residuals: dict[int, BucketEntry] = {}
        self._velocities: dict[int, BucketEntry] = {}
        self._adam_m: dict[int, BucketEntry] = {}  # AdamUpdate: Adam's moments per bucket
        self._adam_v: dict[int, BucketEntry] = {}
        self._tables = BucketTables()
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.compressed_buckets = 0
        self.dense_buckets = 0
        self.residual_resets = 0
        self._nonfinite_host = 0
        self._nonfinite_device: dict[torch.device, torch.Tensor] = {}
        self.bucket_density: dict[int, float] = {}
        self.last_density = 1.0  # the density chosen for the last iteration that started
        self._iteration_density: float | None = None  # set by the iteration's first bucket
        self._iteration_dense = False
        # Per iteration: squared norms per bucket, filled by the hook and its callbacks.
        self._norms = IterationNorms()

    # -- schedule -------------------------------------------------------------------------------
    def density_at(self, iteration: int) -> float:
        """The fixed-density schedule at ``iteration``: 1.0 during the dense start, then the
        warm-up, then ``density``. With a controller, iterations after the dense start use the
        controller's choice instead (see :attr:`last_density`)."""
        if iteration < self.start_iter:
            return 1.0
        step = iteration - self.start_iter
        if self.warmup > 0 and step < self.warmup:
            return self.warmup_start_density * (self.density / self.warmup_start_density) ** (step / self.warmup)
        return self.density

    def k_for(self, numel: int, iteration: int) -> int:
        """Entries sent for a bucket of ``numel`` elements at the schedule's density:
        ceil(density * numel), at least 1."""
        return _k_at(self.density_at(iteration), numel)

    # -- counters -------------------------------------------------------------------------------
    @property
    def nonfinite_resets(self) -> int:
        """Buckets whose residual was cleared because the accumulated gradient was not finite
        (reads the device counters: a host wait on a GPU)."""
        return self._nonfinite_host + sum(int(t.item()) for t in self._nonfinite_device.values())

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes actually passed to collectives, since construction (1.0 before
        anything was sent). The one definition of compression ratio in the project."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0

    def norms(self) -> dict[str, float] | None:
        """Squared gradient norms of the last finished iteration, summed over its buckets:
        ``local_sq_norm`` (this rank's gradient), ``mean_local_sq_norm`` (mean over ranks of each
        rank's own) and ``global_sq_norm`` (of the averaged gradient the optimizer receives; for
        compressed buckets that is the sparse average), plus ``world_size``. These are the
        small-batch and large-batch norms a gradient-noise-scale estimator needs. None before
        the first iteration finished."""
        return self._norms.summary(self.iter - 1, self._group().size())

    def metrics(self) -> dict[str, float]:
        """Cumulative counters under plain field names: ``bytes_sent`` (bytes passed to
        collectives), ``dense_bytes`` (what dense allreduce would have passed), ``ratio``
        (dense_bytes / bytes_sent, 1.0 before anything was sent), ``density`` (the density of the
        last iteration), ``compressed_buckets``, ``dense_buckets``, ``residual_resets``,
        ``nonfinite_resets``, ``iterations``."""
        return {
            "bytes_sent": float(self.bytes_sent),
            "dense_bytes": float(self.dense_bytes),
            "ratio": self.compression_ratio,
            "density": float(self.last_density),
            "compressed_buckets": float(self.compressed_buckets),
            "dense_buckets": float(self.dense_buckets),
            "residual_resets": float(self.residual_resets),
            "nonfinite_resets": float(self.nonfinite_resets),
            "iterations": float(self.iter),
        }

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-exactly: residuals and velocities
        (keyed by bucket index, with their layout), counters, iteration, the density chosen last,
        the controller's state and the previous iteration's norms (the controller's next input).
        Tensors are cloned. Take it between iterations (not during a backward pass)."""
        if self._iteration_density is not None:
            raise RuntimeError("state_dict: called during an iteration; take it between optimizer steps")
        return {
            "iteration": self.iter,
            "residuals": table_state(self._residuals),
            "velocities": table_state(self._velocities),
            "adam_m": table_state(self._adam_m),
            "adam_v": table_state(self._adam_v),
            "counters": {name: int(getattr(self, name)) for name in _COUNTERS}
            | {"nonfinite_resets": self.nonfinite_resets},
            "bucket_density": dict(self.bucket_density),
            "last_density": self.last_density,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "last_norms": self._norms.state(self.iter - 1),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output (on a state built with the same arguments)."""
        expected = {
            "iteration",
            "residuals",
            "velocities",
            "counters",
            "bucket_density",
            "last_density",
            "controller",
            "last_norms",
        }
        optional = {"adam_m", "adam_v"}  # absent from states saved before AdamUpdate existed
        if not isinstance(sd, dict) or not expected <= set(sd) <= expected | optional:
            got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"state dict: expected keys {sorted(expected)}, got {got}")
        if (sd["controller"] is None) != (self.controller is None):
            raise ValueError(
                "state dict: saved with"
                + ("out" if sd["controller"] is None else "")
                + " a density controller, but this state is built differently"
            )
        self.iter = int(sd["iteration"])
        self._residuals = table_from(sd["residuals"])
        self._velocities = table_from(sd["velocities"])
        self._adam_m = table_from(sd.get("adam_m", {}))
        self._adam_v = table_from(sd.get("adam_v", {}))
        self._tables.end_iteration()
        counters = sd["counters"]
        for name in _COUNTERS:
            setattr(self, name, int(counters[name]))
        self._nonfinite_host = int(counters["nonfinite_resets"])
        self._nonfinite_device = {}
        self.bucket_density = {int(k): float(v) for k, v in sd["bucket_density"].items()}
        self.last_density = float(sd["last_density"])
        if self.controller is not None:
            self.controller.load_state_dict(sd["controller"])
        self._iteration_density = None
        self._norms.load(self.iter - 1, sd["last_norms"])

    # -- internals ------------------------------------------------------------------------------
    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD  # type: ignore[return-value]

    def _begin_iteration(self) -> float:
        """The density of the iteration that starts now (called by its first bucket)."""
        if self.controller is not None:
            # The ranks' mean local squared norm, not the averaged gradient's: the latter is the
            # norm of the *sparse* average, which depends on the density itself (a feedback loop
            # that kept flipping the decision). The mean of full local norms does not, and every
            # rank computes it from the same gathered rows.
            prev = self._norms.total(self.iter - 1, "mean_local_sq_norm")
            if prev is not None and self.controller.observe(prev):
                self._agree_on_controller()
        if self.iter < self.start_iter:
            density = 1.0
        elif self.controller is not None:
            density = self.controller.density
        else:
            density = self.density_at(self.iter)
        self._iteration_density = density
        # Dense allreduce in the dense start, and when the controller asks for everything (a
        # compressed message at density 1 would cost twice the dense bytes). A fixed density of
        # 1 still runs the compressed path (it is the path's exactness check).
        self._iteration_dense = self.iter < self.start_iter or (self.controller is not None and density >= 1.0)
        self.last_density = density
        return density

    def _agree_on_controller(self) -> None:
        # Every rank feeds the same figures, so this only guards against a last-bit difference
        # flipping a threshold on one rank: all ranks take the most critical decision.
        assert self.controller is not None
        flag = torch.tensor([1.0 if self.controller.critical else 0.0], dtype=torch.float64)
        device = group_device(self._group())
        flag = flag.to(device)
        self.bytes_sent += flag.numel() * flag.element_size()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group())
        self.controller.critical = bool(flag.item() > 0)

    def _buffer_for(self, table: dict[int, BucketEntry], bucket: dist.GradBucket, buffer: torch.Tensor) -> torch.Tensor:
        tensor, lost = self._tables.buffer_for(table, bucket, buffer)
        if lost and table is self._residuals:
            self.residual_resets += 1
        return tensor

    def _clear_if(self, nonfinite: torch.Tensor, *tensors: torch.Tensor) -> None:
        """Zeroes ``tensors`` when the 0-dim bool ``nonfinite`` is set and counts it. On the CPU
        a plain branch; on a GPU a masked fill and a device counter, so the host never waits."""
        if nonfinite.device.type == "cpu":
            if bool(nonfinite):
                for t in tensors:
                    t.zero_()
                self._nonfinite_host += 1
            return
        for t in tensors:
            t.masked_fill_(nonfinite, 0)
        counter = self._nonfinite_device.get(nonfinite.device)
        if counter is None:
            counter = self._nonfinite_device[nonfinite.device] = torch.zeros(
                (), dtype=torch.int64, device=nonfinite.device
            )
        counter.add_(nonfinite)

    def _norm_lists(self) -> dict[str, list[torch.Tensor]]:
        return self._norms.lists(self.iter)

    def _finish_bucket(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            self.iter += 1
            self._iteration_density = None
            self._tables.end_iteration()


def _k_at(density: float, numel: int) -> int:
    # Rounded first so that 0.01 * 20000 is 200, not ceil(200.00000000000003).
    return max(1, min(numel, math.ceil(round(density * numel, 6))))


def _velocity(state: TopKState, bucket: dist.GradBucket, buffer: torch.Tensor, iteration: int) -> torch.Tensor | None:
    """The tensor that is sent instead of the gradient: DGC's velocity u = momentum * u + grad,
    or under :class:`AdamUpdate` the preconditioned momentum; None when neither is on."""
    if state.adam is not None:
        return _adam_velocity(state, bucket, buffer, iteration)
    if state.momentum == 0:
        return None
    u = state._buffer_for(state._velocities, bucket, buffer)
    return u.mul_(state.momentum).add_(buffer)


def _adam_velocity(state: TopKState, bucket: dist.GradBucket, g: torch.Tensor, iteration: int) -> torch.Tensor:
    """After the dense start: u = beta1 u + (1 - beta1) g / (sqrt(v_hat) + eps), with u started
    from the dense phase's m / (sqrt(v_hat) + eps) in the first iteration after it."""
    a = state.adam
    assert a is not None
    v = state._buffer_for(state._adam_v, bucket, g)
    if a.variance == "local":
        v.mul_(a.beta2).addcmul_(g, g, value=1 - a.beta2)
        updates = iteration + 1
    else:
        updates = state.start_iter  # v as the dense start left it
        if iteration == state.start_iter:
            fill_unmeasured(v, [math.prod(p.shape) for p in bucket.parameters()])
    denom = (v.sqrt() / math.sqrt(1 - a.beta2**updates)).add_(a.eps)
    u = state._buffer_for(state._velocities, bucket, g)
    if a.momentum == "global":  # u is scratch for p; m moves into p's space once
        if iteration == state.start_iter:
            state._buffer_for(state._adam_m, bucket, g).div_(denom)
        return u.copy_(g).div_(denom)
    if iteration == state.start_iter:
        u.copy_(state._buffer_for(state._adam_m, bucket, g)).div_(denom)
    return u.mul_(a.beta1).addcdiv_(g, denom, value=1 - a.beta1)


def _adam_deliver(a: AdamUpdate, average: torch.Tensor, m: torch.Tensor | None, iteration: int) -> torch.Tensor:
    """What the optimizer receives after the dense start: the average of momenta, or under
    global momentum the momentum of the average, divided by Adam's 1 - beta1^t."""
    if m is not None:
        average = m.mul_(a.beta1).add_(average, alpha=1 - a.beta1)
    return average.div(1 - a.beta1 ** (iteration + 1))


def _global_momentum(state: TopKState, bucket: dist.GradBucket, buffer: torch.Tensor) -> torch.Tensor | None:
    """Adam's m of the delivered average under global momentum (None otherwise)."""
    if state.adam is None or state.adam.momentum != "global":
        return None
    return state._buffer_for(state._adam_m, bucket, buffer)


def _adam_dense_step(a: AdamUpdate, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, iteration: int) -> None:
    """AdamW's moments and direction m_hat / (sqrt(v_hat) + eps) of the averaged ``grad``,
    written into ``grad`` (the dense start under :class:`AdamUpdate`)."""
    t = iteration + 1
    m.mul_(a.beta1).add_(grad, alpha=1 - a.beta1)
    v.mul_(a.beta2).addcmul_(grad, grad, value=1 - a.beta2)
    denom = (v.sqrt() / math.sqrt(1 - a.beta2**t)).add_(a.eps)
    grad.copy_(m).div_(denom).div_(1 - a.beta1**t)


def _dense_allreduce(
    state: TopKState, bucket: dist.GradBucket, buffer: torch.Tensor, iteration: int
) -> torch.futures.Future[Any]:
    group = state._group()
    world = group.size()
    norms = state._norm_lists()
    local_sq = sq_norm(buffer).reshape(1)
    norms["local_sq_norm"].append(local_sq.clone())
    adam = state.adam
    adam_start = adam is not None and iteration < state.start_iter
    if adam_start:  # exact AdamW on the averaged gradient: its moments live in the hook
        adam_m = state._buffer_for(state._adam_m, bucket, buffer)
        adam_v = state._buffer_for(state._adam_v, bucket, buffer)
    velocity = None if adam_start else _velocity(state, bucket, buffer, iteration)
    global_m = _global_momentum(state, bucket, buffer) if not adam_start else None
    # A dense bucket under AdamUpdate after the start (small, or a controller ceiling of 1) sends
    # the gradient beside the velocity, for the averaged gradient's norm.
    message = buffer
    if velocity is not None:
        # Averaging every rank's velocity is the velocity of the averaged gradient (it is linear),
        # so a dense bucket under momentum correction is exactly momentum SGD.
        message = torch.cat([velocity, buffer]) if adam is not None else buffer.copy_(velocity)
    message.div_(world)
    state.bytes_sent += message.numel() * message.element_size() + local_sq.numel() * local_sq.element_size()
    state.dense_buckets += 1
    state.bucket_density[bucket.index()] = 1.0
    norm_fut = dist.all_reduce(local_sq, group=group, async_op=True).get_future()
    fut = dist.all_reduce(message, group=group, async_op=True).get_future()

    def done(f: torch.futures.Future[Any]) -> torch.Tensor:
        result: torch.Tensor = f.value()[0]
        norm_fut.wait()
        norms["mean_local_sq_norm"].append(local_sq / world)
        if adam is not None and not adam_start:  # [average velocity | average gradient]
            n = buffer.numel()
            norms["global_sq_norm"].append(sq_norm(result[n:]).reshape(1))
            return buffer.copy_(_adam_deliver(adam, result[:n], global_m, iteration))
        norms["global_sq_norm"].append(sq_norm(result))
        if adam_start:
            _adam_dense_step(adam, result, adam_m, adam_v, iteration)  # type: ignore[arg-type]
        return result

    return fut.then(done)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averages the bucket across ranks through top-k compression.

    Register with ``model.register_comm_hook(state, topk_hook)``. Every rank must use a state
    built with the same arguments. The returned future holds the averaged bucket."""
    buffer = bucket.buffer()
    numel = buffer.numel()
    density = state._iteration_density
    if density is None:
        density = state._begin_iteration()
    state.dense_bytes += numel * buffer.element_size()
    iteration = state.iter
    try:
        if state._iteration_dense or numel < state.min_numel:
            return _dense_allreduce(state, bucket, buffer, iteration)
        return _compressed(state, bucket, buffer, numel, _k_at(density, numel), iteration)
    finally:
        state._finish_bucket(bucket)


def _compressed(
    state: TopKState, bucket: dist.GradBucket, buffer: torch.Tensor, numel: int, k: int, iteration: int
) -> torch.futures.Future[torch.Tensor]:
    group = state._group()
    world = group.size()
    residual = state._buffer_for(state._residuals, bucket, buffer) if state.error_feedback else None
    velocity = _velocity(state, bucket, buffer, iteration)
    global_m = _global_momentum(state, bucket, buffer)
    mask = velocity is not None and (state.adam is None or (state.adam.momentum == "local" and state.adam.masking))
    norms = state._norm_lists()

    # One message per rank, as bytes: [local squared norm (float64) | indices | values]. The
    # kernel writes straight into it; in this order every field is aligned for its dtype.
    index_dtype = index_dtype_for(numel)
    index_bytes = k * torch.empty((), dtype=index_dtype).element_size()
    value_bytes = k * torch.empty((), dtype=state.value_dtype).element_size()
    # Under AdamUpdate a sketch of the raw gradient follows the norm: [norm | sketch | indices |
    # values] (the sketch's length is even, so the indices stay 8-byte aligned).
    sketch_at = sketch_indices(numel, iteration, bucket.index(), buffer.device) if state.adam is not None else None
    head = 8 + (0 if sketch_at is None else 4 * sketch_at.numel())
    message = torch.empty(head + index_bytes + value_bytes, dtype=torch.uint8, device=buffer.device)
    local_sq = message[:8].view(torch.float64)
    indices = message[head : head + index_bytes].view(index_dtype)
    values = message[head + index_bytes :].view(state.value_dtype)
    if sketch_at is not None:
        message[8:head].view(torch.float32).copy_(buffer[sketch_at])
    if velocity is None:
        # The kernel reads the bucket once for both the selection and its sum of squares.
        topk_compress(buffer, residual, k, values_out=values, indices_out=indices, sq_norm_out=local_sq)
    else:
        local_sq.copy_(sq_norm(buffer).reshape(1))  # the gradient's, not the velocity's
        topk_compress(velocity, residual, k, values_out=values, indices_out=indices)
        if mask:
            velocity.index_fill_(0, indices.long(), 0)  # momentum factor masking
    norms["local_sq_norm"].append(local_sq.clone())
    if residual is not None:
        # NaN/Inf rank first, so values holds one iff the accumulated bucket had one.
        nonfinite = ~torch.isfinite(values).all()
        state._clear_if(nonfinite, *([residual] if velocity is None else [residual, velocity]))

    gathered = torch.empty(world * message.numel(), dtype=torch.uint8, device=buffer.device)
    state.bytes_sent += message.numel()
    state.compressed_buckets += 1
    state.bucket_density[bucket.index()] = k / numel
    fut = all_gather(gathered, message, group).get_future()

    def decompress(f: torch.futures.Future[Any]) -> torch.Tensor:
        f.wait()
        rows = gathered.view(world, -1)
        rank_sq = rows[:, :8].contiguous().view(torch.float64)
        all_indices = rows[:, head : head + index_bytes].contiguous().view(index_dtype).reshape(-1)
        all_values = rows[:, head + index_bytes :].contiguous().view(state.value_dtype).reshape(-1)
        buffer.zero_()
        # Every rank's indices come from topk_compress on a bucket of this size: no check, so on
        # a GPU the callback queues the scatter without waiting for the stream.
        topk_decompress(all_values, all_indices, buffer, scale=1.0 / world, check_indices=False)
        norms["mean_local_sq_norm"].append(rank_sq.sum() / world)
        if sketch_at is not None:  # the delivered tensor is an update: the norm from the sketch
            assert state.adam is not None
            sketch = rows[:, 8:head].contiguous().view(torch.float32).double().mean(0)
            norms["global_sq_norm"].append((sketch.square().sum() * (numel / sketch.numel())).reshape(1))
            return buffer.copy_(_adam_deliver(state.adam, buffer, global_m, iteration))
        # The average g is (1/W) sum_r s_r over the ranks' sparse tensors s_r, so
        # |g|^2 = (1/W) sum_r <s_r, g>: a gather of g at the sent indices, no deduplication.
        at_sent = buffer[all_indices.long()].double()
        norms["global_sq_norm"].append(torch.dot(all_values.double(), at_sent).reshape(1) / world)
        return buffer

    return fut.then(decompress)
