"""The chunk store: verification on every read, atomic appearance, eviction, hashing rules."""
import hashlib
import os
import random

from sidecar.store import Store
from sidecar.store.chunks import BLOCK, HEADER
from sidecar.store.verify import Dos2UnixMd5, md5_matches

CS = 4 * BLOCK


def test_roundtrip_and_partial_reads(tmp_path):
    store = Store(tmp_path, budget=1 << 30, chunk_size=CS)
    data = random.Random(1).randbytes(CS - 1000)
    store.write("ab" * 16, 0, data)
    assert store.read("ab" * 16, 0) == data
    assert store.read("ab" * 16, 0, BLOCK - 10, BLOCK + 10) == data[BLOCK - 10:BLOCK + 10]
    assert store.read("ab" * 16, 0, CS - 2000, CS) == data[CS - 2000:]
    assert store.read("cd" * 16, 0) is None
    store.close()
    # survives a restart
    again = Store(tmp_path, budget=1 << 30, chunk_size=CS)
    assert again.read("ab" * 16, 0) == data
    assert again.used_bytes() == len(data)


def test_flipped_byte_is_detected_and_chunk_dropped(tmp_path):
    store = Store(tmp_path, budget=1 << 30, chunk_size=CS)
    data = random.Random(2).randbytes(CS)
    oid = "ef" * 16
    store.write(oid, 0, data)
    path = store.chunk_path(oid, 0)
    with open(path, "r+b") as f:
        f.seek(HEADER + BLOCK * 2 + 17)
        byte = f.read(1)
        f.seek(HEADER + BLOCK * 2 + 17)
        f.write(bytes([byte[0] ^ 0x01]))
    # an untouched block still reads; the damaged one is refused and the chunk removed
    fresh = Store(tmp_path, budget=1 << 30, chunk_size=CS)
    assert fresh.read(oid, 0, 0, 100) == data[:100]
    assert fresh.read(oid, 0, BLOCK * 2, BLOCK * 2 + 100) is None
    assert not path.exists()
    assert fresh.index.present(oid) == set()


def test_truncated_chunk_is_never_served(tmp_path):
    store = Store(tmp_path, budget=1 << 30, chunk_size=CS)
    oid = "12" * 16
    store.write(oid, 0, b"x" * 5000)
    path = store.chunk_path(oid, 0)
    os.truncate(path, 3000)
    assert Store(tmp_path, budget=1 << 30, chunk_size=CS).read(oid, 0) is None


def test_unfinished_temp_files_are_invisible(tmp_path):
    store = Store(tmp_path, budget=1 << 30, chunk_size=CS)
    oid = "34" * 16
    # what a kill in the middle of a write leaves behind: a temp file, never the chunk path
    (store.root / "tmp" / f"{oid}.0.999.1").write_bytes(b"partial")
    assert store.read(oid, 0) is None


def test_lru_eviction_under_budget(tmp_path):
    store = Store(tmp_path, budget=10 * BLOCK, chunk_size=CS)
    oids = [f"{i:032x}" for i in range(6)]
    for oid in oids[:4]:
        store.write(oid, 0, b"a" * (2 * BLOCK))
    store.read(oids[0], 0)          # oids[0] is now the most recently used
    store.index.flush()
    for oid in oids[4:]:
        store.write(oid, 0, b"b" * (2 * BLOCK))
    assert store.used_bytes() <= 10 * BLOCK
    assert store.read(oids[0], 0) is not None
    assert store.read(oids[1], 0) is None
    assert store.evictions >= 1


def test_dos2unix_md5_streaming_matches_dvc2_rule():
    text = b"a,b\r\nc,d\r\n" * 1000
    expected = hashlib.md5(text.replace(b"\r\n", b"\n")).hexdigest()
    hasher = Dos2UnixMd5()
    for i in range(0, len(text), 7):          # splits land between \r and \n too
        hasher.update(text[i:i + 7])
    assert hasher.hexdigest() == expected
    assert md5_matches(text, expected, legacy=True)
    assert not md5_matches(text, expected, legacy=False)
    assert md5_matches(text, hashlib.md5(text).hexdigest(), legacy=True)
