"""The store's async interface: nothing waits on the index while another process holds its
write lock (checked by order), changes made meanwhile land once it is free, and per-chunk
lock files do not outlive their download."""
from __future__ import annotations

import asyncio
import fcntl
import os
import random
import subprocess
import sys

from sidecar.store import AsyncStore, Store
from sidecar.store.chunks import BLOCK

CS = 4 * BLOCK
HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()          # released only when the test says so
db.execute("ROLLBACK")
print("released", flush=True)
"""


def test_reads_writes_and_lookups_do_not_wait_for_another_process_holding_the_index(tmp_path):
    data = {f"{i:032x}": random.Random(i).randbytes(CS - i) for i in range(4)}
    sync = Store(tmp_path, 1 << 30, CS)
    for oid, blob in data.items():
        sync.write(oid, 0, blob)
    sync.index.record_sizes({oid: len(b) for oid, b in data.items()})
    sync.close()
    new_oid, new_blob = "f" * 32, b"new chunk" * 1000

    async def go() -> None:
        store = await AsyncStore.open(tmp_path, 1 << 30, CS)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root / "index.sqlite")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
            # all of this answers while the lock is held (a wait would hang here: the holder
            # lets go only when told, after these returned)
            async with asyncio.timeout(60):
                for oid, blob in data.items():
                    assert await store.read(oid, 0) == blob
                    assert await store.read(oid, 0, 10, 20) == blob[10:20]
                assert await store.sizes(list(data)) == {oid: len(b) for oid, b in data.items()}
                await store.write(new_oid, 0, new_blob)           # the file now, the index later
                await store.record_sizes({new_oid: len(new_blob)})
                assert await store.read(new_oid, 0) == new_blob
                await asyncio.sleep(2.5)                          # the writer tries (and waits) meanwhile
                assert await store.read(new_oid, 0) == new_blob
                assert store.used_bytes() > 0
            assert holder.poll() is None, "the lock holder ended early"
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
        assert await asyncio.to_thread(holder.stdout.readline) == "released\n"
        holder.wait(10)
        await store.aclose()          # writes what was queued

    asyncio.run(go())
    again = Store(tmp_path, 1 << 30, CS)
    assert again.index.present(new_oid) == {0}
    assert again.index.size(new_oid) == len(new_blob)
    assert again.used_bytes() == sum(map(len, data.values())) + len(new_blob)
    again.close()


def test_lock_files_go_away_with_their_download_and_stale_ones_at_open(tmp_path):
    store = Store(tmp_path, 1 << 30, CS)
    locks = store.root / "locks"

    async def locked_twice() -> None:
        async with store.lock("ab" * 16, 3):
            assert (locks / f"{'ab' * 16}.3.lock").exists()
            # a second waiter on the same chunk gets it after the first let go
            waiter = asyncio.create_task(store.lock("ab" * 16, 3).__aenter__())
            await asyncio.sleep(0.05)
            assert not waiter.done()
        lock = await asyncio.wait_for(waiter, 5)
        lock.release()

    asyncio.run(locked_twice())
    assert list(locks.iterdir()) == []
    store.close()
    # left by a killed process: removed at the next open, unless someone still holds it
    (locks / "dead.0.lock").write_bytes(b"")
    held = locks / "held.0.lock"
    fd = os.open(held, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        Store(tmp_path, 1 << 30, CS).close()
        assert sorted(p.name for p in locks.iterdir()) == ["held.0.lock"]
    finally:
        os.close(fd)


def test_index_write_queue_is_bounded_with_back_pressure_on_store_threads(tmp_path, monkeypatch):
    """Issue 10 (bounded queues): while another process holds the index lock, a store thread
    queues at most INDEX_QUEUE_MAX index writes and then waits for room; the event loop never
    waits (it queues past the bound); every queued write lands once the lock is free."""
    import threading

    from sidecar.store import chunks
    monkeypatch.setattr(chunks, "INDEX_QUEUE_MAX", 4)
    store = Store(tmp_path, 1 << 30, CS)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root / "index.sqlite")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    done: list[int] = []
    try:
        assert holder.stdout.readline() == "locked\n"

        def producer() -> None:
            for i in range(10):
                store.index_later(store.index.record_sizes, {f"{i:032x}": i + 1})
                done.append(i)

        thread = threading.Thread(target=producer)
        thread.start()
        thread.join(3)
        # ordering, not timing: the writer is stuck on the lock, so the producer stopped at the bound
        assert thread.is_alive() and len(done) == 4, done

        async def from_the_loop() -> None:   # the loop queues past the bound without waiting
            store.index_later(store.index.record_sizes, {"e" * 32: 99})
        asyncio.run(asyncio.wait_for(from_the_loop(), 5))
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
    assert holder.stdout.readline() == "released\n"
    holder.wait(10)
    thread.join(60)
    assert not thread.is_alive() and done == list(range(10))
    assert store.index_settled(60)
    assert store.index.sizes([f"{i:032x}" for i in range(10)] + ["e" * 32]) == \
        {**{f"{i:032x}": i + 1 for i in range(10)}, "e" * 32: 99}
    store.close()
