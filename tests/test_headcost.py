"""Issue 11 (cold `find -printf %s` of 100k files over HTTP): what each cold file costs the
daemon - tasks, Entry objects, the stat-ahead following a reader whose lookups are answered
from the tree's arrays, one request per object, and what a HEAD carries. Counts, never
timings (bench/headab.py measures those).

Real parts: DVC-identical layouts (tests/dvclayout.py), the in-memory fake remote where every
size request must be slow, a real HTTP server (http.server in a thread) that records what
each HEAD carried.
"""
from __future__ import annotations

import asyncio
import http.server
import threading
import uuid

import pytest

from dvclayout import write_layout
from engines import engine_at as _engine
from sidecar.fs import FileSystem
from sidecar.remotes.fake import FakeRemote
from sidecar.snapshot.tree import Tree


def run(coro):
    return asyncio.run(coro)



@pytest.fixture
def slow_fake(tmp_path):
    """1,000 files in one folder on a fake remote whose size requests each take 20 ms, 48 at once."""
    name = f"r{uuid.uuid4().hex[:8]}"
    layout = write_layout(tmp_path / "l", folders=1, per_folder=1000, remote_url=f"fake://{name}")
    fake = FakeRemote.register(name, layout.remote_root)
    fake.size_concurrency = 48
    fake.script(op="size", delay=0.02)
    yield layout, fake, {"DDA_REMOTE_STORAGE_URL": f"fake://{name}"}
    FakeRemote.unregister(name)


def _true_size(layout, oid: str) -> int:
    return (layout.remote_root / "files" / "md5" / oid[:2] / oid[2:]).stat().st_size


async def _settle(fake) -> int:
    """Size requests made once none is under way or starts for 0.5 s."""
    stable = 0
    for _ in range(1000):
        before = fake.count("size")
        await asyncio.sleep(0.02)
        stable = stable + 1 if fake.sizing == 0 and fake.count("size") == before else 0
        if stable == 25:
            return before
    raise AssertionError("sizing never settled")


def test_stat_ahead_makes_no_task_and_no_entry_per_file(slow_fake, tmp_path, monkeypatch):
    """Sizing a 1,000-file folder ahead of a walker creates tasks for its pool (48 wide), not
    one per object, and no Entry per file (it reads the tree's arrays); every size lands in
    the tree, equal to the object's, each object asked once."""
    layout, fake, env = slow_fake
    fake.faults.clear()
    fake.script(op="size", delay=0.02)
    made = [0]
    real_make = Tree._make

    def counted_make(self, path, fid):
        made[0] += 1
        return real_make(self, path, fid)

    monkeypatch.setattr(Tree, "_make", counted_make)

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            loop = asyncio.get_running_loop()
            tasks = [0]

            def factory(loop, coro, **kwargs):
                tasks[0] += 1
                return asyncio.Task(coro, loop=loop, **kwargs)

            for p in paths[:2]:
                await fs.stat(p)
            loop.set_task_factory(factory)
            made[0] = 0
            await asyncio.gather(*engine._stat_ahead.values())
            loop.set_task_factory(None)
            entries, created = made[0], tasks[0]
            sizes = {e.path: (e.size, e.oid) for e in fs.walk_files("data")}
            asked = [c.path for c in fake.calls if c.op == "size"]
            return entries, created, sizes, asked

    entries, created, sizes, asked = run(go())
    assert entries == 0, entries
    assert created < 200, created       # one task per object made it >= 998
    assert all(size == _true_size(layout, oid) for size, oid in sizes.values())
    assert len(asked) == len(set(asked)) == 1000


def test_a_stat_joins_the_stat_aheads_request_and_survives_its_cancellation(slow_fake, tmp_path):
    """A stat of an object the stat-ahead is asking for right now waits for that request (one
    request, not two); when the stat-ahead is stopped while a stat waits on its request, the
    stat still gets the object's size (it asks itself) instead of a cancellation."""
    layout, fake, env = slow_fake
    fake.faults.clear()
    fake.script(op="size", delay=0.3)

    async def in_flight(engine, fs, paths, skip=()):
        for _ in range(500):
            for p in paths[2:]:
                entry = fs.entry(p)
                if p not in skip and entry.size is None and any(k[0] == entry.oid for k in engine._sizing):
                    return p
            await asyncio.sleep(0.01)
        raise AssertionError("no request of the stat-ahead under way")

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            for p in paths[:2]:
                await fs.stat(p)
            joined = await in_flight(engine, fs, paths)
            first = (await fs.stat(joined)).size
            asked_joined = sum(1 for c in fake.calls if c.op == "size" and c.path.endswith(fs.entry(joined).oid[2:]))
            other = await in_flight(engine, fs, paths, skip={joined})
            waiting = asyncio.ensure_future(fs.stat(other))
            for _ in range(5):
                await asyncio.sleep(0)
            for task in engine._stat_ahead.values():
                task.cancel()
            second = (await waiting).size
            return first, asked_joined, fs.entry(joined).oid, second, fs.entry(other).oid

    first, asked_joined, joined_oid, second, other_oid = run(go())
    assert asked_joined == 1
    assert first == _true_size(layout, joined_oid)
    assert second == _true_size(layout, other_oid)


def test_known_sizes_are_answered_from_the_arrays_and_still_lead_the_stat_ahead(slow_fake, tmp_path, monkeypatch):
    """A lookup of a file whose size is known (`FileSystem.known_child`, what a FUSE lookup
    asks first) answers what `lookup` would, makes no Entry and sends no request - and the
    stat-ahead still hears where its reader is: a walker whose stats all hit sizes learned
    ahead keeps the sizing going past the first window. A directory, an unknown size, a
    missing name, `.` and `..` are left to `lookup`."""
    import sidecar.engine as engine_mod

    monkeypatch.setattr(engine_mod, "STAT_AHEAD_WINDOW", 100)
    monkeypatch.setattr(engine_mod, "STAT_AHEAD_STEP", 40)
    layout, fake, env = slow_fake
    fake.faults.clear()
    fake.script(op="size", delay=0.02)
    made = [0]
    real_make = Tree._make

    def counted_make(self, path, fid):
        made[0] += 1
        return real_make(self, path, fid)

    async def go():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            for p in paths[:2]:
                await fs.stat(p)
            first = await _settle(fake)
            names = [p.rsplit("/", 1)[1] for p in paths]
            monkeypatch.setattr(Tree, "_make", counted_make)
            answers = [fs.known_child("data", n) for n in names[2:100]]
            entries = made[0]
            monkeypatch.setattr(Tree, "_make", real_make)
            second = await _settle(fake)
            expected = [await fs.lookup("data", n) for n in names[2:100]]
            left = [fs.known_child("data", n) for n in ("nope", ".", "..", names[-1])] + [fs.known_child("", "data")]
            return first, second, answers, expected, entries, left

    first, second, answers, expected, entries, left = run(go())
    assert 100 <= first <= 102, first
    assert answers == expected and all(a is not None for a in answers)
    assert entries == 0, entries
    assert second >= 190, second         # the reader's known-size lookups moved it on (else: stuck at ~100)
    assert left == [None] * 5


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, dict[str, str]]] = []

    def do_HEAD(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.send_header("Set-Cookie", "session=abc; Path=/")
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.mark.parametrize("base_path", ["/dvc", "/my%20data/dvc"])
def test_head_requests_carry_no_cookie_nor_accept_encoding_and_the_right_path(base_path):
    """The HEADs that size objects ask for the object's own length: no Accept-Encoding (an
    encoded answer's length is not the object's), no cookie sent back after a Set-Cookie;
    the path is the object's key under the remote's base, percent-encoding kept."""
    from sidecar.remotes.http import HttpRemote

    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{base_path}"
        remote = HttpRemote("r", url, user="u", password="p")

        async def go():
            try:
                return [await remote.size("files/md5/ab/cdef0123456789"), await remote.size("files/md5/ab/cdef0123456789")]
            finally:
                await remote.aclose()

        sizes = run(go())
    finally:
        server.shutdown()
        server.server_close()
    assert sizes == [1234, 1234]
    assert [p for p, _ in _Recorder.seen] == [f"{base_path}/files/md5/ab/cdef0123456789"] * 2
    for _, headers in _Recorder.seen:
        assert "accept-encoding" not in headers
        assert "cookie" not in headers
        assert headers["authorization"].startswith("Basic ")


def test_bulk_sizing_opens_no_store_file_for_objects_the_store_does_not_hold(slow_fake, tmp_path, monkeypatch):
    """A cold folder's stat-ahead asks the index which objects the store holds (one query per
    batch) and opens files only for those: none for 1,000 cold objects (each used to cost two
    failed opens), while an object verified into the store whose size row was forgotten is
    still answered from the store, with no request."""
    from sidecar.store import Store

    layout, fake, env = slow_fake
    fake.faults.clear()
    fake.script(op="size", delay=0.005)

    async def verify_one(path):
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            handle = await fs.open(path)
            data = b"".join([piece async for piece in fs.iter_bytes(handle)])
            fs.release(handle)
            return handle.entry.oid, len(data), engine.store.index.path

    opened = []
    real = Store.object_size

    def counted(self, oid):
        opened.append(oid)
        return real(self, oid)

    async def walk():
        async with await _engine(layout.repo, tmp_path / "c", env) as engine:
            fs = FileSystem(engine)
            paths = [e.path for e in fs.walk_files("data")]
            fake.calls.clear()
            for p in paths[:2]:
                await fs.stat(p)
            await asyncio.gather(*engine._stat_ahead.values())
            asked = [c.path for c in fake.calls if c.op == "size"]
            size = (await fs.stat(target)).size      # the store's verified object answers it
            return {fs.entry(p).oid for p in paths[:2]}, size, asked, [c.path for c in fake.calls if c.op == "size"]

    target = "data/f000500.bin"
    oid, size, index = run(verify_one(target))
    import sqlite3

    with sqlite3.connect(index) as db:    # the store holds it verified; its sizes row is gone
        db.execute("DELETE FROM sizes WHERE oid=?", (oid,))
        held = db.execute("SELECT COUNT(*) FROM chunks WHERE oid=?", (oid,)).fetchone()[0]
    assert held >= 1
    monkeypatch.setattr(Store, "object_size", counted)
    stats, shown, ahead, asked = run(walk())
    assert set(opened) - stats == {oid}, len(opened)     # the two stats look in the store themselves
    assert shown == size == _true_size(layout, oid)
    assert not any(p.endswith(oid[2:]) for p in asked)
    assert len(ahead) == len(set(ahead)) == 999


def test_request_slots_keep_their_order_reserve_and_hand_over_on_cancel():
    """`PriorityLimiter.slot` (every request takes one): background work never takes the
    reserved last slot; a demand request takes it at once even while background work waits
    for more (it used to queue behind them until some request ended: a lookup's own HEAD
    behind a stat-ahead); a waiting demand request goes before waiting background ones, and
    a waiter cancelled as it is handed a slot passes the slot on (none is lost)."""
    from sidecar.fetch.priority import DEMAND, PREFETCH, PriorityLimiter

    async def go():
        limiter = PriorityLimiter(4)          # reserve: 1
        order: list[str] = []
        release = asyncio.Event()

        async def hold(name, priority):
            async with limiter.slot(priority):
                order.append(name)
                await release.wait()

        held = [asyncio.ensure_future(hold(f"bg{i}", PREFETCH)) for i in range(3)]
        await asyncio.sleep(0)
        late_bg = asyncio.ensure_future(hold("bg3", PREFETCH))      # would take the reserve: waits
        await asyncio.sleep(0)
        demand = asyncio.ensure_future(hold("demand", DEMAND))      # takes the reserved slot at once
        await asyncio.sleep(0)
        first = list(order)
        waiter = asyncio.ensure_future(hold("cancelled", DEMAND))   # no slot left: waits, ahead of bg3
        await asyncio.sleep(0)
        held[0].cancel()                     # frees one slot: handed to the demand waiter...
        waiter.cancel()                      # ...which is cancelled in the same step: passes it on
        await asyncio.gather(held[0], waiter, return_exceptions=True)
        await asyncio.sleep(0)
        second = list(order)
        release.set()
        await asyncio.gather(*held[1:], late_bg, demand, return_exceptions=True)
        return first, second, limiter._free, limiter.waiting

    first, second, free, waiting = run(go())
    assert first == ["bg0", "bg1", "bg2", "demand"]
    assert "cancelled" not in second
    assert free == 4 and waiting == 0
    assert second[-1] == "bg3" or "bg3" not in second   # bg3 runs only once a slot beyond the reserve is free
