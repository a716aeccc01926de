"""Keep credentials out of anything we print, log or label."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# scp-like 'user:password@host:path' (git has no such syntax, but a user may type it): the password
_SCP_PASSWORD = re.compile(r"(?P<lead>^|[\s'\"(=])(?P<user>[\w.-]+):[^\s/@'\"]+@(?=[\w.-]+:)")
_NETLOC = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<netloc>[^/?#]*)(?P<rest>.*)$", re.DOTALL)


def strip_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """Split 'https://user:token@host/p' into ('https://host/p', user, token). Never raises: a
    URL urllib cannot parse ('http://u:t@[::1/x') still loses its userinfo."""
    try:
        parts = urlsplit(url)
    except ValueError:
        match = _NETLOC.match(url)
        if not match or "@" not in match["netloc"]:
            return url, None, None
        userinfo, _, hostport = match["netloc"].rpartition("@")
        user, sep, password = userinfo.partition(":")
        from urllib.parse import unquote

        return (match["scheme"] + hostport + match["rest"], unquote(user) or None,
                unquote(password) if sep else None)
    if not parts.scheme or "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    from urllib.parse import unquote

    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) if sep else None


def redact(text: str, secrets: "list[str | None] | tuple[str | None, ...]" = ()) -> str:
    """Remove URL userinfo and any known secret values from text."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _SCP_PASSWORD.sub(r"\g<lead>\g<user>:***@", text)
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text
