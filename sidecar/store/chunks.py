"""Chunk files: each holds one chunk of one object after a header that says what it is (object
id, chunk index, chunk size, object size) and a CRC32 per 128 KiB block (store/identity.py).

A chunk file appears under its name only by an atomic rename, and only with bytes that were
verified: the whole object's md5 (a one-chunk object, or a whole in-order pass over a larger
one), or the chunk's own sha256 learned from such a pass. Bytes of a pass still under way sit
in pending files (`<name>.p<pid>-<n>`) that no reader opens; the pass renames them into place
when the md5 matches and removes them when it does not. Every read checks the identity and
the CRCs of the blocks it returns, so a damaged chunk, or one copied over another's name, is
dropped and fetched again, never served.

Layout: a fixed 512-byte header, then the data. A fixed header lets one pread fetch header
and data together: a warm read of a small file is open + pread + close.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import CacheFull
from ..locks import FileLock
from .budget import SharedBudget
from .evict import evict_to_budget
from .identity import BLOCK, HEADER, MAX_BLOCKS, BadChunk, ChunkHeader, pack_header, pack_sums, parse_header, \
    parse_sums
from .index import SUMS_IDX, Index, disk_size

__all__ = ["Store", "BLOCK", "HEADER", "MAX_BLOCKS"]

LOCK_STRIPES = 64   # object locks share this many lock files: their number stays bounded
FLUSH_SECONDS = 5.0  # how often recorded uses are written to the index (by a thread)
OVERHEAD_SECONDS = 1.0   # how often the store's folders and metadata files are measured
BESIDE_SECONDS = 30.0    # how often the cache directory's other folders (git, logs) are walked
BESIDE = ("git", "logs", "tls")   # what else dda keeps in a cache directory (counted, never evicted)
INDEX_QUEUE_MAX = 4096   # index writes waiting for the writer thread (see Store.index_later)
INDEX_QUEUE_WAIT = 60.0  # seconds a store thread waits for room before queueing anyway


def on_event_loop() -> bool:
    """True on a thread that runs an asyncio event loop (which must never wait on the index)."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

log = logging.getLogger(__name__)


def _blocks(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def _tree_blocks(path: Path) -> int:
    """st_blocks * 512 of a folder and everything under it (0 if absent)."""
    total = _blocks(path)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            total += _blocks(Path(folder) / name)
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, root: Path, budget: int, chunk_size: int):
        if chunk_size % BLOCK:
            raise ValueError(f"chunk size must be a multiple of {BLOCK} bytes")
        if chunk_size // BLOCK > MAX_BLOCKS:
            raise ValueError(f"chunk size must be at most {MAX_BLOCKS * BLOCK} bytes")
        self.root = Path(root) / "store-v2"
        self._chunks = str(self.root / "chunks")
        self.budget = budget
        self.chunk_size = chunk_size
        try:
            for sub in ("chunks", "locks", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.shared_budget = SharedBudget(self.root / "budgets", budget)
        except OSError as err:
            raise self._os_error(err, "open") from None
        self.index = Index(self.root / "index.sqlite")
        self.evictions = 0
        self._pending_seq = 0
        self.held_object_locks: set[Path] = set()
        self._effective = (budget, 0.0)
        self._disk_est, self._disk_read = 0, 0.0
        self._overhead_cached = (0, 0.0)
        self._beside_cached = (0, -BESIDE_SECONDS)
        self._evicting = threading.Lock()
        self._clean_tmp()
        self._clean_locks()
        if self.index.rebuilt:
            self._rebuild_index()
        else:
            self._clean_pending()
        self._used = self.index.used_bytes()
        self._used_read = time.monotonic()
        self._disk_est = self.index.disk_bytes()
        self._overhead(fresh=True)
        # Use times are written by this thread, never by a reader: a warm read must not wait
        # for the index's write lock (another process may hold it).
        self._stop_flusher = threading.Event()
        self._flusher = threading.Thread(target=self._flush_uses, name="store-index-flush", daemon=True)
        self._flusher.start()
        self._index_writer = ThreadPoolExecutor(1, thread_name_prefix="store-index-write")
        self._index_queued = 0                      # writes submitted, not yet done
        self._index_room = threading.Condition()

    def index_later(self, fn: Callable[..., object], *args: object) -> None:
        """Run an index write on the store's writer thread, in order, without waiting for it:
        the event loop must never wait for the index's write lock (another process may hold
        it). Failures are logged; the index is a cache of the chunk files.

        The queue is bounded (INDEX_QUEUE_MAX): a store thread that finds it full waits for
        room (back-pressure on downloads while another process holds the index lock, at most
        INDEX_QUEUE_WAIT s, then queues anyway); the event loop never waits - its writes are
        batches of sizes and proofs, a few per request."""
        def run() -> None:
            try:
                fn(*args)
            except Exception as err:
                log.warning("cache index: a change was not recorded: %s", err)
            finally:
                with self._index_room:
                    self._index_queued -= 1
                    self._index_room.notify_all()
        with self._index_room:
            if self._index_queued >= INDEX_QUEUE_MAX and not on_event_loop():
                self._index_room.wait_for(lambda: self._index_queued < INDEX_QUEUE_MAX, INDEX_QUEUE_WAIT)
            self._index_queued += 1
        try:
            self._index_writer.submit(run)
        except RuntimeError:     # closed meanwhile
            with self._index_room:
                self._index_queued -= 1

    def index_settled(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the index writes queued so far (False if they are
        still waiting, e.g. on another process's lock). Blocking: call it from a thread."""
        try:
            self._index_writer.submit(lambda: None).result(timeout)
            return True
        except RuntimeError:     # closed
            return True
        except TimeoutError:
            return False

    def _flush_uses(self) -> None:
        while not self._stop_flusher.wait(FLUSH_SECONDS):
            try:
                self.index.flush()
            except Exception as err:    # use times are a hint for eviction: kept for the next try
                log.debug("cache index: use times not written yet: %s", err)
            try:    # keeps disk_used() current for the metrics (other processes write too)
                self._disk_est = self.index.disk_bytes()
                self._overhead()
            except Exception as err:
                log.debug("cache: usage not measured: %s", err)

    # -- housekeeping ----------------------------------------------------------------------------
    def _clean_tmp(self) -> None:
        """Remove temp files of processes that are gone (or older than an hour)."""
        cutoff = time.time() - 3600
        for entry in os.scandir(self.root / "tmp"):
            try:
                parts = entry.name.split(".")
                pid = int(parts[2]) if len(parts) >= 4 else 0
                if not _pid_alive(pid) or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except (OSError, ValueError):
                pass

    def _clean_locks(self) -> None:
        """Chunk lock files left by a killed process (a live holder's stay). Object locks are
        striped, kept files: not touched."""
        try:
            entries = list(os.scandir(self.root / "locks"))
        except OSError:
            return
        for entry in entries:
            if not entry.name.startswith("object-"):
                FileLock(Path(entry.path), remove=True).remove_if_free()

    def _clean_pending(self) -> None:
        for key, idx in self.index.pending():
            tag = key.split("~", 1)[1]
            if not _pid_alive(int(tag.split("-", 1)[0] or 0)):
                self._unlink(key, idx)
                self.index.forget_chunk(key, idx)

    def _rebuild_index(self) -> None:
        """Refill a new index from the chunk headers; drop what is not a valid chunk file."""
        rows: list[tuple[str, int, int, float]] = []
        kept = dropped = 0
        for sub in os.scandir(self._chunks):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                try:
                    if name.endswith(".sums"):
                        oid = sub.name + name[:-len(".sums")]
                        with open(entry.path, "rb") as f:
                            parse_sums(f.read(), oid, self.chunk_size)
                        st = entry.stat()
                        rows.append((oid, SUMS_IDX, 0, disk_size(st.st_size, st.st_blocks), st.st_atime))
                        continue
                    stem, _, idx_text = name.rpartition(".")
                    if not idx_text.isdigit():      # a pending file: its pass cannot finish any more
                        raise BadChunk("pending")
                    oid, idx = sub.name + stem, int(idx_text)
                    with open(entry.path, "rb") as f:
                        header = parse_header(f.read(HEADER), oid, idx, self.chunk_size)
                    st = entry.stat()
                    if st.st_size != HEADER + header.length:
                        raise BadChunk("truncated")
                    rows.append((oid, idx, header.length, disk_size(st.st_size, st.st_blocks), st.st_atime))
                    kept += 1
                except (BadChunk, OSError, ValueError):
                    dropped += 1
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass
        self.index.add_chunks(rows)
        self.index.mark_built()
        if kept or dropped:
            log.warning("cache: rebuilt the index from the chunk files (%d kept, %d dropped)", kept, dropped)

    def _os_error(self, err: OSError, doing: str) -> Exception:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return CacheFull(f"cache directory {self.root.parent}: no space left on the device ({doing})")
        return err

    # layout ----------------------------------------------------------------------------------
    def chunk_file(self, oid: str, idx: int) -> str:
        if "~" in oid:      # pending file of a pass: `<oid>~<tag>`
            oid, tag = oid.split("~", 1)
            return f"{self._chunks}/{oid[:2]}/{oid[2:]}.{idx}.p{tag}"
        return f"{self._chunks}/{oid[:2]}/{oid[2:]}.{idx}"   # hot path: no Path objects

    def chunk_path(self, oid: str, idx: int) -> Path:
        return Path(self.chunk_file(oid, idx))

    def sums_file(self, oid: str) -> str:
        return f"{self._chunks}/{oid[:2]}/{oid[2:]}.sums"

    def lock(self, oid: str, idx: int) -> FileLock:
        """The cross-process lock of one chunk's download. Its file is removed on release, so
        lock files never outlive their downloads (as many as downloads under way, no more)."""
        return FileLock(self.root / "locks" / f"{oid}.{idx}.lock", remove=True)

    def object_lock(self, oid: str) -> FileLock:
        """Held by the process running the verifying pass over `oid` (striped too)."""
        stripe = zlib.crc32(oid.encode()) % LOCK_STRIPES
        return FileLock(self.root / "locks" / f"object-{stripe:02x}.lock")

    def chunk_count(self, size: int) -> int:
        return max(1, -(-size // self.chunk_size))

    # reading ---------------------------------------------------------------------------------
    def read(self, oid: str, idx: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of chunk `idx`, or None if absent, damaged or not what its name
        says (then removed)."""
        try:
            fd = os.open(self.chunk_file(oid, idx), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            first = start // BLOCK
            # Guess the blocks needed from `end` and read header + data in one go.
            guess_stop = self.chunk_size if end is None else min(self.chunk_size, -(-end // BLOCK) * BLOCK)
            if first == 0:
                raw = os.pread(fd, HEADER + guess_stop, 0)
                head, body_at = raw, HEADER
            else:
                head = os.pread(fd, HEADER, 0)
                raw, body_at = None, 0
            try:
                header = parse_header(head, oid, idx, self.chunk_size)
            except BadChunk as err:
                return self._damaged(oid, idx, str(err))
            length = header.length
            stop = length if end is None else min(end, length)
            if start >= stop:
                return b""
            last = (stop - 1) // BLOCK
            want_to = min(length, (last + 1) * BLOCK)
            if raw is None or len(raw) < HEADER + want_to:
                raw = os.pread(fd, want_to - first * BLOCK, HEADER + first * BLOCK)
                body_at = 0
            view = memoryview(raw)[body_at:]
            if len(view) < want_to - first * BLOCK:
                return self._damaged(oid, idx, "truncated data")
            for n, block in enumerate(range(first, last + 1)):
                if zlib.crc32(view[n * BLOCK:(n + 1) * BLOCK]) != header.crcs[block]:
                    return self._damaged(oid, idx, f"block {block} checksum")
            self.index.touch(oid, idx)
            offset = first * BLOCK
            return bytes(view[start - offset:stop - offset])
        finally:
            os.close(fd)

    def header(self, oid: str, idx: int) -> ChunkHeader | None:
        """The checked header of a stored chunk (None if absent or bad)."""
        try:
            with open(self.chunk_file(oid, idx), "rb") as f:
                return parse_header(f.read(HEADER), oid, idx, self.chunk_size)
        except FileNotFoundError:
            return None
        except BadChunk as err:
            self._damaged(oid, idx, str(err))
            return None

    def _damaged(self, oid: str, idx: int, why: str) -> None:
        log.warning("cache: chunk %d of object %s is damaged (%s); dropping it", idx, oid, why)
        self._unlink(oid, idx)
        self.index.forget_chunk(oid, idx)
        return None

    def has(self, oid: str, idx: int) -> bool:
        return os.path.exists(self.chunk_file(oid, idx))

    # writing ---------------------------------------------------------------------------------
    def write(self, oid: str, idx: int, data: bytes | memoryview, object_size: int | None = None,
              pending: str | None = None, index_later: bool = False) -> None:
        """Store verified chunk `idx` of `oid` (or, with `pending`, an unverified chunk of the
        pass tagged so, which no reader sees until `promote`). `object_size` defaults to an
        object that ends with this chunk. Raises CacheFull when the disk is full."""
        if object_size is None:
            object_size = idx * self.chunk_size + len(data)
        key = f"{oid}~{pending}" if pending else oid
        header = pack_header(oid, idx, self.chunk_size, object_size, data)
        need = disk_size(len(data) + HEADER)
        if self._over_budget(need):     # make room first: the budget holds while we write too
            if need > self.effective_budget() - self._overhead():
                return                  # larger than the whole budget: served, never cached
            self.evict(extra=need)
        path = self.chunk_file(key, idx)
        tmp = self.root / "tmp" / f"{oid}.{idx}.{os.getpid()}.{time.monotonic_ns()}"
        for attempt in (1, 2):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(header)
                    f.write(data)
                    f.flush()
                    disk = disk_size(HEADER + len(data), os.fstat(f.fileno()).st_blocks)
                os.replace(tmp, path)
                break
            except OSError as err:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                if err.errno not in (errno.ENOSPC, errno.EDQUOT) or attempt == 2:
                    raise self._os_error(err, "writing a chunk") from None
                self.evict(target=0.5, extra=need)      # make room, then try once more
        if index_later:     # the async store: the file now, its index row from the writer thread
            self.index_later(self._record_chunk, key, idx, len(data), disk)
        else:
            self._record_chunk(key, idx, len(data), disk)
        self._used += len(data)
        self._disk_est += disk

    def _record_chunk(self, key: str, idx: int, nbytes: int, disk: int) -> None:
        try:
            self.index.add_chunk(key, idx, nbytes, disk)
        except CacheFull:
            self._unlink(key, idx)      # a chunk the index does not know would escape the budget
            raise

    def promote(self, oid: str, idx: int, tag: str) -> bool:
        """Make a pending chunk of a verified pass servable. False if it was evicted meanwhile."""
        try:
            os.replace(self.chunk_file(f"{oid}~{tag}", idx), self.chunk_file(oid, idx))
        except FileNotFoundError:
            self.index.forget_chunk(f"{oid}~{tag}", idx)
            return False
        row = self.index.chunk_row(f"{oid}~{tag}", idx)
        self.index.forget_chunk(f"{oid}~{tag}", idx)
        nbytes, disk = row if row else (self.chunk_size, disk_size(HEADER + self.chunk_size))
        self.index.add_chunk(oid, idx, nbytes, disk)
        return True

    def discard(self, oid: str, idx: int, tag: str | None = None) -> None:
        """Remove a chunk (the pending one of pass `tag`, when given) from disk and index."""
        key = f"{oid}~{tag}" if tag else oid
        self._unlink(key, idx)
        self.index.forget_chunk(key, idx)

    def new_pending_tag(self) -> str:
        self._pending_seq += 1
        return f"{os.getpid()}-{self._pending_seq}"

    # digests of verified objects -----------------------------------------------------------------
    def read_sums(self, oid: str) -> tuple[int, list[bytes]] | None:
        """(object size, sha256 per chunk) learned from a verified pass, or None."""
        try:
            with open(self.sums_file(oid), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            found = parse_sums(raw, oid, self.chunk_size)
            self.index.touch(oid, SUMS_IDX)
            return found
        except BadChunk as err:
            log.warning("cache: digests of object %s are unusable (%s); dropping them", oid, err)
            self.drop_sums(oid)
            return None

    def write_sums(self, oid: str, size: int, digests: list[bytes]) -> None:
        """Keep the sha256 of each chunk of verified object `oid` (a file beside its chunks,
        counted and evicted LRU like them). Raises CacheFull when the disk is full."""
        blob = pack_sums(oid, size, self.chunk_size, digests)
        need = disk_size(len(blob))
        if self._over_budget(need):
            if need > self.effective_budget() - self._overhead():
                return
            self.evict(extra=need)
        tmp = self.root / "tmp" / f"{oid}.sums.{os.getpid()}.{time.monotonic_ns()}"
        try:
            os.makedirs(os.path.dirname(self.sums_file(oid)), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                disk = disk_size(len(blob), os.fstat(f.fileno()).st_blocks)
            os.replace(tmp, self.sums_file(oid))
        except OSError as err:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._os_error(err, "writing chunk digests") from None
        try:
            self.index.add_chunk(oid, SUMS_IDX, 0, disk)
        except CacheFull:
            self._unlink(oid, SUMS_IDX)     # a file the index does not know would escape the budget
            raise
        self._disk_est += disk

    def drop_sums(self, oid: str) -> None:
        self._unlink(oid, SUMS_IDX)
        self.index.forget_chunk(oid, SUMS_IDX)

    def object_size(self, oid: str) -> int | None:
        """The size of an object that was verified into this store, or None."""
        sums = self.read_sums(oid)
        if sums is not None:
            return sums[0]
        header = self.header(oid, 0)
        return header.object_size if header is not None else None

    # budget ----------------------------------------------------------------------------------
    def effective_budget(self) -> int:
        """The smallest budget of the processes sharing this directory (re-read every 0.1 s)."""
        value, read_at = self._effective
        now = time.monotonic()
        if now - read_at > 0.1:
            value = self.shared_budget.effective()
            self._effective = (value, now)
        return value

    def _over_budget(self, extra: int = 0) -> bool:
        """Whether the directory's bytes on disk exceed the shared budget. The chunk total is
        re-read from the index (other processes write too) at most every second."""
        now = time.monotonic()
        if now - self._disk_read > 0.0:     # exact and O(1): other processes write too
            self._disk_est, self._disk_read = self.index.disk_bytes(), now
        return self._disk_est + self._overhead() + extra > self.effective_budget()

    def _overhead(self, fresh: bool = False) -> int:
        """On-disk bytes of the cache directory besides the files of `chunks/` (which the
        index counts): every folder (the cache directory, the store's, `chunks/` and its
        256 `XX/` folders, which grow with their entries and never shrink), the index with
        its WAL and shm, lock, budget, temp and key files, and what else dda keeps there
        (BESIDE: git clones, logs, CA bundles; walked every BESIDE_SECONDS). Measured at
        most every OVERHEAD_SECONDS unless `fresh`. st_blocks * 512, as `du` counts."""
        value, read_at = self._overhead_cached
        now = time.monotonic()
        if not fresh and now - read_at < OVERHEAD_SECONDS:
            return value
        total = _blocks(self.root.parent) + _blocks(self.root)
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            entries = []
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
                if not entry.is_dir(follow_symlinks=False):
                    continue
                for inner in os.scandir(entry.path):
                    # chunks/XX: the folder only (its files are in the index); tmp, locks, budgets: all
                    total += inner.stat(follow_symlinks=False).st_blocks * 512
            except OSError:     # removed meanwhile
                pass
        beside, walked_at = self._beside_cached
        if fresh or now - walked_at >= BESIDE_SECONDS:
            beside = sum(_tree_blocks(self.root.parent / name) for name in BESIDE)
            self._beside_cached = (beside, now)
        total += beside
        self._overhead_cached = (total, time.monotonic())
        return total

    def disk_usage(self) -> int:
        """Bytes the cache directory takes on disk, as `du` counts them (st_blocks of every
        file and folder): the files of `chunks/` from the index (exact, shared by every
        process), the rest measured now. This is what the budget is held against."""
        return self.index.disk_bytes() + self._overhead(fresh=True)

    def disk_used(self) -> int:
        """`disk_usage()` as last measured (by a write, an eviction, or the store's thread
        every FLUSH_SECONDS): no I/O, for the metrics and `dda status` on the event loop."""
        return self._disk_est + self._overhead_cached[0]

    def evict(self, target: float | None = None, extra: int = 0) -> None:
        """Remove least recently used chunks until the directory fits the shared budget with
        `extra` bytes to spare (down to `target` of it, when given)."""
        # One evictor per process: store threads evicting at once took the same oldest files,
        # each counting them (evictions were counted several times) and stopping too early.
        with self._evicting:
            budget = self.effective_budget() - self._overhead() - extra
            self._disk_est, removed, gone = evict_to_budget(self.index, max(0, budget), self._unlink, target)
        if gone:
            self.index_later(self.index.forget_proofs_of_gone, gone)
        self._disk_read = time.monotonic()
        self._used = self.index.used_bytes()
        self.evictions += removed

    def _unlink(self, oid: str, idx: int) -> None:
        try:
            os.unlink(self.sums_file(oid) if idx == SUMS_IDX else self.chunk_file(oid, idx))
        except FileNotFoundError:
            pass

    def drop_object(self, oid: str, chunks: int) -> None:
        for idx in range(chunks):
            self._unlink(oid, idx)
        self.index.forget_object(oid)
        self.drop_sums(oid)

    def used_bytes(self) -> int:
        """Bytes in the store, as the shared index says (other processes may write too);
        re-read at most every few seconds."""
        now = time.monotonic()
        if now - self._used_read > 5:
            self._used, self._used_read = self.index.used_bytes(), now
        return self._used

    def close(self) -> None:
        self._stop_flusher.set()
        self._flusher.join()
        self._index_writer.shutdown(wait=True)
        self.index.close()
        self.shared_budget.close()
