"""Verifying objects larger than one chunk: one in-order pass over the whole object.

A pass downloads the chunks of one object (a few ahead of the hash, more if readers ask),
feeds them to an incremental md5 in order, and keeps each chunk in a pending file of the
store that no reader opens. When the md5 matches, the pending chunks that are still there
(a budget smaller than the object evicts some) are renamed into place and the sha256 of
every chunk is written next to them, so a later read of an evicted chunk can be checked on
its own. When it does not match, every pending chunk is removed and the pass fails.

Readers (sidecar.fetch.scheduler) either wait for the pass's verdict before taking any byte
(`verify: before-read`), or take bytes as they arrive (`verify: stream`, the default); then a
ReadCursor remembers which passes it took unverified bytes from, any later read through it
fails once one of them failed, and the read that reaches the object's end waits for them.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import TYPE_CHECKING

from ..errors import CacheFull, HashMismatch
from ..store.identity import chunk_digest
from ..store.verify import ObjectVerifier
from .job import ChunkJob, Superseded

if TYPE_CHECKING:
    from .scheduler import Fetcher, ObjectRef

log = logging.getLogger(__name__)

WINDOW = 4          # chunks downloaded ahead of the hash
MAX_AHEAD = 16      # a reader further ahead than this waits (bounds the memory of one pass)


class ReadCursor:
    """One reader of one object (a FUSE file handle, one `dda cat`): the passes it took
    unverified bytes from, and whether one of them failed."""

    def __init__(self) -> None:
        self.passes: set[ObjectPass] = set()
        self.error: BaseException | None = None

    def took(self, job_pass: "ObjectPass") -> None:
        if not job_pass.ok:
            self.passes.add(job_pass)

    def fail(self, error: BaseException) -> None:
        self.error = error

    def check(self) -> None:
        """Raise if bytes this reader took came from a pass that failed."""
        if self.error is None:
            for job_pass in self.passes:
                if job_pass.failed is not None:
                    self.error = job_pass.failed
        if self.error is not None:
            raise _reader_error(self.error)

    async def settle(self) -> None:
        """Wait for the verdict of every pass this reader took bytes from; raise if one failed."""
        self.check()
        for job_pass in list(self.passes):
            try:
                await job_pass.verdict()
            except BaseException as err:
                self.error = err
                raise _reader_error(err) from None
            self.passes.discard(job_pass)


def _reader_error(err: BaseException) -> BaseException:
    if isinstance(err, HashMismatch):
        return HashMismatch(str(err))
    if isinstance(err, asyncio.CancelledError):
        return HashMismatch("bytes already read could not be verified (the download was cancelled)")
    return HashMismatch(f"bytes already read could not be verified: {err}")


class ObjectPass:
    """One in-order, verified download of a whole object (see the module docstring). Its
    chunks are fetched by the fetcher's one job type (ChunkJob, kind "pass"): a reader that
    asks for a chunk joins the job the pass started, or starts it."""

    def __init__(self, fetcher: "Fetcher", ref: "ObjectRef", size: int):
        self.fetcher = fetcher
        self.store = fetcher.store
        self.ref = ref
        self.size = size
        self.count = self.store.chunk_count(size)
        self.tag = self.store.new_pending_tag()
        self.jobs: dict[int, ChunkJob] = {}     # chunks not hashed yet (finished ones kept until then)
        self.hashed = 0
        self.digests: list[bytes] = []
        self.ok = False
        self.failed: BaseException | None = None
        self.served_unverified = False
        self._moved = asyncio.Event()
        self._ready = asyncio.Event()     # set once we hold the object's lock (or gave up waiting)
        # A context of its own: the jobs it starts end at their own deadlines, not at the one of
        # the reader that happened to start the pass.
        self.task = asyncio.create_task(self._run(), context=contextvars.Context())

    # -- readers ---------------------------------------------------------------------------------
    async def verdict(self) -> None:
        """Wait for the pass to end; raises its error (HashMismatch, RemoteError...)."""
        await asyncio.shield(self.task)

    async def range(self, idx: int, lo: int, hi: int) -> bytes | None:
        """Bytes [lo, hi) of chunk `idx` as they arrive (unverified), or None when the pass
        has already hashed that chunk (then read it verified once the pass ends)."""
        while idx >= self.hashed + MAX_AHEAD and not self.task.done():
            self._moved.clear()
            await self._moved.wait()
        if idx < self.hashed or self.task.done():
            return None
        while True:
            try:
                job = await self._wait(idx, hi)
            except Exception:
                if isinstance(self.failed, Exception):   # the pass failed and ended its jobs: say why
                    raise self.failed from None
                raise
            data = await job.copy(lo, hi, self.fetcher.astore.run)
            # The answer that woke us may have been rejected since (a wrong size: the job
            # restarted with an empty buffer): wait for the bytes again, never hand out fewer.
            if len(data) == hi - lo:
                break
        if not self.ok:
            self.served_unverified = True
        return data

    def job(self, idx: int) -> ChunkJob:
        """The download of chunk `idx`, joined or started (a finished one is kept until hashed)."""
        job = self.jobs.get(idx)
        if job is not None and job.done and job.error is None:
            return job
        job = self.fetcher._job(self.ref, idx, self.size, "pass", gate=self._ready)
        self.jobs[idx] = job
        return job

    async def _wait(self, idx: int, need: int, until_done: bool = False) -> ChunkJob:
        while True:
            job = self.job(idx)
            try:
                await self.fetcher._watch(job, need, until_done)
                return job
            except Superseded:      # it made no progress: a fresh job took over
                continue

    # -- the pass --------------------------------------------------------------------------------
    async def _run(self) -> None:
        # Across processes, one pass per object at a time: a second process waits for the
        # first one's verdict and then finds the verified chunks in the store (one download).
        # It waits a bounded time: a stuck or very slow holder must not stall it for good.
        lock = self.store.object_lock(self.ref.oid)
        mine = self.store.held_object_locks     # lock files this process holds (stripes are shared)
        held = False
        if lock.path not in mine:
            try:
                async with asyncio.timeout(max(1.0, self.fetcher.deadline / 2)):
                    await lock.__aenter__()
                    held = True
                    mine.add(lock.path)
            except TimeoutError:
                log.info("%s: another process is still verifying it; downloading it here too", self.ref.display)
        self._ready.set()
        try:
            await self._verify()
        finally:
            if held:
                mine.discard(lock.path)
                lock.release()

    async def _verify(self) -> None:
        ref, store = self.ref, self.store
        verifier = ObjectVerifier(ref.oid, ref.legacy)
        written: list[int] = []

        def absorb(idx: int, job: ChunkJob) -> bool:
            """On a store thread: hash the chunk in order and keep it in a pending file."""
            data = job.view()
            verifier.update(data)
            self.digests.append(chunk_digest(data))
            if job.from_cache:
                return False
            try:
                store.write(ref.oid, idx, data, self.size, self.tag)
                return True
            except CacheFull as err:
                log.warning("%s: not caching chunk %d: %s", ref.display, idx, err)
                return False

        try:
            for idx in range(self.count):
                for ahead in range(idx, min(self.count, idx + WINDOW)):
                    self.job(ahead)
                job = await self._wait(idx, 0, until_done=True)
                if await asyncio.to_thread(absorb, idx, job):
                    written.append(idx)
                self.jobs.pop(idx, None)
                self.hashed = idx + 1
                self._moved.set()
            if not await asyncio.to_thread(verifier.ok):
                self.fetcher._mismatch(ref, f"{ref.display}: content of {ref.path} on remote {ref.remote.name!r} "
                                            f"does not match its md5 {ref.oid}; dropped it from the cache")
            await asyncio.to_thread(self._promote, written)
            self.fetcher._digests[ref.oid] = (self.size, self.digests)
            self.ok = True
            self.fetcher._learned_size(ref.oid, self.size, verified=True)
        except BaseException as err:
            self.failed = err
            for job in list(self.jobs.values()):
                self.fetcher._end_job(job, "cancelled")
            await asyncio.shield(asyncio.to_thread(self._discard, written))
            if self.served_unverified or isinstance(err, HashMismatch):
                self.fetcher._object_changed(ref.oid)
            raise
        finally:
            self._moved.set()

    def _promote(self, written: list[int]) -> None:
        for idx in written:
            self.store.promote(self.ref.oid, idx, self.tag)
        try:
            self.store.write_sums(self.ref.oid, self.size, self.digests)
        except CacheFull as err:
            log.warning("%s: not keeping chunk digests: %s", self.ref.display, err)

    def _discard(self, written: list[int]) -> None:
        for idx in written:
            self.store.discard(self.ref.oid, idx, self.tag)
