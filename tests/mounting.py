"""Mount helpers for tests: an in-process mount served on its own thread, and the CLI daemon."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

DDA = str(Path(sys.executable).parent / "dda")


class MountThread:
    """`with MountThread(config, mp) as m:` — the mount is live inside the block; `m.run(coro)`
    runs a coroutine on the mount's loop (prefetch hints, counters)."""

    def __init__(self, config, mountpoint: Path, subdir: str = ""):
        self.config, self.mountpoint, self.subdir = config, Path(mountpoint), subdir
        self.loop: asyncio.AbstractEventLoop | None = None
        self.mount = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from sidecar.fuse.mount import Mount

        async def go() -> None:
            self.loop = asyncio.get_running_loop()
            try:
                self.mount = await Mount.start(self.config, self.mountpoint, self.subdir)
            except BaseException as err:
                self.error = err
                self._ready.set()
                return
            self._ready.set()
            await self.mount.serve(handle_signals=False)

        asyncio.run(go())

    def __enter__(self) -> "MountThread":
        self._thread.start()
        self._ready.wait(120)
        if self.error:
            raise self.error
        return self

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        if self.mount is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.mount.terminate)
        self._thread.join(30)
        assert not self._thread.is_alive(), "mount thread did not stop"


def mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def daemon_pid(mountpoint: Path) -> int:
    """The pid of the dda daemon serving `mountpoint` (from its log line or the process table)."""
    out = subprocess.run(["pgrep", "-f", f"dda mount"], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(mountpoint)) in cmd:
            return int(pid)
    raise AssertionError(f"no daemon for {mountpoint}")
