"""Cross-process locks (flock) usable from asyncio."""
from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path


class FileLock:
    """An exclusive flock held across processes. Waiting polls (never a blocked thread): a
    waiter that is cancelled leaves nothing behind, and no thread pool can be exhausted by
    waiters while the holder needs a thread to finish."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False

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
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
