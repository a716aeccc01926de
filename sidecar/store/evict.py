"""LRU eviction under a byte budget."""
from __future__ import annotations

from typing import Callable

from .index import Index

# Evict down to this fraction of the budget, so that eviction runs now and then, not on every write.
LOW_WATER = 0.9


def evict_to_budget(index: Index, budget: int, unlink: Callable[[str, int], None],
                    target: float | None = None) -> tuple[int, int, list[str]]:
    """Remove least recently used files (chunks, digest files) until their bytes on disk are
    under budget (down to `target` of it, default LOW_WATER). Returns (bytes on disk
    afterwards, files removed, objects that lost a chunk).
    Another process may hold a removed chunk open: unlinking leaves its reads intact, and it
    will simply find the chunk missing next time."""
    used = index.disk_bytes()
    goal = int(budget * (LOW_WATER if target is None else target))
    if used <= budget and target is None:
        return used, 0, []
    removed = 0
    touched: list[str] = []
    while used > goal:
        batch = index.oldest(256)
        if not batch:
            break
        gone: list[tuple[str, int]] = []
        for oid, idx, nbytes in batch:
            unlink(oid, idx)
            gone.append((oid, idx))
            used -= nbytes
            if idx >= 0:
                touched.append(oid)
            if used <= goal:
                break
        index.forget_chunks(gone)    # one transaction per batch: tiny files evict thousands
        removed += len(gone)
    return used, removed, touched
