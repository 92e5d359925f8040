"""Preemption: which running tasks to stop so that a waiting one fits, losing the least work.

Kept apart from the scheduler's bookkeeping: it sees candidates only through three callables, so
the same search serves any caller that can say what fits, what a stop costs and how a candidate
scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["least_work_victims"]

V = TypeVar("V")


def least_work_victims(
    pool: Sequence[V],
    fits: Callable[[list[V]], bool],
    lost: Callable[[V], float],
    score: Callable[[V], float],
    order: Callable[[V], int],
    exact_limit: int = 10,
) -> list[V] | None:
    """The subset of ``pool`` whose stopping makes ``fits`` true with the least work lost (seconds),
    then fewest victims, then lowest summed score; None if even the whole pool is not enough.

    Exhaustive over subsets up to ``exact_limit`` candidates, greedy (cheapest first) beyond.
    Guaranteed minimal: every victim not needed for the fit is dropped again, most expensive first.
    """
    if not pool or not fits(list(pool)):
        return None
    cost = {id(v): lost(v) for v in pool}
    chosen: list[V] = []
    if len(pool) <= exact_limit:
        best: tuple[float, int, float] | None = None
        for k in range(1, len(pool) + 1):
            for combo in itertools.combinations(pool, k):
                key = (sum(cost[id(v)] for v in combo), k, sum(score(v) for v in combo))
                if (best is None or key < best) and fits(list(combo)):
                    best, chosen = key, list(combo)
    else:
        for v in sorted(pool, key=lambda v: (cost[id(v)], score(v), order(v))):
            chosen.append(v)
            if fits(chosen):
                break
    for v in sorted(chosen, key=lambda v: -cost[id(v)]):
        rest = [w for w in chosen if w is not v]
        if fits(rest):
            chosen = rest
    return chosen
