"""Git LFS objects through the server's batch API, streamed to a temporary file and verified
by their sha256 before anything is served, then kept in the Store under the cache budget."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING

import httpx

from ..errors import CacheFull, HashMismatch, ObjectMissing, RemoteAuthError, RemoteError, RemoteUnavailable
from .httpcommon import check_status, transport_error

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)
PARK_SECONDS = 30.0   # how long the verified file of an object larger than the budget stays open
_JSON = "application/vnd.git-lfs+json"


class LfsClient:
    """Objects of one LFS endpoint, kept in the engine's Store (chunk files keyed by their
    sha256 oid): the same `--cache-size` budget and LRU eviction as DVC objects."""

    def __init__(self, endpoint: str, store: "Store", *, user: str | None = None, token: str | None = None,
                 verify: "ssl.SSLContext | bool" = True, timeout: float = 30.0):
        self.endpoint = endpoint.rstrip("/")
        self.store = store
        auth = httpx.BasicAuth(user, token or "") if user else None
        headers = {"Authorization": f"Bearer {token}"} if token and not user else {}
        self.client = httpx.AsyncClient(auth=auth, headers=headers, verify=verify, follow_redirects=True,
                                        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._flights: dict[str, _Flight] = {}
        self._parked: str | None = None   # oid of the download kept open (see _release)
        self.downloads = 0

    def _where(self) -> str:
        return f"LFS server {self.endpoint}"

    def _cached(self, oid: str, size: int, offset: int, length: int) -> bytes | None:
        """Bytes from the store's chunks, or None when one of them is not there."""
        stop = min(size, offset + length)
        if offset >= stop:
            return b"" if self.store.has(oid, 0) else None
        cs = self.store.chunk_size
        parts = []
        for idx in range(offset // cs, (stop - 1) // cs + 1):
            base = idx * cs
            got = self.store.read(oid, idx, max(offset, base) - base, min(stop, base + cs) - base)
            if got is None:
                return None
            parts.append(got)
        return b"".join(parts)

    async def read(self, oid: str, size: int, offset: int, length: int, display: str,
                   download: bool = False) -> bytes:
        """Bytes [offset, offset+length) of LFS object `oid` (`size` bytes, from its pointer).
        Served from the store; else the whole object is downloaded once (one flight per oid),
        verified by its sha256, and cut into the store's chunks under the budget.
        `download`: from this server even when the store holds it (the tenancy gate's way to
        let a verified download of ours prove it)."""
        if not download:
            data = await asyncio.to_thread(self._cached, oid, size, offset, length)
            if data is not None:
                return data
        flight = self._flights.get(oid)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(self._download(oid, size, display)))
            self._flights[oid] = flight
        flight.users += 1
        flight.stop_timer()
        try:
            fd = await asyncio.shield(flight.task)
            # The verified file itself: its chunks may already be evicted (an object larger
            # than the budget is served, never kept).
            return await asyncio.to_thread(os.pread, fd, max(0, min(length, size - offset)), offset)
        finally:
            flight.users -= 1
            if flight.users == 0:
                self._release(oid, flight)

    def _release(self, oid: str, flight: "_Flight") -> None:
        """The last reader of a download is done. The verified file of an object whose chunks
        did not all fit the budget stays open for a reader going on through it (`dda cat`, a
        sequential read): one such file, closed PARK_SECONDS after its last use or when
        another takes its place. Anything else is closed now."""
        if not flight.ok() or flight.kept_whole:
            self._expire(oid, flight)
            return
        if self._parked is not None and self._parked != oid:
            other = self._flights.get(self._parked)
            if other is not None and other.users == 0:
                self._expire(self._parked, other)
        self._parked = oid
        flight.timer = asyncio.get_running_loop().call_later(PARK_SECONDS, self._expire, oid, flight)

    def _expire(self, oid: str, flight: "_Flight") -> None:
        if flight.users:
            return      # in use again: released by its last reader
        flight.stop_timer()
        if self._flights.get(oid) is flight:
            del self._flights[oid]
        if self._parked == oid:
            self._parked = None
        flight.close()

    async def holds(self, oid: str, size: int, display: str) -> None:
        """One batch request: returns when this server (with our credentials) holds `oid`;
        raises ObjectMissing, RemoteAuthError, ... as a download would."""
        await self._action(oid, size, display)

    async def _download(self, oid: str, size: int, display: str) -> int:
        """Download, verify and keep `oid`; the verified file's fd (closed by its _Flight)."""
        action = await self._action(oid, size, display)
        return await self._fetch(oid, size, display, action)

    async def _action(self, oid: str, size: int, display: str) -> dict:
        """The batch API's download action for `oid` (one request)."""
        body = {"operation": "download", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]}
        try:
            resp = await self.client.post(f"{self.endpoint}/objects/batch", json=body,
                                          headers={"Accept": _JSON, "Content-Type": _JSON})
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        check_status(resp, self._where(), "objects/batch")
        try:
            obj = resp.json()["objects"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteError(f"{self._where()}: batch answer is not LFS JSON") from None
        error = obj.get("error") if isinstance(obj, dict) else None
        if error:
            code = error.get("code")
            message = f"{display}: LFS object {oid[:12]}… {error.get('message', 'unavailable')} (code {code})"
            raise ObjectMissing(message) if code == 404 else RemoteAuthError(message) if code in (401, 403) \
                else RemoteUnavailable(message)
        action = (obj.get("actions") or {}).get("download") if isinstance(obj, dict) else None
        if not isinstance(action, dict) or not isinstance(action.get("href"), str):
            raise RemoteError(f"{self._where()}: no download action for {display}")
        return action

    async def _fetch(self, oid: str, size: int, display: str, action: dict) -> int:
        headers = {str(k): str(v) for k, v in (action.get("header") or {}).items()}
        tmp = self.store.root / "tmp" / f"{oid}.lfs.{os.getpid()}.{time.monotonic_ns()}"
        digest = hashlib.sha256()
        got = 0
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(tmp)      # the fd keeps it: nothing is left behind if we die
            async with self.client.stream("GET", action["href"], headers=headers) as stream:
                if stream.status_code >= 300:
                    await stream.aread()
                    check_status(stream, self._where(), display)
                async for piece in stream.aiter_bytes():
                    got += len(piece)
                    if got > size:
                        break
                    digest.update(piece)
                    await asyncio.to_thread(os.pwrite, fd, piece, got - len(piece))
            if got != size or digest.hexdigest() != oid:
                raise HashMismatch(f"{display}: LFS object from {self._where()} does not match its sha256 "
                                   f"({got} bytes, expected {size}); not served")
            self.downloads += 1
            kept = await asyncio.to_thread(self._keep, oid, size, fd)
            if kept and oid in self._flights:
                self._flights[oid].kept_whole = True
        except httpx.HTTPError as err:
            os.close(fd)
            raise transport_error(self._where(), err) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _keep(self, oid: str, size: int, fd: int) -> bool:
        """Cut a verified object into the store's chunks (each written under the budget).
        True when all of them are there afterwards."""
        cs = self.store.chunk_size
        count = self.store.chunk_count(size)
        try:
            for idx in range(count):
                self.store.write(oid, idx, os.pread(fd, cs, idx * cs), object_size=size)
        except CacheFull as err:    # served from the verified file all the same
            log.warning("LFS object %s… not cached: %s", oid[:12], err)
            return False
        return all(self.store.has(oid, idx) for idx in range(count))

    async def aclose(self) -> None:
        for oid, flight in list(self._flights.items()):
            if flight.users == 0:
                self._expire(oid, flight)
        await self.client.aclose()


class _Flight:
    """One download of an object and the readers waiting on it; the verified file's fd is
    closed when the last of them is done."""

    def __init__(self, task: "asyncio.Future[int]"):
        self.task = task
        self.users = 0
        self.kept_whole = False   # every chunk landed in the store
        self.timer: asyncio.TimerHandle | None = None

    def ok(self) -> bool:
        return self.task.done() and not self.task.cancelled() and self.task.exception() is None

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        if not self.task.done():    # every reader gave up: close it when the download ends
            self.task.add_done_callback(lambda _t: self.close())
        elif not self.task.cancelled() and self.task.exception() is None:
            os.close(self.task.result())
