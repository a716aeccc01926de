"""Containment of every path a repository hands us, decided once, at the snapshot.

Repository paths are POSIX: '/' separates names and a backslash is an ordinary character
(as in `git clone` on Linux). Whatever comes from git trees, .dvc files, dvc.yaml/dvc.lock
or .dir manifests goes through `join_inside`/`check_name`, so nothing downstream (the tree,
the mount, `dda get`, the hooks) ever sees an absolute path, a `..` or a `.git` name.
"""
from __future__ import annotations

import posixpath

from ..errors import DvcFileError

_RESERVED = {".git"}


def split_checked(path: str) -> list[str]:
    """The names of a relative POSIX path; raises ValueError saying why it is unsafe."""
    if "\0" in path:
        raise ValueError("contains a NUL byte")
    if path.startswith("/"):
        raise ValueError("is absolute")
    names = [n for n in path.split("/") if n not in ("", ".")]
    out: list[str] = []
    for name in names:
        if name == "..":
            if not out:
                raise ValueError("points outside the repository")
            out.pop()
            continue
        if name.lower() in _RESERVED:
            raise ValueError(f"names {name!r}, which a checkout never has")
        out.append(name)
    return out


def join_inside(base: str, raw: object, where: str, field: str, root: str = "") -> str:
    """`raw` (relative to the repository folder `base`) as a normalized repository path that
    stays inside `root` (a DVC (sub)repository's folder; "" is the git repository).

    Raises DvcFileError naming `where` and `field` for a non-string, empty, absolute or
    escaping path. Returns "" for `root` itself only when `raw` names it (callers decide).
    """
    if not isinstance(raw, str) or not raw:
        raise DvcFileError(f"{where}: {field!r} must be a non-empty string, got {raw!r}")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":" and raw[0].isalpha()):
        raise DvcFileError(f"{where}: {field} {raw!r} is absolute: it points outside the repository (DVC paths are relative)")
    try:
        names = split_checked(posixpath.join(base, raw) if base else raw)
    except ValueError as err:
        raise DvcFileError(f"{where}: {field} {raw!r} {err}") from None
    path = "/".join(names)
    if root and not (path == root or path.startswith(root + "/")):
        raise DvcFileError(f"{where}: {field} {raw!r} points outside the DVC repository at {root}/")
    return path


def check_name(path: str) -> str | None:
    """Why a git tree path cannot be checked out (None: fine). Git trees name each entry
    once, so a path is only unsafe through `.`, `..`, empty names or `.git`."""
    names = path.split("/")
    for name in names:
        if name in ("", ".", ".."):
            return f"has an invalid name {name!r}"
        if name.lower() in _RESERVED:
            return "names .git"
        if "\0" in name:
            return "contains a NUL byte"
    return None
