"""The fetch scheduler: one download path for every chunk.

- one job type (`ChunkJob`, fetch/job.py) per missing chunk, whoever asks: single flight in
  the process (a shared job), across processes an flock per chunk and then a second look in
  the store. Whole chunks (one-chunk objects, chunks with a known sha256) are checked before
  anyone sees them; chunks of a larger object stream to the verified in-order pass
  (fetch/verify_stream.py) and to readers as they arrive;
- bounded concurrency per remote; one retry policy (fetch/retry.py: exponential backoff, full
  jitter) on 5xx, timeouts and resets, resuming where an attempt stopped;
- deadlines: a read ends at its deadline with a clear error; a job ends at the latest deadline
  of the readers that joined it, and a job that made no progress for a while is not joined
  (a fresh one starts, see STALL_FRACTION);
- nothing here touches the disk, the index or a hash on the event loop: the store is used
  through AsyncStore (a bounded thread pool) and large copies run there too.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import weakref
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, replace
from typing import Callable

from ..counters import Counters, FetchStats
from ..errors import (CacheFull, DeadlineExceeded, HashMismatch, ObjectMissing, RemoteError,
                      RemoteUnavailable, reason_of)
from ..locks import FileLock
from ..remotes import Remote
from ..store import AsyncStore, Store
from ..store.chunks import on_event_loop
from ..store.identity import ChunkHeader, chunk_digest, expected_length
from ..store.verify import impossible_size, md5_matches
from .job import LOOP_COPY_MAX, ChunkJob, Kind, Superseded
from .priority import PriorityLimiter
from .retry import RetryPolicy
from .verify_stream import ObjectPass, ReadCursor

log = logging.getLogger(__name__)

# Observers for metrics, picked up by every Fetcher created in this context (the sidecar sets
# them before the engine opens, so requests made while the snapshot resolves are seen too):
# (on_request(op, status, seconds), on_read_wait(seconds)).
fetch_observers: contextvars.ContextVar[tuple[Callable[[str, str, float], None] | None,
                                              Callable[[float], None] | None]] = \
    contextvars.ContextVar("dda_fetch_observers", default=(None, None))

SIZE_MEMO = 65536   # sizes kept in memory (the persistent index keeps them all): a bound, not one per size learned


class SizeMemo(OrderedDict[str, int]):
    """oid -> size, the most recently stored `limit` of them (older ones are read again
    from the persistent index when asked)."""

    def __init__(self, limit: int = SIZE_MEMO):
        super().__init__()
        self.limit = limit

    def __setitem__(self, oid: str, size: int) -> None:
        super().__setitem__(oid, size)
        self.move_to_end(oid)
        if len(self) > self.limit:
            self.popitem(last=False)


# When the current read's deadline ends (loop time), set by _with_deadline: a Retry-After that
# reaches past it fails at once with the server's reason instead of sleeping into the deadline.
STALL_FRACTION = 0.25   # a job with no byte and no answer for this share of the deadline is not joined
JOB_GRACE = 0.01   # a job is cancelled just after its last reader's deadline (that reader times out first)
_read_ends_at: contextvars.ContextVar[float | None] = contextvars.ContextVar("dda_read_ends_at", default=None)


@dataclass(frozen=True)
class ObjectRef:
    oid: str            # md5 hex of the object
    remote: Remote
    path: str           # key of the object on the remote
    legacy: bool        # DVC 2 object: md5 may be of the CRLF-normalised text
    size: int | None    # when known without asking the remote
    display: str        # what users call it (repository path)


class Fetcher:
    def __init__(self, store: Store, *, jobs: int = 16, retries: int = 5, deadline: float = 60.0,
                 backoff_base: float = 0.2, backoff_cap: float = 10.0, strict: bool = False):
        self.store = store          # sync: sizes and paths only; every I/O step goes through astore
        self.astore = AsyncStore(store)
        self.jobs = jobs
        self.deadline = deadline
        self.retry = RetryPolicy(retries, backoff_base, backoff_cap)   # the one retry policy
        self.counters = Counters()      # counted where the event happens (sidecar/counters.py)
        self.stats = FetchStats(self.counters)   # a read-only view by field names
        self._limits: dict[tuple[int, bool], PriorityLimiter] = {}
        self._inflight: dict[tuple[str, int, str], ChunkJob] = {}    # (oid, idx, kind): the job in flight
        self._stream_tasks: set[asyncio.Task[None]] = set()            # verified passes under way
        self._job_ends: dict[ChunkJob, float] = {}     # when a shared download ends (loop time)
        self._passes: dict[str, ObjectPass] = {}
        self._digests: dict[str, tuple[int, list[bytes]]] = {}
        self._sizes = SizeMemo()
        self._unrecorded: dict[str, int] = {}    # sizes learned, not yet in the persistent index
        self._unrecorded_lock = threading.Lock()
        self._record_queued = False
        self._contradicted: set[str] = set()     # sizes forgotten after a contradiction
        self.strict = strict
        # Called with (oid) when bytes of an object that readers may hold failed verification
        # (the mount drops its pages), and with (oid, size) when a verified size replaced another.
        self.mismatch_observers: list[Callable[[str], None]] = []
        self.size_observers: list[Callable[[str, int], None]] = []
        # Observers for metrics (sidecar.metrics); None costs nothing. Called on the loop.
        self.on_request: Callable[[str, str, float], None] | None       # (op, status, seconds)
        self.on_read_wait: Callable[[float], None] | None               # a read blocked on the remote
        self.on_request, self.on_read_wait = fetch_observers.get()

    # the retry policy, by its old names (tests tune them on a live fetcher) --------------------
    @property
    def retries(self) -> int:
        return self.retry.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self.retry = replace(self.retry, retries=value)

    @property
    def backoff_base(self) -> float:
        return self.retry.base

    @backoff_base.setter
    def backoff_base(self, value: float) -> None:
        self.retry = replace(self.retry, base=value)

    @property
    def backoff_cap(self) -> float:
        return self.retry.cap

    @backoff_cap.setter
    def backoff_cap(self, value: float) -> None:
        self.retry = replace(self.retry, cap=value)

    @property
    def stall_after(self) -> float:
        """Seconds without progress after which a job is not joined any more."""
        return self.deadline * STALL_FRACTION

    # sizes -----------------------------------------------------------------------------------
    def known_size(self, ref: ObjectRef) -> int | None:
        """The size if known without any I/O (the ref, or learned in this process)."""
        if ref.size is not None:
            return ref.size
        return self._sizes.get(ref.oid)

    def remembered_size(self, oid: str) -> int | None:
        """The size this process learned for `oid` and still holds in memory (no I/O)."""
        return self._sizes.get(oid)

    async def indexed_size(self, ref: ObjectRef) -> int | None:
        """The size if known here or in the store's index (read on a store thread)."""
        size = self.known_size(ref)
        if size is None and ref.oid not in self._contradicted:   # forgotten: the index may still hold it
            size = await self.astore.size(ref.oid)
            if size is not None and ref.oid not in self._contradicted:
                self._sizes[ref.oid] = size
        return size

    def _learned_size(self, oid: str, size: int, verified: bool = False) -> bool:
        """Record a size from an answer we trust (a Content-Range total, the length of a
        complete answer, a HEAD) or from the verified object (`verified`). True when it
        corrected a size that was contradicted (see _index_settled)."""
        if size == 0 and impossible_size(oid, size):
            return False        # no object of that md5 is empty: never recorded (see ask_size)
        old = self._sizes.get(oid)
        if old is None and verified and oid not in self._contradicted and not on_event_loop():
            # known once, since dropped from the bounded memo; on the loop the index is not read
            # (the read paths ask indexed_size first, which puts it back in the memo)
            old = self.store.index.size(oid)
        if old != size:
            self._sizes[oid] = size
            self._record_size(oid, size)
            corrected = old is not None or oid in self._contradicted
            if verified and corrected:    # a correction: whoever showed the old size follows
                self._contradicted.discard(oid)
                for observer in self.size_observers:
                    observer(oid, size)
                return True
        return False

    async def _index_settled(self) -> None:
        """Wait (bounded) until the index writer has applied what is queued: after a size
        correction, so the read that learned the true size returns with the index saying it
        too (other processes and a remount look there)."""
        await asyncio.to_thread(self.store.index_settled, 2.0)

    def _record_size(self, oid: str, size: int) -> None:
        """Into the persistent index soon, in one transaction with the sizes learned meanwhile
        (a walker's sizing learns thousands a second; one commit each would be the bottleneck)."""
        with self._unrecorded_lock:
            self._unrecorded[oid] = size
            if self._record_queued:
                return
            self._record_queued = True
        self.store.index_later(self._flush_sizes)

    def _flush_sizes(self) -> None:
        """On the store's index writer (in order with every other index change)."""
        with self._unrecorded_lock:
            sizes, self._unrecorded = self._unrecorded, {}
            self._record_queued = False
        self.store.index.record_sizes(sizes)

    def _size_contradicted(self, ref: ObjectRef, known: int, answered: int) -> None:
        """An answer's size disagrees with the one we had: forget ours (it came from an
        earlier answer, never from the repository) so the read learns it again."""
        log.warning("%s: remote says %s has %d bytes, the cache index said %d; learning the size again",
                    ref.display, ref.path, answered, known)
        self._sizes.pop(ref.oid, None)
        with self._unrecorded_lock:
            self._unrecorded.pop(ref.oid, None)
        self._contradicted.add(ref.oid)
        self.store.index_later(self.store.index.forget_size, ref.oid)
        with self._unrecorded_lock:
            self._record_queued = False   # a size learned from now on is written after the forget
        self.counters.add("dda_errors", 1, "size_contradiction")

    async def size_of(self, ref: ObjectRef, *, index_asked: bool = False) -> int:
        """The size of `ref`'s object: what is known (memory, the store's index, the cache),
        else one request under its own deadline, recorded at once. index_asked=True: the
        caller just found the store's index without it (no second query)."""
        size = self.known_size(ref) if index_asked else await self.indexed_size(ref)
        if size is None:
            size = await self.astore.run(self.store.object_size, ref.oid)
            if size is not None:
                self._learned_size(ref.oid, size)
        if size is None:
            return await self.ask_size(ref)
        self.counters.add("dda_cache_reads", 1, "metadata", "hit")
        return size

    async def ask_size(self, ref: ObjectRef) -> int:
        """One size request for `ref` (a HEAD, a stat) under its own deadline and the remote's
        size slots, recorded at once (memory now, the persistent index in the next batch).
        For a caller that found no size on this node (`size_of`, or a bulk sizing that asked
        the index and the store for a whole batch in one trip each: `stored_sizes`)."""
        self.counters.add("dda_cache_reads", 1, "metadata", "miss")
        size = await self._with_deadline(
            self.retried_call(ref, lambda: ref.remote.size(ref.path)), ref)
        self.counters.add("dda_remote_size_lookups")
        if size == 0 and impossible_size(ref.oid, size):
            return await self._size_from_object(ref)
        self._learned_size(ref.oid, size)
        return size

    async def _size_from_object(self, ref: ObjectRef) -> int:
        """The size of an object the remote claimed is 0 bytes though its md5 is not that of
        no bytes (a lying HEAD or listing, or an object cut short on the remote): learned from
        the object itself, by the verified probe a read of an unknown size makes (one GET; a
        one-chunk object is md5-checked and cached). Raises HashMismatch when the object on
        the remote is not what its md5 says (a truncated one), like any read of it."""
        log.warning("%s: remote %r says %s has 0 bytes, which no object with md5 %s has; "
                    "learning its size from the object", ref.display, ref.remote.name, ref.path, ref.oid)
        self.counters.add("dda_errors", 1, "size_contradiction")
        job = await self._with_deadline(self._await_job(ref, 0, None, "probe", 0, until_done=True), ref)
        size = self.known_size(ref)
        size = job.total if size is None else size
        if size is None:
            raise RemoteUnavailable(f"{ref.display}: the answer for {ref.path} gave no size", path=ref.display)
        return size

    async def retried_call(self, ref: ObjectRef, call, op: str = "size"):  # type: ignore[no-untyped-def]
        """`call()` (a request about `ref`: a HEAD, a proof read) within the remote's slots for
        `op`, retried on transient failures (5xx, 429 with its Retry-After, a dropped
        connection) with the one RetryPolicy, as reads are (see _backoff); the caller's
        deadline bounds it all. A good first answer costs one try/except, no task."""
        attempt = 0
        while True:
            try:
                return await self._remote_call(ref.remote, call, op)
            except RemoteUnavailable as err:
                attempt += 1
                await self._backoff(attempt, ref, err)

    async def stored_sizes(self, oids: list[str]) -> dict[str, int]:
        """Sizes of the objects among `oids` verified into the store (one trip to a store
        thread for the whole list, not one per object: bulk sizing asks this of every batch
        the index did not know), remembered as learned."""
        store = self.store

        def look() -> dict[str, int]:
            # only what the index says the store holds is opened (a cold batch: one query, no file)
            held = store.index.holding(oids)
            return {o: n for o in oids if o in held and (n := store.object_size(o)) is not None}

        found = await self.astore.run(look)
        for oid, size in found.items():
            self._learned_size(oid, size)
        return found

    async def sizes_of(self, refs: list[ObjectRef]) -> dict[str, int]:
        """True sizes for many objects: the index first, then one listing per remote folder
        where the remote lists cheaply, else one HEAD each (bounded)."""
        result: dict[str, int] = {}
        missing: list[ObjectRef] = []
        for ref in refs:
            size = ref.size if ref.size is not None else self._sizes.get(ref.oid)
            if size is not None:
                result[ref.oid] = size
            else:
                missing.append(ref)
        if missing:
            stored = await self.astore.sizes([r.oid for r in missing if r.oid not in self._contradicted])
            self._sizes.update(stored)
            result.update(stored)
            missing = [r for r in missing if r.oid not in stored]
        self.counters.add("dda_cache_reads", len(refs) - len(missing), "metadata", "hit")
        self.counters.add("dda_cache_reads", len(missing), "metadata", "miss")
        by_remote: dict[int, list[ObjectRef]] = defaultdict(list)
        for ref in missing:
            by_remote[id(ref.remote)].append(ref)
        for group in by_remote.values():
            result.update(await self._remote_sizes(group))
        return result

    async def _remote_sizes(self, refs: list[ObjectRef]) -> dict[str, int]:
        remote = refs[0].remote
        learned: dict[str, int] = {}
        if len(refs) > 64 and remote.can_list:
            folders = sorted({r.path.rsplit("/", 1)[0] + "/" for r in refs})
            listings = await asyncio.gather(*(self._remote_call(remote, lambda f=f: remote.list_sizes(f), "list")
                                              for f in folders))
            if all(listing is not None for listing in listings):
                by_path = {path: size for listing in listings for path, size in listing.items()}  # type: ignore[union-attr]
                self.counters.add("dda_remote_size_lookups", len(folders))
                for ref in refs:
                    if ref.path in by_path:
                        learned[ref.oid] = by_path[ref.path]
        todo = [r for r in refs if r.oid not in learned]

        async def head(ref: ObjectRef) -> None:
            learned[ref.oid] = await self.retried_call(ref, lambda: remote.size(ref.path))
            self.counters.add("dda_remote_size_lookups")

        if todo:
            await self._with_deadline(asyncio.gather(*(head(r) for r in todo)), todo[0])
        for ref in refs:
            if learned.get(ref.oid, 1) == 0 and impossible_size(ref.oid, 0):
                learned[ref.oid] = await self._size_from_object(ref)
        self._sizes.update(learned)
        self.store.index_later(self.store.index.record_sizes, learned)
        return learned

    # reading ---------------------------------------------------------------------------------
    async def read(self, ref: ObjectRef, offset: int, length: int, reader: ReadCursor | None = None) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the object). `reader` is the
        cursor of one reader of the object (a file handle): with it, and `verify: stream`,
        bytes of a large object may be served before its md5 is known, and a later read
        through the same cursor (at the latest the one that reaches the end) fails if they
        were wrong. Without it every byte is verified before it is returned."""
        return await self._with_deadline(self._read(ref, offset, length, reader=reader), ref)

    async def read_all(self, ref: ObjectRef) -> bytes:
        """A whole object as metadata (the .dir manifests): counted as a metadata lookup, not
        as bytes served to readers."""
        return await self._with_deadline(self._read(ref, 0, None, meta=True), ref)

    async def _read(self, ref: ObjectRef, offset: int, length: int | None, meta: bool = False,
                    reader: ReadCursor | None = None) -> bytes:
        started = time.monotonic()
        waiting = [False]   # set while (and if) the read waits for the remote
        try:
            for attempt in range(3):
                try:
                    return await self._read_body(ref, offset, length, meta, waiting, reader)
                except _SizeChanged:
                    if attempt == 2:
                        raise RemoteError(f"{ref.display}: the remote keeps changing its answer about the size "
                                          f"of {ref.path}") from None
            raise AssertionError("unreachable")
        finally:
            if waiting[0] and not meta and self.on_read_wait is not None:
                self.on_read_wait(time.monotonic() - started)

    async def _read_body(self, ref: ObjectRef, offset: int, length: int | None, meta: bool,
                         waiting: list[bool], reader: ReadCursor | None) -> bytes:
        cs = self.store.chunk_size
        if reader is not None:
            reader.check()
        size = await self.indexed_size(ref)
        if size == 0 and impossible_size(ref.oid, size):
            size = None     # a claim no object of that md5 meets: the object tells (probe below)
        missed = False
        first: ChunkJob | None = None
        if size is None:
            size = await self.astore.run(self.store.object_size, ref.oid)   # a verified object knows it
            if size is not None:
                self._learned_size(ref.oid, size, verified=True)
        if size is None:
            # Learn the size from the first chunk's answer (Content-Range), not a separate HEAD.
            waiting[0] = True
            first = await self._await_job(ref, 0, None, "probe", 0, until_done=True)
            size = self.known_size(ref)
            if size is None:
                raise _SizeChanged()
            missed = not first.from_cache
            if self.store.chunk_count(size) > 1 or first.total != size:
                first = None    # the first chunk of a large object is read by its verified pass
        end = size if length is None else min(size, offset + length)
        if offset >= end:
            return b""
        large = self.store.chunk_count(size) > 1
        pieces: list[bytes] = []
        first_idx, last_idx = offset // cs, (end - 1) // cs
        for idx in range(first_idx, last_idx + 1):
            lo, hi = max(offset, idx * cs) - idx * cs, min(end, (idx + 1) * cs) - idx * cs
            if first is not None and idx == 0:
                data: bytes | None = await first.copy(lo, hi, self.astore.run)   # verified bytes of the probe
            elif not large and (ref.oid, idx, "whole") in self._inflight:
                data = None     # being downloaded: join the job (it holds the bytes), no store trip
            else:
                data = await self.astore.read(ref.oid, idx, lo, hi)
            if data is None:
                waiting[0] = True
                if large:
                    data, hit = await self._large_range(ref, idx, size, lo, hi, reader)
                else:
                    data, hit = await self._whole_range(ref, idx, size, lo, hi)
                missed = missed or not hit
                waiting[0] = missed
            pieces.append(data)
        if large and reader is not None and end == size:
            await reader.settle()       # the read that ends the object: every byte taken was right
        if len(pieces) == 1:
            out = pieces[0]
        elif sum(map(len, pieces)) > LOOP_COPY_MAX:
            out = await self.astore.run(b"".join, pieces)
        else:
            out = b"".join(pieces)
        if meta:
            if missed:
                self.counters.add("dda_cache_reads", 1, "metadata", "miss")
            else:
                self.counters.add("dda_cache_reads", 1, "metadata", "hit")
            return out
        if missed:
            self.counters.add("dda_cache_reads", 1, "data", "miss")
        else:
            self.counters.add("dda_cache_reads", 1, "data", "hit")
        self.counters.add("dda_served_bytes", len(out))
        return out

    async def _sums(self, oid: str, size: int) -> list[bytes] | None:
        """Per-chunk sha256 of a verified object (from a verified pass), or None."""
        found = self._digests.get(oid)
        if found is None:
            stored = await self.astore.run(self.store.read_sums, oid)
            if stored is None:
                return None
            found = self._digests[oid] = stored
        if found[0] != size:
            log.warning("object %s: verified size %d differs from the recorded %d; using the verified one",
                        oid, found[0], size)
            self._learned_size(oid, found[0], verified=True)
            raise _SizeChanged()
        return found[1]

    async def _whole_range(self, ref: ObjectRef, idx: int, size: int, lo: int, hi: int,
                           digest: bytes | None = None) -> tuple[bytes, bool]:
        """Bytes [lo, hi) of a chunk verified on its own (see ChunkJob "whole"), and whether
        the cache had it."""
        job = await self._await_job(ref, idx, size, "whole", 0, until_done=True, digest=digest)
        return await job.copy(lo, hi, self.astore.run), job.from_cache

    async def _large_range(self, ref: ObjectRef, idx: int, size: int, lo: int, hi: int,
                           reader: ReadCursor | None) -> tuple[bytes, bool]:
        """Bytes [lo, hi) of chunk `idx` of a large object that is not in the cache."""
        for attempt in range(2):
            sums = await self._sums(ref.oid, size)
            if sums is not None:       # verified before: this chunk can be checked on its own
                return await self._whole_range(ref, idx, size, lo, hi, digest=sums[idx])
            job_pass = self._pass(ref, size)
            if reader is not None and not self.strict:
                data = await job_pass.range(idx, lo, hi)
                if data is not None:
                    reader.took(job_pass)
                    return data, False
            try:
                await job_pass.verdict()
            except HashMismatch:
                if attempt == 1 or (reader is not None and reader.passes):
                    raise
                continue    # this reader took no unverified byte yet: one more pass
            data = await self.astore.read(ref.oid, idx, lo, hi)
            if data is not None:
                return data, False
        raise HashMismatch(f"{ref.display}: content of {ref.path} on remote {ref.remote.name!r} does not "
                           f"match its md5 {ref.oid}")

    def _pass(self, ref: ObjectRef, size: int) -> ObjectPass:
        job_pass = self._passes.get(ref.oid)
        if job_pass is None or job_pass.task.done():
            job_pass = ObjectPass(self, ref, size)
            self._passes[ref.oid] = job_pass
            self._stream_tasks.add(job_pass.task)

            def done(task: asyncio.Task[None], oid: str = ref.oid, p: ObjectPass = job_pass) -> None:
                self._stream_tasks.discard(task)
                if self._passes.get(oid) is p:
                    del self._passes[oid]
                if not task.cancelled():
                    task.exception()    # retrieved: readers get it from verdict()
            job_pass.task.add_done_callback(done)
        return job_pass

    def _mismatch(self, ref: ObjectRef, message: str) -> None:
        self.counters.add("dda_hash_mismatches")
        self.counters.add("dda_errors", 1, "hash_mismatch")
        raise HashMismatch(message)

    def _object_changed(self, oid: str) -> None:
        """Bytes of `oid` that readers may hold (the kernel's page cache) were not verified."""
        for observer in self.mismatch_observers:
            try:
                observer(oid)
            except Exception:   # an observer must never break the read path
                log.exception("mismatch observer failed")

    async def prefetch(self, ref: ObjectRef, offset: int = 0, length: int | None = None) -> None:
        """Bring chunks into the cache without serving them."""
        size = await self.size_of(ref)
        cs = self.store.chunk_size
        end = size if length is None else min(size, offset + length)
        for idx in range(offset // cs, max(offset // cs, (end - 1) // cs) + 1):
            if not await self.astore.has(ref.oid, idx):
                if self.store.chunk_count(size) > 1:
                    await self._large_range(ref, idx, size, 0, 0, None)
                else:
                    await self._await_job(ref, idx, size, "whole", 0, until_done=True)

    async def cached(self, ref: ObjectRef) -> bool:
        """Whether every chunk of the object is in the store (False while the size is unknown)."""
        size = await self.indexed_size(ref)
        if size is None:
            return False
        count = self.store.chunk_count(size)
        return await self.astore.run(lambda: all(self.store.has(ref.oid, i) for i in range(count)))

    # -- the download job (fetch/job.py) ----------------------------------------------------------
    def _job(self, ref: ObjectRef, idx: int, size: int | None, kind: Kind, digest: bytes | None = None,
             gate: asyncio.Event | None = None) -> ChunkJob:
        """The job fetching chunk `idx` of `ref` as `kind`: joined if one is in flight and alive,
        else started. A job that made no progress for `stall_after` seconds (stuck on a remote
        that has recovered since, say) is not joined: it is replaced and its waiters move on."""
        key = (ref.oid, idx, kind)
        loop = asyncio.get_running_loop()
        job = self._inflight.get(key)
        if job is not None and job.stalled(loop.time(), self.stall_after):
            log.info("%s: chunk %d made no progress for %.1fs; starting a fresh download", ref.display, idx,
                     loop.time() - job.progressed_at)
            self._end_job(job, "superseded")
            job = None
        if job is None or job.done:
            capacity = self.store.chunk_size if size is None else expected_length(size, idx, self.store.chunk_size)
            job = ChunkJob(ref, idx, size, kind, capacity, digest, loop.time(), gate)
            self._inflight[key] = job
            job.task = asyncio.create_task(self._run_job(job), context=contextvars.Context())

            def gone(_t: "asyncio.Task[None]", k: tuple[str, int, str] = key, j: ChunkJob = job) -> None:
                if self._inflight.get(k) is j:
                    del self._inflight[k]
                self._job_ends.pop(j, None)     # else its chunk-size buffer lives until the deadline
            job.task.add_done_callback(gone)
        self._job_deadline(job)
        return job

    async def _await_job(self, ref: ObjectRef, idx: int, size: int | None, kind: Kind, need: int,
                         until_done: bool = False, digest: bytes | None = None,
                         gate: asyncio.Event | None = None) -> ChunkJob:
        """Wait on the job for chunk `idx` until `need` bytes arrived (or its end); follows a
        job that was superseded to the fresh one."""
        while True:
            job = self._job(ref, idx, size, kind, digest, gate)
            try:
                await self._watch(job, need, until_done)
                return job
            except Superseded:
                continue
            except DeadlineExceeded:
                self.counters.add("dda_errors", 1, DeadlineExceeded.reason)
                raise DeadlineExceeded(
                    f"{ref.display}: no answer from remote {ref.remote.name!r} ({ref.remote.display_url}) "
                    f"within {self.deadline:g}s", path=ref.display) from None

    async def _watch(self, job: ChunkJob, need: int, until_done: bool) -> None:
        """`job.wait(need, until_done)`, superseding the job if it stalls meanwhile (the remote
        may have recovered since it started: a fresh request gets an answer). Raises
        Superseded then: the caller takes the fresh job."""
        loop = asyncio.get_running_loop()
        while True:
            left = self.stall_after if job.queued else job.progressed_at + self.stall_after - loop.time()
            try:
                async with asyncio.timeout(max(left, 0.0) + JOB_GRACE):
                    await job.wait(need, until_done)
                return
            except TimeoutError:
                if job.stalled(loop.time(), self.stall_after):
                    log.info("%s: chunk %d made no progress for %.1fs; starting a fresh download",
                             job.ref.display, job.idx, loop.time() - job.progressed_at)
                    self._end_job(job, "superseded")
                    raise Superseded() from None

    def _end_job(self, job: ChunkJob, why: str) -> None:
        """Cancel a job (at its deadline, or superseded) and never join it again."""
        if self._inflight.get(job.key) is job:
            del self._inflight[job.key]
        if job.task is not None and not job.task.done():
            job.ended_by = job.ended_by or why
            job.task.cancel()

    def _job_deadline(self, job: ChunkJob) -> None:
        """A shared download ends at the latest deadline of the readers that joined it: one
        stuck on a trickling server is cancelled then (its request slot freed) and leaves
        `_inflight` at once, so the next reader starts afresh instead of joining a dead job."""
        loop = asyncio.get_running_loop()
        ends = _read_ends_at.get()
        ends = loop.time() + self.deadline if ends is None else ends
        if ends <= self._job_ends.get(job, 0.0):
            return
        first = job not in self._job_ends
        self._job_ends[job] = ends
        if first:   # the timer holds the job weakly: a finished job (and its buffer) goes at once
            loop.call_at(ends + JOB_GRACE, self._deadline_check, weakref.ref(job))

    def _deadline_check(self, held: "weakref.ref[ChunkJob]") -> None:
        job = held()
        if job is None or job.done:
            if job is not None:
                self._job_ends.pop(job, None)
            return
        due = self._job_ends.get(job)
        if due is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            loop.call_at(due + JOB_GRACE, self._deadline_check, held)
            return
        self._job_ends.pop(job, None)
        self._end_job(job, "deadline")

    async def _run_job(self, job: ChunkJob) -> None:
        ref, idx = job.ref, job.idx
        try:
            if job.kind == "pass":
                if job.gate is not None and not job.gate.is_set():
                    job.queued = True
                    await job.gate.wait()       # the pass holds the object's lock (or gave up waiting)
                cached = await self.astore.read(ref.oid, idx)     # verified by another process meanwhile
                if cached is not None and len(cached) == len(job.buf):
                    job.from_cache = True
                    job.fill(cached)
                else:
                    await self._download(job)
            else:
                job.queued = True   # another process may be downloading it
                lock = self.store.lock(ref.oid, idx)
                header, cached = await self._lock_and_look(lock, ref.oid, idx)
                try:
                    job.queued = False
                    job.progress()
                    if not self._second_look(job, header, cached):
                        await self._download(job)
                finally:
                    lock.release()
            job.finish(None)
        except asyncio.CancelledError:
            if job.ended_by == "superseded":
                job.finish(Superseded())
            elif job.ended_by == "deadline":
                job.finish(DeadlineExceeded(f"{ref.display}: chunk {idx}: no answer within the deadline"))
            else:
                job.finish(RemoteUnavailable(f"{ref.display}: download was cancelled"))
            raise
        except BaseException as err:    # handed to whoever waits for the chunk
            job.finish(err)

    async def _lock_and_look(self, lock: FileLock, oid: str, idx: int) -> tuple[ChunkHeader | None, bytes | None]:
        """Take the chunk's cross-process lock and look in the store again (another process may
        have stored the chunk meanwhile): one trip to a store thread when the lock is free, else
        wait for it on the loop (polling: cancellable) and then look. Returns (header, bytes)."""
        def look() -> tuple[ChunkHeader | None, bytes | None]:
            header = self.store.header(oid, idx)
            return header, (self.store.read(oid, idx) if header is not None else None)

        def try_and_look() -> tuple[bool, ChunkHeader | None, bytes | None]:
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            if not lock.try_acquire():
                return False, None, None
            try:
                return (True, *look())
            except BaseException:
                lock.release()
                raise

        trip = asyncio.ensure_future(self.astore.run(try_and_look))
        try:
            got, header, cached = await asyncio.shield(trip)
        except asyncio.CancelledError:     # the thread may still take the lock: let go of it then
            trip.add_done_callback(lambda t: lock.release() if not t.cancelled() and t.exception() is None
                                   and t.result()[0] else None)
            raise
        if got:
            return header, cached
        await lock.__aenter__()
        try:
            return await self.astore.run(look)
        except BaseException:
            lock.release()
            raise

    def _second_look(self, job: ChunkJob, header: ChunkHeader | None, cached: bytes | None) -> bool:
        """Whether another process stored the chunk while we waited for its lock (then the job
        holds its bytes)."""
        ref, size = job.ref, job.size
        if header is None:
            return False
        if size is not None and header.object_size != size and ref.size is None:
            self._size_contradicted(ref, size, header.object_size)
            self._learned_size(ref.oid, header.object_size, verified=True)   # the chunk was verified
            raise _SizeChanged()
        if cached is None or (size is not None and header.object_size != size):
            return False
        job.from_cache = True
        job.total = header.object_size
        job.fill(cached)
        self._learned_size(ref.oid, header.object_size, verified=True)
        return True

    async def _download(self, job: ChunkJob) -> None:
        """Stream the chunk into `job`, retrying with the one RetryPolicy and resuming where the
        last attempt stopped. A "whole" chunk (or the probe of a one-chunk object) is checked
        and stored in one trip to a store thread, and fetched once more on a mismatch, before
        any reader sees a byte of it."""
        ref, idx, size = job.ref, job.idx, job.size
        cs = self.store.chunk_size
        start = idx * cs
        end = start + cs if size is None else min(size, start + cs)
        attempt = mismatches = 0
        told: int | None = None

        def sink(piece: bytes) -> None:
            self.counters.add("dda_remote_bytes", len(piece))
            job.feed(piece)

        async def request(offset: int) -> int | None:
            job.queued = False      # it has its request slot: from now on it must make progress
            job.progress()
            return await ref.remote.stream(ref.path, offset, end, sink)

        while True:
            try:
                offset = start + job.received
                if offset < end:
                    job.queued = True
                    answer = await self._remote_call(ref.remote, lambda: request(offset), "read")
                    job.progress()
                    if answer is not None:
                        if told is not None and answer != told:   # the object changed under a resumed read
                            job.restart()
                            told = None
                            raise RemoteUnavailable(f"{ref.display}: the size of {ref.path} changed between answers")
                        told = answer
                total = told if told is not None else size
                if total is None:
                    # No size in the answer: only a whole verified object can tell it.
                    total = start + job.received
                    if job.received >= cs:
                        job.restart()
                        raise RemoteUnavailable(f"{ref.display}: the answer for {ref.path} gave no size")
                if size is not None and total != size:
                    if ref.size is not None:
                        job.restart()
                        told = None
                        raise RemoteUnavailable(f"{ref.display}: remote says {ref.path} has {total} bytes, "
                                                f"the repository says {size}")
                    self._size_contradicted(ref, size, total)
                    raise _SizeChanged()
                expected = max(0, min(total, start + cs) - start)
                if job.received != expected:
                    got = job.received
                    if got > expected:
                        job.restart()
                    raise RemoteUnavailable(f"{ref.display}: short read from {ref.path} "
                                            f"({got} of {expected} bytes)", path=ref.display)
                job.length, job.total = expected, total
                if job.kind == "pass":
                    return
                one_chunk = self.store.chunk_count(total) == 1
                if not one_chunk and job.digest is None:
                    # First chunk of a large object read to learn its size: it is not kept.
                    self._learned_size(ref.oid, total)
                    return
                # (a thread of its own, as before: a store write may wait on another process's
                # index lock, and must not take a thread that cached reads need)
                if not await asyncio.to_thread(self._check_and_store, job, total, one_chunk):
                    mismatches += 1
                    self.counters.add("dda_hash_mismatches")
                    if mismatches > 1:
                        self.counters.add("dda_errors", 1, HashMismatch.reason)
                        raise HashMismatch(f"{ref.display}: content of {ref.path} on remote {ref.remote.name!r} "
                                           f"does not match its md5 {ref.oid} (after {mismatches} downloads)")
                    job.restart()
                    told = None
                    continue
                if self._learned_size(ref.oid, total, verified=True):
                    await self._index_settled()
                return
            except RemoteUnavailable as err:
                job.progress()      # an answer, if an unwelcome one
                attempt += 1
                job.queued = True   # a backoff is not a stall
                await self._backoff(attempt, ref, err)

    def _check_and_store(self, job: ChunkJob, total: int, one_chunk: bool) -> bool:
        """On a store thread: check a whole chunk (the object's md5, or the chunk's sha256) and
        store it if right. A full cache serves it uncached."""
        data = job.view()
        ok = md5_matches(data, job.ref.oid, job.ref.legacy) if one_chunk else chunk_digest(data) == job.digest
        if ok:
            try:
                self.store.write(job.ref.oid, job.idx, data, total)
            except CacheFull as err:    # the bytes are verified: serve them, uncached
                log.warning("%s: not caching it: %s", job.ref.display, err)
        return ok

    async def _backoff(self, attempt: int, ref: ObjectRef, err: RemoteUnavailable) -> None:
        """Sleep before retry `attempt` (exponential, full jitter), or give up with `err`."""
        if self.retry.gives_up(attempt):
            self.counters.add("dda_errors", 1, RemoteUnavailable.reason)
            raise err
        delay = self.retry.delay(attempt)
        asked = getattr(err, "retry_after", None)   # RetryAfter: the server said how long to wait
        if asked is not None:
            ends = _read_ends_at.get()
            left = self.deadline if ends is None else ends - asyncio.get_running_loop().time()
            if asked >= left:
                self.counters.add("dda_errors", 1, "unavailable")
                raise err
            delay = max(delay, asked)
            status = getattr(err, "status", 429)
            words = {429: "rate limited", 503: "service unavailable"}.get(status, "server error")
            log.warning("%s: %s (HTTP %s), retrying after %g s", ref.display, words, status, round(delay, 1))
        self.counters.add("dda_remote_retries")
        log.info("retry %d for %s in %.2fs: %s", attempt, ref.display, delay, err)
        await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Cancel every download in flight and wait for them to end."""
        await self.drain(0)
        await self.astore.aclose_pool()

    async def drain(self, timeout: float) -> None:
        """Let downloads already under way land in the cache (a reader that took the first
        kilobytes of a chunk leaves the rest downloading); cancel what is left at `timeout`."""
        tasks = [t for t in (*self._stream_tasks, *(j.task for j in self._inflight.values() if j.task))
                 if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # plumbing --------------------------------------------------------------------------------
    def _limit(self, remote: Remote, op: str = "read") -> PriorityLimiter:
        # Sizes have their own slots where the remote's client carries many at once (tiny
        # answers, no bandwidth): a walker's sizing never queues behind reads, nor reads behind it.
        sizes = op == "size" and bool(remote.size_concurrency)
        key = (id(remote), sizes)
        if key not in self._limits:
            self._limits[key] = PriorityLimiter(remote.size_concurrency if sizes else self.jobs)  # type: ignore[arg-type]
        return self._limits[key]

    def size_slots(self, remote: Remote) -> int:
        """How many size requests `remote` may have in flight (the sizing pool's width)."""
        return remote.size_concurrency or self.jobs

    async def _remote_call(self, remote: Remote, call, op: str):  # type: ignore[no-untyped-def]
        """One request (`op`: read, size or list) within the remote's concurrency limit."""
        async with self._limit(remote, op).slot():
            self.counters.add("dda_remote_requests")
            if self.on_request is None:
                return await call()
            started, status = time.monotonic(), "error"
            try:
                result = await call()
                status = "ok"
                return result
            except BaseException as err:
                status = reason_of(err)     # the one error mapping (sidecar.errors)
                raise
            finally:
                self.on_request(op, status, time.monotonic() - started)

    async def _with_deadline(self, coro, ref: ObjectRef):  # type: ignore[no-untyped-def]
        token = _read_ends_at.set(asyncio.get_running_loop().time() + self.deadline)
        try:
            async with asyncio.timeout(self.deadline):
                return await coro
        except ObjectMissing:
            self.counters.add("dda_errors", 1, ObjectMissing.reason)
            raise ObjectMissing(f"{ref.display}: object md5 {ref.oid} is missing on remote {ref.remote.name!r} "
                                f"({ref.remote.display_url}/{ref.path})", path=ref.display) from None
        except RemoteError as err:
            if err.path is not None:        # already says which file
                raise
            # Say which file, keeping the error's class and fields (errno, Retry-After, ...).
            err.args = (f"{ref.display}: {err}",)
            err.path = ref.display
            raise err from None
        except TimeoutError:
            self.counters.add("dda_errors", 1, DeadlineExceeded.reason)
            raise DeadlineExceeded(
                f"{ref.display}: no answer from remote {ref.remote.name!r} ({ref.remote.display_url}) "
                f"within {self.deadline:g}s", path=ref.display) from None
        finally:
            _read_ends_at.reset(token)


class _SizeChanged(RemoteError):
    """The size we had for an object was contradicted: the read starts over and learns it
    (escaping elsewhere, e.g. to a prefetch, it is an ordinary one-line remote error)."""

    def __init__(self, message: str = "the remote contradicted the size we had for this object") -> None:
        super().__init__(message)

