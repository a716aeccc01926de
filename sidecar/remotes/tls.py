"""TLS trust for remotes and git: DVC's per-remote `ssl_verify`, and one private CA bundle
(`ca_bundle` / DDA_CA_BUNDLE) trusted by git and every remote in addition to the public CAs."""
from __future__ import annotations

import functools
import hashlib
import os
import ssl
from pathlib import Path

import certifi

from ..errors import ConfigError

_FALSE = {"false", "0", "no", "off"}
_TRUE = {"true", "1", "yes", "on", ""}


@functools.lru_cache(maxsize=32)
def _context(cafiles: tuple[str, ...]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    for cafile in cafiles:
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"CA bundle {cafile}: cannot load it ({type(err).__name__}: {err})") from None
    return context


def verify_for(name: str, ssl_verify: str | None, ca_bundle: str | None) -> ssl.SSLContext | bool:
    """What httpx's `verify=` gets for remote `name`. `ssl_verify` is the remote's own
    setting as DVC reads it (true, false, or the path of a CA bundle); `ca_bundle` the
    private CA every remote trusts as well. Raises ConfigError naming the remote."""
    value = (ssl_verify or "").strip()
    if value.lower() in _FALSE:
        return False
    cafiles = [ca_bundle] if ca_bundle else []
    if value.lower() in _TRUE and not cafiles:
        return True   # httpx's default trust (honours SSL_CERT_FILE / SSL_CERT_DIR)
    if value.lower() not in _TRUE:
        path = Path(os.path.expanduser(value))
        if not path.is_absolute() or not path.is_file():
            raise ConfigError(f"remote {name!r}: ssl_verify {value!r} is neither true/false nor an absolute path "
                              f"to a CA bundle on this machine (override: DDA_REMOTE_{name.upper()}_SSL_VERIFY)")
        cafiles.append(str(path))
    return _context(tuple(cafiles))


def combined_bundle(ca_bundle: str, cache_dir: Path) -> Path:
    """A PEM file holding the public CAs plus `ca_bundle` (for git, whose `http.sslCAInfo`
    replaces the default trust instead of adding to it). Written once per content."""
    try:
        extra = Path(ca_bundle).read_bytes()
    except OSError as err:
        raise ConfigError(f"ca_bundle {ca_bundle}: {err.strerror}") from None
    public = Path(certifi.where()).read_bytes()
    digest = hashlib.sha256(public + extra).hexdigest()[:16]
    target = cache_dir / "tls" / f"ca-{digest}.pem"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_bytes(public + b"\n" + extra)
        os.replace(tmp, target)
    return target
