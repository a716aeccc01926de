"""Response handling shared by the HTTP and S3 clients (both speak HTTP through httpx)."""
from __future__ import annotations

import datetime
import email.utils
import re
import time
from typing import Awaitable, Callable

import httpx

from ..errors import ObjectMissing, RemoteAuthError, RemoteError, RemoteUnavailable, RetryAfter, UploadRefused
from .base import Range

try:    # httpx speaks HTTP/2 only with the `h2` package; without it, HTTP/1.1 as before
    import h2  # noqa: F401
    HTTP2 = True
except ImportError:  # pragma: no cover - h2 is a declared dependency
    HTTP2 = False

_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def credential_guard(base_url: str, header_names: "list[str]") -> "Callable[[httpx.Request], Awaitable[None]]":
    """An httpx request hook that removes the credential headers `header_names` (and
    Authorization) from any request to another origin than `base_url`'s: httpx strips only
    Authorization on a cross-origin redirect, so a custom auth header would otherwise travel on.
    Runs for every request, redirects included."""
    origin = _origin(httpx.URL(base_url))
    names = ["Authorization", *header_names]

    async def hook(request: httpx.Request) -> None:
        if _origin(request.url) != origin:
            for name in names:
                request.headers.pop(name, None)

    return hook


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def range_header(start: int, end: int | None) -> str:
    return f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"


def check_status(resp: httpx.Response, where: str, path: str) -> None:
    code = resp.status_code
    if code < 300 or code == 416:
        return
    if code == 404:
        raise ObjectMissing(f"{where}: object {path} is missing (HTTP 404)")
    if code in (401, 403):
        raise RemoteAuthError(f"{where}: access denied (HTTP {code}); check the credentials for this remote")
    if code in (429, 503) or (code >= 500 and "retry-after" in resp.headers):
        raise retry_after_error(resp, where, path)
    if code >= 500 or code == 408:
        raise RemoteUnavailable(f"{where}: server error HTTP {code} for {path}")
    raise RemoteError(f"{where}: unexpected HTTP {code} for {path}")


def check_upload_status(resp: httpx.Response, where: str, path: str, method_hint: str | None = None) -> None:
    """`check_status` for an upload: a client error (403 read-only, 405 method not allowed, a
    404 from a server that takes no uploads there...) raises UploadRefused naming the method,
    the URL's path (never its query: a signed URL's credentials live there) and the status,
    not "missing" or "access denied". 401 stays an authentication error; 408/429 are retried.
    `method_hint`: the setting that chooses the method, named when the server refused it."""
    code = resp.status_code
    if 400 <= code < 500 and code not in (401, 408, 429):
        method = resp.request.method
        hint = f"; does the server take {method} uploads there? ({method_hint})" if code == 404 and method_hint \
            else f"; the server does not allow {method} there ({method_hint})" if code == 405 and method_hint else ""
        raise UploadRefused(f"{where} refused the upload: {method} {resp.request.url.path} answered "
                            f"HTTP {code} {resp.reason_phrase}{hint}", path=path)
    check_status(resp, where, path)


_STATUS_WORDS = {429: "rate limited", 503: "service unavailable"}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header as seconds from now (RFC 9110: delta-seconds or an HTTP-date);
    None when absent or unreadable, 0 for a date in the past."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value[:12]), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_error(resp: httpx.Response, where: str, path: str) -> RetryAfter:
    """The retryable error for a 429/503 (or a 5xx with Retry-After), carrying the delay asked for."""
    code = resp.status_code
    delay = parse_retry_after(resp.headers.get("retry-after"))
    words = _STATUS_WORDS.get(code, "server error")
    asked = f"; the server asks to retry after {delay:g} s" if delay is not None else ""
    return RetryAfter(f"{where}: {words} (HTTP {code}) for {path}{asked}", delay, code)


def range_from_response(resp: httpx.Response, body: bytes, start: int, end: int | None) -> Range:
    """Trust Content-Range whatever the status (some S3 servers answer 200 with a range)."""
    if resp.status_code == 416:
        match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        total = int(match.group(3)) if match and match.group(3) != "*" else None
        return Range(b"", total)
    match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
    if match and match.group(1) is not None:
        first = int(match.group(1))
        total = None if match.group(3) == "*" else int(match.group(3))
        if first != start:
            raise RemoteUnavailable(f"server answered range starting at {first}, asked {start}")
        return Range(body, total)
    # No Content-Range: the server sent the whole object. Its length is the object's size
    # only when the answer said how long it is and that many bytes came (a close-delimited
    # body cut short looks complete otherwise).
    stop = len(body) if end is None else min(end, len(body))
    length = resp.headers.get("content-length")
    total = len(body) if length is not None and length.isdigit() and int(length) == len(body) else None
    return Range(body[start:stop], total)


def transport_error(where: str, err: Exception) -> RemoteUnavailable:
    kind = type(err).__name__
    if isinstance(err, httpx.TimeoutException):
        return RemoteUnavailable(f"{where}: request timed out ({kind})")
    if isinstance(err, httpx.ConnectError):
        return RemoteUnavailable(f"{where}: cannot connect ({_short(err)})")
    return RemoteUnavailable(f"{where}: connection failed ({kind}: {_short(err)})")


def _short(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]


async def stream_get(client: httpx.AsyncClient, url: str, headers: dict[str, str], where: str, path: str,
                     start: int, end: int, sink: "Callable[[bytes], None]") -> int | None:
    """GET a range and feed the body to `sink` piece by piece; returns the object size."""
    try:
        async with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code >= 300 and resp.status_code != 416:
                await resp.aread()
                check_status(resp, where, path)
            if resp.status_code == 416:
                return range_from_response(resp, b"", start, end).total
            match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if match and match.group(1) is not None:
                if int(match.group(1)) != start:
                    raise RemoteUnavailable(f"{where}: server answered range starting at {match.group(1)}, asked {start}")
                total = None if match.group(3) == "*" else int(match.group(3))
                skip = 0
            else:   # the server ignored Range and sends the whole object
                length = resp.headers.get("content-length")
                total = int(length) if length is not None else None
                skip = start
            want = end - start
            async for piece in resp.aiter_bytes():
                if skip:
                    if len(piece) <= skip:
                        skip -= len(piece)
                        continue
                    piece, skip = piece[skip:], 0
                if len(piece) > want:
                    piece = piece[:want]
                if piece:
                    sink(piece)
                    want -= len(piece)
                # No early break: reading the body to its end lets httpx keep the connection.
            return total
    except httpx.HTTPError as err:
        raise transport_error(where, err) from None
