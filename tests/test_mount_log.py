"""The mount daemon's log (`CACHE_DIR/logs/mount.log`) is rotated: a long-lived mount that
logs an error per read (an object missing on the remote: EIO each time) keeps at most the
current file and LOG_BACKUPS old ones, each bounded, and every one of them is counted by the
cache's accounting (what `du` says). Real daemon (`python -m sidecar.fuse.daemon`), a real
DVC-identical layout with one object deleted from its local remote."""
from __future__ import annotations

import errno
import os
import subprocess

from dvclayout import write_layout
from mounting import daemon_pid, wait_until
from sidecar.config import load_config
from sidecar.fuse.daemon import LOG_BACKUPS, spawn
from sidecar.store import Store
from test_accounting import WAL_SLACK, du

BOUND = 4096     # small, so a hundred failing reads (~200 B of log each) rotate it several times


def test_the_mount_log_rotates_within_its_bound_and_the_cache_counts_it(tmp_path, mp):
    layout = write_layout(tmp_path / "l", folders=1, per_folder=5)
    victim = sorted(p for p in (layout.remote_root / "files" / "md5").rglob("*")
                    if p.is_file() and not p.name.endswith(".dir"))[0]
    victim.unlink()
    cache = tmp_path / "cache"
    config = load_config({"repo": str(layout.repo), "revision": "main", "cache_dir": str(cache)}, env={})
    log = cache / "logs" / "mount.log"
    assert spawn(config, mp, "", False, log, log_max_bytes=BOUND) == 0
    pid = daemon_pid(mp)
    try:
        failed = 0
        names = sorted(os.listdir(mp / "data"))
        for _ in range(120):
            for name in names:
                try:
                    (mp / "data" / name).read_bytes()
                except OSError as err:
                    assert err.errno == errno.EIO
                    failed += 1
        assert failed == 120       # the missing one, every time; each logged (~200 B a line)
        # what the process itself writes to stdout/stderr goes to the current file too
        assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        assert wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 15)   # our child: reaped here
    kept = sorted(p.name for p in log.parent.iterdir())
    assert kept == ["mount.log"] + [f"mount.log.{i}" for i in range(1, LOG_BACKUPS + 1)], kept
    for p in log.parent.iterdir():
        assert p.stat().st_size <= BOUND + 512, (p.name, p.stat().st_size)
    assert "is missing on remote" in log.read_text()     # the current file goes on receiving them

    store = Store(cache, budget=1 << 30, chunk_size=config.chunk_size)
    try:
        counted, truth = store.disk_usage(), du(cache)
    finally:
        store.close()
    assert abs(counted - truth) <= WAL_SLACK, (counted, truth)
    logs = du(log.parent)
    assert logs >= (LOG_BACKUPS + 1) * BOUND // 2     # the rotated files are there, and counted above
