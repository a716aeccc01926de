"""Sizing many objects without throwing progress away (issue 11, item 2).

- the persistent md5 -> size index first, then the store's verified objects, each asked
  once per batch (one trip to a store thread each, never one per object);
- then a pool of `workers` coroutines (default: the remote's size slots) pulling from one iterator (no task per object created
  up front, so 1M objects cost `workers` tasks), each object asked on its own (HEAD, or a
  stat for a local remote: cost per object asked, never a LIST of a whole `files/md5/XX/`
  prefix), each request under its own deadline (`Fetcher.size_of`), each size recorded in
  the index and handed to `on_size` the moment it is known - a deadline or error that ends
  the batch keeps every size learned before it.

The shared size index (`<md5>.dir.sizes` next to a manifest on the remote) is read by the
engine before it gets here (`sidecar.sizeindex`); what it held is already in the index.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Awaitable, Callable, Hashable, Iterable, Iterator, TypeVar

from .scheduler import Fetcher, ObjectRef

K = TypeVar("K", bound=Hashable)

INDEX_BATCH = 512
# The most coroutines in a sizing pool: an HTTP remote carries 128 HEADs at once
# (Remote.size_concurrency); other remotes as many as their reads (the fetcher's jobs).
WORKERS = 128


async def size_all(fetcher: Fetcher, items: Iterable[tuple[K, ObjectRef]], on_size: Callable[[K, int], object],
                   *, workers: int | None = None,
                   size_of: Callable[[ObjectRef], Awaitable[int]] | None = None,
                   on_error: Callable[[K, Exception], object] | None = None) -> None:
    """Learn the size of every `(key, ref)` in `items` and call `on_size(key, size)` for each
    as soon as it is known. `size_of`: the request for one object that neither the index nor
    the store knew (checked for its whole batch first), default `fetcher.ask_size`. Raises the
    first error any request met (after the requests already under way finish and are
    recorded); sizes learned before it stay recorded. With `on_error`, a failed request is
    handed to `on_error(key, error)` instead and the others go on (one missing or stuck
    object costs its own request, not the batch)."""
    source = iter(items)
    if workers is None:     # as many as the (first) remote carries at once: its size slots
        first = next(source, None)
        if first is None:
            return
        source = itertools.chain([first], source)
        workers = min(WORKERS, fetcher.size_slots(first[1].remote))
    workers = max(1, workers)
    ask = size_of or fetcher.ask_size
    pending: asyncio.Queue[tuple[K, ObjectRef] | None] = asyncio.Queue(maxsize=workers * 2)
    failed: list[BaseException] = []

    async def produce() -> None:
        # Index lookups in batches; only what the index lacks reaches the pool.
        for batch in _batches(source, INDEX_BATCH):
            if failed:
                break
            unknown = await _from_index(fetcher, batch, on_size)
            if unknown:
                unknown = await _from_store(fetcher, unknown, on_size)
            for k, r in batch:
                if r.size is not None:
                    on_size(k, r.size)
            for item in unknown:
                if failed:
                    break
                await pending.put(item)
        for _ in range(workers):
            await pending.put(None)

    async def work() -> None:
        while True:
            item = await pending.get()
            if item is None:
                return
            if failed:
                continue      # drain: the producer is stopping
            key, ref = item
            try:
                on_size(key, await ask(ref))   # own deadline; recorded in the index at once
            except Exception as err:   # noqa: BLE001 - the first error ends the batch, after the rest land
                if on_error is None:
                    failed.append(err)
                else:
                    on_error(key, err)

    tasks = [asyncio.ensure_future(work()) for _ in range(workers)]
    try:
        await produce()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    if failed:
        raise failed[0]


async def _from_index(fetcher: Fetcher, batch: list, on_size: Callable) -> list:  # type: ignore[type-arg]
    """Answer what the persistent index knows (one query per batch, on a store thread);
    return the rest."""
    unsized = [(k, r) for k, r in batch if r.size is None]
    stored = await fetcher.astore.sizes([r.oid for _, r in unsized]) if unsized else {}
    return _answered(fetcher, unsized, stored, on_size)


async def _from_store(fetcher: Fetcher, batch: list, on_size: Callable) -> list:  # type: ignore[type-arg]
    """Answer what the store holds verified (one trip for the batch); return the rest."""
    stored = await fetcher.stored_sizes([r.oid for _, r in batch])
    return _answered(fetcher, batch, stored, on_size) if stored else batch


def _answered(fetcher: Fetcher, batch: list, stored: dict[str, int], on_size: Callable) -> list:  # type: ignore[type-arg]
    """Hand `on_size` each size `stored` (oid -> bytes) holds for `batch`; return the rest."""
    fetcher.counters.add("dda_cache_reads", len(stored), "metadata", "hit")
    rest = []
    for k, r in batch:
        size = stored.get(r.oid)
        if size is None:
            rest.append((k, r))
        else:
            on_size(k, size)
    return rest


def _batches(source: Iterator[K], n: int) -> Iterator[list[K]]:
    while batch := list(itertools.islice(source, n)):
        yield batch
