"""The event loop never waits on the cache's SQLite index (issue 10, failing-today 2): with
another process holding the index's write lock, a mounted sidecar still answers getattr,
reads of cached files and /healthz. Checked by order, not by time: the lock holder lets go
only after it saw every answer (or after a long give-up, which fails the test)."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from mounting import mounted
from sidecar.sample import make_sample_repo
from sidecar_util import Sidecar

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
GIVE_UP = 25.0   # the holder releases by itself after this (far past any healthy answer)


def files_under(root: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _, names in os.walk(root) for n in names)


def test_cached_reads_getattr_and_healthz_answer_while_another_process_holds_the_index_lock(tmp_path, mp):
    repo, _ = make_sample_repo(tmp_path / "sample")
    cache = tmp_path / "cache"
    with Sidecar(str(repo), mp, cache) as sc:            # warm the cache
        expected = {p.relative_to(mp): p.read_bytes() for p in files_under(mp)}
        assert sc.stop(signal.SIGTERM)[0] == 0
    assert len(expected) > 10
    index = cache / "store-v2" / "index.sqlite"
    assert index.exists()

    with Sidecar(str(repo), mp, cache) as sc:            # a fresh mount: the kernel caches nothing yet
        # The old code wrote batched LRU times on the loop once 5 s had passed since it opened
        # the index; let that moment come so it would have to wait for the lock.
        time.sleep(6)
        locked, answered = threading.Event(), threading.Event()
        held: dict[str, bool] = {}

        def hold() -> None:
            db = sqlite3.connect(index, isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            locked.set()
            held["released_after_answers"] = answered.wait(GIVE_UP)
            db.execute("ROLLBACK")
            db.close()

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert locked.wait(10)
            stats = {rel: os.stat(mp / rel) for rel in expected}          # lookup + getattr by the daemon
            got = {rel: (mp / rel).read_bytes() for rel in expected}        # cached chunks
            health = sc.get("/healthz", timeout=GIVE_UP + 5)
            answered.set()
        finally:
            answered.set()
            holder.join(GIVE_UP + 10)
        assert held["released_after_answers"], "the mount or /healthz waited for the index lock"
        assert health == (200, b"ok\n")
        assert got == expected
        assert all(stats[rel].st_size == len(data) for rel, data in expected.items())
        assert sc.stop(signal.SIGTERM)[0] == 0
    assert not mounted(mp)
