"""Builds the Runtime's policy parts from its configuration objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from autoglm_rt.constants import limit_or_none
from autoglm_rt.policy.memory import MemoryPolicy, available_cores
from autoglm_rt.runtime.config import MemoryConfig, ThreadConfig
from autoglm_rt.runtime.pipeline import ThreadControl


def build_memory_policy(pool: Any, cfg: MemoryConfig, threads: ThreadConfig | None) -> MemoryPolicy | None:
    """The memory policy over ``pool`` (None without a pool). A step-time target owns the thread
    count, so with one the phases set no threads."""
    if pool is None:
        return None
    kwargs: dict[str, Any] = {"capacity": cfg.capacity if cfg.capacity is not None else default_capacity(pool)}
    if cfg.limits is not None:
        kwargs["limits"] = cfg.limits
    if cfg.threads_by_phase is False or threads is not None:
        kwargs["thread_setter"] = None  # a step-time target owns the thread count
    elif isinstance(cfg.threads_by_phase, Mapping):
        kwargs["threads"] = cfg.threads_by_phase
    return MemoryPolicy(pool, **kwargs)


def build_thread_control(cfg: ThreadConfig | None) -> ThreadControl | None:
    """The step-time thread loop of ``cfg`` (None without a step-time target)."""
    if cfg is None:
        return None
    cores = available_cores() if cfg.max_threads is None else cfg.max_threads
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ValueError(f"max_threads: expected a positive int, got {cfg.max_threads!r}")
    return ThreadControl(cfg.step_time_target, cores, max(torch.get_num_threads(), 1))


def default_capacity(pool: Any) -> int:
    """The memory the phase fractions refer to: the pool's limit, else the CUDA device's or the
    host's total memory."""
    limit = limit_or_none(pool.stats().get("limit_bytes"))
    if limit:
        return limit
    device = str(getattr(pool, "device", "cpu"))
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


__all__ = ["build_memory_policy", "build_thread_control", "default_capacity"]
