"""The one download job of fetch/: one chunk of one object, whoever asked for it.

Every missing chunk is fetched by a `ChunkJob`: a reader of a few bytes, a reader of the
whole chunk, readahead, a prefetch and the verifying pass over a large object all get the
job already in flight for that chunk (single flight) or start one. The chunk streams into one
buffer (allocated once when the size is known, else grown as bytes arrive); waiters ask for a
prefix of it (`wait(need)`) or for its end (`until_done`). What a job checks before it ends
depends on its `kind`:

- "whole": a chunk verified on its own, against the object's md5 (one-chunk objects) or the
  chunk's sha256 from an earlier verified pass, then stored; its readers wait for the end;
- "probe": chunk 0 of an object whose size is unknown: the answer tells the size; a one-chunk
  object is verified and stored as "whole", the first chunk of a larger one is not kept;
- "pass": a chunk of the in-order verified pass over a large object (fetch/verify_stream.py):
  bytes are handed out as they arrive (verify: stream) and the pass hashes and stores them.

A job ends at the latest deadline of the readers that joined it (Fetcher._job_deadline), and
a job that made no progress (no byte, no answer) for a while is not joined: a reader starts a
fresh job, and the waiters of the stale one move to it (`Superseded`).
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .scheduler import ObjectRef

Kind = Literal["whole", "probe", "pass"]
LOOP_COPY_MAX = 256 * 1024   # larger copies out of a job's buffer run on a store thread


class Superseded(Exception):
    """The job was replaced by a fresh one (it had made no progress): wait on the new one."""


class ChunkJob:
    """Chunk `idx` of `ref` being downloaded: its bytes so far, the readers waiting for them,
    when it last made progress (loop time), and how it ended (`error`: None when it succeeded)."""

    def __init__(self, ref: "ObjectRef", idx: int, size: int | None, kind: Kind, capacity: int,
                 digest: bytes | None, now: float, gate: asyncio.Event | None = None):
        self.ref = ref
        self.idx = idx
        self.size = size                # the object's size as known when the job started (None: a probe)
        self.kind = kind
        self.digest = digest            # the chunk's sha256 from a verified pass, when known
        self.gate = gate                # set when the job may start (a pass holds the object's lock)
        self.capacity = capacity        # the most bytes the chunk can hold
        # A known size: the chunk's exact length at once. A probe (size unknown): grown with what
        # arrives, so a tiny object costs its own bytes, not a whole chunk (8 MiB by default),
        # for as long as the job lives.
        self.buf: bytearray | bytes = bytearray(capacity if size is not None else 0)
        self.received = 0
        self.length: int | None = None  # bytes of the chunk, once known
        self.total: int | None = None   # the object's size the answer told
        self.done = False
        self.error: BaseException | None = None
        self.from_cache = False
        self.progressed_at = now
        self.queued = False             # waiting its turn (a request slot, a lock, a backoff): not stalled
        self.ended_by: str | None = None   # "deadline" or "superseded" when cancelled for that
        self.task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, bool, asyncio.Future[None]]] = []

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.ref.oid, self.idx, self.kind)

    def progress(self) -> None:
        """Bytes or an answer arrived (a job waiting on a stuck remote makes none)."""
        self.progressed_at = asyncio.get_running_loop().time()

    def stalled(self, now: float, after: float) -> bool:
        """Whether the job has been waiting on the remote with nothing arriving for `after`
        seconds (waiting its turn does not count)."""
        return not self.done and not self.queued and now - self.progressed_at > after

    def feed(self, piece: bytes) -> None:
        end = self.received + len(piece)
        if end > self.capacity:     # more than a chunk (a server that ignored the range end)
            piece = piece[:self.capacity - self.received]
            end = self.capacity
        if end > len(self.buf):
            self._grow(end)
        self.buf[self.received:end] = piece
        self.received = end
        self.progressed_at = asyncio.get_running_loop().time()
        self._wake()

    def _grow(self, need: int) -> None:
        """Room for `need` bytes: a new buffer of at least twice the old (capped at the chunk),
        the bytes so far copied in. Never resized in place: views handed out (`view`) keep the
        old buffer alive, and the bytes they cover are the same in both."""
        grown = bytearray(min(self.capacity, max(need, 2 * len(self.buf))))
        grown[:self.received] = memoryview(self.buf)[:self.received]
        self.buf = grown

    def fill(self, data: bytes) -> None:
        """The whole chunk at once (found in the store): kept as it is, not copied."""
        self.buf = data    # type: ignore[assignment]
        self.received = self.length = len(data)
        self.progressed_at = asyncio.get_running_loop().time()
        self._wake()

    def restart(self) -> None:
        """Drop what arrived (bytes nobody saw: a whole chunk that failed its check)."""
        self.received = 0

    def view(self, lo: int = 0, hi: int | None = None) -> memoryview:
        """Bytes [lo, hi) that arrived, without a copy."""
        return memoryview(self.buf)[lo:self.received if hi is None else min(hi, self.received)]

    def finish(self, error: BaseException | None) -> None:
        self.done = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiting = []
        for need, until_done, future in self._waiters:
            if future.done():
                continue
            if self.done or (not until_done and self.received >= need):
                future.set_result(None)
            else:
                waiting.append((need, until_done, future))
        self._waiters = waiting

    async def wait(self, need: int, until_done: bool = False) -> None:
        """Until `need` bytes arrived (or the job ended, with `until_done`); raises the job's
        error if it ended without them (Superseded: ask the fetcher for the current job)."""
        while not self.done and (until_done or self.received < need):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((need, until_done, future))
            await future
        if self.error is not None and (until_done or self.received < need):
            raise self.error

    async def copy(self, lo: int, hi: int, run) -> bytes:  # type: ignore[no-untyped-def]
        """A copy of bytes [lo, hi); a large one is made by `run` (a store thread): bytes that
        arrived are never written again while the job lives, so the copy may run beside it."""
        if hi - lo <= LOOP_COPY_MAX:
            return bytes(self.view(lo, hi))
        return await run(lambda: bytes(self.view(lo, hi)))
