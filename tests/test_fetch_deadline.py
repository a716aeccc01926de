"""A stuck download ends at its deadline (issue 14, item 5), against a real HTTP server that
trickles its answer one byte at a time (so the client's per-read timeout never fires) and
then recovers: the stuck reads fail with a deadline error, their requests give their slots
back so a healthy file still reads with `jobs=2`, and once the server is healthy the same
files read at once (a fresh download, not a join of the dead one)."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mounting import MountThread
from sidecar.config import Config
from sidecar.errors import DeadlineExceeded
from sidecar.fetch import Fetcher, ObjectRef
from sidecar.remotes.http import HttpRemote
from sidecar.store import Store

DEADLINE = 1.5
TRICKLE_EVERY = 0.25   # seconds per byte: well under the client's 5 s read timeout


class TrickleServer:
    """HTTP/1.1 on 127.0.0.1 serving `objects` by path with Range support; a GET of a path in
    `stuck` gets its status line and headers one byte every TRICKLE_EVERY seconds, forever."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.stuck: set[str] = set()
        self.requests: list[tuple[str, bool]] = []     # (path, answered stuck)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.port = 0

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "TrickleServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                path = target.lstrip("/")
                stuck = path in self.stuck and method == "GET"
                self.requests.append((path, stuck))
                if stuck:
                    endless = b"HTTP/1.1 206 Partial Content\r\nX-Pad: " + b"a" * 100_000
                    for byte in endless:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(TRICKLE_EVERY)
                data = self.objects.get(path)
                if data is None:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                start, end = 0, len(data) - 1
                rng = headers.get("range")
                if rng:
                    a, _, b = rng.removeprefix("bytes=").partition("-")
                    start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                body = data[start:end + 1] if method == "GET" else b""
                status = "206 Partial Content" if rng else "200 OK"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {end + 1 - start}\r\n".encode()
                             + (f"Content-Range: bytes {start}-{end}/{len(data)}\r\n".encode() if rng else b"")
                             + b"\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def test_stuck_downloads_end_at_the_deadline_free_their_slots_and_recover(tmp_path):
    rnd = random.Random(14)
    blobs = [rnd.randbytes(200_000 + i) for i in range(5)]
    md5s = [hashlib.md5(b).hexdigest() for b in blobs]
    paths = [f"files/md5/{m[:2]}/{m[2:]}" for m in md5s]
    with TrickleServer(dict(zip(paths, blobs))) as server:
        server.stuck = set(paths[:4])

        async def go() -> None:
            remote = HttpRemote("trickle", f"http://127.0.0.1:{server.port}", timeout=5)
            store = Store(tmp_path, 1 << 30, 4 << 20)
            fetcher = Fetcher(store, jobs=2, deadline=DEADLINE, backoff_base=0.01)
            refs = [ObjectRef(m, remote, p, False, len(b), f"data/{i}.bin")
                    for i, (m, p, b) in enumerate(zip(md5s, paths, blobs))]
            try:
                # four stuck files with two request slots: every read ends at its deadline
                results = await asyncio.gather(*(fetcher.read(r, 0, 1000) for r in refs[:4]),
                                               return_exceptions=True)
                assert all(isinstance(r, DeadlineExceeded) for r in results), results
                assert all("data/" in str(r) for r in results)
                # the stuck requests gave their slots back: a healthy file reads now
                assert await fetcher.read(refs[4], 0, 1000) == blobs[4][:1000]
                # a download started while the remote is stuck (a prefetch) and still in flight
                # when it recovers is not joined once it made no progress for a while: the read
                # below gets a fresh request instead of waiting on the dead one to its deadline
                prefetch = asyncio.create_task(fetcher.prefetch(refs[0]))
                await asyncio.sleep(fetcher.stall_after + 0.1)
                assert not prefetch.done() and fetcher._inflight
                # the remote recovers: the same files read, through fresh requests
                server.stuck = set()
                assert await fetcher.read(refs[0], 0, 1000) == blobs[0][:1000]
                await prefetch
                got = await asyncio.gather(*(fetcher.read(r, 0, 1000) for r in refs[:4]))
                assert got == [b[:1000] for b in blobs[:4]]
                assert not fetcher._inflight and not any(t for t in fetcher._stream_tasks if not t.done())
            finally:
                await fetcher.aclose()
                await remote.aclose()
                store.close()

        asyncio.run(asyncio.wait_for(go(), 60))
        healthy_after = [p for p, stuck in server.requests if not stuck and p in paths[:4]]
        assert sorted(healthy_after) == sorted(paths[:4])
    assert not any((tmp_path / "store-v2" / "locks").iterdir()), "chunk lock files left behind"


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mounted_reads_get_etimedout_then_recover_with_the_remote(tmp_path, mp):
    """The same through a mount with `jobs=2`: four stuck files answer ETIMEDOUT (not a hang),
    a healthy file still reads meanwhile, and the stuck ones read once the remote recovers."""
    from sidecar.sample import make_sample_repo

    repo, remote_dir = make_sample_repo(tmp_path / "sample")
    objects = {str(p.relative_to(remote_dir)): p.read_bytes() for p in Path(remote_dir).rglob("*") if p.is_file()}
    with TrickleServer(objects) as server:
        config = Config(repo=str(repo), cache_dir=tmp_path / "cache", deadline=DEADLINE, jobs=2,
                        request_timeout=5, remotes={"default": {"url": f"http://127.0.0.1:{server.port}"}})
        with MountThread(config, mp) as m:
            folder = mp / "data/images/dogs"
            names = sorted(os.listdir(folder))
            assert len(names) >= 5
            sizes = {n: os.stat(folder / n).st_size for n in names}      # learned before anything sticks
            oids = {n: m.mount.engine.tree.files[f"data/images/dogs/{n}"].oid for n in names}
            server.stuck = {f"files/md5/{oids[n][:2]}/{oids[n][2:]}" for n in names[:4]}

            def read(name: str) -> bytes | int:
                try:
                    return (folder / name).read_bytes()
                except OSError as err:
                    return err.errno

            with ThreadPoolExecutor(4) as pool:
                stuck = list(pool.map(read, names[:4]))
            assert stuck == [errno.ETIMEDOUT] * 4
            healthy = read(names[4])
            assert isinstance(healthy, bytes) and len(healthy) == sizes[names[4]]
            server.stuck = set()
            # A download started while the remote was stuck (a prefetch of the folder, say) may
            # still be in flight: a read does not wait on it once it made no progress for a while.
            again = [read(n) for n in names[:4]]
            assert [len(d) if isinstance(d, bytes) else d for d in again] == [sizes[n] for n in names[:4]]
            for n, data in zip(names[:4], again):
                assert hashlib.md5(data).hexdigest() == oids[n]


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_cli_mount_daemon_stuck_downloads_outlive_no_fault(tmp_path, mp):
    """Issue 14 item 5 as a user meets it: `dda mount --daemon --jobs 2 --deadline D` against a
    remote trickling headers for four files: they answer ETIMEDOUT, a healthy file reads
    meanwhile, and once the remote is healthy the four read (no download outlives its fault)."""
    import json
    import subprocess

    from mounting import DDA, mounted, wait_until
    from sidecar.sample import make_sample_repo

    repo, remote_dir = make_sample_repo(tmp_path / "sample")
    objects = {str(p.relative_to(remote_dir)): p.read_bytes() for p in Path(remote_dir).rglob("*") if p.is_file()}
    md5_of = {}                        # "dogs/<name>" -> object path, from the manifests
    for path, data in objects.items():
        if path.endswith(".dir"):
            for entry in json.loads(data):
                md5_of[entry["relpath"]] = f"files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDA_")}
    with TrickleServer(objects) as server:
        proc = subprocess.run([DDA, "mount", str(repo), str(mp), "--daemon", "--jobs", "2", "--deadline",
                               str(DEADLINE), "--request-timeout", "5"], capture_output=True, text=True, timeout=60,
                              env={**env, "DDA_CACHE_DIR": str(tmp_path / "cache"),
                                   "DDA_REMOTE_DEFAULT_URL": f"http://127.0.0.1:{server.port}"})
        assert proc.returncode == 0, proc.stderr
        try:
            folder = mp / "data/images/dogs"
            names = sorted(os.listdir(folder))
            sizes = {n: os.stat(folder / n).st_size for n in names}
            server.stuck = {md5_of[f"dogs/{n}"] for n in names[:4]}

            def read(name: str) -> bytes | int:
                try:
                    return (folder / name).read_bytes()
                except OSError as err:
                    return err.errno

            with ThreadPoolExecutor(4) as pool:
                stuck = list(pool.map(read, names[:4]))
            assert stuck == [errno.ETIMEDOUT] * 4
            healthy = read(names[4])
            assert isinstance(healthy, bytes) and len(healthy) == sizes[names[4]]
            server.stuck = set()
            time.sleep(DEADLINE + 1.0)       # a prefetch started while stuck ends at its own deadline
            again = [read(n) for n in names[:4]]
            assert [len(d) if isinstance(d, bytes) else d for d in again] == [sizes[n] for n in names[:4]]
        finally:
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
            wait_until(lambda: not mounted(mp), 10)
