"""The store as the event loop sees it: every disk, hash and SQLite step runs off the loop.

Chunk reads, writes and CRC checks run in a small thread pool (at most MAX_JOBS submitted at
once); index writes (new chunks, learned sizes, use times) go to the store's one writer
thread without being waited for, so while another process holds the index's write lock only
that thread waits. Index reads use per-thread WAL read connections (never blocked).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from .chunks import Store

T = TypeVar("T")
THREADS = 8      # disk and hashing threads
MAX_JOBS = 64    # disk jobs submitted at once; more wait on the loop


class AsyncStore:
    """Async interface of a `Store` (sync, blocking). Shapes: oid is an object id (md5 hex),
    idx a chunk number, byte ranges are [start, end) within the chunk."""

    def __init__(self, store: Store, threads: int = THREADS):
        self.disk = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dda-store")
        self._jobs = asyncio.Semaphore(MAX_JOBS)

    @classmethod
    async def open(cls, root: Path, budget: int, chunk_size: int) -> "AsyncStore":
        """Open (create) the store under `root` off the loop."""
        return cls(await asyncio.to_thread(Store, root, budget, chunk_size))

    @property
    def root(self) -> Path:
        return self.disk.root

    @property
    def chunk_size(self) -> int:
        return self.disk.chunk_size

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a store thread; at most MAX_JOBS submitted at once."""
        async with self._jobs:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def read(self, oid: str, idx: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of a chunk, identity- and CRC-checked; None if absent or damaged."""
        return await self.run(self.disk.read, oid, idx, start, end)

    async def has(self, oid: str, idx: int) -> bool:
        return await self.run(self.disk.has, oid, idx)

    async def write(self, oid: str, idx: int, data: bytes | memoryview, object_size: int | None = None) -> None:
        """Store a verified chunk: the file now, its index row through the writer thread."""
        def work() -> None:
            self.disk.write(oid, idx, data, object_size, index_later=True)
        await self.run(work)

    async def size(self, oid: str) -> int | None:
        return await self.run(self.disk.index.size, oid)

    async def sizes(self, oids: list[str]) -> dict[str, int]:
        return await self.run(self.disk.index.sizes, oids)

    async def record_sizes(self, sizes: dict[str, int]) -> None:
        """Remember sizes (written by the writer thread; never waited for)."""
        if sizes:
            self.disk.index_later(self.disk.index.record_sizes, dict(sizes))

    def used_bytes(self) -> int:
        """Bytes of chunk data in the store (an index read: never blocked by a writer)."""
        return self.disk.used_bytes()

    async def aclose_pool(self) -> None:
        """Stop the threads (the store itself stays open: its owner closes it)."""
        self._pool.shutdown(wait=False)

    async def aclose(self) -> None:
        """Write what is queued and close the store (off the loop)."""
        await asyncio.to_thread(self.disk.close)
        self._pool.shutdown(wait=False)
