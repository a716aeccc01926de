"""S3-compatible remote (AWS, DagsHub, MinIO, rclone, any endpoint_url).

httpx carries the requests; botocore signs them (SigV4) and supplies the standard
credential chain (env, profile, web identity, instance metadata) when no keys are given.
"""
from __future__ import annotations

import asyncio
import os
from typing import Callable
import xml.etree.ElementTree as ET
from urllib.parse import quote, urlencode, urlsplit

import ssl

import httpx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError
from botocore.session import Session

from ..errors import ConfigError, RemoteError
from .base import Range, Remote, split_version
from .httpcommon import (
    HTTP2,
    check_status,
    check_upload_status,
    range_from_response,
    range_header,
    stream_get,
    transport_error,
)

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Remote(Remote):
    def __init__(self, name: str, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 session_token: str | None = None, profile: str | None = None,
                 jobs: int = 16, timeout: float = 30.0, verify: "ssl.SSLContext | bool" = True):
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"remote {name!r}: {url!r} is not an s3://bucket/prefix URL")
        self.name = name
        self.can_list = True
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.display_url = f"s3://{self.bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        if endpoint_url:
            self.base = f"{endpoint_url.rstrip('/')}/{self.bucket}"   # path-style: what S3-compatibles expect
        else:
            self.base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com"
        # The standard chain may read files or ask the instance metadata service: it is
        # resolved (and refreshed) on a thread, never on the event loop.
        self._static: Credentials | None = \
            Credentials(access_key_id, secret_access_key, session_token) if access_key_id and secret_access_key \
            else None
        self._profile = profile
        self._chain: object | None = None
        self._chain_loaded = False
        self._frozen: object | None = None
        self._credentials_lock = asyncio.Lock()
        self.client = httpx.AsyncClient(
            verify=verify,
            http2=HTTP2,   # multiplexed HEADs/GETs where the server offers h2 (ALPN)
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=jobs * 2, max_keepalive_connections=jobs * 2))

    def _where(self) -> str:
        return f"remote {self.name!r} ({self.display_url})"

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _load_chain(self) -> object | None:
        try:
            session = Session(profile=self._profile) if self._profile else Session()
            return session.get_credentials()
        except BotoCoreError as err:
            raise ConfigError(f"remote {self.name!r}: cannot get AWS credentials: {err}") from None

    async def _credentials(self) -> object | None:
        """Static keys, or the chain's current credentials (looked up, and refreshed when
        they near expiry, on a thread)."""
        if self._static is not None:
            return self._static
        refresh = getattr(self._chain, "refresh_needed", None)
        if self._chain_loaded and self._frozen is not None and not (refresh is not None and refresh()):
            return self._frozen
        async with self._credentials_lock:
            if not self._chain_loaded:
                self._chain = await asyncio.to_thread(self._load_chain)
                self._chain_loaded = True
            if self._chain is None:
                return None
            refresh = getattr(self._chain, "refresh_needed", None)
            if self._frozen is None or (refresh is not None and refresh()):
                try:
                    self._frozen = await asyncio.to_thread(self._chain.get_frozen_credentials)  # type: ignore[attr-defined]
                except BotoCoreError as err:
                    raise ConfigError(f"remote {self.name!r}: cannot get AWS credentials: {err}") from None
            return self._frozen

    async def _signed(self, method: str, key: str | None, query: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[str, dict[str, str]]:
        url = self.base + ("/" + quote(key, safe="/~-_.") if key is not None else "/")
        if query:
            url += "?" + urlencode(sorted(query.items()), quote_via=quote)
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
        credentials = await self._credentials()
        if credentials is not None:
            S3SigV4Auth(credentials, "s3", self.region).add_auth(request)
        return url, {k: v for k, v in request.headers.items()}

    async def _send(self, method: str, key: str | None, path_for_errors: str, *, upload: bool = False,
                    **kw: object) -> httpx.Response:
        body = kw.pop("body", b"")
        url, headers = await self._signed(method, key, body=body, **kw)  # type: ignore[arg-type]
        try:
            resp = await self.client.request(method, url, headers=headers, content=body or None)
        except httpx.HTTPError as err:
            raise transport_error(self._where(), err) from None
        (check_upload_status if upload else check_status)(resp, self._where(), path_for_errors)
        return resp

    def _target(self, path: str) -> tuple[str, dict[str, str] | None, str]:
        """(key, query, name for errors) of `path`; a versioned path asks for its version."""
        key, version = split_version(path)
        shown = f"{key} (version {version})" if version else key
        return self._key(key), ({"versionId": version} if version else None), shown

    async def read(self, path: str, start: int, end: int | None) -> Range:
        headers = {} if (start == 0 and end is None) else {"Range": range_header(start, end)}
        key, query, shown = self._target(path)
        resp = await self._send("GET", key, shown, headers=headers, query=query)
        return range_from_response(resp, resp.content, start, end)

    async def stream(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> int | None:
        key, query, shown = self._target(path)
        url, headers = await self._signed("GET", key, query=query, headers={"Range": range_header(start, end)})
        return await stream_get(self.client, url, headers, self._where(), shown, start, end, sink)

    async def size(self, path: str) -> int:
        key, query, shown = self._target(path)
        resp = await self._send("HEAD", key, shown, query=query)
        return int(resp.headers.get("content-length", "0"))

    async def list_sizes(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": full}
            if token:
                query["continuation-token"] = token
            resp = await self._send("GET", None, f"list {prefix}", query=query)
            try:
                root = ET.fromstring(resp.content)
            except ET.ParseError:
                raise RemoteError(f"{self._where()}: listing answer is not XML") from None
            for item in root.iter(f"{_NS}Contents"):
                key = item.findtext(f"{_NS}Key") or ""
                found[key[strip:]] = int(item.findtext(f"{_NS}Size") or 0)
            if (root.findtext(f"{_NS}IsTruncated") or "false") != "true":
                return found
            token = root.findtext(f"{_NS}NextContinuationToken")
            if not token:
                return found

    async def write(self, path: str, data: bytes) -> None:
        await self._send("PUT", self._key(path), path, body=data, upload=True)

    async def aclose(self) -> None:
        await self.client.aclose()
