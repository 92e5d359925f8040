"""Per-bucket state of a DDP communication hook, carried across DDP's bucket rebuilds.

A hook keeps flat tensors shaped like a bucket (a residual, a momentum, ...) keyed by the bucket's
index. DDP rebuilds its buckets after the first iteration, and a resumed DDP buckets its
parameters afresh, so an index can come to mean other parameters: :class:`BucketTables` then
carries every parameter's slice over from the entries that held it, so nothing is lost.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["BucketEntry", "BucketTables", "table_from", "table_state"]


@dataclass
class BucketEntry:
    layout: tuple[Any, ...]  # (numel, dtype, device, parameter shapes)
    tensor: torch.Tensor
    keys: tuple[int, ...] = ()  # the parameters' stable keys, in bucket order (see BucketTables.keys_of)

    def pieces(self) -> dict[int, torch.Tensor]:
        """This bucket's slices by parameter key (empty when keys or shapes do not add up)."""
        shapes = self.layout[3]
        sizes = [math.prod(s) for s in shapes]
        if len(self.keys) != len(shapes) or sum(sizes) != self.tensor.numel():
            return {}
        return dict(zip(self.keys, torch.split(self.tensor, sizes), strict=True))


class BucketTables:
    """Hands out each table's tensor for a bucket and migrates it when the bucket's layout changes.

    A table is a ``dict[int, BucketEntry]`` owned by the hook state (so it can save it with
    :func:`table_state`). Parameters get stable keys in the order they are first seen, i.e. the
    order of DDP's first-iteration buckets, which is the same in a fresh process and in the one a
    checkpoint came from. Call :meth:`end_iteration` after an iteration's last bucket."""

    def __init__(self) -> None:
        # id(parameter) -> (weak reference, stable key)
        self._param_key: dict[int, tuple[Any, int]] = {}
        # Entries replaced in this iteration, per table: their slices may still belong to buckets
        # not yet seen.
        self._retired: dict[int, list[BucketEntry]] = {}

    def keys_of(self, params: list[torch.Tensor]) -> tuple[int, ...]:
        keys = []
        for p in params:
            known = self._param_key.get(id(p))
            if known is None or known[0]() is not p:  # new, or an id reused after garbage collection
                known = (weakref.ref(p), len(self._param_key))
                self._param_key[id(p)] = known
            keys.append(known[1])
        return tuple(keys)

    def buffer_for(
        self, table: dict[int, BucketEntry], bucket: dist.GradBucket, buffer: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """``(tensor, lost)``: the table's tensor for this bucket (zeros when new) and whether a
        replaced entry's slices could not all be carried over."""
        params = list(bucket.parameters())
        layout = (buffer.numel(), buffer.dtype, buffer.device, tuple(tuple(p.shape) for p in params))
        index = bucket.index()
        entry = table.get(index)
        if entry is not None and entry.layout == layout:
            return entry.tensor, False
        new = BucketEntry(layout, torch.zeros_like(buffer), self.keys_of(params))
        retired = self._retired.setdefault(id(table), [])
        if entry is not None:
            retired.append(entry)
        pieces: dict[int, torch.Tensor] = {}
        for old in [*retired, *table.values()]:
            if old.layout[1:3] == layout[1:3]:
                pieces.update(old.pieces())
        found = 0
        for key, target in new.pieces().items():
            piece = pieces.get(key)
            if piece is not None and piece.shape == target.shape:
                target.copy_(piece)
                found += 1
        table[index] = new
        return new.tensor, entry is not None and found < len(params)

    def end_iteration(self) -> None:
        self._retired.clear()


def table_state(table: dict[int, BucketEntry]) -> dict[int, dict[str, Any]]:
    """A table as plain data (tensors cloned), for a state dict."""
    return {i: {"layout": r.layout, "tensor": r.tensor.clone(), "keys": r.keys} for i, r in table.items()}


def table_from(saved: dict[Any, dict[str, Any]]) -> dict[int, BucketEntry]:
    """The inverse of :func:`table_state` (tensors cloned)."""
    return {int(i): BucketEntry(tuple(r["layout"]), r["tensor"].clone(), tuple(r["keys"])) for i, r in saved.items()}
