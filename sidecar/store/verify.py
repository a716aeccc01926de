"""Object hash checks: DVC md5, with DVC 2's rule that text is hashed after CRLF -> LF."""
from __future__ import annotations

import hashlib

EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"   # the md5 of no bytes: the one object that is 0 bytes long


def impossible_size(oid: str, size: int) -> bool:
    """Whether `size` (bytes, claimed by a HEAD, a listing, a stat, a size index or the cache
    index) cannot be that of the object with DVC md5 `oid`: 0 bytes for any md5 but that of
    no bytes. Such a claim is a lie or a truncated object; callers treat the size as unknown
    and learn it from the verified object. The common case costs one integer compare.
    (Keys that are not an md5, such as a size index's loaded marker, are never impossible.)"""
    return size == 0 and oid != EMPTY_MD5 and len(oid) == 32


class Dos2UnixMd5:
    """md5 of the stream with every CRLF turned into LF, fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5()
        self._pending_cr = False

    def update(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        self._md5.update(data.replace(b"\r\n", b"\n"))

    def hexdigest(self) -> str:
        md5 = self._md5.copy()
        if self._pending_cr:
            md5.update(b"\r")
        return md5.hexdigest()


class ObjectVerifier:
    """Accepts the object if its md5 matches; legacy (DVC 2) objects may match after dos2unix."""

    def __init__(self, md5: str, legacy: bool):
        self.expected = md5
        self._raw = hashlib.md5()
        self._text = Dos2UnixMd5() if legacy else None

    def update(self, data: bytes | memoryview) -> None:
        self._raw.update(data)
        if self._text is not None:
            self._text.update(data)

    def ok(self) -> bool:
        if self._raw.hexdigest() == self.expected:
            return True
        return self._text is not None and self._text.hexdigest() == self.expected


def md5_matches(data: bytes, md5: str, legacy: bool) -> bool:
    verifier = ObjectVerifier(md5, legacy)
    verifier.update(data)
    return verifier.ok()
