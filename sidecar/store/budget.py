"""One budget for a cache directory shared by several processes: the smallest of theirs.

Each process that opens the store holds a shared flock on a small file naming its budget
(`budgets/<pid>-<random>`). A file nobody holds belongs to a process that is gone and is
removed by whoever finds it. flock works across PID namespaces on one host, so pods that
share a hostPath cache see each other's budgets too.
"""
from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path


class SharedBudget:
    def __init__(self, folder: Path, budget: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.own = budget
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.path = folder / name
        # Locked before it appears under its name: a scan never takes it for a dead one.
        hidden = folder / f".{name}"
        self._fd = os.open(hidden, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(self._fd, str(budget).encode())
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        os.rename(hidden, self.path)

    def effective(self) -> int:
        """The smallest budget among the live processes sharing the directory (bytes)."""
        smallest = self.own
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return smallest
        for entry in entries:
            if entry.path == str(self.path) or entry.name.startswith("."):
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:     # held: a live process
                    try:
                        smallest = min(smallest, int(os.pread(fd, 32, 0) or b"0"))
                    except ValueError:
                        pass
                    continue
                os.unlink(entry.path)       # nobody holds it: its process is gone
            except OSError:
                pass
            finally:
                os.close(fd)
        return smallest

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1
