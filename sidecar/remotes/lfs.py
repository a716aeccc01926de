"""Git LFS objects through the server's batch API, streamed to disk and verified by their
sha256 before anything is served; each object is kept once under CACHE_DIR/lfs/."""
from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path

import httpx

from ..errors import HashMismatch, ObjectMissing, RemoteAuthError, RemoteError, RemoteUnavailable
from .httpcommon import check_status, transport_error

_JSON = "application/vnd.git-lfs+json"


class LfsClient:
    def __init__(self, endpoint: str, cache_dir: Path, *, user: str | None = None, token: str | None = None,
                 verify: "ssl.SSLContext | bool" = True, timeout: float = 30.0):
        self.endpoint = endpoint.rstrip("/")
        self.root = Path(cache_dir) / "lfs"
        auth = httpx.BasicAuth(user, token or "") if user else None
        headers = {"Authorization": f"Bearer {token}"} if token and not user else {}
        self.client = httpx.AsyncClient(auth=auth, headers=headers, verify=verify, follow_redirects=True,
                                        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._flights: dict[str, asyncio.Task[Path]] = {}

    def _where(self) -> str:
        return f"LFS server {self.endpoint}"

    def path_of(self, oid: str) -> Path:
        return self.root / oid[:2] / oid[2:4] / oid

    async def read(self, oid: str, size: int, offset: int, length: int, display: str,
                   download: bool = False) -> bytes:
        """Bytes [offset, offset+length) of LFS object `oid` (downloaded whole, once;
        `download`: from this server even when the cache holds it - the tenancy gate's way
        to let a verified download of ours prove it)."""
        path = self.path_of(oid)
        if download or not path.exists():
            flight = self._flights.get(oid)
            if flight is None:
                flight = asyncio.ensure_future(self._download(oid, size, display))
                self._flights[oid] = flight
                flight.add_done_callback(lambda _t: self._flights.pop(oid, None))
            path = await asyncio.shield(flight)

        def pread() -> bytes:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), length, offset)
        return await asyncio.to_thread(pread)

    async def holds(self, oid: str, size: int, display: str) -> None:
        """One batch request: returns when this server (with our credentials) holds `oid`;
        raises ObjectMissing, RemoteAuthError, ... as a download would."""
        await self._action(oid, size, display)

    async def _download(self, oid: str, size: int, display: str) -> Path:
        action = await self._action(oid, size, display)
        return await self._fetch(oid, size, display, action)

    async def _action(self, oid: str, size: int, display: str) -> dict:
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

    async def _fetch(self, oid: str, size: int, display: str, action: dict) -> Path:
        headers = {str(k): str(v) for k, v in (action.get("header") or {}).items()}
        target = self.path_of(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{oid}.{os.getpid()}.part")
        digest = hashlib.sha256()
        got = 0
        try:
            with open(tmp, "wb") as out:
                async with self.client.stream("GET", action["href"], headers=headers) as stream:
                    if stream.status_code >= 300:
                        await stream.aread()
                        check_status(stream, self._where(), display)
                    async for piece in stream.aiter_bytes():
                        got += len(piece)
                        if got > size:
                            break
                        digest.update(piece)
                        await asyncio.to_thread(out.write, piece)
            if got != size or digest.hexdigest() != oid:
                raise HashMismatch(f"{display}: LFS object from {self._where()} does not match its sha256 "
                                   f"({got} bytes, expected {size}); not served")
            os.replace(tmp, target)
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    async def aclose(self) -> None:
        await self.client.aclose()
