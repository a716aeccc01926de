"""Git LFS pointers in a commit: which blobs `.gitattributes` sends through `filter=lfs`,
and what their pointer files say (spec v1: oid sha256 and size)."""
from __future__ import annotations

import configparser
import fnmatch
import posixpath
import re
from dataclasses import dataclass

_POINTER = re.compile(rb"^version https://git-lfs\.github\.com/spec/v1\n(?:[a-z0-9.-]+ [^\n]*\n)*$")
_OID = re.compile(rb"^oid sha256:([0-9a-f]{64})$", re.M)
_SIZE = re.compile(rb"^size (\d{1,18})$", re.M)
POINTER_MAX = 1024   # git-lfs never reads a larger blob as a pointer


@dataclass(frozen=True)
class LfsPointer:
    oid: str    # sha256 hex
    size: int


def parse_pointer(blob: bytes) -> LfsPointer | None:
    """The pointer a blob holds, or None when it is not one (git-lfs then checks it out as is)."""
    if len(blob) > POINTER_MAX or not _POINTER.match(blob):
        return None
    oid, size = _OID.search(blob), _SIZE.search(blob)
    if not oid or not size:
        return None
    return LfsPointer(oid.group(1).decode(), int(size.group(1)))


def lfs_patterns(attributes: dict[str, bytes]) -> list[tuple[str, str, bool]]:
    """(folder, pattern, is_lfs) from every `.gitattributes` (path -> content), in the order
    git applies them (outer files first, later lines win)."""
    rules: list[tuple[str, str, bool]] = []
    for path in sorted(attributes, key=lambda p: p.count("/")):
        folder = posixpath.dirname(path)
        for line in attributes[path].decode("utf-8", "replace").splitlines():
            parts = line.strip().split()
            if not parts or parts[0].startswith("#"):
                continue
            attrs = parts[1:]
            if "filter=lfs" in attrs:
                rules.append((folder, parts[0], True))
            elif "-filter" in attrs or "!filter" in attrs or any(a.startswith("filter=") for a in attrs):
                rules.append((folder, parts[0], False))
    return rules


def is_lfs_path(path: str, rules: list[tuple[str, str, bool]]) -> bool:
    """Whether git would run `path` through the LFS filter (gitattributes matching: a pattern
    without '/' matches the name at any depth below its folder; with '/', the path from it)."""
    verdict = False
    for folder, pattern, is_lfs in rules:
        if folder and not path.startswith(folder + "/"):
            continue
        rel = path[len(folder) + 1:] if folder else path
        pat = pattern.lstrip("/")
        if "/" in pattern.rstrip("/"):
            hit = fnmatch.fnmatchcase(rel, pat) or (pat.endswith("/**") and rel.startswith(pat[:-3] + "/"))
        else:
            hit = fnmatch.fnmatchcase(posixpath.basename(rel), pat)
        if hit:
            verdict = is_lfs
    return verdict


def lfs_url_from_config(text: bytes) -> str | None:
    """`lfs.url` of a committed `.lfsconfig` (git config syntax)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text.decode("utf-8"))
    except (configparser.Error, UnicodeDecodeError):
        return None
    for section in parser.sections():
        if section.strip().lower() == "lfs" and parser.has_option(section, "url"):
            return parser.get(section, "url").strip() or None
    return None
