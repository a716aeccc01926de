"""The fetch scheduler.

- single-flight: N readers of one missing chunk -> one request (in-process: a shared task;
  across processes: an flock per chunk, then a second look in the store);
- bounded concurrency per remote; retries with exponential backoff and full jitter on
  5xx, timeouts and resets; a deadline per read that ends in a clear error;
- verification: an object of one chunk is checked against its md5 before it is stored or
  served; a larger object is checked as soon as its last chunk lands, and dropped (and the
  read fails) on mismatch.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import (CacheFull, DeadlineExceeded, HashMismatch, ObjectMissing, RemoteError,
                      RemoteUnavailable, reason_of)
from ..remotes import Remote
from ..store import Store
from ..store.identity import chunk_digest
from ..store.verify import md5_matches
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


@dataclass
class FetchStats:
    requests: int = 0
    bytes_fetched: int = 0
    bytes_served: int = 0
    cache_hits: int = 0         # reads answered from the cache alone
    cache_misses: int = 0       # reads that needed the remote
    retries: int = 0
    hash_mismatches: int = 0
    size_lookups: int = 0
    meta_hits: int = 0          # size lookups and .dir manifests answered from the cache/index
    meta_misses: int = 0        # ... that needed the remote
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Fetcher:
    def __init__(self, store: Store, *, jobs: int = 16, retries: int = 5, deadline: float = 60.0,
                 backoff_base: float = 0.2, backoff_cap: float = 10.0, strict: bool = False):
        self.store = store
        self.jobs = jobs
        self.deadline = deadline
        self.retry = RetryPolicy(retries, backoff_base, backoff_cap)   # the one retry policy
        self.stats = FetchStats()
        self._limits: dict[tuple[int, bool], PriorityLimiter] = {}
        self._inflight: dict[tuple[str, int, bool], asyncio.Task[tuple[bytes, bool]]] = {}
        self._stream_tasks: set[asyncio.Task[None]] = set()
        self._job_ends: dict[asyncio.Task[tuple[bytes, bool]], float] = {}   # when a shared download ends
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

    # sizes -----------------------------------------------------------------------------------
    def known_size(self, ref: ObjectRef) -> int | None:
        if ref.size is not None:
            return ref.size
        if ref.oid in self._sizes:
            return self._sizes[ref.oid]
        if ref.oid in self._contradicted:
            return None     # forgotten: the index may still hold it (its change is queued)
        size = self.store.index.size(ref.oid)
        if size is not None:
            self._sizes[ref.oid] = size
        return size

    def _learned_size(self, oid: str, size: int, verified: bool = False) -> None:
        """Record a size from an answer we trust (a Content-Range total, the length of a
        complete answer, a HEAD) or from the verified object (`verified`)."""
        old = self._sizes.get(oid)
        if old is None and verified and oid not in self._contradicted:
            old = self.store.index.size(oid)   # known once, since dropped from the bounded memo
        if old != size:
            self._sizes[oid] = size
            self._record_size(oid, size)
            corrected = old is not None or oid in self._contradicted
            if verified and corrected:    # a correction: whoever showed the old size follows
                self._contradicted.discard(oid)
                for observer in self.size_observers:
                    observer(oid, size)

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
        self.stats.errors["size_contradiction"] += 1

    async def size_of(self, ref: ObjectRef, *, index_asked: bool = False) -> int:
        """The size of `ref`'s object: what is known (memory, persistent index, the cache),
        else one request under its own deadline, recorded at once. index_asked=True: the
        caller just found the persistent index without it (no second query)."""
        size = ref.size if ref.size is not None else self._sizes.get(ref.oid) if index_asked else self.known_size(ref)
        if size is None:
            size = self.store.object_size(ref.oid)
            if size is not None:
                self._learned_size(ref.oid, size)
        if size is None:
            self.stats.meta_misses += 1
            size = await self._with_deadline(self._remote_call(ref.remote, lambda: ref.remote.size(ref.path),
                                                               "size"), ref)
            self.stats.size_lookups += 1
            self._learned_size(ref.oid, size)
        else:
            self.stats.meta_hits += 1
        return size

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
            stored = self.store.index.sizes([r.oid for r in missing if r.oid not in self._contradicted])
            self._sizes.update(stored)
            result.update(stored)
            missing = [r for r in missing if r.oid not in stored]
        self.stats.meta_hits += len(refs) - len(missing)
        self.stats.meta_misses += len(missing)
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
                self.stats.size_lookups += len(folders)
                for ref in refs:
                    if ref.path in by_path:
                        learned[ref.oid] = by_path[ref.path]
        todo = [r for r in refs if r.oid not in learned]

        async def head(ref: ObjectRef) -> None:
            learned[ref.oid] = await self._remote_call(remote, lambda: remote.size(ref.path), "size")
            self.stats.size_lookups += 1

        if todo:
            await self._with_deadline(asyncio.gather(*(head(r) for r in todo)), todo[0])
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
        size = self.known_size(ref)
        missed = False
        if size is None:
            size = self.store.object_size(ref.oid)     # a verified object in the store knows it
            if size is not None:
                self._learned_size(ref.oid, size, verified=True)
        if size is None:
            # Learn the size from the first chunk's answer (Content-Range), not a separate HEAD.
            waiting[0] = True
            size = await self._probe(ref)
            missed = True
        end = size if length is None else min(size, offset + length)
        if offset >= end:
            return b""
        large = self.store.chunk_count(size) > 1
        pieces: list[bytes] = []
        first_idx, last_idx = offset // cs, (end - 1) // cs
        for idx in range(first_idx, last_idx + 1):
            lo, hi = max(offset, idx * cs) - idx * cs, min(end, (idx + 1) * cs) - idx * cs
            data = self.store.read(ref.oid, idx, lo, hi)
            if data is None:
                waiting[0] = True
                if large:
                    data, hit = await self._large_range(ref, idx, size, lo, hi, reader)
                else:
                    chunk, hit = await self._chunk(ref, idx, size)
                    data = chunk[lo:hi]
                missed = missed or not hit
                waiting[0] = missed
            pieces.append(data)
        if large and reader is not None and end == size:
            await reader.settle()       # the read that ends the object: every byte taken was right
        out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if meta:
            if missed:
                self.stats.meta_misses += 1
            else:
                self.stats.meta_hits += 1
            return out
        if missed:
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1
        self.stats.bytes_served += len(out)
        return out

    async def _probe(self, ref: ObjectRef) -> int:
        """Learn an object's size from the answer for its first chunk. A one-chunk object is
        verified and stored on the way; the first chunk of a larger one is not kept (it is
        verified with the rest by the pass that reads it)."""
        data, _ = await self._chunk(ref, 0, None)
        size = self.known_size(ref)
        if size is None:
            raise _SizeChanged()
        return size

    def _sums(self, oid: str, size: int) -> list[bytes] | None:
        """Per-chunk sha256 of a verified object (from a verified pass), or None."""
        found = self._digests.get(oid)
        if found is None:
            stored = self.store.read_sums(oid)
            if stored is None:
                return None
            found = self._digests[oid] = stored
        if found[0] != size:
            log.warning("object %s: verified size %d differs from the recorded %d; using the verified one",
                        oid, found[0], size)
            self._learned_size(oid, found[0], verified=True)
            raise _SizeChanged()
        return found[1]

    async def _large_range(self, ref: ObjectRef, idx: int, size: int, lo: int, hi: int,
                           reader: ReadCursor | None) -> tuple[bytes, bool]:
        """Bytes [lo, hi) of chunk `idx` of a large object that is not in the cache."""
        for attempt in range(2):
            sums = self._sums(ref.oid, size)
            if sums is not None:       # verified before: this chunk can be checked on its own
                chunk, hit = await self._chunk(ref, idx, size, digest=sums[idx])
                return chunk[lo:hi], hit
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
            data = self.store.read(ref.oid, idx, lo, hi)
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
        self.stats.hash_mismatches += 1
        self.stats.errors["hash_mismatch"] += 1
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
            if not self.store.has(ref.oid, idx):
                if self.store.chunk_count(size) > 1:
                    await self._large_range(ref, idx, size, 0, 0, None)
                else:
                    await self._chunk(ref, idx, size)

    def cached(self, ref: ObjectRef) -> bool:
        """Whether every chunk of the object is in the store (size must be known)."""
        size = self.known_size(ref)
        if size is None:
            return False
        return all(self.store.has(ref.oid, idx) for idx in range(self.store.chunk_count(size)))

    async def _chunk(self, ref: ObjectRef, idx: int, size: int | None,
                     digest: bytes | None = None) -> tuple[bytes, bool]:
        """(chunk bytes, whether the cache had it), joining a download already in flight. The
        chunk is verified before it is stored or returned: against the object's md5 (one-chunk
        objects) or the chunk's sha256 from a verified pass (`digest`)."""
        key = (ref.oid, idx, size is None)     # a probe (size unknown) never joins a verified load
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._load_chunk(ref, idx, size, digest))
            self._inflight[key] = task
            task.add_done_callback(lambda t, k=key: (self._inflight.pop(k, None) if self._inflight.get(k) is t
                                                     else None, t.cancelled() or t.exception()))
        self._job_deadline(key, task)
        try:
            data, downloaded = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # the job ended at its deadline (a reader's own deadline ends at the same time)
                self.stats.errors[DeadlineExceeded.reason] += 1
                raise DeadlineExceeded(
                    f"{ref.display}: no answer from remote {ref.remote.name!r} ({ref.remote.display_url}) "
                    f"within {self.deadline:g}s", path=ref.display) from None
            raise
        return data, not downloaded

    def _job_deadline(self, key: tuple[str, int, bool], task: "asyncio.Task[tuple[bytes, bool]]") -> None:
        """A shared download ends at the latest deadline of the readers that joined it: one
        stuck on a trickling server is cancelled then (its request slot freed) and leaves
        `_inflight` at once, so the next reader starts afresh instead of joining a dead job."""
        loop = asyncio.get_running_loop()
        ends = _read_ends_at.get()
        ends = loop.time() + self.deadline if ends is None else ends
        if ends <= self._job_ends.get(task, 0.0):
            return
        first = task not in self._job_ends
        self._job_ends[task] = ends

        def check() -> None:
            if task.done():
                self._job_ends.pop(task, None)
                return
            due = self._job_ends[task]
            if loop.time() < due:
                loop.call_at(due + JOB_GRACE, check)
                return
            self._job_ends.pop(task, None)
            if self._inflight.get(key) is task:
                del self._inflight[key]     # never joined again
            task.cancel()

        if first:
            loop.call_at(ends + JOB_GRACE, check)

    async def _stream_download(self, ref: ObjectRef, idx: int, size: int, job: "_StreamJob") -> None:
        start = idx * self.store.chunk_size
        attempt = 0

        def sink(piece: bytes) -> None:
            self.stats.bytes_fetched += len(piece)
            job.feed(piece)

        while job.received < job.length:
            try:
                # Resume where the last attempt stopped: nothing is fetched twice.
                offset = start + job.received
                total = await self._remote_call(
                    ref.remote, lambda: ref.remote.stream(ref.path, offset, start + job.length, sink), "read")
                if total is not None and total != size:
                    if ref.size is not None:    # the repository's size: the answer is wrong
                        raise RemoteUnavailable(f"{ref.display}: remote says {ref.path} has {total} bytes, "
                                                f"the repository says {size}")
                    self._size_contradicted(ref, size, total)
                    raise _SizeChanged()
                if job.received < job.length:
                    raise RemoteUnavailable(f"{ref.display}: short read from {ref.path} "
                                            f"({job.received} of {job.length} bytes)", path=ref.display)
            except RemoteUnavailable as err:
                attempt += 1
                await self._backoff(attempt, ref, err)

    async def _load_chunk(self, ref: ObjectRef, idx: int, size: int | None,
                          digest: bytes | None) -> tuple[bytes, bool]:
        async with self.store.lock(ref.oid, idx):
            header = self.store.header(ref.oid, idx)    # another process may have just written it
            if header is not None and size is not None and header.object_size != size and ref.size is None:
                self._size_contradicted(ref, size, header.object_size)
                self._learned_size(ref.oid, header.object_size, verified=True)   # the chunk was verified
                raise _SizeChanged()
            if header is not None and (size is None or header.object_size == size):
                cached = self.store.read(ref.oid, idx)
                if cached is not None:
                    self._learned_size(ref.oid, header.object_size, verified=True)
                    return cached, False
            data, size = await self._download_chunk(ref, idx, size, digest)
            if self.store.chunk_count(size) == 1 or digest is not None:
                try:
                    await asyncio.to_thread(self.store.write, ref.oid, idx, data, size)
                except CacheFull as err:    # the bytes are verified: serve them, uncached
                    log.warning("%s: not caching it: %s", ref.display, err)
        return data, True

    async def _download_chunk(self, ref: ObjectRef, idx: int, size: int | None,
                              digest: bytes | None) -> tuple[bytes, int]:
        cs = self.store.chunk_size
        start = idx * cs
        end = start + cs if size is None else min(size, start + cs)
        mismatches = 0
        attempt = 0
        while True:
            try:
                got = await self._remote_call(ref.remote, lambda: ref.remote.read(ref.path, start, end), "read")
                self.stats.bytes_fetched += len(got.data)
                total = got.total if got.total is not None else size
                if total is None:
                    # No size in the answer: only a whole verified object can tell it.
                    total = start + len(got.data)
                    if len(got.data) >= cs:
                        raise RemoteUnavailable(f"{ref.display}: the answer for {ref.path} gave no size")
                if size is not None and total != size:
                    if ref.size is not None:
                        raise RemoteUnavailable(f"{ref.display}: remote says {ref.path} has {total} bytes, "
                                                f"the repository says {size}")
                    self._size_contradicted(ref, size, total)
                    raise _SizeChanged()
                expected_len = min(total, start + cs) - start
                if len(got.data) != expected_len:
                    raise RemoteUnavailable(f"{ref.display}: short read from {ref.path} "
                                            f"({len(got.data)} of {expected_len} bytes)", path=ref.display)
                if self.store.chunk_count(total) == 1:
                    ok = md5_matches(got.data, ref.oid, ref.legacy)
                elif digest is not None:
                    ok = chunk_digest(got.data) == digest
                else:
                    # First chunk of a large object read to learn its size: it is not kept.
                    self._learned_size(ref.oid, total)
                    return got.data, total
                if not ok:
                    mismatches += 1
                    self.stats.hash_mismatches += 1
                    if mismatches > 1:
                        self.stats.errors[HashMismatch.reason] += 1
                        raise HashMismatch(f"{ref.display}: content of {ref.path} on remote {ref.remote.name!r} "
                                           f"does not match its md5 {ref.oid} (after {mismatches} downloads)")
                    continue
                self._learned_size(ref.oid, total, verified=True)
                return got.data, total
            except RemoteUnavailable as err:
                attempt += 1
                await self._backoff(attempt, ref, err)

    async def _backoff(self, attempt: int, ref: ObjectRef, err: RemoteUnavailable) -> None:
        """Sleep before retry `attempt` (exponential, full jitter), or give up with `err`."""
        if self.retry.gives_up(attempt):
            self.stats.errors[RemoteUnavailable.reason] += 1
            raise err
        delay = self.retry.delay(attempt)
        asked = getattr(err, "retry_after", None)   # RetryAfter: the server said how long to wait
        if asked is not None:
            ends = _read_ends_at.get()
            left = self.deadline if ends is None else ends - asyncio.get_running_loop().time()
            if asked >= left:
                self.stats.errors["unavailable"] += 1
                raise err
            delay = max(delay, asked)
            status = getattr(err, "status", 429)
            words = {429: "rate limited", 503: "service unavailable"}.get(status, "server error")
            log.warning("%s: %s (HTTP %s), retrying after %g s", ref.display, words, status, round(delay, 1))
        self.stats.retries += 1
        log.info("retry %d for %s in %.2fs: %s", attempt, ref.display, delay, err)
        await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Cancel every download in flight and wait for them to end."""
        await self.drain(0)

    async def drain(self, timeout: float) -> None:
        """Let downloads already under way land in the cache (a reader that took the first
        kilobytes of a chunk leaves the rest downloading); cancel what is left at `timeout`."""
        tasks = [t for t in (*self._stream_tasks, *self._inflight.values()) if not t.done()]
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
            self.stats.requests += 1
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
            self.stats.errors[ObjectMissing.reason] += 1
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
            self.stats.errors[DeadlineExceeded.reason] += 1
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


class _StreamJob:
    """One chunk being downloaded: the bytes so far, and readers waiting for a prefix of it."""

    def __init__(self, length: int, last: bool):
        self.length = length
        self.last = last               # the object's final chunk
        self.buf = bytearray(length)
        self.received = 0
        self.done = False
        self.error: BaseException | None = None
        self.from_cache = False
        self._waiters: list[tuple[int, bool, asyncio.Future[None]]] = []

    def feed(self, piece: bytes) -> None:
        end = self.received + len(piece)
        self.buf[self.received:end] = piece
        self.received = end
        self._wake()

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
        while not self.done and (until_done or self.received < need):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((need, until_done, future))
            await future
        if self.error is not None and (until_done or self.received < need):
            if isinstance(self.error, asyncio.CancelledError):
                raise RemoteUnavailable("download was cancelled") from None
            raise self.error
