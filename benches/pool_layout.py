"""Why a trace fragments the caching pool, and how far any non-moving allocator could get.

    PYTHONPATH=python python benches/pool_layout.py [TRACE.csv ...] [--granularity 64Ki]
        [--policy recent|best|lowaddr|highlarge] [--high-from 1Mi] [--classes 4Mi] [--decommit]
        [--spare-ratio N] [--tail-before F] [--compare] [--bound [--budget N]] [--quiet]

For each trace (default: benches/traces/*.csv and ../shared/traces/*.csv) this replays a Python
model of the pool's arena policy and prints, at the moment of peak reserved, the layout of each
arena (live blocks, free holes, the free tail) and the request that forced the growth.

The model is the pool with a separate small arena (csrc/memory/caching_pool.cpp whenever the
growth granule is at most 4 x small_size, e.g. the default 64 KiB host arenas): requests rounded to
256 B, a small class (<= 128 KiB) and a large class each growing one arena in `granularity` steps,
free blocks ordered by (size, address), the arena's free tail kept out of the free lists and
extended only when no hole fits, split on allocation, merge on free. `--compare` prints the native
replay (autoglm_rt.memory.replay) beside it: with the default policy they agree to the byte
(tests/test_memory_footprint.py). With granules above 4 x small_size (`--granularity 2Mi`) the
native pool puts small blocks into chunks carved from the large arena instead, so there the model
shows the separate-arena layout that the chunks replace.

Variants evaluated for benches/RESULTS.md: `--classes 4Mi` segregates a third class into an arena
of its own; `--decommit` unmaps free whole granules before the arena maps more (the pool's
`decommit=True` option; its peaks equal the model's); `--tail-before F` lets a request >= --high-from
take the already-mapped free tail instead of a hole F or more times its size; and the placement
(`--policy`):
  recent     best fit by (size, address); a block >= --high-from cut from a hole goes to the end
             of the hole whose neighbour was allocated last (the low end when neither neighbour
             is live), and such a block takes the free tail instead of a hole that holds the
             largest request so far, would not once cut, and is >= --spare-ratio x the block, when
             the tail holds it without growing: what the pool does
             (PoolOptions::recent_neighbour_from, spare_hole_ratio), with granules up to 4 x the
             small class (with larger ones, both the pool and this model use best)
  best       best fit by (size, address), always at the low end of the hole
  lowaddr    first fit by address
  highlarge  best fit, but blocks >= --high-from are cut from the high end of their hole

`--bound` searches, over one pass of the large class, every sequence of placements at either end
of any free gap or at the arena's end (branch and bound), for the lowest peak of the arena's
mapped size: once restricted to policies that use a fitting hole whenever one exists ("hole
first", every variant above) and once unrestricted (an offline allocator that knows the future).
The first is a lower bound for the pool's whole policy family on that trace; the second shows what
lookahead could buy; the gap between them is the evidence that no hole-first rule closes it.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROUND = 256
SMALL = 128 * 1024
MiB = 1 << 20

Trace = list[tuple[bool, int, int]]
POLICIES = ("recent", "best", "lowaddr", "highlarge")


def round_up(n: int, q: int) -> int:
    return (n + q - 1) // q * q


def read_trace(path: Path) -> Trace:
    """(is_alloc, id, bytes) rows of a trace CSV (DESIGN.md format; the stream is ignored)."""
    rows = []
    with open(path) as f:
        header = f.readline().strip()
        if header != "op,id,bytes,stream":
            raise ValueError(f"{path}: expected the header 'op,id,bytes,stream', got {header!r}")
        for line in f:
            if line.strip():
                op, ident, nbytes, _ = line.strip().split(",")
                rows.append((op == "alloc", int(ident), int(nbytes)))
    return rows


@dataclass
class Arena:
    """One class's arena: block starts in address order, their sizes, the live ones' ids."""

    cls: int
    mapped: int = 0
    peak: int = 0
    starts: list[int] = field(default_factory=list)
    size: dict[int, int] = field(default_factory=dict)
    live: dict[int, int] = field(default_factory=dict)
    unmapped: set[int] = field(default_factory=set)  # decommitted granules (index) inside [0, mapped)

    def blocks(self) -> list[tuple[int, int, int | None]]:
        return [(a, self.size[a], self.live.get(a)) for a in self.starts]

    def tail_free(self) -> int:
        if not self.starts or self.starts[-1] in self.live:
            return 0
        return self.size[self.starts[-1]]

    def holes(self) -> list[tuple[int, int]]:
        """Free blocks other than the free tail, as (address, size)."""
        out = [(a, self.size[a]) for a in self.starts if a not in self.live]
        if out and out[-1][0] == self.starts[-1]:
            out.pop()
        return out


class Model:
    """The pool's arena policy (separate small arena), replayed in Python."""

    def __init__(
        self,
        granularity: int,
        policy: str = "recent",
        high_from: int = MiB,
        bounds: tuple[int, ...] = (),
        decommit: bool = False,
        tail_before: float = 0.0,
        spare_ratio: int = 6,
    ) -> None:
        """`bounds`: more class boundaries above the small class's (each class its own arena).
        `decommit`: before an arena maps memory (to grow, or to back a block placed over granules
        unmapped earlier), the whole free granules inside its holes (and, when not growing, its
        free tail) are unmapped (one upstream call per free block); mapping is one call per block.
        `tail_before` (0 = off): a request >= `high_from` whose best-fitting hole is at least
        `tail_before` times its size takes the free tail instead when the tail already holds it
        (a rule evaluated for gcn_graphs and not adopted, benches/RESULTS.md).
        `spare_ratio` (0 = off; the pool's PoolOptions::spare_hole_ratio, policy `recent` only): a
        request >= `high_from` whose best-fitting hole holds the largest request its class has seen,
        would not hold it once cut, and is at least `spare_ratio` times the request, takes the free
        tail instead when the tail holds it without growing."""
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.gran = granularity
        self.policy = policy
        self.high_from = high_from
        self.decommit = decommit
        if not tail_before >= 0:  # NaN too
            raise ValueError(f"tail_before: expected a factor >= 0 (0 = off), got {tail_before!r}")
        self.tail_before = tail_before
        self.spare_ratio = spare_ratio
        self.upstream_frees = 0
        self.bounds = (SMALL, *sorted(bounds))
        self.arenas = [Arena(c) for c in range(len(self.bounds) + 1)]
        self.largest = [0 for _ in self.arenas]  # largest rounded request per class so far
        self.reserved = self.requested = 0
        self.peak_reserved = self.peak_requested = 0
        self.upstream_allocs = 0
        self.after_first = 0
        self.where: dict[int, tuple[int, int, int]] = {}  # id -> (class, address, requested)
        self.born: dict[int, int] = {}  # live block address (per class) -> allocation number
        self.allocs = 0
        self.snapshots = ["" for _ in self.arenas]  # per class: the layout when its arena last grew

    def choose(self, ar: Arena, r: int) -> tuple[int, int] | None:
        """The hole (address, size) for r bytes, or None to use and extend the free tail."""
        holes = [h for h in ar.holes() if h[1] >= r]
        if not holes:
            return None
        tail = ar.tail_free()
        if self.spares(ar, r, min(s for _, s in holes)):
            return None
        if self.tail_before and r >= self.high_from and tail >= r and min(s for _, s in holes) >= self.tail_before * r:
            return None
        if self.policy == "lowaddr":
            return min(holes)
        return min(holes, key=lambda h: (h[1], h[0]))

    def alloc(self, ident: int, nbytes: int, where: str) -> None:
        r = round_up(nbytes, ROUND)
        cls = bisect.bisect_left(self.bounds, r)
        ar = self.arenas[cls]
        hole = self.choose(ar, r)
        grew = 0
        if hole is None:
            have = ar.tail_free()
            need = 0 if have >= r else round_up(r - have, self.gran)
            if need and self.decommit:
                self.decommit_holes(ar)
            if need:
                self.upstream_allocs += 1
                grew = need
                if have:
                    ar.size[ar.starts[-1]] += need
                else:
                    ar.starts.append(ar.mapped)
                    ar.size[ar.mapped] = need
                ar.mapped += need
                self.reserved += need
            hole = (ar.starts[-1], ar.size[ar.starts[-1]])
        a, s = hole
        high = a != ar.starts[-1] and self.place_high(ar, a, s, r)
        if s - r >= ROUND:
            cut = a + s - r if high else a + r
            bisect.insort(ar.starts, cut)
            if high:
                ar.size[a], ar.size[cut] = s - r, r
                a = cut
            else:
                ar.size[a], ar.size[cut] = r, s - r
        if ar.unmapped:
            back = {k for k in range(a // self.gran, (a + r - 1) // self.gran + 1) if k in ar.unmapped}
            if back:
                ar.unmapped -= back
                ar.live[a] = ident  # not free while the others are decommitted
                self.decommit_holes(ar, tail=True)
                del ar.live[a]
                self.reserved += len(back) * self.gran
                self.upstream_allocs += 1
        ar.live[a] = ident
        self.largest[cls] = max(self.largest[cls], r)
        self.allocs += 1
        self.born[(cls, a)] = self.allocs
        self.where[ident] = (cls, a, nbytes)
        self.requested += nbytes
        self.peak_requested = max(self.peak_requested, self.requested)
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        if grew and ar.mapped > ar.peak:
            ar.peak = ar.mapped
            self.snapshots[cls] = self.describe(
                f"{where}: alloc id {ident} of {nbytes} B ({r} rounded, "
                f"{self.label(cls)} class) grew its arena to its peak by {grew} B"
            )

    def spares(self, ar: Arena, r: int, hole: int) -> bool:
        """Whether r bytes come from the free tail rather than the best-fitting hole of `hole` bytes."""
        if not self.spare_ratio or self.policy != "recent" or self.gran > 4 * SMALL or r < self.high_from:
            return False
        big = self.largest[ar.cls]
        return hole >= big > hole - r and hole // self.spare_ratio >= r and ar.tail_free() >= r

    def place_high(self, ar: Arena, a: int, s: int, r: int) -> bool:
        """Whether r bytes taken from the hole [a, a + s) (not the free tail) go at its high end."""
        if r < self.high_from or self.policy not in ("highlarge", "recent"):
            return False
        if self.policy == "highlarge":
            return True
        if self.gran > 4 * SMALL:  # the native pool keeps the rule to arenas with a small arena of their own
            return False
        i = ar.starts.index(a)
        below = self.born.get((ar.cls, ar.starts[i - 1]), 0) if i > 0 else 0
        above = self.born.get((ar.cls, ar.starts[i + 1]), 0) if i + 1 < len(ar.starts) else 0
        return above > below

    def decommit_holes(self, ar: Arena, tail: bool = False) -> None:
        free = ar.holes()
        if tail and ar.tail_free():
            free.append((ar.starts[-1], ar.tail_free()))
        for a, s in free:
            first, end = -(-a // self.gran), (a + s) // self.gran
            gone = {k for k in range(first, end) if k not in ar.unmapped}
            if gone:
                ar.unmapped |= gone
                self.reserved -= len(gone) * self.gran
                self.upstream_frees += 1

    def free(self, ident: int) -> None:
        cls, a, nbytes = self.where.pop(ident)
        ar = self.arenas[cls]
        del ar.live[a]
        del self.born[(cls, a)]
        self.requested -= nbytes
        i = ar.starts.index(a)
        if i + 1 < len(ar.starts) and ar.starts[i + 1] not in ar.live:
            ar.size[a] += ar.size.pop(ar.starts.pop(i + 1))
        if i > 0 and ar.starts[i - 1] not in ar.live:
            ar.size[ar.starts[i - 1]] += ar.size.pop(a)
            ar.starts.pop(i)

    def label(self, cls: int) -> str:
        if cls == 0:
            return "small"
        upper = f" <= {self.bounds[cls] / MiB:g} MiB" if cls < len(self.bounds) else ""
        return f"large ({'>'} {self.bounds[cls - 1] / MiB:g} MiB{upper})" if len(self.bounds) > 1 else "large"

    def describe(self, why: str) -> str:
        lines = [
            why,
            f"  reserved {self.reserved / MiB:.3f} MiB, requested {self.requested / MiB:.3f} MiB "
            f"(ratio {self.reserved / max(self.requested, 1):.3f})",
        ]
        for ar in self.arenas:
            live = sum(s for _, s, i in ar.blocks() if i is not None)
            lines.append(
                f"  {self.label(ar.cls)} arena: mapped {ar.mapped / MiB:.3f} MiB, live "
                f"{live / MiB:.3f} MiB, free holes {sum(s for _, s in ar.holes()) / MiB:.3f} MiB, free tail "
                f"{ar.tail_free() / MiB:.3f} MiB"
            )
            if ar.cls > 0 and len(ar.starts) <= 40:
                for a, s, i in ar.blocks():
                    tag = f"live id {i}" if i is not None else "free"
                    lines.append(f"    [{a / MiB:8.3f}, {(a + s) / MiB:8.3f}) MiB {s / MiB:8.3f} MiB  {tag}")
        return "\n".join(lines)

    def replay(self, trace: Trace, repeat: int = 3) -> Model:
        """Replays `trace` `repeat` times; allocations live at the end of a pass are freed."""
        for p in range(repeat):
            before = self.upstream_allocs
            for k, (is_alloc, ident, nbytes) in enumerate(trace, 1):
                if is_alloc:
                    self.alloc(ident, nbytes, f"pass {p + 1} record {k}")
                else:
                    self.free(ident)
            for ident in list(self.where):
                self.free(ident)
            if p > 0:
                self.after_first += self.upstream_allocs - before
        return self

    @property
    def ratio(self) -> float:
        return self.peak_reserved / self.peak_requested


def best_placement(
    trace: Trace, granularity: int, hole_first: bool, budget: int = 200_000
) -> tuple[int, list[str], bool]:
    """Lowest peak mapped size of the large class's arena over one pass of `trace`, over every
    sequence of placements at either end of a free gap or at the arena's end (growing it in
    `granularity` steps); with `hole_first`, the end only when no gap fits. Returns the peak, the
    allocations of the best sequence that grew the arena although a gap fitted, and whether the
    search finished within `budget` nodes (if not, the peak is the best found, not the bound)."""
    events = [(a, i, round_up(n, ROUND)) for a, i, n in trace if round_up(n, ROUND) > SMALL]
    best: list[object] = [float("inf"), []]
    seen: dict[tuple[int, tuple[tuple[int, int, int], ...], int], int] = {}
    nodes = [0]

    def search(k: int, live: tuple[tuple[int, int, int], ...], top: int, peak: int, notes: list[str]) -> None:
        nodes[0] += 1
        if peak >= best[0] or (nodes[0] > budget and best[0] != float("inf")):  # type: ignore[operator]
            return
        if k == len(events):
            best[0], best[1] = peak, notes
            return
        key = (k, live, top)
        if seen.get(key, 1 << 62) <= peak:
            return
        seen[key] = peak
        is_alloc, ident, r = events[k]
        if not is_alloc:
            search(k + 1, tuple(x for x in live if x[2] != ident), top, peak, notes)
            return
        gaps, at = [], 0
        for s, e, _ in live:
            if s > at:
                gaps.append((at, s))
            at = e
        spots = {s for s, e in gaps if e - s >= r} | {e - r for s, e in gaps if e - s >= r}
        options = [(top, s, False) for s in spots]
        if not spots or not hole_first:
            grown = top if at + r <= top else top + round_up(at + r - top, granularity)
            options.append((grown, at, bool(spots)))
        for new_top, spot, declined in sorted(options):
            note = [f"id {ident} ({r / MiB:.3f} MiB) at the arena's end though a gap fitted"] if declined else []
            search(k + 1, tuple(sorted((*live, (spot, spot + r, ident)))), new_top, max(peak, new_top), notes + note)

    sys.setrecursionlimit(max(10_000, 4 * len(events)))
    search(0, (), 0, 0, [])
    return int(best[0]), list(best[1]), nodes[0] <= budget  # type: ignore[call-overload]


def default_traces() -> list[Path]:
    return sorted((HERE / "traces").glob("*.csv")) + sorted((HERE.parent.parent / "shared" / "traces").glob("*.csv"))


def main(argv: list[str] | None = None) -> int:
    from autoglm_rt.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="*", type=Path)
    ap.add_argument("--granularity", default="64Ki")
    ap.add_argument("--policy", default="recent", choices=POLICIES)
    ap.add_argument("--high-from", default="1Mi", help="recent, highlarge: smallest block the rule moves")
    ap.add_argument(
        "--tail-before", type=float, default=0.0, help="model: take the free tail over a hole >= this x the request"
    )
    ap.add_argument("--spare-ratio", type=int, default=6, help="recent: keep a hole for the largest request (0 = off)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--classes", default="", help="more class boundaries, e.g. 4Mi (a third arena above it)")
    ap.add_argument("--compare", action="store_true", help="print the native replay beside the model")
    ap.add_argument("--bound", action="store_true", help="search the best placements (hole first and any)")
    ap.add_argument("--budget", type=int, default=200_000, help="--bound: search nodes before it is cut")
    ap.add_argument("--quiet", action="store_true", help="figures only, no layout")
    ap.add_argument("--decommit", action="store_true", help="model: unmap free whole granules in holes before mapping")
    args = ap.parse_args(argv)
    gran = parse_size(args.granularity, name="granularity")
    for path in args.trace or default_traces():
        trace = read_trace(path)
        bounds = tuple(parse_size(b, name="classes") for b in args.classes.split(",") if b)
        high_from = parse_size(args.high_from, name="high_from")
        m = Model(gran, args.policy, high_from, bounds, args.decommit, args.tail_before, args.spare_ratio).replay(
            trace, args.repeat
        )
        print(
            f"== {path.name} ({args.policy}, granularity {gran}): peak reserved / requested = {m.ratio:.4f} "
            f"({m.peak_reserved / MiB:.3f} / {m.peak_requested / MiB:.3f} MiB), upstream allocs after the "
            f"first pass {m.after_first}" + (f", upstream frees {m.upstream_frees}" if args.decommit else "")
        )
        if not args.quiet:
            for text in reversed(m.snapshots):
                print(text)
        if args.compare:
            from autoglm_rt import memory

            native = memory.replay(path, repeat=args.repeat, granularity=gran)
            reserved = native["peak_reserved_bytes"] / MiB
            print(
                f"  native replay: {native['reserved_to_requested']:.4f} ({reserved:.3f} MiB reserved), "
                f"upstream allocs after the first pass {native['upstream_allocs_after_first_pass']}"
            )
        if args.bound:
            small = sum(a.peak for a in m.arenas[:-1]) if len(m.arenas) > 2 else m.arenas[0].peak
            for hole_first in (True, False):
                peak, notes, complete = best_placement(trace, gran, hole_first, args.budget)
                total = peak + small
                label = "hole-first placements" if hole_first else "any placement (offline)"
                print(
                    f"  {'best' if complete else 'best found (search cut at its budget)'} large arena over "
                    f"{label}: {peak / MiB:.3f} MiB; with the small arena ({small / MiB:.3f} MiB): ratio "
                    f"{total / m.peak_requested:.4f}"
                )
                for n in notes:
                    print(f"    {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
