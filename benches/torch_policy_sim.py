"""PyTorch's default CUDA caching-allocator block policy, as a small simulator (the baseline of the
pool's replay figures). Written to be obviously correct, not fast. The rules
(c10/cuda/CUDACachingAllocator.cpp, default settings):

- sizes round up to a multiple of 512 B (at least 512 B);
- requests up to 1 MiB use the small pool, larger ones the large pool;
- a new segment is 2 MiB for the small pool, 20 MiB for requests below 10 MiB, otherwise the
  request rounded up to 2 MiB;
- best fit: the free block of the pool with the smallest (size, address) that fits;
- split when the remainder is >= 512 B (small pool) or > 1 MiB (large pool);
- a freed block merges with free neighbours of its segment; segments are never released.

One stream only (the traces here use stream 0).

``expandable=True`` simulates ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` instead
(``TorchExpandableSim``): each pool (small, large) is one virtual address range mapped in pages
of 2 MiB (small pool) or 20 MiB (large pool); a block is split whenever the remainder is >= 512 B;
when no mapped free block fits, the free block at the top of the range (if any) is extended by
mapping just enough pages behind it (``find_expandable_block`` / ``map_block``). Without memory
pressure torch never unmaps pages (it does on an out-of-memory retry or ``empty_cache``, which a
replay without a limit never reaches).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
SMALL_SIZE = 1 * MiB
SMALL_BUFFER = 2 * MiB
LARGE_BUFFER = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB
MIN_BLOCK = 512


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else -(-n // MIN_BLOCK) * MIN_BLOCK


def segment_size(n: int) -> int:
    if n <= SMALL_SIZE:
        return SMALL_BUFFER
    if n < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-n // ROUND_LARGE) * ROUND_LARGE


@dataclass
class _Block:
    addr: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None


@dataclass
class TorchPolicySim:
    """Replays alloc/free calls and tracks reserved (sum of segments) and requested bytes."""

    free_lists: dict[bool, list[tuple[int, int]]] = field(default_factory=lambda: {True: [], False: []})
    blocks: dict[int, _Block] = field(default_factory=dict)
    reserved: int = 0
    requested: int = 0
    peak_reserved: int = 0
    peak_requested: int = 0
    segments: int = 0
    _next_addr: int = 0

    def allocate(self, nbytes: int) -> int:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        free = self.free_lists[small]
        i = bisect.bisect_left(free, (size, -1))
        if i < len(free):
            _, addr = free.pop(i)
            block = self.blocks[addr]
        else:
            seg = segment_size(size)
            addr = self._next_addr
            self._next_addr += seg + (1 << 40)  # segments never touch each other
            block = _Block(addr, seg, small)
            self.blocks[addr] = block
            self.reserved += seg
            self.segments += 1
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if (small and remaining >= MIN_BLOCK) or (not small and remaining > SMALL_SIZE):
            rest = _Block(block.addr + size, remaining, small, True, block, block.next)
            if block.next:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self.blocks[rest.addr] = rest
            bisect.insort(free, (rest.size, rest.addr))
        block.free = False
        self.requested += nbytes
        self.peak_requested = max(self.peak_requested, self.requested)
        return block.addr

    def deallocate(self, addr: int, nbytes: int) -> None:
        block = self.blocks[addr]
        free = self.free_lists[block.small]
        block.free = True
        self.requested -= nbytes
        nxt = block.next
        if nxt is not None and nxt.free:
            free.remove((nxt.size, nxt.addr))
            del self.blocks[nxt.addr]
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next:
                nxt.next.prev = block
        prv = block.prev
        if prv is not None and prv.free:
            free.remove((prv.size, prv.addr))
            del self.blocks[block.addr]
            prv.size += block.size
            prv.next = block.next
            if block.next:
                block.next.prev = prv
            block = prv
        bisect.insort(free, (block.size, block.addr))


EXPANDABLE_PAGE = {True: SMALL_BUFFER, False: LARGE_BUFFER}  # mapping unit per pool (small?)


@dataclass
class TorchExpandableSim:
    """torch's allocator with ``expandable_segments:True``: one growable range per pool. Counts
    page mappings as upstream calls (one per extension)."""

    free_lists: dict[bool, list[tuple[int, int]]] = field(default_factory=lambda: {True: [], False: []})
    blocks: dict[int, _Block] = field(default_factory=dict)
    top: dict[bool, _Block | None] = field(default_factory=lambda: {True: None, False: None})
    mapped_end: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 1 << 50})
    reserved: int = 0
    requested: int = 0
    peak_reserved: int = 0
    peak_requested: int = 0
    segments: int = 0  # extensions of a range (map calls)

    def allocate(self, nbytes: int) -> int:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        free = self.free_lists[small]
        i = bisect.bisect_left(free, (size, -1))
        if i < len(free):
            _, addr = free.pop(i)
            block = self.blocks[addr]
        else:
            top = self.top[small]
            have = top.size if top is not None and top.free else 0
            page = EXPANDABLE_PAGE[small]
            grow = -(-(size - have) // page) * page
            if have:
                assert top is not None
                free.remove((top.size, top.addr))
                top.size += grow
                block = top
            else:
                block = _Block(self.mapped_end[small], grow, small, True, top, None)
                if top is not None:
                    top.next = block
                self.blocks[block.addr] = block
                self.top[small] = block
            self.mapped_end[small] += grow
            self.reserved += grow
            self.segments += 1
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if remaining >= MIN_BLOCK:  # expandable segments split at any remainder >= 512 B
            rest = _Block(block.addr + size, remaining, small, True, block, block.next)
            if block.next:
                block.next.prev = rest
            elif self.top[small] is block:
                self.top[small] = rest
            block.next = rest
            block.size = size
            self.blocks[rest.addr] = rest
            bisect.insort(free, (rest.size, rest.addr))
        block.free = False
        self.requested += nbytes
        self.peak_requested = max(self.peak_requested, self.requested)
        return block.addr

    def deallocate(self, addr: int, nbytes: int) -> None:
        block = self.blocks[addr]
        small = block.small
        free = self.free_lists[small]
        block.free = True
        self.requested -= nbytes
        nxt = block.next
        if nxt is not None and nxt.free:
            free.remove((nxt.size, nxt.addr))
            del self.blocks[nxt.addr]
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next:
                nxt.next.prev = block
            if self.top[small] is nxt:
                self.top[small] = block
        prv = block.prev
        if prv is not None and prv.free:
            free.remove((prv.size, prv.addr))
            del self.blocks[block.addr]
            prv.size += block.size
            prv.next = block.next
            if block.next:
                block.next.prev = prv
            if self.top[small] is block:
                self.top[small] = prv
            block = prv
        bisect.insort(free, (block.size, block.addr))


def replay(
    rows: Iterable[tuple[str, int, int, int]], repeat: int = 1, expandable: bool = False
) -> dict[str, float | int]:
    """Replays (op, id, bytes, stream) rows ``repeat`` times, freeing what is live after each pass;
    returns peak reserved/requested, their ratio and the segments (upstream calls) per pass.
    ``expandable``: torch with ``expandable_segments:True`` (TorchExpandableSim)."""
    rows = list(rows)
    sim: TorchPolicySim | TorchExpandableSim = TorchExpandableSim() if expandable else TorchPolicySim()
    per_pass = []
    for _ in range(repeat):
        live: dict[int, tuple[int, int]] = {}
        before = sim.segments
        for op, ident, nbytes, _stream in rows:
            if op == "alloc":
                live[ident] = (sim.allocate(nbytes), nbytes)
            else:
                addr, n = live.pop(ident)
                sim.deallocate(addr, n)
        for addr, n in live.values():
            sim.deallocate(addr, n)
        per_pass.append(sim.segments - before)
    return {
        "peak_reserved_bytes": sim.peak_reserved,
        "peak_requested_bytes": sim.peak_requested,
        "reserved_to_requested": sim.peak_reserved / sim.peak_requested if sim.peak_requested else 0.0,
        "upstream_allocs": sim.segments,
        "upstream_allocs_after_first_pass": sum(per_pass[1:]),
    }
