"""DVC HTTP(S) remote: plain GET/HEAD with Range, basic/bearer/custom-header auth, one
pooled httpx client. This is how DagsHub serves DVC data (https://dagshub.com/<o>/<r>.dvc).

Sizes (HEAD) go through aiohttp where it can carry them (see `_Heads`): sizing a 100k-file
folder is 100k HEADs, and httpx spends ~1 ms of CPU on each (its pool's bookkeeping grows with
connections x waiting requests; over h2 it is still ~0.9 ms), aiohttp ~0.17 ms (measured
against nginx with a 20 ms first byte, 64 in flight: 175 and 814 (h2) against 2,800 HEAD/s).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import aiohttp
    import yarl

import httpx

from ..errors import ConfigError, RemoteError, RemoteUnavailable
from .base import Range, Remote
from .httpcommon import (
    _CONTENT_RANGE,
    HTTP2,
    _short,
    check_status,
    check_upload_status,
    credential_guard,
    range_from_response,
    range_header,
    stream_get,
    transport_error,
)

log = logging.getLogger(__name__)


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
        self._head_refused = False    # the server answered HEAD with 405/501: size with a GET
        secret_headers = [custom_auth_header] if auth == "custom" and custom_auth_header else []
        # HEADs: every auth but digest (a challenge round trip: httpx does it)
        self._heads: _Heads | None = None
        if auth != "digest":
            head_headers = dict(headers)
            if auth == "basic":
                pair = f"{user}:{password or token or ''}".encode()
                head_headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            self._heads = _Heads(head_headers, verify, timeout)
            self._heads.set_base(self.base)
            self.size_concurrency = _Heads.IN_FLIGHT
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
        if self._head_refused:      # learned once per remote: no HEAD that is bound to fail
            return await self._size_by_get(path)
        try:
            if self._heads is not None:
                size = await self._heads.size(self._url(path), self._where(), path)
                if size is not None:
                    return size
            try:
                resp = await self.client.head(self._url(path))
            except httpx.HTTPError as err:
                raise transport_error(self._where(), err) from None
            if resp.status_code in _HEAD_REFUSED:
                raise _HeadRefused(resp.status_code)
            check_status(resp, self._where(), path)
        except _HeadRefused as refused:
            if not self._head_refused:
                self._head_refused = True
                log.info("%s refuses HEAD (HTTP %d): sizes come from a one-byte GET", self._where(), refused.status)
            return await self._size_by_get(path)
        length = resp.headers.get("content-length")
        if length is None or not length.isdigit():  # some servers omit it on HEAD
            return await self._size_by_get(path)
        return int(length)

    async def _size_by_get(self, path: str) -> int:
        """The size from a GET of the first byte (for a server that refuses HEAD or gives no
        length on it, as DVC's own HTTP file system falls back to): Content-Range's total on a
        206 (or a 416 for an empty object); on a 200 (no range support) its Content-Length,
        the response closed without reading the body."""
        where = self._where()
        try:
            async with self.client.stream("GET", self._url(path), headers={"Range": "bytes=0-0"}) as resp:
                code = resp.status_code
                if code >= 300 and code != 416:
                    await resp.aread()      # a short error page: check_status may quote its headers
                    check_status(resp, where, path)
                if code == 206 or code == 416 or resp.headers.get("content-range"):
                    total = range_from_response(resp, b"", 0, 1).total if code == 416 else _range_total(resp)
                    await resp.aread()      # one byte: read, so the connection goes back to the pool
                else:       # 200: the whole object would follow; its length is the size
                    length = resp.headers.get("content-length")
                    total = int(length) if length is not None and length.isdigit() else None
        except httpx.HTTPError as err:
            raise transport_error(where, err) from None
        if total is None:
            raise RemoteError(f"{where}: the server gives no size for {path} (no HEAD, and its GET "
                              f"says no Content-Range total or Content-Length)")
        return total

    async def write(self, path: str, data: bytes) -> None:
        try:
            resp = await self.client.request(self.upload_method, self._url(path), content=data)
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        check_upload_status(resp, self._where(), path, "the remote's `method`")

    async def aclose(self) -> None:
        if self._heads is not None:
            await self._heads.aclose()
        await self.client.aclose()


_HEAD_REFUSED = (405, 501)    # Method Not Allowed, Not Implemented: HEAD is not served there


class _HeadRefused(Exception):
    """The server refused the HEAD method (caught in HttpRemote.size: it sizes with a GET)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _range_total(resp: httpx.Response) -> int | None:
    """The object's size from a ranged answer's Content-Range (`bytes 0-0/TOTAL`), if it says."""
    match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
    return int(match.group(3)) if match and match.group(3) != "*" else None


_PLAIN_KEY = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]*(?:/[0-9A-Za-z][0-9A-Za-z._-]*)*")   # an object key: nothing to encode


class _Heads:
    """HEAD requests through one aiohttp session (created on first use, on the caller's loop):
    the object's Content-Length, or None where the httpx path must answer - a redirect (httpx
    follows it and drops credentials on another origin), no Content-Length. Statuses map as
    httpx's do (`check_status`), transport errors to RemoteUnavailable (retried)."""

    IN_FLIGHT = 128      # connections (HTTP/1.1) = HEADs at once; nginx serves far more

    def __init__(self, headers: dict[str, str], verify: "ssl.SSLContext | bool", timeout: float):
        import aiohttp   # here: a process that never sizes over HTTP (the hooks' reader) does not load it

        self.headers = headers
        # the same trust as the httpx client: our context (CA bundle), or httpx's default (certifi)
        self.ssl: ssl.SSLContext | bool = verify if isinstance(verify, ssl.SSLContext) else \
            (httpx.create_ssl_context() if verify else False)
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        # Proxies from the environment, as httpx honours them - looked up once here: aiohttp's
        # trust_env does it per request in a thread, reading ~/.netrc each time.
        self.proxies = urllib.request.getproxies()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._base_for, self._encoded_base = "", None    # see set_base

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._closed:    # a late request after aclose() must not open a session nobody closes
            raise RemoteUnavailable("the remote's client is closed")
        if self._session is None or self._loop is not loop or self._session.closed:
            self._loop = loop
            # Per HEAD, as little as aiohttp allows (a 100k-file folder is 100k of them): no
            # cookies, no Accept-Encoding (an encoded answer's Content-Length would not be the
            # object's size anyway), nothing to decompress.
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding",), auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=self.IN_FLIGHT, ssl=self.ssl))
        return self._session

    def _request_url(self, url: str) -> "str | yarl.URL":
        """`url` as aiohttp's URL, built without parsing where it is safe to: an object key
        (hex and slashes) after a base URL already in its encoded form (`_encoded_base`)."""
        import yarl

        base = self._encoded_base
        if base is None or self._base_for != url[:len(self._base_for)]:
            return url
        rest = url[len(self._base_for):]
        if not _PLAIN_KEY.fullmatch(rest):
            return url
        return yarl.URL(base + rest, encoded=True)

    def set_base(self, base: str) -> None:
        """The remote's base URL: object URLs under it are built from its encoded form."""
        import yarl

        parsed = yarl.URL(base)
        encoded = str(parsed)
        # only a plain absolute URL (no credentials, query or fragment) is extended by text
        if parsed.absolute and not parsed.user and not parsed.password and not parsed.query_string \
                and not parsed.fragment and not base.endswith("/") and not encoded.endswith("/"):
            self._base_for, self._encoded_base = base + "/", encoded + "/"

    async def size(self, url: str, where: str, path: str) -> int | None:
        import aiohttp

        proxy = self._proxy(url)
        try:
            request = self._client().head(self._request_url(url), allow_redirects=False, proxy=proxy) \
                if proxy else self._client().head(self._request_url(url), allow_redirects=False)
            async with request as resp:
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            kind = type(err).__name__
            raise RemoteUnavailable(f"{where}: connection failed ({kind}: {_short(err) if str(err) else kind})") from None
        if 300 <= status < 400:
            return None
        if status >= 300:
            if status in _HEAD_REFUSED:
                raise _HeadRefused(status)
            check_status(httpx.Response(status, headers=list(headers.items())), where, path)
        length = headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None

    def _proxy(self, url: str) -> str | None:
        if not self.proxies:
            return None
        parts = urllib.parse.urlsplit(url)
        if urllib.request.proxy_bypass_environment(parts.hostname or "", self.proxies):
            return None
        return self.proxies.get(parts.scheme) or self.proxies.get("all")

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None and not self._session.closed and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None
