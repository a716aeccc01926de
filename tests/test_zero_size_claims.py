"""A size of 0 bytes for an object whose md5 is not that of no bytes is impossible
(verify.impossible_size): it is never kept or served, wherever it comes from. The remote's
HEAD, a published size index and a truncated object are in test_breaker4.py; here the cache
index written by an older version, and the size index's reader on its own."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess

import pytest

from dvclayout import write_layout
from mounting import DDA
from sidecar.errors import HashMismatch
from sidecar.fetch.scheduler import Fetcher, ObjectRef
from sidecar.remotes import object_path
from sidecar.remotes.fake import FakeRemote
from sidecar.sizeindex import SizeIndexInvalid, decode, encode
from sidecar.store import Store
from sidecar.store.chunks import BLOCK
from sidecar.store.verify import EMPTY_MD5, impossible_size

CS = BLOCK


def test_only_the_md5_of_no_bytes_can_be_empty():
    assert hashlib.md5(b"").hexdigest() == EMPTY_MD5
    assert impossible_size("1" * 32, 0)
    assert not impossible_size(EMPTY_MD5, 0)
    assert not impossible_size("1" * 32, 1)
    assert not impossible_size("1" * 32 + ".dir.sizes", 0)     # not an md5: a loaded marker


def test_the_cache_index_never_answers_an_impossible_zero(tmp_path):
    """Rows an older version recorded (a lying HEAD) are not answered; true ones are."""
    store = Store(tmp_path, 1 << 30, CS)
    try:
        lie, ok, marker = "1" * 32, "2" * 32, "3" * 32 + ".dir.sizes"
        store.index.record_sizes({lie: 0, ok: 7, EMPTY_MD5: 0, marker: 0})
        assert store.index.sizes([lie, ok, EMPTY_MD5]) == {ok: 7, EMPTY_MD5: 0}
        assert store.index.size(lie) is None
        assert store.index.size(EMPTY_MD5) == 0 and store.index.size(marker) == 0
    finally:
        store.close()


def test_a_size_index_saying_zero_for_a_non_empty_md5_is_not_trusted():
    manifest, full = "a" * 32, "b" * 32
    where = "data: size index"
    assert decode(encode(manifest, {full: 5, EMPTY_MD5: 0}), manifest, {full, EMPTY_MD5}, where) == \
        {full: 5, EMPTY_MD5: 0}
    with pytest.raises(SizeIndexInvalid, match=f"{full} has 0 bytes"):
        decode(encode(manifest, {full: 0, EMPTY_MD5: 0}), manifest, {full, EMPTY_MD5}, where)


def test_a_cache_from_an_older_version_holding_a_zero_serves_the_true_bytes(tmp_path):
    """`dda ls` sizes the files (no download), then the cache index says 0 bytes for one
    (what a version without this check kept after a HEAD said 0): `dda cat` of it prints the
    true bytes, not an empty file."""
    layout = write_layout(tmp_path / "l", folders=1, per_folder=3)
    m = layout.manifest_md5
    victim = json.loads((layout.remote_root / "files/md5" / m[:2] / (m[2:] + ".dir")).read_bytes())[1]
    want = (layout.remote_root / "files/md5" / victim["md5"][:2] / victim["md5"][2:]).read_bytes()
    env = {**os.environ, "DDA_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([DDA, "ls", str(layout.repo), "data"], env=env, capture_output=True, timeout=60, check=True)
    index = next((tmp_path / "cache").rglob("index.sqlite"))
    with sqlite3.connect(index) as db:
        assert db.execute("SELECT size FROM sizes WHERE oid=?", (victim["md5"],)).fetchone() == (len(want),)
        assert db.execute("SELECT count(*) FROM chunks WHERE oid=?", (victim["md5"],)).fetchone() == (0,)
        db.execute("UPDATE sizes SET size=0 WHERE oid=?", (victim["md5"],))
    got = subprocess.run([DDA, "cat", str(layout.repo), f"data/{victim['relpath']}"], env=env, capture_output=True,
                         timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want


class _ListsZero(FakeRemote):
    """A fake remote whose listing says 0 bytes for the object at `lie` (its reads are right)."""

    lie = ""

    async def list_sizes(self, prefix: str) -> dict[str, int] | None:
        listed = await super().list_sizes(prefix)
        return None if listed is None else {p: 0 if p == self.lie else n for p, n in listed.items()}


@pytest.mark.parametrize("how", ["head", "listing", "truncated"])
def test_bulk_sizing_learns_a_claimed_zero_from_the_object(tmp_path, how):
    """`Fetcher.sizes_of` (the upload's sizing: a listing per folder for more than 64 objects,
    else one HEAD each) given 0 bytes for a non-empty object: the true size, learned by a
    verified download; an object truncated on the remote fails its md5 check."""
    blobs = [b"blob %d\n" % i * (i + 1) for i in range(70 if how == "listing" else 5)]
    objects = {object_path(hashlib.md5(b).hexdigest(), False): b for b in blobs}
    victim = hashlib.md5(blobs[3]).hexdigest()
    remote = _ListsZero(name=f"zero-{how}", objects=objects, can_list=how == "listing")
    remote.lie = object_path(victim, False)
    if how == "head":
        remote.script(op="size", pattern=remote.lie, data=b"")
    if how == "truncated":
        remote.objects[remote.lie] = b""
    refs = [ObjectRef(hashlib.md5(b).hexdigest(), remote, object_path(hashlib.md5(b).hexdigest(), False), False,
                      None, f"f{i}") for i, b in enumerate(blobs)]
    store = Store(tmp_path / "store", 1 << 30, CS)

    async def go() -> dict[str, int]:
        fetcher = Fetcher(store, retries=0)
        try:
            return await fetcher.sizes_of(refs)
        finally:
            await fetcher.aclose()

    try:
        if how == "truncated":
            with pytest.raises(HashMismatch, match=victim):
                asyncio.run(go())
        else:
            assert asyncio.run(go()) == {r.oid: len(b) for r, b in zip(refs, blobs)}
            assert store.index.size(victim) in (None, len(blobs[3]))
    finally:
        store.close()
