"""Chunk files: each holds one chunk of one object after a header with a CRC32 per 128 KiB block.

A chunk file appears only by an atomic rename of a finished temp file, so a kill at any
instant leaves either no chunk or a whole one; every block is checked against its CRC
when read, so bytes damaged on disk are dropped and fetched again, never served.

Layout: a fixed 512-byte header (magic, data length, block count, CRCs), then the data. A
fixed header lets one pread fetch header and data together: a warm read of a small file
is open + pread + close.
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path

from ..locks import FileLock
from .evict import evict_to_budget
from .index import Index

BLOCK = 128 * 1024
_MAGIC = b"DDA2"
_HEAD = struct.Struct("<4sII")   # magic, data length, block count
HEADER = 512                     # room for the CRCs of 126 blocks (a 15.75 MiB chunk)
MAX_BLOCKS = (HEADER - _HEAD.size) // 4

log = logging.getLogger(__name__)


def _crcs(data: bytes | memoryview) -> list[int]:
    view = memoryview(data)
    return [zlib.crc32(view[i:i + BLOCK]) for i in range(0, len(view), BLOCK)] or [zlib.crc32(b"")]


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
        for sub in ("chunks", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.index = Index(self.root / "index.sqlite")
        self._used = self.index.used_bytes()
        self._used_read = time.monotonic()
        self.evictions = 0
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        cutoff = time.time() - 3600
        for entry in os.scandir(self.root / "tmp"):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    # layout ----------------------------------------------------------------------------------
    def chunk_file(self, oid: str, idx: int) -> str:
        return f"{self._chunks}/{oid[:2]}/{oid[2:]}.{idx}"   # hot path: no Path objects

    def chunk_path(self, oid: str, idx: int) -> Path:
        return Path(self.chunk_file(oid, idx))

    def lock(self, oid: str, idx: int) -> FileLock:
        return FileLock(self.root / "locks" / f"{oid}.{idx}.lock")

    def chunk_count(self, size: int) -> int:
        return max(1, -(-size // self.chunk_size))

    # reading ---------------------------------------------------------------------------------
    def read(self, oid: str, idx: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of chunk `idx`, or None if absent or damaged (then removed)."""
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
            if len(head) < _HEAD.size:
                return self._damaged(oid, idx, "truncated header")
            magic, length, count = _HEAD.unpack_from(head)
            if magic != _MAGIC or count != max(1, -(-length // BLOCK)) or count > MAX_BLOCKS:
                return self._damaged(oid, idx, "bad header")
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
            crcs = struct.unpack_from(f"<{count}I", head, _HEAD.size)
            for n, block in enumerate(range(first, last + 1)):
                if zlib.crc32(view[n * BLOCK:(n + 1) * BLOCK]) != crcs[block]:
                    return self._damaged(oid, idx, f"block {block} checksum")
            self.index.touch(oid, idx)
            offset = first * BLOCK
            return bytes(view[start - offset:stop - offset])
        finally:
            os.close(fd)

    def _damaged(self, oid: str, idx: int, why: str) -> None:
        log.warning("cache: chunk %d of object %s is damaged (%s); dropping it", idx, oid, why)
        self._unlink(oid, idx)
        self.index.forget_chunk(oid, idx)
        return None

    def has(self, oid: str, idx: int) -> bool:
        return os.path.exists(self.chunk_file(oid, idx))

    # writing ---------------------------------------------------------------------------------
    def write(self, oid: str, idx: int, data: bytes | memoryview) -> None:
        crcs = _crcs(data)
        path = self.chunk_path(oid, idx)
        path.parent.mkdir(exist_ok=True)
        tmp = self.root / "tmp" / f"{oid}.{idx}.{os.getpid()}.{time.monotonic_ns()}"
        header = _HEAD.pack(_MAGIC, len(data), len(crcs)) + struct.pack(f"<{len(crcs)}I", *crcs)
        with open(tmp, "wb") as f:
            f.write(header.ljust(HEADER, b"\0"))
            f.write(data)
        os.replace(tmp, path)
        self.index.add_chunk(oid, idx, len(data))
        self._used += len(data)
        if self._used > self.budget:
            self.evict()

    def evict(self) -> None:
        self._used, removed = evict_to_budget(self.index, self.budget, self._unlink)
        self.evictions += removed

    def _unlink(self, oid: str, idx: int) -> None:
        try:
            os.unlink(self.chunk_path(oid, idx))
        except FileNotFoundError:
            pass

    def drop_object(self, oid: str, chunks: int) -> None:
        for idx in range(chunks):
            self._unlink(oid, idx)
        self.index.forget_object(oid)

    def used_bytes(self) -> int:
        """Bytes in the store, as the shared index says (other processes may write too);
        re-read at most every few seconds."""
        now = time.monotonic()
        if now - self._used_read > 5:
            self._used, self._used_read = self.index.used_bytes(), now
        return self._used

    def close(self) -> None:
        self.index.close()
