"""Optimizer state on a slower memory tier: ``OptimizerOffload(optimizer, tier, directory)``.

Tiers:

- ``"disk"``: the moments (``exp_avg``, ``exp_avg_sq``) move into one file on local disk, mapped
  into memory. :meth:`OptimizerOffload.step` walks the file in blocks of about ``block_bytes``:
  it asks the kernel to read the next block ahead (``MADV_WILLNEED``) while the current one steps,
  and drops each stepped block from the process (``MADV_DONTNEED``; its dirty pages stay in the
  page cache, are written back by the kernel and can be reclaimed under a memory limit). Works for
  CPU parameters (and for CUDA parameters through host staging, see ``"host"``).
- ``"host"``: for CUDA parameters: the moments move to pinned host memory and the step runs on the
  host with the fused CPU kernel: parameter and gradient copied down on a side stream as backward
  produces each gradient, the parameter copied back on it (``offload.host_staging``).
  CUDA paths: written against torch's API, not run on this project's CPU-only CI.

In every state :meth:`step` uses the same native kernel in the same order for CPU parameters, so a
trajectory is bit-identical with and without offload. The state stays in the optimizer's own
``state`` (tensors that view the file or pinned memory), so ``optimizer.state_dict()`` and
checkpoints work in either state. A move that fails part-way leaves the optimizer exactly as it
was: the file is written under a temporary name, synced and renamed before any state tensor is
swapped; :meth:`restore` copies everything back before it swaps and only then deletes the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from autoglm_rt.offload.fused_adam import (
    AdamHyper,
    apply_step,
    check_adam,
    init_state,
    params_with_grad,
    step_params,
)
from autoglm_rt.offload.host_staging import HostStaging
from autoglm_rt.units import parse_size

TIERS = ("host", "disk")
_MOMENTS = ("exp_avg", "exp_avg_sq")
_PAGE = mmap.PAGESIZE
STATE_FILE = "optimizer_state.bin"


# sync_file_range(2) (Linux; not in Python's os): write a byte range back and wait for it.
_SYNC_RANGE_WAIT = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER


def _sync_file_range_function() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _sync_file_range_function()


_PREFETCH_CHUNK = 128 * 1024  # the kernel's default readahead window (VM_READAHEAD_PAGES)


def _align(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


@dataclass
class _Piece:
    """Elements [begin, end) of a parameter; its moments start at m_offset and v_offset."""

    param: torch.Tensor
    begin: int
    end: int
    m_offset: int
    v_offset: int

    def ranges(self) -> list[tuple[int, int]]:
        return [(off + 4 * self.begin, off + 4 * self.end) for off in (self.m_offset, self.v_offset)]

    def prefix_ranges(self) -> list[tuple[int, int]]:
        """From the start of each moment up to the end of this piece."""
        return [(off, off + 4 * self.end) for off in (self.m_offset, self.v_offset)]


@dataclass
class _Block:
    """Pieces of one group's parameters holding about block_bytes of moments: the unit the disk
    tier steps, prefetches and releases."""

    group: int
    pieces: list[_Piece] = field(default_factory=list)
    nbytes: int = 0

    def ranges(self) -> list[tuple[int, int]]:
        return [r for piece in self.pieces for r in piece.ranges()]

    def prefix_ranges(self) -> list[tuple[int, int]]:
        """Each moment of each piece from its start: a range the page cache can drop whole (a
        block's own range rarely covers the large folios readahead creates, and the kernel drops
        only folios entirely inside the range it is given)."""
        return [r for piece in self.pieces for r in piece.prefix_ranges()]


class _DiskStore:
    """The state file: every parameter's moments at page-aligned offsets, in group order."""

    def __init__(self, path: str, tensors: list[torch.Tensor | None], offsets: list[int], size: int) -> None:
        """Writes ``tensors`` at ``offsets`` (None: zeros, left as a hole in the file) and maps
        the file; the file appears under ``path`` only once complete and synced."""
        self.path = path
        self.size = size
        tmp = path + ".tmp"
        try:
            # Large sequential writes from the tensors' own memory; nothing is swapped yet.
            with open(tmp, "wb") as f:
                for t, off in zip(tensors, offsets, strict=True):
                    if t is None or t.numel() == 0:
                        continue
                    f.seek(off)
                    f.write(_bytes_of(t))
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        # A descriptor kept for posix_fadvise, closed by discard() or when the store is collected.
        self.fd = os.open(path, os.O_RDWR)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self.map = mmap.mmap(self.fd, size) if size else None
        if self.map is not None:
            # No kernel readahead: step() prefetches exactly the next block. Readahead would keep
            # megabytes of state ahead of the step in the page cache, which a memory cgroup counts.
            self.map.madvise(mmap.MADV_RANDOM)

    def view(self, shape: torch.Size, offset: int) -> torch.Tensor:
        """A float32 tensor of ``shape`` over the file at offset (RAM for an empty tensor)."""
        numel = math.prod(shape)
        if numel == 0 or self.map is None:
            return torch.empty(shape, dtype=torch.float32)
        return torch.frombuffer(self.map, dtype=torch.float32, count=numel, offset=offset).view(shape)

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Asks the kernel to read these byte ranges ahead (returns once the reads are queued).
        One call per ``_PREFETCH_CHUNK``: the kernel reads at most its readahead window
        (``read_ahead_kb``) per call and drops the rest of a larger range."""
        for start, end in ranges:
            if self.map is None or end <= start:
                continue
            for chunk in range(start - start % _PAGE, end, _PREFETCH_CHUNK):
                self.map.madvise(mmap.MADV_WILLNEED, chunk, min(_PREFETCH_CHUNK, end - chunk))

    def release(self, ranges: list[tuple[int, int]], drop_page_cache: bool) -> None:
        """Drops these byte ranges from the process; with ``drop_page_cache`` also starts writing
        them back without waiting and evicts what is clean, so the page cache holds little dirty
        state (which a memory cgroup reclaims slowly) at the price of reading it back next step."""
        for start, end in ranges:
            if self.map is None or end <= start:
                continue
            aligned = start - start % _PAGE
            self.map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
            if drop_page_cache:
                os.posix_fadvise(self.fd, aligned, end - aligned, os.POSIX_FADV_DONTNEED)

    def evict(self, ranges: list[tuple[int, int]]) -> None:
        """Waits until these byte ranges (a block released earlier, whose writeback has had a
        block's time to run) are on disk, then evicts them from the page cache: the dirty state in
        flight stays at about two blocks, which a memory cgroup's usage and peak would count."""
        for start, end in ranges:
            if self.map is None or end <= start:
                continue
            aligned = start - start % _PAGE
            if _sync_file_range is None or _sync_file_range(self.fd, aligned, end - aligned, _SYNC_RANGE_WAIT) != 0:
                os.fdatasync(self.fd)  # no sync_file_range here: the whole file, same effect
            os.posix_fadvise(self.fd, aligned, end - aligned, os.POSIX_FADV_DONTNEED)

    def flush_and_evict(self) -> None:
        """Waits for the file's writeback and evicts all of it from the page cache: what a step
        leaves behind is then on disk only. (Released pages are dirty when first advised away, and
        the kernel drops only clean ones; without this they stay cached and count against a
        memory cgroup until reclaimed.)"""
        if self.map is None:
            return
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, self.size, os.POSIX_FADV_DONTNEED)

    def discard(self) -> None:
        """Deletes the file. Tensors still viewing it stay valid (the mapping outlives the name)."""
        _remove_quietly(self.path)
        self._close_fd()
        self.map = None


def _bytes_of(t: torch.Tensor) -> memoryview:
    return t.detach().cpu().contiguous().numpy().view("uint8").data


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _copy_out(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a moment in the parameters' memory (restore's one copy per tensor)."""
    return t.to(device=device, copy=True)


class OptimizerOffload:
    """Moves a torch Adam/AdamW's moments to ``tier`` and back; steps it in either state.

    ``directory``: where the disk tier's file lives (default: a new temporary directory, removed
    by :meth:`close`). ``block_bytes``: size of the disk tier's stepping blocks (int or "64Mi").
    ``drop_page_cache``: after stepping a block, also start its writeback and evict it from the
    page cache (bounded memory under a cgroup limit; each step then reads the state back).
    False keeps it cached: faster while memory is plentiful (see benches/RESULTS.md).
    Use :meth:`step` instead of ``optimizer.step()`` while this object manages the optimizer.
    """

    def __init__(
        self,
        optimizer: Any,
        tier: str = "host",
        directory: str | os.PathLike[str] | None = None,
        block_bytes: int | str = "64Mi",
        drop_page_cache: bool = True,
    ) -> None:
        self._decoupled = check_adam(optimizer)
        if tier not in TIERS:
            raise ValueError(f"tier: expected one of {', '.join(TIERS)}, got {tier!r}")
        self.optimizer = optimizer
        self.tier = tier
        self.drop_page_cache = drop_page_cache
        self.block_bytes = parse_size(block_bytes, name="block_bytes")
        if self.block_bytes <= 0:
            raise ValueError(f"block_bytes: expected a positive size, got {block_bytes!r}")
        self._own_directory = directory is None
        self._directory = str(directory) if directory is not None else None
        self._store: _DiskStore | None = None
        self._blocks: list[_Block] = []
        self._staging: HostStaging | None = None
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
        self._close_staging()
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
                moved.append(
                    (s, {key: s[key].to("cpu", copy=True).pin_memory() if pinned else s[key].cpu() for key in _MOMENTS})
                )
        staging = HostStaging([p for _, p in self._params()])  # before any swap: a failure changes nothing
        for s, m in moved:
            s.update(m)
        self._staging = staging

    def _offload_disk(self) -> None:
        directory = self._directory
        if directory is None:
            directory = tempfile.mkdtemp(prefix="autoglm_rt_offload_")
            self._directory = directory
        os.makedirs(directory, exist_ok=True)
        entries = list(self._params())
        for _, p in entries:
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"tier='disk': expected float32 or bfloat16 parameters, got {p.dtype}")
        tensors: list[torch.Tensor | None] = []
        offsets: list[int] = []
        blocks: list[_Block] = []
        pos = 0
        per_block = max(1, self.block_bytes // 8)  # elements per block: 4 bytes in each moment
        for gi, p in entries:
            # A parameter without state gets torch's initial state (zeros) directly in the file,
            # never in RAM: offloading before the first step costs no memory.
            s = self.optimizer.state.get(p) or None
            m_off, v_off = pos, pos + _align(p.numel() * 4)
            for key, off in zip(_MOMENTS, (m_off, v_off), strict=True):
                tensors.append(s[key] if s is not None else None)
                offsets.append(off)
            pos = v_off + _align(p.numel() * 4)
            for begin in range(0, max(p.numel(), 1), per_block):
                end = min(p.numel(), begin + per_block)
                last = blocks[-1] if blocks else None
                if last is None or last.group != gi or last.nbytes + 8 * (end - begin) > self.block_bytes:
                    blocks.append(_Block(group=gi))
                blocks[-1].pieces.append(_Piece(p, begin, end, m_off, v_off))
                blocks[-1].nbytes += 8 * (end - begin)
        store = _DiskStore(os.path.join(directory, STATE_FILE), tensors, offsets, pos)
        # The file is complete and synced: only now does the optimizer see it.
        i = 0
        for _, p in entries:
            s = self.optimizer.state[p]
            if not s:
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in _MOMENTS:
                s[key] = store.view(p.shape, offsets[i])
                i += 1
        for b in blocks:
            store.release(b.ranges(), self.drop_page_cache)
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
            if self._offloaded and self.tier == "disk":
                self._step_disk(hypers)
                return
            # Every group is checked before any is stepped, so bad input changes nothing.
            groups = [params_with_grad(g, cuda_ok=self._offloaded) for g in self.optimizer.param_groups]
            for params, hyper in zip(groups, hypers, strict=True):
                if self._offloaded:  # host tier
                    self._step_staged(params, hyper)
                    continue
                for p in params:
                    init_state(self.optimizer, p)
                step_params(self.optimizer, params, hyper)

    def _step_disk(self, hypers: list[AdamHyper]) -> None:
        store = self._store
        assert store is not None  # offloaded to disk implies a store
        known = {id(piece.param) for b in self._blocks for piece in b.pieces}
        stepping = []
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in params_with_grad(group, cuda_ok=True):
                if id(p) not in known:
                    raise RuntimeError(
                        f"param_groups[{gi}] has parameters added after offload(); call restore() and offload() again"
                    )
                stepping.append(p)
        after = {id(p): self.optimizer.state[p]["step"] + 1 for p in stepping}
        steps = {key: float(t) for key, t in after.items()}
        if self._blocks:
            store.prefetch(self._blocks[0].ranges())
        for i, block in enumerate(self._blocks):
            if i + 1 < len(self._blocks):
                store.prefetch(self._blocks[i + 1].ranges())
            pieces = [piece for piece in block.pieces if id(piece.param) in steps and piece.end > piece.begin]
            if pieces:
                self._step_pieces(pieces, [steps[id(piece.param)] for piece in pieces], hypers[block.group])
            store.release(block.ranges(), self.drop_page_cache)
            if self.drop_page_cache and i > 0:
                store.evict(self._blocks[i - 1].prefix_ranges())
        if self.drop_page_cache:
            store.flush_and_evict()
        for p in stepping:
            self.optimizer.state[p]["step"].copy_(after[id(p)])

    def _step_pieces(self, pieces: list[_Piece], steps: list[float], hyper: AdamHyper) -> None:
        params, grads, ms, vs, back = [], [], [], [], []
        for piece in pieces:
            p, s = piece.param, self.optimizer.state[piece.param]
            flat = p.detach().view(-1)[piece.begin : piece.end]
            grad = p.grad.reshape(-1)[piece.begin : piece.end]  # type: ignore[union-attr]
            if p.is_cuda:
                host = flat.to("cpu", copy=True)
                back.append((flat, host))
                flat, grad = host, grad.to("cpu", copy=True)
            params.append(flat)
            grads.append(grad)
            ms.append(s["exp_avg"].view(-1)[piece.begin : piece.end])
            vs.append(s["exp_avg_sq"].view(-1)[piece.begin : piece.end])
        apply_step(params, grads, ms, vs, steps, hyper)
        for device_view, host in back:
            device_view.copy_(host)

    def _step_staged(self, params: list[torch.Tensor], hyper: AdamHyper) -> None:
        """CUDA parameters with host state: the pinned copies made during backward (side stream,
        ``HostStaging``), the step on the host, the parameters back on the side stream."""
        assert self._staging is not None  # offloaded to the host implies staging
        if not params:
            return

        def update(host_params: list[torch.Tensor], host_grads: list[torch.Tensor]) -> None:
            step_params(self.optimizer, params, hyper, host_params=host_params, host_grads=host_grads)

        self._staging.step(params, update)

    # --------------------------------------------------------------------------------- persist
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict (tensors may view the state file: they stay valid, and later
        steps change them, as torch's own state dict shares its tensors) plus the offload state."""
        return {"optimizer": self.optimizer.state_dict(), "offload": {"tier": self.tier, "offloaded": self._offloaded}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads an optimizer state (from this class or a plain ``optimizer.state_dict()``); the
        current tier placement is kept: an offloaded object offloads the loaded state again."""
        inner = state_dict.get("optimizer", state_dict) if "offload" in state_dict else state_dict
        # torch copies the loaded state into fresh tensors and checks it before changing anything,
        # so a bad state dict leaves the current (possibly offloaded) state as it was.
        self.optimizer.load_state_dict(inner)
        self.resync()

    def resync(self) -> None:
        """After the optimizer's state was replaced behind this object's back (e.g. by
        ``optimizer.load_state_dict``), moves the new state to the tier when offloaded; nothing
        when resident."""
        if self._offloaded:
            self._drop_store()
            self.offload()

    def _drop_store(self) -> None:
        if self._store is not None:
            self._store.discard()
        self._store = None
        self._blocks = []
        self._close_staging()
        self._offloaded = False

    def _close_staging(self) -> None:
        if self._staging is not None:
            self._staging.close()
        self._staging = None

    def close(self) -> None:
        """Restores the state if offloaded and removes a directory this object created."""
        self.restore()
        if self._own_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def set_offloaded(self, on: bool) -> bool:
        """offload() when ``on``, else restore(); True when something moved (the actuator's call)."""
        return self.offload() if on else self.restore()
