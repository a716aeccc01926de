"""Chunk files: each holds one chunk of one object plus a CRC32 per 128 KiB block.

A chunk file appears only by an atomic rename of a finished temp file, so a kill at any
instant leaves either no chunk or a whole one; every block is checked against its CRC
when read, so bytes damaged on disk are dropped and fetched again, never served.
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from pathlib import Path

from ..locks import FileLock
from .evict import evict_to_budget
from .index import Index

BLOCK = 128 * 1024
_MAGIC = b"DDA1"
_TAIL = struct.Struct("<II4s")   # block count, data length, magic

log = logging.getLogger(__name__)


def _crcs(data: bytes | memoryview) -> list[int]:
    view = memoryview(data)
    return [zlib.crc32(view[i:i + BLOCK]) for i in range(0, len(view), BLOCK)] or [zlib.crc32(b"")]


class Store:
    def __init__(self, root: Path, budget: int, chunk_size: int):
        if chunk_size % BLOCK:
            raise ValueError(f"chunk size must be a multiple of {BLOCK} bytes")
        self.root = Path(root) / "store-v1"
        self.budget = budget
        self.chunk_size = chunk_size
        for sub in ("chunks", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.index = Index(self.root / "index.sqlite")
        self._used = self.index.used_bytes()
        self._trailers: OrderedDict[tuple[str, int], tuple[int, list[int]]] = OrderedDict()
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
    def chunk_path(self, oid: str, idx: int) -> Path:
        return self.root / "chunks" / oid[:2] / f"{oid[2:]}.{idx}"

    def lock(self, oid: str, idx: int) -> FileLock:
        return FileLock(self.root / "locks" / f"{oid}.{idx}.lock")

    def chunk_count(self, size: int) -> int:
        return max(1, -(-size // self.chunk_size))

    # reading ---------------------------------------------------------------------------------
    def _trailer(self, fd: int, key: tuple[str, int]) -> tuple[int, list[int]] | None:
        cached = self._trailers.get(key)
        if cached is not None:
            self._trailers.move_to_end(key)
            return cached
        file_size = os.fstat(fd).st_size
        if file_size < _TAIL.size:
            return None
        count, length, magic = _TAIL.unpack(os.pread(fd, _TAIL.size, file_size - _TAIL.size))
        if magic != _MAGIC or file_size != length + 4 * count + _TAIL.size or count != max(1, -(-length // BLOCK)):
            return None
        crcs = list(struct.unpack(f"<{count}I", os.pread(fd, 4 * count, length)))
        self._trailers[key] = (length, crcs)
        if len(self._trailers) > 4096:
            self._trailers.popitem(last=False)
        return length, crcs

    def read(self, oid: str, idx: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of chunk `idx`, or None if absent or damaged (then removed)."""
        key = (oid, idx)
        path = self.chunk_path(oid, idx)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            trailer = self._trailer(fd, key)
            if trailer is None:
                return self._damaged(oid, idx, "bad trailer")
            length, crcs = trailer
            stop = length if end is None else min(end, length)
            if start >= stop:
                return b""
            first, last = start // BLOCK, (stop - 1) // BLOCK
            raw = os.pread(fd, min(length, (last + 1) * BLOCK) - first * BLOCK, first * BLOCK)
            view = memoryview(raw)
            for n, block in enumerate(range(first, last + 1)):
                if zlib.crc32(view[n * BLOCK:(n + 1) * BLOCK]) != crcs[block]:
                    return self._damaged(oid, idx, f"block {block} checksum")
            self.index.touch(oid, idx)
            offset = first * BLOCK
            if start == offset and stop - offset == len(raw):
                return raw
            return raw[start - offset:stop - offset]
        finally:
            os.close(fd)

    def _damaged(self, oid: str, idx: int, why: str) -> None:
        log.warning("cache: chunk %d of object %s is damaged (%s); dropping it", idx, oid, why)
        self._trailers.pop((oid, idx), None)
        self._unlink(oid, idx)
        self.index.forget_chunk(oid, idx)
        return None

    def has(self, oid: str, idx: int) -> bool:
        return self.chunk_path(oid, idx).exists()

    # writing ---------------------------------------------------------------------------------
    def write(self, oid: str, idx: int, data: bytes | memoryview) -> None:
        crcs = _crcs(data)
        path = self.chunk_path(oid, idx)
        path.parent.mkdir(exist_ok=True)
        tmp = self.root / "tmp" / f"{oid}.{idx}.{os.getpid()}.{time.monotonic_ns()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(struct.pack(f"<{len(crcs)}I", *crcs))
            f.write(_TAIL.pack(len(crcs), len(data), _MAGIC))
        os.replace(tmp, path)
        self._trailers.pop((oid, idx), None)
        self.index.add_chunk(oid, idx, len(data))
        self._used += len(data)
        if self._used > self.budget:
            self.evict()

    def evict(self) -> None:
        self._used, removed = evict_to_budget(self.index, self.budget, self._unlink)
        self.evictions += removed

    def _unlink(self, oid: str, idx: int) -> None:
        self._trailers.pop((oid, idx), None)
        try:
            os.unlink(self.chunk_path(oid, idx))
        except FileNotFoundError:
            pass

    def drop_object(self, oid: str, chunks: int) -> None:
        for idx in range(chunks):
            self._unlink(oid, idx)
        self.index.forget_object(oid)

    def used_bytes(self) -> int:
        return self._used

    def close(self) -> None:
        self.index.close()
