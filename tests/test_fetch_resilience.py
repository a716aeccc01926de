"""Retries, backoff and verification against a real (deliberately unreliable) HTTP server."""
from __future__ import annotations

import asyncio
import hashlib
import http.server
import random
import socket
import threading
from pathlib import Path

import pytest

from sidecar.errors import HashMismatch
from sidecar.fetch import Fetcher, ObjectRef
from sidecar.remotes.http import HttpRemote
from sidecar.store import Store


class Flaky(http.server.ThreadingHTTPServer):
    """Serves bytes from `objects`; the first entries of `script` decide what the next
    requests get: 'ok', '503', 'reset' (close without answering) or 'corrupt'."""

    daemon_threads = True

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.script: list[str] = []
        self.seen: list[tuple[str, str]] = []
        self.bearer: str | None = None
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: Flaky = self.server  # type: ignore[assignment]
        if server.bearer and self.headers.get("Authorization") != f"Bearer {server.bearer}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        action = server.script.pop(0) if server.script else "ok"
        server.seen.append((self.path, action))
        if action == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if action == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = server.objects.get(self.path.lstrip("/"))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if action == "corrupt":
            data = bytes([data[0] ^ 1]) + data[1:]
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def flaky():
    data = random.Random(5).randbytes(300_000)
    md5 = hashlib.md5(data).hexdigest()
    server = Flaky({f"files/md5/{md5[:2]}/{md5[2:]}": data})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, data, md5
    server.shutdown()


def read(server, md5, cache: Path, **fetcher_kw) -> tuple[bytes, Fetcher]:
    async def go():
        remote = HttpRemote("flaky", f"http://127.0.0.1:{server.server_address[1]}", timeout=5)
        store = Store(cache, 1 << 30, 4 << 20)
        fetcher = Fetcher(store, backoff_base=0.01, **fetcher_kw)
        ref = ObjectRef(md5, remote, f"files/md5/{md5[:2]}/{md5[2:]}", False, None, "data/x.bin")
        try:
            return await fetcher.read_all(ref), fetcher
        finally:
            await remote.aclose()
            store.close()
    return asyncio.run(go())


def test_retries_5xx_and_resets_then_succeeds(flaky, tmp_path):
    server, data, md5 = flaky
    server.script = ["503", "reset", "503"]
    got, fetcher = read(server, md5, tmp_path)
    assert got == data
    assert fetcher.stats.retries == 3
    assert [a for _, a in server.seen] == ["503", "reset", "503", "ok"]


def test_gives_up_after_retries_with_clear_error(flaky, tmp_path):
    server, data, md5 = flaky
    server.script = ["503"] * 10
    from sidecar.errors import RemoteUnavailable
    with pytest.raises(RemoteUnavailable, match=r"data/x.bin: .*HTTP 503"):
        read(server, md5, tmp_path, retries=2)
    assert len(server.seen) == 3


def test_corrupt_answer_is_refetched_then_refused(flaky, tmp_path):
    server, data, md5 = flaky
    server.script = ["corrupt"]
    got, fetcher = read(server, md5, tmp_path / "a")
    assert got == data and fetcher.stats.hash_mismatches == 1
    server.script = ["corrupt", "corrupt"]
    with pytest.raises(HashMismatch, match="does not match its md5"):
        read(server, md5, tmp_path / "b")
    assert not any((tmp_path / "b").rglob("*.0"))   # nothing stored


def test_single_flight_in_process(flaky, tmp_path):
    server, data, md5 = flaky

    async def go():
        remote = HttpRemote("flaky", f"http://127.0.0.1:{server.server_address[1]}")
        store = Store(tmp_path, 1 << 30, 4 << 20)
        fetcher = Fetcher(store)
        ref = ObjectRef(md5, remote, f"files/md5/{md5[:2]}/{md5[2:]}", False, len(data), "x")
        try:
            results = await asyncio.gather(*(fetcher.read(ref, i * 1000, 1000) for i in range(50)))
        finally:
            await remote.aclose()
            store.close()
        return results

    results = asyncio.run(go())
    assert b"".join(results) == data[:50_000]
    assert len(server.seen) == 1


def test_bearer_token_auth(flaky, tmp_path):
    """DagsHub-style token auth: the token goes in an Authorization header, and a refusal
    says so without echoing it."""
    server, data, md5 = flaky
    server.bearer = "tok-SECRET-1"

    async def go(token):
        remote = HttpRemote("flaky", f"http://127.0.0.1:{server.server_address[1]}", token=token, auth="bearer")
        store = Store(tmp_path / token, 1 << 30, 4 << 20)
        fetcher = Fetcher(store, backoff_base=0.01)
        ref = ObjectRef(md5, remote, f"files/md5/{md5[:2]}/{md5[2:]}", False, None, "data/x.bin")
        try:
            return await fetcher.read_all(ref)
        finally:
            await remote.aclose()
            store.close()

    assert asyncio.run(go("tok-SECRET-1")) == data
    from sidecar.errors import RemoteAuthError
    with pytest.raises(RemoteAuthError) as err:
        asyncio.run(go("wrong-token"))
    assert "HTTP 401" in str(err.value) and "wrong-token" not in str(err.value)
