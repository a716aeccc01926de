"""The recorded source of a `dvc import-url` output (a local path, an http(s) URL or an s3://
URL) as a read-only Remote holding that one object: every path asked of it reads the source,
so the fetcher verifies it against the md5 the .dvc file records, as any DVC object."""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError, RemoteError
from ..redact import strip_userinfo
from .base import Range, Remote, versioned_path
from .http import HttpRemote
from .local import LocalRemote
from .s3 import S3Remote
from .tls import verify_for


class SourceObject(Remote):
    """One object at `key` of `inner` (its `version_id`, on a version-aware S3 bucket)."""

    def __init__(self, inner: Remote, key: str, display_url: str, version_id: str | None = None):
        self.inner = inner
        self.name = inner.name
        self.key = versioned_path(key, version_id) if version_id else key
        self.display_url = display_url

    async def read(self, path: str, start: int, end: int | None) -> Range:
        return await self.inner.read(self.key, start, end)

    async def stream(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> int | None:
        return await self.inner.stream(self.key, start, end, sink)

    async def size(self, path: str) -> int:
        return await self.inner.size(self.key)

    async def write(self, path: str, data: bytes) -> None:
        raise RemoteError(f"{self.display_url}: the source of an import is never written")

    async def aclose(self) -> None:
        await self.inner.aclose()


def build_source(url: str, base: Path | None, *, version_id: str | None = None, jobs: int, timeout: float,
                 ca_bundle: str | None = None) -> SourceObject:
    """The source `url` of an import-url output, as recorded in `deps[0].path`. `base`: the
    folder of its .dvc file on this machine (relative paths), None when the repository is
    not on this machine. Raises ConfigError saying why it cannot be read from here."""
    name = "import-url source"
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        clean, user, password = strip_userinfo(url)
        parent, _, leaf = clean.rpartition("/")
        if not leaf or parent.endswith(":/"):
            raise ConfigError(f"{clean}: an import-url source must name a file")
        inner: Remote = HttpRemote(name, parent, user=user, password=password, jobs=jobs, timeout=timeout,
                                   verify=verify_for(name, None, ca_bundle))
        return SourceObject(inner, leaf, clean, version_id)
    if scheme == "s3":
        parts = urlsplit(url)
        key = parts.path.lstrip("/")
        if not parts.netloc or not key or key.endswith("/"):
            raise ConfigError(f"{url}: an import-url source must name an object")
        folder, _, leaf = key.rpartition("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")   # as boto reads them
        inner = S3Remote(name, f"s3://{parts.netloc}/{folder}", endpoint_url=endpoint, jobs=jobs, timeout=timeout,
                         verify=verify_for(name, None, ca_bundle))
        return SourceObject(inner, leaf, url, version_id)
    if scheme in ("", "file"):
        path = Path(unquote(urlsplit(url).path)) if scheme == "file" else Path(url)
        if not path.is_absolute():
            if base is None:
                raise ConfigError(f"{url}: a path relative to the repository, which is not on this machine")
            path = base / path
        path = Path(posixpath.normpath(str(path)))
        return SourceObject(LocalRemote(name, path.parent), path.name, str(path), version_id)
    raise ConfigError(f"{strip_userinfo(url)[0]}: unsupported import-url source kind {scheme!r} "
                      f"(supported: http, https, s3, local path)")
