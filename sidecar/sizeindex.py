"""The shared size index: the sizes of a tracked directory's files, published on the remote
next to its manifest so a client reads one object instead of one HEAD per file.

Layout: `<manifest object path>.sizes`, i.e. DVC 3 `files/md5/ab/cdef....dir.sizes` (DVC 2:
`ab/cdef....dir.sizes`), keyed by the manifest's md5, so it can never describe another
directory version. Content (JSON, UTF-8):

    {"format": "dda-sizes/1", "manifest": "<md5>.dir", "sizes": {"<file md5>": <bytes>, ...}}

A reader trusts it only if it lists exactly the manifest's md5s (no more, no fewer) and says
0 bytes for none but the md5 of no bytes (verify.impossible_size); a size
that a later download contradicts is dropped by the engine. `dvc gc --cloud` sees the file
as an unused object (`abcdef....dir.sizes` is never a used hash) and removes it, whether the
manifest stays or not: nothing breaks, clients fall back to asking per file, and
`dda sizes publish` puts it back.
"""
from __future__ import annotations

import json

from .errors import DDAError
from .remotes import object_path
from .store.verify import EMPTY_MD5, impossible_size

FORMAT = "dda-sizes/1"
MAX_SIZE = 2 ** 63     # a file size fits a signed 64-bit off_t (and SQLite INTEGER)


class SizeIndexInvalid(DDAError):
    """A published size index that does not match its manifest (ignored, never trusted)."""

    reason = "size_index_invalid"


def index_path(manifest_md5: str, legacy: bool) -> str:
    """Remote key of the size index of manifest `manifest_md5` (32 hex digits, no .dir)."""
    return object_path(manifest_md5, legacy, is_dir=True) + ".sizes"


def max_bytes(files: int) -> int:
    """The most bytes an index of `files` entries can take as `encode` writes it (an entry:
    a quoted md5, a colon, at most 19 digits and a comma; plus the header). A reader asks for
    no more than this, so a padded or foreign object cannot cost it more memory."""
    return 64 * files + 1024


def encode(manifest_md5: str, sizes: dict[str, int]) -> bytes:
    """The published bytes for `sizes` (file md5 -> bytes) of manifest `manifest_md5`."""
    return json.dumps({"format": FORMAT, "manifest": f"{manifest_md5}.dir",
                       "sizes": dict(sorted(sizes.items()))}, separators=(",", ":")).encode()


def decode(data: bytes, manifest_md5: str, expected: set[str], where: str) -> dict[str, int]:
    """The sizes in `data`, checked against the manifest: `expected` is the set of file md5s
    the manifest lists. Raises SizeIndexInvalid (naming `where`) on any disagreement."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SizeIndexInvalid(f"{where}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SizeIndexInvalid(f"{where}: not a {FORMAT} size index")
    if doc.get("manifest") != f"{manifest_md5}.dir":
        raise SizeIndexInvalid(f"{where}: describes {doc.get('manifest')!r}, not {manifest_md5}.dir")
    sizes = doc.get("sizes")
    if not isinstance(sizes, dict):
        raise SizeIndexInvalid(f"{where}: 'sizes' is not a mapping")
    if sizes.keys() != expected:
        extra, missing = len(sizes.keys() - expected), len(expected - sizes.keys())
        raise SizeIndexInvalid(f"{where}: lists {extra} md5s the manifest lacks and lacks {missing} it lists")
    for md5, size in sizes.items():
        if type(size) is not int or not 0 <= size < MAX_SIZE:
            raise SizeIndexInvalid(f"{where}: size of {md5} is not a byte count")
        if impossible_size(md5, size):    # a provable lie: nothing else it says is trusted
            raise SizeIndexInvalid(f"{where}: says {md5} has 0 bytes (only {EMPTY_MD5}, the md5 of no "
                                   f"bytes, can)")
    return sizes
