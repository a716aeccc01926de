"""DVC HTTP(S) remote: plain GET/HEAD with Range, basic/bearer/custom-header auth, one
pooled httpx client. This is how DagsHub serves DVC data (https://dagshub.com/<o>/<r>.dvc)."""
from __future__ import annotations

import ssl
from typing import Callable

import httpx

from ..errors import ConfigError, RemoteError
from .base import Range, Remote
from .httpcommon import (
    HTTP2,
    check_status,
    credential_guard,
    range_from_response,
    range_header,
    stream_get,
    transport_error,
)


class HttpRemote(Remote):
    def __init__(self, name: str, url: str, *, user: str | None = None, password: str | None = None,
                 token: str | None = None, auth: str | None = None, custom_auth_header: str | None = None,
                 method: str | None = None, jobs: int = 16, timeout: float = 30.0, verify: "ssl.SSLContext | bool" = True):
        self.name = name
        self.base = url.rstrip("/")
        self.display_url = self.base
        self.upload_method = (method or "POST").upper()
        headers: dict[str, str] = {"User-Agent": "dda-sidecar"}
        client_auth: httpx.Auth | None = None
        auth = (auth or "").lower() or ("bearer" if token and not user else "basic" if user else "")
        if auth == "basic":
            if not user:
                raise ConfigError(f"remote {name!r}: auth basic needs a user")
            client_auth = httpx.BasicAuth(user, password or token or "")
        elif auth == "digest":
            client_auth = httpx.DigestAuth(user or "", password or "")
        elif auth == "bearer":
            headers["Authorization"] = f"Bearer {token or password}"
        elif auth == "custom":
            if not custom_auth_header:
                raise ConfigError(f"remote {name!r}: auth custom needs custom_auth_header")
            headers[custom_auth_header] = password or token or ""
        elif auth:
            raise ConfigError(f"remote {name!r}: unknown auth {auth!r} (basic, digest, bearer, custom)")
        secret_headers = [custom_auth_header] if auth == "custom" and custom_auth_header else []
        self.client = httpx.AsyncClient(
            verify=verify,
            http2=HTTP2,   # multiplexed HEADs/GETs where the server offers h2 (ALPN)
            auth=client_auth, headers=headers, follow_redirects=True,
            event_hooks={"request": [credential_guard(self.base, secret_headers)]},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=jobs * 2, max_keepalive_connections=jobs * 2))

    def _where(self) -> str:
        return f"remote {self.name!r} ({self.display_url})"

    def _url(self, path: str) -> str:
        if "\0" in path:   # a version of a cloud-versioned object: only S3 serves those here
            raise RemoteError(f"remote {self.name!r} ({self.display_url}): objects recorded with a cloud "
                              f"version_id need a version-aware S3 remote")
        return f"{self.base}/{path}"

    async def read(self, path: str, start: int, end: int | None) -> Range:
        headers = {} if (start == 0 and end is None) else {"Range": range_header(start, end)}
        try:
            resp = await self.client.get(self._url(path), headers=headers)
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        check_status(resp, self._where(), path)
        return range_from_response(resp, resp.content, start, end)

    async def stream(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> int | None:
        return await stream_get(self.client, self._url(path), {"Range": range_header(start, end)}, self._where(),
                                path, start, end, sink)

    async def size(self, path: str) -> int:
        try:
            resp = await self.client.head(self._url(path))
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        check_status(resp, self._where(), path)
        length = resp.headers.get("content-length")
        if length is None:  # some servers omit it on HEAD: ask for one byte and read Content-Range
            return (await self.read(path, 0, 1)).total or 0
        return int(length)

    async def write(self, path: str, data: bytes) -> None:
        try:
            resp = await self.client.request(self.upload_method, self._url(path), content=data)
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        check_status(resp, self._where(), path)

    async def aclose(self) -> None:
        await self.client.aclose()
