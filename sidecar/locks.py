"""Cross-process locks (flock) usable from asyncio."""
from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path


class FileLock:
    """An exclusive flock held across processes. Waiting polls (never a blocked thread): a
    waiter that is cancelled leaves nothing behind, and no thread pool can be exhausted by
    waiters while the holder needs a thread to finish.

    With `remove=True` the holder deletes the file before unlocking it, so per-chunk locks do
    not pile up. A waiter that opened the file before it was deleted would then lock an
    orphan: after taking the lock it checks that the path still names the file it locked,
    and tries again if not."""

    def __init__(self, path: Path, remove: bool = False):
        self.path = path
        self.remove = remove
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if self.remove:
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:   # the previous holder removed it after we opened it
                os.close(fd)
                return False
        self.fd = fd
        return True

    async def __aenter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        delay = 0.002
        while not self.try_acquire():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            if self.remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def remove_if_free(self) -> bool:
        """Delete a lock file nobody holds (left by a killed process); False if it is held."""
        try:
            if not self.try_acquire():
                return False
        except OSError:
            return False
        self.release()
        return True
