"""A DVC remote that is a directory on this machine (or a mounted network share)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

from ..errors import ObjectMissing, RemoteError, RemoteUnavailable
from .base import Range, Remote


class LocalRemote(Remote):
    def __init__(self, name: str, root: Path):
        self.name = name
        self.can_list = True
        self.root = root
        self.display_url = str(root)

    def _path(self, path: str) -> Path:
        if "\0" in path:   # a version of a cloud-versioned object: only S3 serves those here
            raise RemoteError(f"remote {self.name!r} ({self.display_url}): objects recorded with a cloud "
                              f"version_id need a version-aware S3 remote")
        return self.root / path

    def _missing(self, path: str) -> ObjectMissing:
        return ObjectMissing(f"remote {self.name!r} ({self.display_url}): object {path} is missing")

    async def read(self, path: str, start: int, end: int | None) -> Range:
        def work() -> Range:
            try:
                with open(self._path(path), "rb") as f:
                    total = os.fstat(f.fileno()).st_size
                    stop = total if end is None else min(end, total)
                    return Range(os.pread(f.fileno(), max(0, stop - start), start), total)
            except FileNotFoundError:
                if not self.root.is_dir():
                    raise RemoteUnavailable(f"remote {self.name!r}: directory {self.display_url} does not exist") from None
                raise self._missing(path) from None
        return await asyncio.to_thread(work)

    async def stream(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> int | None:
        piece = 1 << 20
        total: int | None = None
        offset = start
        while offset < end:
            got = await self.read(path, offset, min(end, offset + piece))
            total = got.total
            if not got.data:
                break
            sink(got.data)
            offset += len(got.data)
        return total

    async def size(self, path: str) -> int:
        try:
            return (await asyncio.to_thread(os.stat, self._path(path))).st_size
        except FileNotFoundError:
            raise self._missing(path) from None

    async def list_sizes(self, prefix: str) -> dict[str, int] | None:
        def work() -> dict[str, int]:
            found: dict[str, int] = {}
            base = self._path(prefix)
            for dirpath, _, files in os.walk(base):
                for name in files:
                    full = os.path.join(dirpath, name)
                    found[os.path.relpath(full, self.root).replace(os.sep, "/")] = os.stat(full).st_size
            return found
        return await asyncio.to_thread(work)

    async def write(self, path: str, data: bytes) -> None:
        def work() -> None:
            target = self._path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        await asyncio.to_thread(work)
