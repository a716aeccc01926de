"""What a chunk file says it is: the header of every chunk file, and the per-chunk digests of
a verified object.

Header (512 bytes, little endian): magic, header CRC, data length, block count, chunk index,
chunk size, object size, object id (hex, NUL-padded to 64 bytes: md5, sha1 or sha256), then a
CRC32 per 128 KiB block. A reader compares the identity with the name it opened (object id,
chunk index, chunk size) and the data length with what the object size implies, so a chunk
file copied or renamed over another's name is refused, not served.

Digests file (`<oid>.sums`): written once an object's md5 was verified over a whole in-order
pass; holds the object size and a sha256 per chunk, so a later read of one evicted chunk can
be checked on its own without fetching the whole object again.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

BLOCK = 128 * 1024
HEADER = 512
MAGIC = b"DDA3"
_FIXED = struct.Struct("<4sIIIIIQ64s")   # magic, header crc, length, count, idx, chunk size, object size, oid
MAX_BLOCKS = (HEADER - _FIXED.size) // 4

SUMS_MAGIC = b"DDS1"
_SUMS = struct.Struct("<4sIQII64s")      # magic, crc of the rest, object size, chunk size, count, oid


class BadChunk(ValueError):
    """A chunk file that is damaged or is not what its name says."""


@dataclass(frozen=True)
class ChunkHeader:
    oid: str
    idx: int
    chunk_size: int
    object_size: int
    length: int
    crcs: tuple[int, ...]


def block_crcs(data: bytes | memoryview) -> list[int]:
    view = memoryview(data)
    return [zlib.crc32(view[i:i + BLOCK]) for i in range(0, len(view), BLOCK)] or [zlib.crc32(b"")]


def expected_length(object_size: int, idx: int, chunk_size: int) -> int:
    """Bytes chunk `idx` of an object of `object_size` bytes holds."""
    return max(0, min(object_size, (idx + 1) * chunk_size) - idx * chunk_size)


def pack_header(oid: str, idx: int, chunk_size: int, object_size: int, data: bytes | memoryview) -> bytes:
    crcs = block_crcs(data)
    if len(crcs) > MAX_BLOCKS:
        raise ValueError(f"a chunk holds at most {MAX_BLOCKS * BLOCK} bytes")
    rest = struct.pack(f"<IIIIQ64s{len(crcs)}I", len(data), len(crcs), idx, chunk_size, object_size,
                       oid.encode().ljust(64, b"\0"), *crcs)
    return (MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest).ljust(HEADER, b"\0")


def parse_header(raw: bytes | memoryview, oid: str | None = None, idx: int | None = None,
                 chunk_size: int | None = None) -> ChunkHeader:
    """The header at the start of `raw`, checked against the name it was opened by (when
    given). Raises BadChunk saying what is wrong."""
    if len(raw) < _FIXED.size:
        raise BadChunk("truncated header")
    magic, crc, length, count, c_idx, c_size, o_size, c_oid = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise BadChunk("bad header")
    if count != max(1, -(-length // BLOCK)) or count > MAX_BLOCKS:
        raise BadChunk("bad header")
    end = _FIXED.size + 4 * count
    if len(raw) < end or zlib.crc32(bytes(raw[8:end])) != crc:
        raise BadChunk("header checksum")
    header = ChunkHeader(c_oid.rstrip(b"\0").decode("ascii", "replace"), c_idx, c_size, o_size, length,
                         struct.unpack_from(f"<{count}I", raw, _FIXED.size))
    if oid is not None and header.oid != oid:
        raise BadChunk(f"holds object {header.oid}")
    if idx is not None and header.idx != idx:
        raise BadChunk(f"holds chunk {header.idx}")
    if chunk_size is not None and header.chunk_size != chunk_size:
        raise BadChunk(f"was cut in chunks of {header.chunk_size} bytes")
    if length != expected_length(o_size, header.idx, header.chunk_size) or length > header.chunk_size:
        raise BadChunk(f"length {length} does not fit an object of {o_size} bytes")
    return header


def chunk_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def pack_sums(oid: str, object_size: int, chunk_size: int, digests: list[bytes]) -> bytes:
    rest = struct.pack("<QII64s", object_size, chunk_size, len(digests), oid.encode().ljust(64, b"\0")) \
        + b"".join(digests)
    return SUMS_MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest


def parse_sums(raw: bytes, oid: str, chunk_size: int) -> tuple[int, list[bytes]]:
    """(object size, sha256 per chunk) from a digests file, checked; raises BadChunk."""
    if len(raw) < _SUMS.size or raw[:4] != SUMS_MAGIC:
        raise BadChunk("bad digests file")
    _, crc, size, c_size, count, c_oid = _SUMS.unpack_from(raw)
    if zlib.crc32(raw[8:]) != crc or len(raw) != _SUMS.size + 32 * count:
        raise BadChunk("digests file checksum")
    if c_oid.rstrip(b"\0").decode("ascii", "replace") != oid:
        raise BadChunk("digests file of another object")
    if c_size != chunk_size or count != max(1, -(-size // chunk_size)):
        raise BadChunk("digests file of another chunk size")
    return size, [raw[_SUMS.size + 32 * i:_SUMS.size + 32 * (i + 1)] for i in range(count)]
