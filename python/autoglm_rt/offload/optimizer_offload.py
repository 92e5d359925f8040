"""Optimizer state on a slower memory tier: ``OptimizerOffload(optimizer, tier, directory)``.

Tiers:

- ``"disk"``: the moments (``exp_avg``, ``exp_avg_sq``) move into one file on local disk, mapped
  into memory. :meth:`OptimizerOffload.step` walks the file in blocks of about ``block_bytes``:
  it asks the kernel to read the next block ahead (``MADV_WILLNEED``) while the current one steps,
  and drops each stepped block from the process (``MADV_DONTNEED``; its dirty pages stay in the
  page cache, are written back by the kernel and can be reclaimed under a memory limit). Works for
  CPU parameters (and for CUDA parameters through host staging, see ``"host"``).
- ``"host"``: for CUDA parameters: the moments move to pinned host memory and the step runs on the
  host with the fused CPU kernel (gradient and parameter copied down, parameter copied back).
  CUDA paths: written against torch's API, not run on this project's CPU-only CI.

In every state :meth:`step` uses the same native kernel in the same order for CPU parameters, so a
trajectory is bit-identical with and without offload. The state stays in the optimizer's own
``state`` (tensors that view the file or pinned memory), so ``optimizer.state_dict()`` and
checkpoints work in either state. A move that fails part-way leaves the optimizer exactly as it
was: the file is written under a temporary name, synced and renamed before any state tensor is
swapped; :meth:`restore` copies everything back before it swaps and only then deletes the file.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from autoglm_rt.offload.fused_adam import (
    AdamHyper,
    check_adam,
    init_state,
    params_with_grad,
    step_params,
)
from autoglm_rt.units import parse_size

TIERS = ("host", "disk")
_MOMENTS = ("exp_avg", "exp_avg_sq")
_PAGE = mmap.PAGESIZE
STATE_FILE = "optimizer_state.bin"


def _align(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


@dataclass
class _Block:
    """Consecutive parameters of one group whose moments lie in [start, end) of the state file."""

    group: int
    params: list[torch.Tensor] = field(default_factory=list)
    start: int = 0
    end: int = 0


class _DiskStore:
    """The state file: every parameter's moments at page-aligned offsets, in group order."""

    def __init__(self, path: str, tensors: list[torch.Tensor], offsets: list[int], size: int) -> None:
        self.path = path
        self.size = size
        tmp = path + ".tmp"
        try:
            # Large sequential writes from the tensors' own memory; nothing is swapped yet.
            with open(tmp, "wb") as f:
                for t, off in zip(tensors, offsets, strict=True):
                    f.seek(off)
                    f.write(_bytes_of(t))
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), size) if size else None

    def view(self, like: torch.Tensor, offset: int) -> torch.Tensor:
        """A float32 tensor of like's shape over the file at offset (RAM for an empty tensor)."""
        if like.numel() == 0 or self.map is None:
            return torch.empty_like(like, device="cpu")
        flat = torch.frombuffer(self.map, dtype=like.dtype, count=like.numel(), offset=offset)
        return flat.view(like.shape)

    def advise(self, advice: int, start: int, end: int) -> None:
        if self.map is not None and end > start:
            self.map.madvise(advice, start, end - start)

    def discard(self) -> None:
        """Deletes the file. Tensors still viewing it stay valid (the mapping outlives the name)."""
        _remove_quietly(self.path)
        self.map = None


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().numpy()).cast("B")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _copy_out(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a moment in the parameters' memory (restore's one copy per tensor)."""
    return t.to(device=device, copy=True)


class OptimizerOffload:
    """Moves a torch Adam/AdamW's moments to ``tier`` and back; steps it in either state.

    ``directory``: where the disk tier's file lives (default: a new temporary directory, removed
    by :meth:`close`). ``block_bytes``: size of the disk tier's stepping blocks (int or "64Mi").
    Use :meth:`step` instead of ``optimizer.step()`` while this object manages the optimizer.
    """

    def __init__(
        self,
        optimizer: Any,
        tier: str = "host",
        directory: str | os.PathLike[str] | None = None,
        block_bytes: int | str = "64Mi",
    ) -> None:
        self._decoupled = check_adam(optimizer)
        if tier not in TIERS:
            raise ValueError(f"tier: expected one of {', '.join(TIERS)}, got {tier!r}")
        self.optimizer = optimizer
        self.tier = tier
        self.block_bytes = parse_size(block_bytes, name="block_bytes")
        if self.block_bytes <= 0:
            raise ValueError(f"block_bytes: expected a positive size, got {block_bytes!r}")
        self._own_directory = directory is None
        self._directory = str(directory) if directory is not None else None
        self._store: _DiskStore | None = None
        self._blocks: list[_Block] = []
        self._offloaded = False

    # ----------------------------------------------------------------------------------- state
    @property
    def offloaded(self) -> bool:
        """True while the moments live on the slower tier."""
        return self._offloaded

    def _params(self) -> Iterator[tuple[int, torch.Tensor]]:
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    yield gi, p

    def _device(self) -> torch.device:
        for _, p in self._params():
            return p.device
        return torch.device("cpu")

    def resident_bytes(self) -> int:
        """Bytes of moments held in the parameters' own memory (RAM for CPU parameters, device
        memory for CUDA ones): all of them before :meth:`offload`, 0 after. Pages of the state
        file the kernel caches are not the process's and are not counted."""
        total = 0
        for _, p in self._params():
            s = self.optimizer.state.get(p)
            if not s:
                continue
            for key in _MOMENTS:
                t = s[key]
                if self._offloaded and (self.tier == "disk" or t.device != p.device):
                    continue
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------------------------ moves
    def offload(self) -> bool:
        """Moves the moments to the tier (creating zero state, as torch's first step would, for
        parameters that have none yet). Returns False when already offloaded. On any failure the
        optimizer is left exactly as before and the exception propagates."""
        if self._offloaded:
            return False
        if self.tier == "host":
            self._offload_host()
        else:
            self._offload_disk()
        self._offloaded = True
        return True

    def restore(self) -> bool:
        """Moves the moments back into the parameters' memory. Returns False when not offloaded.
        Every tensor is copied before any is swapped, so a failure loses nothing."""
        if not self._offloaded:
            return False
        pairs = []
        for _, p in self._params():
            s = self.optimizer.state.get(p)
            if s:
                pairs.append((s, {key: _copy_out(s[key], p.device) for key in _MOMENTS}))
        for s, moved in pairs:
            s.update(moved)
        if self._store is not None:
            self._store.discard()
        self._store = None
        self._blocks = []
        self._offloaded = False
        return True

    def _offload_host(self) -> None:
        device = self._device()
        if device.type != "cuda":
            raise ValueError(
                f"tier='host' moves optimizer state off a CUDA device, but the parameters are on {device}; "
                "use tier='disk' for CPU parameters"
            )
        pinned = torch.cuda.is_available()
        moved = []
        with torch.no_grad():
            for _, p in self._params():
                s = init_state(self.optimizer, p)
                moved.append((s, {key: s[key].to("cpu", copy=True).pin_memory() if pinned else s[key].cpu()
                                  for key in _MOMENTS}))
        for s, m in moved:
            s.update(m)

    def _offload_disk(self) -> None:
        directory = self._directory
        if directory is None:
            directory = tempfile.mkdtemp(prefix="autoglm_rt_offload_")
            self._directory = directory
        os.makedirs(directory, exist_ok=True)
        with torch.no_grad():
            entries = [(gi, p, init_state(self.optimizer, p)) for gi, p in self._params()]
        tensors: list[torch.Tensor] = []
        offsets: list[int] = []
        blocks: list[_Block] = []
        pos = 0
        for gi, p, s in entries:
            size = sum(_align(s[key].numel() * s[key].element_size()) for key in _MOMENTS)
            if not blocks or blocks[-1].group != gi or (blocks[-1].end - blocks[-1].start + size > self.block_bytes
                                                        and blocks[-1].params):
                blocks.append(_Block(group=gi, start=pos, end=pos))
            for key in _MOMENTS:
                t = s[key]
                if t.dtype != torch.float32:
                    raise TypeError(f"tier='disk': expected float32 optimizer state, got {t.dtype} for {key}")
                tensors.append(t)
                offsets.append(pos)
                pos += _align(t.numel() * t.element_size())
            blocks[-1].params.append(p)
            blocks[-1].end = pos
        store = _DiskStore(os.path.join(directory, STATE_FILE), tensors, offsets, pos)
        views = [store.view(t, off) for t, off in zip(tensors, offsets, strict=True)]
        # The file is complete and synced: only now does the optimizer see it.
        it = iter(views)
        for _, p, s in entries:
            for key in _MOMENTS:
                s[key] = next(it)
        for b in blocks:
            store.advise(mmap.MADV_DONTNEED, b.start, b.end)
        self._store = store
        self._blocks = blocks

    # ------------------------------------------------------------------------------------- step
    def step(self) -> None:
        """One optimizer step in the current state (same kernel and order for CPU parameters
        whether offloaded or not; resident CUDA parameters step with ``optimizer.step()``)."""
        if self._device().type == "cuda" and not self._offloaded:
            self.optimizer.step()
            return
        hypers = [AdamHyper.of_group(g, self._decoupled) for g in self.optimizer.param_groups]
        with torch.no_grad():
            if not self._offloaded:
                for group, hyper in zip(self.optimizer.param_groups, hypers, strict=True):
                    params = params_with_grad(group)
                    for p in params:
                        init_state(self.optimizer, p)
                    step_params(self.optimizer, params, hyper)
                return
            if self.tier == "host":
                for group, hyper in zip(self.optimizer.param_groups, hypers, strict=True):
                    self._step_staged(params_with_grad(group), hyper)
                return
            self._step_disk(hypers)

    def _step_disk(self, hypers: list[AdamHyper]) -> None:
        store = self._store
        assert store is not None  # offloaded to disk implies a store
        known = {id(p) for b in self._blocks for p in b.params}
        for gi, group in enumerate(self.optimizer.param_groups):
            if any(p.grad is not None and id(p) not in known for p in group["params"]):
                raise RuntimeError(
                    f"param_groups[{gi}] has parameters added after offload(); call restore() and offload() again"
                )
        for i, block in enumerate(self._blocks):
            if i + 1 < len(self._blocks):
                nxt = self._blocks[i + 1]
                store.advise(mmap.MADV_WILLNEED, nxt.start, nxt.end)
            params = [p for p in block.params if p.grad is not None]
            if params and params[0].is_cuda:
                self._step_staged(params, hypers[block.group])
            else:
                step_params(self.optimizer, params, hypers[block.group])
            store.advise(mmap.MADV_DONTNEED, block.start, block.end)

    def _step_staged(self, params: list[torch.Tensor], hyper: AdamHyper) -> None:
        """CUDA parameters with host state: copy down, step on the host, copy the parameter back."""
        host_params = [p.detach().to("cpu", copy=True) for p in params]
        host_grads = [p.grad.to("cpu", copy=True) for p in params]  # type: ignore[union-attr]
        step_params(self.optimizer, params, hyper, host_params=host_params, host_grads=host_grads)
        for p, h in zip(params, host_params, strict=True):
            p.detach().copy_(h, non_blocking=False)

    # --------------------------------------------------------------------------------- persist
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict (tensors may view the state file: they stay valid, and later
        steps change them, as torch's own state dict shares its tensors) plus the offload state."""
        return {"optimizer": self.optimizer.state_dict(), "offload": {"tier": self.tier, "offloaded": self._offloaded}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads an optimizer state (from this class or a plain ``optimizer.state_dict()``); the
        current tier placement is kept: an offloaded object offloads the loaded state again."""
        inner = state_dict.get("optimizer", state_dict) if "offload" in state_dict else state_dict
        was = self._offloaded
        if was:
            self._drop_store()
        self.optimizer.load_state_dict(inner)
        if was:
            self.offload()

    def _drop_store(self) -> None:
        if self._store is not None:
            self._store.discard()
        self._store = None
        self._blocks = []
        self._offloaded = False

    def close(self) -> None:
        """Restores the state if offloaded and removes a directory this object created."""
        self.restore()
        if self._own_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def set_offloaded(self, on: bool) -> bool:
        """offload() when ``on``, else restore(); True when something moved (the actuator's call)."""
        return self.offload() if on else self.restore()
