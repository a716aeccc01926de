"""What every DVC remote client offers: ranged reads, sizes, listing, writes."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Range:
    data: bytes
    total: int | None   # object size, when the response told it


def object_path(md5: str, legacy: bool, is_dir: bool = False) -> str:
    """Remote layout: DVC 3 `files/md5/ab/cdef...[.dir]`, DVC 2 `ab/cdef...[.dir]`."""
    name = f"{md5[:2]}/{md5[2:]}" + (".dir" if is_dir else "")
    return name if legacy else f"files/md5/{name}"


def versioned_path(key: str, version_id: str) -> str:
    """The path of one version of an object on a cloud-versioned remote (`version_aware`):
    its key under the remote's prefix and its version id, NUL-separated (a NUL is in no key)."""
    return f"{key}\0{version_id}"


def split_version(path: str) -> tuple[str, str | None]:
    key, sep, version = path.partition("\0")
    return key, (version if sep else None)


class Remote(abc.ABC):
    name: str
    display_url: str   # never holds credentials
    can_list = False   # list_sizes() answers with one request per folder
    # size() requests this client carries at once without its own cost growing (None: as
    # many as reads); the fetcher sizes a folder ahead of a walker with that many in flight
    size_concurrency: int | None = None

    @abc.abstractmethod
    async def read(self, path: str, start: int, end: int | None) -> Range:
        """Bytes [start, end) of `path` (end=None: to the end). Raises ObjectMissing,
        RemoteAuthError, RemoteUnavailable (retryable)."""

    async def stream(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> int | None:
        """Like `read`, but hands bytes to `sink` as they arrive (so a reader waiting for
        the first kilobytes of a large range need not wait for all of it). Returns the
        object's size when the answer told it."""
        got = await self.read(path, start, end)
        sink(got.data)
        return got.total

    @abc.abstractmethod
    async def size(self, path: str) -> int:
        """Size of `path`; ObjectMissing if absent."""

    async def list_sizes(self, prefix: str) -> dict[str, int] | None:
        """Sizes of every object under `prefix` (paths relative to the remote root), or
        None where the remote cannot list cheaply."""
        return None

    @abc.abstractmethod
    async def write(self, path: str, data: bytes) -> None: ...

    async def exists(self, path: str) -> bool:
        from ..errors import ObjectMissing

        try:
            await self.size(path)
            return True
        except ObjectMissing:
            return False

    async def aclose(self) -> None:
        return None
