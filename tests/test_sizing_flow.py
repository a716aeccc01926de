"""Issue 11 (items 2 and 6): how many requests, trips and writes a walker's sizing costs -
counts, never timings (bench/scale.py measures those).

Real parts: DVC-identical layouts (tests/dvclayout.py), nginx as the HTTP remote (its access
log counts requests), the in-memory fake remote where a test needs every size request slow.
"""
from __future__ import annotations

import asyncio
import gc
import os
import uuid
import warnings

import pytest

from dvclayout import write_layout
from engines import engine_at as _engine
from servers import HttpRemoteServer
from sidecar.fs import FileSystem
from sidecar.remotes.fake import FakeRemote
from sidecar.snapshot.tree import Entry, Tree


def run(coro):
    return asyncio.run(coro)



@pytest.fixture
def nginx(tmp_path):
    srv = HttpRemoteServer(tmp_path / "nginx").start()
    yield srv
    srv.stop()


@pytest.fixture
def slow_fake(tmp_path):
    """1,000 files in one folder on a fake remote whose size requests each take 20 ms and which
    carries 48 of them at once (as an HTTP remote's HEAD session carries 128)."""
    name = f"r{uuid.uuid4().hex[:8]}"
    layout = write_layout(tmp_path / "l", folders=1, per_folder=1000, remote_url=f"fake://{name}")
    fake = FakeRemote.register(name, layout.remote_root)
    fake.size_concurrency = 48
    fake.script(op="size", delay=0.02)
    yield layout, fake, {"DDA_REMOTE_STORAGE_URL": f"fake://{name}"}
    FakeRemote.unregister(name)


def test_walker_sizing_uses_the_remotes_own_size_slots_with_bounded_tasks(slow_fake, tmp_path):
    """A walker's stat-ahead has as many size requests in flight as the remote's client
    carries (48 here, less the few kept for a reader) - not the 16 read slots the tenancy
    wrapper used to leave it - and never more; the tasks alive stay bounded by that width, not by the folder's 1,000 files; every
    object is asked once."""
    layout, fake, env = slow_fake

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            for p in paths[:2]:
                await fs.stat(p)
            most_tasks = 0
            ahead = asyncio.gather(*engine._stat_ahead.values())
            while not ahead.done():
                most_tasks = max(most_tasks, len(asyncio.all_tasks()))
                await asyncio.sleep(0.005)
            await ahead
            asked = [c.path for c in fake.calls if c.op == "size"]
            return most_tasks, asked

    most_tasks, asked = run(go())
    # background work leaves a reader the last 48 // 8 slots (fetch/priority.py)
    assert 48 - 48 // 8 <= fake.most_sizing <= 48, fake.most_sizing
    assert len(asked) == len(set(asked)) == 1000
    assert most_tasks < 2 * 48 + 20, most_tasks


def test_bulk_sizing_asks_the_store_once_per_batch_and_writes_proofs_in_batches(slow_fake, tmp_path):
    """Sizing 1,000 unknown files costs a few trips to the store's threads for the whole
    batch (the index, then the verified objects), not several per file, and the proofs
    of the sizes our remote answered reach the index in a few transactions, not one each.
    A second engine on the same cache knows every size and asks nothing."""
    layout, fake, env = slow_fake
    fake.faults.clear()

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            trips, writes = [0], [0]
            run_on_thread, record = engine.fetcher.astore.run, engine.store.index.record_proofs

            async def counted_run(fn, *args):
                trips[0] += 1
                return await run_on_thread(fn, *args)

            def counted_record(rows):
                writes[0] += 1
                return record(rows)

            engine.fetcher.astore.run = counted_run
            engine.store.index.record_proofs = counted_record
            fake.calls.clear()
            attrs = await fs.stat_many(paths)
            await asyncio.to_thread(engine.store.index_settled, 10.0)
            return attrs, trips[0], writes[0], len([c for c in fake.calls if c.op == "size"])

    attrs, trips, writes, asked = run(go())
    assert asked == 1000 and all(a.size is not None for _, a in attrs)
    assert trips < 50, trips       # was ~6 per file: index, store, and proof lookups one by one
    assert 0 < writes < 50, writes

    async def again():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fake.calls.clear()
            fs = FileSystem(engine)
            attrs = await fs.stat_many([e.path for e in fs.walk_files("data")])
            return attrs, [c for c in fake.calls if c.op == "size"]

    attrs2, asked2 = run(again())
    assert asked2 == [] and dict(attrs2) == dict(attrs)


def test_remount_with_a_manifest_above_256k_asks_nothing(nginx, tmp_path):
    """A 5,000-file manifest (355 KB, one chunk, its size unknown when asked) proves itself
    by its own download: a second engine on the same cache makes no request at all (it
    used to read a 64-byte window of the manifest again on every remount)."""
    layout = write_layout(tmp_path / "l", folders=1, per_folder=5000, remote=nginx.root)
    env = {"DDA_REMOTE_STORAGE_URL": nginx.url, "DDA_REMOTE_STORAGE_USER": nginx.user,
           "DDA_REMOTE_STORAGE_PASSWORD": nginx.password}

    async def open_close() -> int:
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            return len(engine.tree.dirs["data"])

    mark = nginx.mark()
    assert run(open_close()) == 5000
    assert [r.uri.endswith(".dir") for r in nginx.requests_since(mark)] == [True]
    mark = nginx.mark()
    assert run(open_close()) == 5000
    assert nginx.requests_since(mark) == []


def test_closing_mid_walk_leaves_no_head_session_open(nginx, tmp_path):
    """An engine closed while a walker's stat-ahead has HEADs in flight closes every HEAD
    session it opened: no 'Unclosed client session' at exit, and sizes answered before the
    close are kept."""
    layout = write_layout(tmp_path / "l", folders=1, per_folder=3000, remote=nginx.root)
    env = {"DDA_REMOTE_STORAGE_URL": nginx.url, "DDA_REMOTE_STORAGE_USER": nginx.user,
           "DDA_REMOTE_STORAGE_PASSWORD": nginx.password}

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            for p in paths[:2]:
                await fs.stat(p)
            await asyncio.sleep(0.05)       # the stat-ahead has HEADs under way
        # a size request that outlived the close (cut, then retried) must not open a session
        await asyncio.sleep(1.5)
        return engine._sizing

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        left = run(go())
        gc.collect()
    assert not left
    assert not [w for w in seen if "Unclosed" in str(w.message)], [str(w.message) for w in seen]


def test_tree_fills_a_folders_sizes_by_object_without_entries():
    """Tree.unsized lists the unsized DVC files of one folder (not below it, not git files);
    set_sizes sets every file of those objects, marks them as learned, and leaves sizes
    already known alone."""
    a, b = "a" * 32, "b" * 32
    tree = Tree({
        "d/x": Entry("d/x", "dvc", 0o100644, None, a, output="d"),
        "d/y": Entry("d/y", "dvc", 0o100644, None, b, output="d"),
        "d/z": Entry("d/z", "dvc", 0o100644, 7, a, output="d"),
        "d/g": Entry("d/g", "git", 0o100644, None, "c" * 40),
        "d/s/w": Entry("d/s/w", "dvc", 0o100644, None, a, output="d"),
    })
    assert [(n, o) for n, o, _ in tree.unsized("d")] == [("x", a), ("y", b)]
    assert tree.set_sizes("d", {a: 5}) == 1
    assert tree.files["d/x"].size == 5 and tree.files["d/x"].looked_up
    assert tree.files["d/z"].size == 7 and tree.files["d/y"].size is None
    assert tree.files["d/s/w"].size is None and tree.files["d/g"].size is None
    assert [n for n, _, _ in tree.unsized("d")] == ["y"]


def test_stat_ahead_follows_the_reader_within_its_window(slow_fake, tmp_path, monkeypatch):
    """The stat-ahead runs at most STAT_AHEAD_WINDOW files past the reader's last stat: a
    reader that stops after two files (`ls -l | head`) costs a window of requests, not the
    folder; when it goes on, the sizing follows; every object is asked once."""
    import sidecar.engine as engine_mod

    monkeypatch.setattr(engine_mod, "STAT_AHEAD_WINDOW", 100)
    monkeypatch.setattr(engine_mod, "STAT_AHEAD_STEP", 40)
    layout, fake, env = slow_fake
    fake.faults.clear()

    async def settle(engine, fake):
        stable = 0
        for _ in range(1000):    # until no size request is under way or starts for 0.5 s
            before = fake.count("size")
            await asyncio.sleep(0.02)
            stable = stable + 1 if fake.sizing == 0 and fake.count("size") == before else 0
            if stable == 25:
                return before
        raise AssertionError("sizing never settled")

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            for p in paths[:2]:
                await fs.stat(p)
            first = await settle(engine, fake)
            await fs.stat(paths[500])
            second = await settle(engine, fake)
            sizes = [(await fs.stat(p)).size for p in paths]
            asked = [c.path for c in fake.calls if c.op == "size"]
            return first, second, sizes, asked

    first, second, sizes, asked = run(go())
    assert 100 <= first <= 100 + 2, first           # the window past the reader's position 1
    assert 500 <= second <= 600 + 2, second         # it follows the reader to 500 + window
    assert all(s is not None for s in sizes)
    assert len(asked) == len(set(asked)) == 1000


def test_a_mount_serves_once_its_published_size_index_is_read(nginx, tmp_path, mp):
    """With a published size index, a fresh client's mount is ready only when every file of
    the big folder has its size (the first listing hands them all to the kernel with the
    names: no lookup per file), having asked for the manifest and the index alone."""
    from mounting import MountThread
    from sidecar.config import Config

    layout = write_layout(tmp_path / "l", folders=1, per_folder=2000, remote=nginx.root)
    env = {"DDA_REMOTE_STORAGE_URL": nginx.url, "DDA_REMOTE_STORAGE_USER": nginx.user,
           "DDA_REMOTE_STORAGE_PASSWORD": nginx.password, "DDA_REMOTE_STORAGE_METHOD": "PUT"}

    async def publish():
        async with await _engine(layout.repo, tmp_path / "publisher", env) as engine:
            return await engine.publish_sizes("data")

    assert [n for _, _, n in run(publish())] == [2000]
    config = Config(repo=str(layout.repo), cache_dir=tmp_path / "client",
                    remotes={"storage": {"url": nginx.url, "user": nginx.user, "password": nginx.password}})
    mark = nginx.mark()
    with MountThread(config, mp) as m:
        unsized = [e.path for e in m.mount.engine.tree.walk_files("data") if e.size is None]
        asked = [r.uri.rsplit(".", 1)[-1] for r in nginx.requests_since(mark)]
        listed = sorted(os.listdir(mp / "data"))
    assert unsized == []
    assert sorted(asked) == ["dir", "sizes"]
    assert len(listed) == 2000


def test_random_stats_size_only_those_files(slow_fake, tmp_path):
    """A reader that opens random files (each open stats it first) is not a walker: three
    misses far apart in name order size those three files and start no stat-ahead; two
    misses in order do."""
    layout, fake, env = slow_fake
    fake.faults.clear()

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            for i in (700, 12, 430):
                await fs.stat(paths[i])
            random_ahead = dict(engine._stat_ahead)
            random_asked = fake.count("size")
            await fs.stat(paths[431])
            return random_ahead, random_asked, list(engine._stat_ahead)

    random_ahead, random_asked, after = run(go())
    assert random_ahead == {} and random_asked == 3
    assert after == ["data"]
