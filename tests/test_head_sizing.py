"""Size requests (HTTP HEAD) as a flaky or minimal server answers them (breaker4 follow-up):
a transient 503/429 on a HEAD is retried with the one retry policy (Retry-After honoured,
within the request's deadline), and a server that refuses HEAD (405/501) is sized with a
one-byte GET, learned once per remote. Real parts: tests/faultremote.py (a real HTTP/1.1
server on 127.0.0.1), the real HttpRemote, Store and Fetcher. Counts, never timings.
"""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from faultremote import FaultRemote
from sidecar.errors import DeadlineExceeded, ObjectMissing, RemoteUnavailable
from sidecar.fetch import Fetcher, ObjectRef
from sidecar.remotes.http import HttpRemote
from sidecar.store import Store

OBJECTS = [b"", b"x", b"hello world\n" * 100]


@pytest.fixture
def remote(tmp_path):
    """A FaultRemote serving OBJECTS: (server, [(md5, key, bytes)])."""
    root = tmp_path / "remote"
    objs = []
    for data in OBJECTS:
        md5 = hashlib.md5(data).hexdigest()
        key = f"files/md5/{md5[:2]}/{md5[2:]}"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
        objs.append((md5, key, data))
    server = FaultRemote(root).start()
    yield server, objs
    server.stop()


def sizes(server: FaultRemote, objs, cache: Path, keys=None, **fetcher_kw) -> tuple[list, Fetcher]:
    """ask_size of each object (or of `keys`) through one remote and fetcher: sizes or errors."""
    async def go():
        http = HttpRemote("storage", server.url, timeout=5)
        store = Store(cache, 1 << 30, 4 << 20)
        fetcher = Fetcher(store, backoff_base=0.01, **fetcher_kw)
        out: list = []
        try:
            for md5, key, _ in objs if keys is None else keys:
                try:
                    out.append(await fetcher.ask_size(ObjectRef(md5, http, key, False, None, f"data/{md5[:6]}")))
                except Exception as err:  # noqa: BLE001 - the test looks at it
                    out.append(err)
            return out, fetcher
        finally:
            await http.aclose()
            store.close()
    return asyncio.run(go())


@pytest.mark.parametrize("status", [503, 429, 500])
def test_one_transient_failure_on_a_head_is_retried(remote, tmp_path, status):
    server, objs = remote
    server.fault("status", method="HEAD", times=1, status=status)
    got, fetcher = sizes(server, objs, tmp_path / "c")
    assert got == [len(d) for _, _, d in objs]
    assert fetcher.counters.get("dda_remote_retries") == 1
    assert [r.method for r in server.requests].count("HEAD") == len(objs) + 1


def test_head_retry_honours_retry_after(remote, tmp_path):
    server, objs = remote
    server.fault("status", method="HEAD", times=1, status=429, retry_after=1)
    got, _ = sizes(server, objs[1:2], tmp_path / "c")
    assert got == [1]
    heads = [r for r in server.requests if r.method == "HEAD"]
    assert len(heads) == 2 and heads[1].at - heads[0].at >= 0.95     # waited what it was asked


def test_head_retry_stops_at_the_deadline(remote, tmp_path):
    """A Retry-After past the request's deadline: one clear error, no sleeping through it."""
    server, objs = remote
    server.fault("status", method="HEAD", times=None, status=503, retry_after=30)
    got, _ = sizes(server, objs[1:2], tmp_path / "c", deadline=2)
    assert isinstance(got[0], (RemoteUnavailable, DeadlineExceeded)), got
    assert "\n" not in str(got[0]) and "data/" in str(got[0])
    assert [r.method for r in server.requests].count("HEAD") == 1


def test_head_gives_up_after_retries(remote, tmp_path):
    server, objs = remote
    server.fault("status", method="HEAD", times=None, status=500)
    got, _ = sizes(server, objs[1:2], tmp_path / "c", retries=2)
    assert isinstance(got[0], RemoteUnavailable) and "HTTP 500" in str(got[0])
    assert [r.method for r in server.requests].count("HEAD") == 3


@pytest.mark.parametrize("status", [405, 501])
def test_head_refused_sizes_with_a_one_byte_get_learned_once(remote, tmp_path, status):
    server, objs = remote
    server.fault("status", method="HEAD", times=None, status=status)
    got, _ = sizes(server, objs, tmp_path / "c")
    assert got == [len(d) for _, _, d in objs]      # the empty object too (416, bytes */0)
    seen = [(r.method, r.range) for r in server.requests]
    assert seen.count(("HEAD", None)) == 1, seen     # refused once: the remote remembers
    assert seen.count(("GET", "bytes=0-0")) == len(objs), seen


def test_head_refused_and_no_range_support_uses_content_length(remote, tmp_path):
    server, objs = remote
    server.fault("status", method="HEAD", times=None, status=405)
    server.fault("ignore_range", method="GET", times=None)
    got, _ = sizes(server, objs, tmp_path / "c")
    assert got == [len(d) for _, _, d in objs]


def test_head_refused_missing_object_is_one_clear_line(remote, tmp_path):
    server, objs = remote
    server.fault("status", method="HEAD", times=None, status=405)
    missing = [("0" * 32, "files/md5/00/" + "0" * 30, b"")]
    got, _ = sizes(server, objs, tmp_path / "c", keys=missing)
    assert isinstance(got[0], ObjectMissing), got
    assert "\n" not in str(got[0]) and "missing" in str(got[0])
