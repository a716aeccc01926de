"""DVC remote clients, built from `.dvc/config` plus our overrides."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from ..redact import strip_userinfo
from .base import Range, Remote, object_path
from .http import HttpRemote
from .local import LocalRemote
from .s3 import S3Remote
from .tls import verify_for

__all__ = ["Range", "Remote", "object_path", "build_remote"]


def build_remote(name: str, settings: dict[str, str], *, repo_dir: Path | None, jobs: int,
                 timeout: float, ca_bundle: str | None = None) -> Remote:
    """`settings`: the remote's .dvc/config section merged with our overrides (which win).
    `ca_bundle`: a private CA trusted (besides the public ones) unless `ssl_verify` says otherwise."""
    url = settings.get("url")
    if not url:
        raise ConfigError(f"remote {name!r}: no url (set it in .dvc/config or DDA_REMOTE_{name.upper()}_URL)")
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        clean, url_user, url_password = strip_userinfo(url)
        return HttpRemote(name, clean, user=settings.get("user") or url_user,
                          password=settings.get("password") or url_password, token=settings.get("token"),
                          auth=settings.get("auth"), custom_auth_header=settings.get("custom_auth_header"),
                          method=settings.get("method"), jobs=jobs, timeout=timeout,
                          verify=verify_for(name, settings.get("ssl_verify"), ca_bundle))
    if scheme == "s3":
        return S3Remote(name, url, endpoint_url=settings.get("endpoint_url") or settings.get("endpointurl"),
                        region=settings.get("region"), access_key_id=settings.get("access_key_id"),
                        secret_access_key=settings.get("secret_access_key"),
                        session_token=settings.get("session_token"), profile=settings.get("profile"),
                        jobs=jobs, timeout=timeout, verify=verify_for(name, settings.get("ssl_verify"), ca_bundle))
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:2] == ":"):
        path = Path(unquote(urlsplit(url).path)) if scheme == "file" else Path(url).expanduser()
        if not path.is_absolute():
            if repo_dir is None:
                raise ConfigError(
                    f"remote {name!r}: url {url!r} is a path relative to the repository, which is not on this "
                    f"machine; point DDA_REMOTE_{name.upper().replace('-', '_')}_URL at the storage")
            path = (repo_dir / ".dvc" / path).resolve()
        return LocalRemote(name, path)
    if scheme == "fake":        # in-memory, scripted (tests): sidecar.remotes.fake
        from .fake import FakeRemote

        return FakeRemote.lookup(urlsplit(url).netloc)
    raise ConfigError(f"remote {name!r}: unsupported remote kind {scheme!r} (supported: http, https, s3, local path)")
