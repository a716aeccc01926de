"""Issue 11: sizing that scales and keeps its progress, the shared size index, tree memory.

Real parts: DVC-identical layouts written by tests/dvclayout.py (exact remote layout, .dir
manifest and .dvc file), nginx as the HTTP remote (its access log counts requests), the
in-memory fake remote where a test needs one request to hang.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dvclayout import write_layout
from engines import engine_at as _engine
from mounting import DDA, MountThread
from servers import HttpRemoteServer
from sidecar.config import Config
from sidecar.errors import DeadlineExceeded
from sidecar.fs import FileSystem
from sidecar.remotes.fake import FakeRemote
from sidecar.sizeindex import index_path
from sidecar.store.index import Index


def run(coro):
    return asyncio.run(coro)


def _http_env(srv: HttpRemoteServer) -> dict[str, str]:
    return {"DDA_REMOTE_STORAGE_URL": srv.url, "DDA_REMOTE_STORAGE_USER": srv.user,
            "DDA_REMOTE_STORAGE_PASSWORD": srv.password}



def _true_sizes(remote: Path, repo_entries) -> dict[str, int]:
    return {e.oid: (remote / "files/md5" / e.oid[:2] / e.oid[2:]).stat().st_size for e in repo_entries}


@pytest.fixture
def small_fake(tmp_path):
    """A 2,000-file layout on the fake remote: (layout, fake, env)."""
    name = f"s{uuid.uuid4().hex[:8]}"
    layout = write_layout(tmp_path / "l", folders=2, per_folder=1000, remote_url=f"fake://{name}")
    fake = FakeRemote.register(name, layout.remote_root)
    yield layout, fake, {"DDA_REMOTE_STORAGE_URL": f"fake://{name}"}
    FakeRemote.unregister(name)


def test_one_hung_request_fails_alone_and_every_other_size_is_kept(small_fake, tmp_path):
    """Each request has its own deadline: one object that never answers fails after ~deadline,
    not the batch; the 1,999 others are in the persistent index, asked once each, by a
    bounded pool (tasks stay ~jobs, not one per file), never by listing whole prefixes."""
    layout, fake, env = small_fake
    cache = tmp_path / "cache"

    async def go():
        async with await _engine(layout.repo, cache, env, deadline="1", jobs="8") as engine:
            fs = FileSystem(engine)
            entries = list(fs.walk_files("data"))
            stuck = entries[1234]
            fake.script(op="size", pattern=f"*{stuck.oid[2:]}", hang=True)
            fake.script(op="size", pattern="*", delay=0.001)
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, len(asyncio.all_tasks()))
                    await asyncio.sleep(0.005)

            watcher = asyncio.ensure_future(watch())
            fake.calls.clear()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(DeadlineExceeded):
                await fs.stat_many([e.path for e in entries])
            took = loop.time() - started
            watcher.cancel()
            sized_calls = [c for c in fake.calls if c.op == "size"]
            assert not [c for c in fake.calls if c.op == "list"]
            assert len(sized_calls) == len({c.path for c in sized_calls}) == len(entries)
            assert took < 20 and peak <= 2 * 8 + 6     # a task per worker and per request in flight, not per file
            known = engine.store.index.sizes([e.oid for e in entries])
            assert set(known) == {e.oid for e in entries} - {stuck.oid}
            assert known == {k: v for k, v in _true_sizes(layout.remote_root, entries).items() if k != stuck.oid}
            # the tree kept them too, and the next pass asks for the one left
            fake.faults.clear()
            for h in list(fake.hung):
                h.set()
            fake.calls.clear()
            attrs = await fs.stat_many([e.path for e in entries])
            assert [c.op for c in fake.calls] == ["size"]
            assert [a.size for _, a in attrs] == [_true_sizes(layout.remote_root, [e])[e.oid] for e in entries]

    run(go())


@pytest.fixture
def nginx(tmp_path):
    srv = HttpRemoteServer(tmp_path / "nginx").start()
    yield srv
    srv.stop()


def test_sizing_20k_folder_over_http_keeps_progress_when_cut(nginx, tmp_path):
    """A 20,000-file folder over the real nginx remote: a caller that gives up after 2 s
    keeps every size learned so far (persistent index); the next process asks only for the
    rest - HEADs in the second run == 20,000 minus what the first recorded."""
    layout = write_layout(tmp_path / "l", folders=1, per_folder=20_000, remote=nginx.root)
    cache = tmp_path / "cache"
    env = _http_env(nginx)

    async def first():
        async with await _engine(layout.repo, cache, env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2.0):
                    await fs.stat_many(paths)
            return [e.oid for e in fs.walk_files("data")]

    oids = run(first())
    index = Index(cache / "store-v2" / "index.sqlite")
    recorded = index.sizes(oids)
    index.close()
    assert 0 < len(recorded) < 20_000

    async def second():
        async with await _engine(layout.repo, cache, env) as engine:
            fs = FileSystem(engine)
            mark = nginx.mark()
            attrs = await fs.stat_many([e.path for e in fs.walk_files("data")])
            heads = [r for r in nginx.requests_since(mark) if r.method == "HEAD"]
            return attrs, heads

    attrs, heads = run(second())
    assert len(heads) == 20_000 - len(set(recorded))
    sizes = {p: a.size for p, a in attrs}
    sample = sorted(sizes)[::997]
    entries_by_path = {}
    manifest = json.loads((nginx.root / "files/md5" / layout.manifest_md5[:2] /
                           (layout.manifest_md5[2:] + ".dir")).read_bytes())
    for item in manifest:
        entries_by_path[f"data/{item['relpath']}"] = item["md5"]
    for p in sample:
        md5 = entries_by_path[p]
        assert sizes[p] == (nginx.root / "files/md5" / md5[:2] / md5[2:]).stat().st_size
        assert recorded.get(md5, sizes[p]) == sizes[p]


def test_published_size_index_answers_every_stat_with_one_request(nginx, tmp_path, mp):
    """`dda sizes publish` writes <manifest>.dir.sizes next to the manifest; a fresh client
    (new cache) mounts, and `find -printf %s` over 3,000 files needs one request: the read of
    the size index (before the first HEAD it would have sent); a remount asks nothing at all."""
    layout = write_layout(tmp_path / "l", folders=3, per_folder=1000, remote=nginx.root)
    env = {**os.environ, **_http_env(nginx), "DDA_REMOTE_STORAGE_METHOD": "PUT",   # nginx DAV takes PUT
           "DDA_CACHE_DIR": str(tmp_path / "publisher")}
    proc = subprocess.run([DDA, "sizes", "publish", str(layout.repo), "data"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    key = index_path(layout.manifest_md5, False)
    assert f"data: published 3000 sizes to {key}" in proc.stdout
    published = json.loads((nginx.root / key).read_bytes())
    manifest = json.loads((nginx.root / index_path(layout.manifest_md5, False).removesuffix(".sizes")).read_bytes())
    assert set(published["sizes"]) == {m["md5"] for m in manifest}

    config = Config(repo=str(layout.repo), cache_dir=tmp_path / "client",
                    remotes={"storage": {"url": nginx.url, "user": nginx.user, "password": nginx.password}})
    mark = nginx.mark()    # a mount reads the index ahead (in the background), else the first stat does
    with MountThread(config, mp):
        sizes = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_size
                 for d, _, files in os.walk(mp / "data") for f in files}
        # all but the mount's read of the manifest itself
        during = [r for r in nginx.requests_since(mark) if not r.uri.endswith(".dir")]
    assert len(sizes) == 3000
    assert [(r.method, r.uri.rsplit("/", 1)[-1]) for r in during] == [("GET", key.rsplit("/", 1)[-1])]
    for m in manifest[::500]:
        assert sizes[str(mp / "data" / m["relpath"])] == published["sizes"][m["md5"]]
    mark = nginx.mark()
    with MountThread(config, mp):
        for d, _, files in os.walk(mp / "data"):
            for f in files:
                os.stat(os.path.join(d, f))
    assert nginx.requests_since(mark) == []


def test_size_index_is_verified_and_contradicted_sizes_dropped(small_fake, tmp_path):
    """An index listing other md5s than the manifest is ignored (sizes asked per file); a size
    that a download contradicts is dropped: the read returns the true bytes, the index the
    true size."""
    layout, fake, env = small_fake
    key = index_path(layout.manifest_md5, False)
    manifest = json.loads(fake.objects[key.removesuffix(".sizes")])
    sizes = {m["md5"]: len(fake.objects[f"files/md5/{m['md5'][:2]}/{m['md5'][2:]}"]) for m in manifest}

    def publish(doc_sizes):
        fake.objects[key] = json.dumps({"format": "dda-sizes/1", "manifest": f"{layout.manifest_md5}.dir",
                                        "sizes": doc_sizes}).encode()

    publish({**sizes, "0" * 32: 5})            # one md5 too many: not trusted

    async def untrusted():
        async with await _engine(layout.repo, tmp_path / "c1", env) as engine:
            fs = FileSystem(engine)
            fake.calls.clear()
            path = next(iter(fs.walk_files("data"))).path
            await fs.stat(path)
            await fs.stat(path.replace("d0000", "d0001"))   # another folder: no stat-ahead
            return [c.op for c in fake.calls]

    assert run(untrusted()) == ["read", "size", "size"]     # the index read once, then asked per file

    victim = manifest[7]
    publish({**sizes, victim["md5"]: sizes[victim["md5"]] + 3})   # one wrong size

    async def contradicted():
        async with await _engine(layout.repo, tmp_path / "c2", env) as engine:
            fs = FileSystem(engine)
            fake.calls.clear()
            path = f"data/{victim['relpath']}"
            assert (await fs.stat(path)).size == sizes[victim["md5"]] + 3
            assert [c.op for c in fake.calls] == ["read"]           # the index, nothing per file
            data = await engine.read(path, 0, 1 << 20)
            assert hashlib.md5(data).hexdigest() == victim["md5"]
            assert engine.store.index.size(victim["md5"]) == sizes[victim["md5"]]
            assert (await fs.stat(path)).size == sizes[victim["md5"]]

    run(contradicted())


def test_tree_memory_per_file_is_bounded_and_build_is_linear():
    """100,000 files in 100 folders: the built tree keeps < 100 bytes per file (interned
    names, md5 as 16 bytes, sizes in an array; an Entry dict took ~500), and composing it with
    100 outputs costs about what one output of the same files costs (not outputs x files)."""
    import time
    import tracemalloc

    from sidecar.snapshot.build import compose_tree
    from sidecar.snapshot.dvcfiles import DvcOut, ManifestEntry

    def outputs(n_out: int, per: int):
        outs, manifests = [], {}
        for o in range(n_out):
            md5 = hashlib.md5(f"out{o}".encode()).hexdigest()
            outs.append(DvcOut(f"data/d{o:03d}", md5, True, None, per, False, None, f"d{o}.dvc"))
            manifests[md5] = [ManifestEntry(f"f{i:06d}.bin", hashlib.md5(f"{o}/{i}".encode()).hexdigest(), None)
                              for i in range(per)]
        return outs, manifests

    outs, manifests = outputs(100, 1000)
    started = time.perf_counter()
    compose_tree([], outs, manifests)
    many = time.perf_counter() - started
    tracemalloc.start()
    tree = compose_tree([], outs, manifests)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(tree.files) == 100_000 and held / 100_000 < 100, held / 100_000
    one_outs, one_manifests = outputs(1, 100_000)
    started = time.perf_counter()
    compose_tree([], one_outs, one_manifests)
    single = time.perf_counter() - started
    assert many < 3 * single + 0.5, (many, single)
    entry = tree.files["data/d042/f000007.bin"]
    assert entry.oid == hashlib.md5(b"42/7").hexdigest() and entry.size is None and entry.output == "data/d042"
    assert tree.dirs["data"][:2] == ["d000", "d001"] and "data/d099" in tree.dirs
    walked = [e.path for e in tree.walk_files("data/d001")]
    assert walked == sorted(walked) and len(walked) == 1000
    tree.set_size("data/d042/f000007.bin", 123)
    assert tree.get("data/d042/f000007.bin").size == 123


def test_directory_prefetch_follows_the_reader_within_a_window(tmp_path):
    """Issue 11 item 4: after a reader's 10 sequential opens in a 600-file folder, directory
    prefetch fetches a bounded window ahead (not the other 590 files); each further open lets
    it go one further; and a reader's own read does not wait behind it."""
    from sidecar.fetch.prefetch import Prefetcher

    layout = write_layout(tmp_path / "l", folders=1, per_folder=600)

    async def go():
        async with await _engine(layout.repo, tmp_path / "cache", {}) as engine:
            pf = Prefetcher(engine, dir_window_files=16)
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            for p in paths[:10]:
                pf.on_open(p)
                await engine.read(p, 0, 1 << 20)
            await asyncio.wait_for(pf.wait_idle(), 60)
            first = pf.stats.issued_files
            assert 8 <= first <= 16 + 10, first          # the window, plus one per later open
            for p in paths[10:20]:
                pf.on_open(p)
                await engine.read(p, 0, 1 << 20)
            await asyncio.wait_for(pf.wait_idle(), 60)
            assert first < pf.stats.issued_files <= first + 10 + 2
            assert pf.stats.used_files >= 8
            # a read far from the walk is served at once, not after the window drains
            started = asyncio.get_running_loop().time()
            await engine.read(paths[500], 0, 1 << 20)
            assert asyncio.get_running_loop().time() - started < 2
            await pf.aclose()

    run(go())


def test_second_size_miss_in_a_folder_sizes_the_rest_ahead_once_each(small_fake, tmp_path):
    """`find -printf %s`-like walk: after 2 stats that had to ask, the rest of the folder is
    sized in the background (bounded, recorded as it lands); later stats ask nothing, and no
    object is asked twice."""
    layout, fake, env = small_fake

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data/d0001")]
            fake.objects.pop(index_path(layout.manifest_md5, False) , None)
            fake.calls.clear()
            for p in paths[:2]:
                await fs.stat(p)
            await asyncio.wait_for(asyncio.gather(*engine._stat_ahead.values()), 60)
            asked = [c.path for c in fake.calls if c.op == "size"]
            assert len(asked) == len(set(asked)) == 1000
            before = len(fake.calls)
            sizes = [(await fs.stat(p)).size for p in paths]
            assert len(fake.calls) == before and all(s is not None for s in sizes)
            assert not [c for c in fake.calls if c.path.startswith("files/md5/") and "d0000" in c.path]

    run(go())


def test_compose_tree_is_linear_in_outputs_and_still_replaces_what_git_has():
    """1,000 directory outputs of 100 files compose in about the time one output of 100,000
    does (each output no longer scans every file placed so far), and an output still replaces
    the git files at and below its path (a real checkout .gitignores them)."""
    import time

    from sidecar.snapshot.build import compose_tree
    from sidecar.snapshot.dvcfiles import DvcOut, ManifestEntry
    from sidecar.snapshot.git import GitEntry

    def outputs(n_out: int, per: int):
        outs, manifests = [], {}
        for o in range(n_out):
            md5 = hashlib.md5(f"out{o}".encode()).hexdigest()
            outs.append(DvcOut(f"data/d{o:04d}", md5, True, None, per, False, None, f"d{o}.dvc"))
            manifests[md5] = [ManifestEntry(f"f{i:06d}.bin", hashlib.md5(f"{o}/{i}".encode()).hexdigest(), None)
                              for i in range(per)]
        return outs, manifests

    git = [GitEntry("data/d0007/stale.txt", 0o100644, "a" * 40, "blob", 3),
           GitEntry("data/keep.txt", 0o100644, "b" * 40, "blob", 4)]
    outs, manifests = outputs(1000, 100)
    started = time.perf_counter()
    tree = compose_tree(git, outs, manifests)
    many = time.perf_counter() - started
    one_outs, one_manifests = outputs(1, 100_000)
    started = time.perf_counter()
    compose_tree([], one_outs, one_manifests)
    single = time.perf_counter() - started
    assert many < 3 * single + 0.5, (many, single)
    assert len(tree.files) == 100_001 and "data/d0007/stale.txt" not in tree.files
    assert tree.files["data/keep.txt"].kind == "git"
    assert tree.files["data/d0007/f000003.bin"].oid == hashlib.md5(b"7/3").hexdigest()


def _count_file_lookups(ops, folder: str) -> list[str]:
    """Patch the mount's FUSE lookup to record the names looked up in `folder` (a repository
    path); pyfuse3 finds the handler on the instance at every request."""
    seen: list[str] = []
    real = ops.lookup

    async def lookup(parent_inode, name, ctx):
        if ops._path(parent_inode) == folder:
            seen.append(os.fsdecode(name))
        return await real(parent_inode, name, ctx)

    ops.lookup = lookup
    return seen


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_readdir_carries_the_sizes_this_node_knows_so_a_walk_needs_no_lookups(small_fake, tmp_path, mp):
    """`find -printf %s` after a remount (or once a folder's sizes are known): readdir hands
    the kernel each known size with its name (readdirplus, long timeouts), so stat-ing every
    file asks neither the remote nor the daemon; a folder whose sizes are unknown still goes
    out without sizes and each stat is a lookup with the true size."""
    layout, fake, env = small_fake
    fake.objects.pop(index_path(layout.manifest_md5, False), None)     # per-file sizing only
    config = Config(repo=str(layout.repo), cache_dir=tmp_path / "c", remotes={"default": {"url": env["DDA_REMOTE_STORAGE_URL"]}})
    manifest = json.loads((layout.remote_root / "files/md5" / layout.manifest_md5[:2] /
                           (layout.manifest_md5[2:] + ".dir")).read_bytes())
    true = {m["relpath"]: (layout.remote_root / "files/md5" / m["md5"][:2] / m["md5"][2:]).stat().st_size
            for m in manifest}
    with MountThread(config, mp):
        first = {e.name: e.stat().st_size for e in os.scandir(mp / "data/d0000")}
    assert len(first) == 1000 and all(first[n] == true[f"d0000/{n}"] for n in first)
    with MountThread(config, mp) as m:
        fake.calls.clear()
        looked = _count_file_lookups(m.mount.ops, "data/d0000")
        again = {e.name: e.stat().st_size for e in os.scandir(mp / "data/d0000")}
        assert again == first
        assert looked == [] and fake.calls == []
        looked_other = _count_file_lookups(m.mount.ops, "data/d0001")
        other = {e.name: e.stat().st_size for e in os.scandir(mp / "data/d0001")}
        assert "f000000.bin" in looked_other and len(other) == 1000   # unknown: looked up (then sized ahead)
        assert all(other[n] == true[f"d0001/{n}"] for n in other)


class _HeadServer:
    """A real HTTP server on 127.0.0.1 answering HEAD/GET by path: `routes` maps a path to
    (status, headers); every request's (method, path, headers) is recorded."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str]]]):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, body: bool) -> None:
                seen.append((self.command, self.path, dict(self.headers)))
                status, headers = routes.get(self.path, (404, {"Content-Length": "0"}))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v.replace("{path}", self.path))
                self.end_headers()
                if body and status == 200:
                    self.wfile.write(b"x" * int(headers.get("Content-Length", "0")))

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def do_GET(self):  # noqa: N802
                self._answer(True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("auth", ["custom", "bearer", "basic"])
def test_head_sizes_keep_credentials_at_their_origin_and_map_statuses(auth):
    """Sizes go through the lean HEAD client (aiohttp): it sends the credentials to the remote,
    leaves a redirect to the httpx path (which drops them for another origin), maps 404/401
    as every request does."""
    from sidecar.errors import ObjectMissing, RemoteAuthError
    from sidecar.remotes.http import HttpRemote

    secret = "s3cr3t-TOKEN-4711"
    other = _HeadServer({"/store/moved": (200, {"Content-Length": "12"})})
    origin = _HeadServer({
        "/store/ok": (200, {"Content-Length": "1234"}),
        "/store/moved": (302, {"Location": other.url + "{path}", "Content-Length": "0"}),
        "/store/denied": (401, {"Content-Length": "0"}),
    })
    kwargs = {"custom": dict(auth="custom", custom_auth_header="X-Api-Key", password=secret),
              "bearer": dict(auth="bearer", token=secret),
              "basic": dict(auth="basic", user="u", password=secret)}[auth]
    remote = HttpRemote("r", origin.url + "/store", **kwargs)
    try:
        async def go():
            try:
                assert await remote.size("ok") == 1234
                assert await remote.size("moved") == 12
                with pytest.raises(ObjectMissing):
                    await remote.size("missing")
                with pytest.raises(RemoteAuthError):
                    await remote.size("denied")
            finally:
                await remote.aclose()

        asyncio.run(go())
        assert remote.size_concurrency == 128
        carries = lambda h: any(secret in v or "dTpzM2NyM3Q" in v for v in h.values())  # noqa: E731
        assert all(carries(h) for _, _, h in origin.seen), origin.seen
        assert other.seen and not any(carries(h) for _, _, h in other.seen), other.seen
        assert [m for m, p, _ in origin.seen if p == "/store/ok"] == ["HEAD"]
    finally:
        origin.close()
        other.close()


def test_listing_fills_known_sizes_from_the_index_and_a_cold_listing_asks_it_once(small_fake, tmp_path):
    """`FileSystem.fill_known_sizes` (what a FUSE readdir pass starts with): with an empty
    index, 1,000 names cost one index query (the probe) and no request; once the sizes are in
    the persistent index (another engine learned them), a new engine's listing carries every
    size with its name, in a few queries and still without a request."""
    layout, fake, env = small_fake
    fake.objects.pop(index_path(layout.manifest_md5, False), None)
    cache = tmp_path / "c"

    async def listing(engine):
        asked = []
        real = engine.store.index.sizes
        engine.store.index.sizes = lambda oids: asked.append(len(oids)) or real(oids)
        fake.calls.clear()
        fs = FileSystem(engine)
        await fs.fill_known_sizes("data/d0000")
        return fs.listdir("data/d0000"), asked, list(fake.calls)

    async def go():
        async with await _engine(layout.repo, cache, env) as engine:
            items, asked, calls = await listing(engine)
            assert len(items) == 1000 and all(i.size is None for i in items)
            assert len(asked) == 1 and calls == []
            await FileSystem(engine).stat_many([i.path for i in items])
        async with await _engine(layout.repo, cache, env) as engine:
            items, asked, calls = await listing(engine)
            true = _true_sizes(layout.remote_root, [engine.tree.files[i.path] for i in items])
            assert [i.size for i in items] == [true[engine.tree.files[i.path].oid] for i in items]
            assert calls == [] and 2 <= len(asked) <= 3

    run(go())
