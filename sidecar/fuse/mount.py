"""Serving a mount: foreground or daemon, clean exit on SIGTERM/SIGINT/unmount."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Callable

import pyfuse3
import pyfuse3.asyncio

from ..config import Config
from ..engine import Engine
from ..fetch.prefetch import Prefetcher
from ..redact import redact
from . import pyfuse3_fix
from .mountpoint import MountError, force_unmount, mount_entry, prepare, why_mount_failed
from .memory import limit_malloc_arenas
from .ops import DdaOperations

log = logging.getLogger(__name__)
pyfuse3.asyncio.enable()
pyfuse3_fix.install()


def _options() -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=dda", "subtype=dda", "ro"}
    options.discard("default_permissions")
    if os.getuid() == 0 or _user_allow_other():
        options.add("allow_other")   # the training container runs as another user
    return options


def _user_allow_other() -> bool:
    try:
        return any(line.strip() == "user_allow_other" for line in open("/etc/fuse.conf"))
    except OSError:
        return False


class Mount:
    """One live mount: the engine, the prefetcher and the FUSE session."""

    def __init__(self, engine: Engine, ops: DdaOperations, prefetcher: Prefetcher, mountpoint: Path,
                 handed_fd: int | None = None):
        self.engine = engine
        self.ops = ops
        self.prefetcher = prefetcher
        self.mountpoint = mountpoint
        self.handed_fd = handed_fd   # CSI mode: the node plugin mounted; we only serve this descriptor
        self._stop = asyncio.Event()
        # "major:minor" of our FUSE connection; unknown in CSI mode (the mount is not ours to see)
        self.device = "" if handed_fd is not None else (mount_entry(mountpoint, resolve=False) or ("", ""))[0]
        self.session_done = True   # False only when main() outlived the cancel of its workers

    @classmethod
    async def start(cls, config: Config, mountpoint: Path, subdir: str = "",
                    allow_non_empty: bool = False) -> "Mount":
        mountpoint = mountpoint.resolve()
        for note in prepare(mountpoint, allow_non_empty):
            log.warning("%s", note)
        limit_malloc_arenas()       # before the engine's threads start (fuse/memory.py)
        engine = await Engine.open(config)
        for problem in engine.problems:   # each once, in the mount's log
            log.error("%s", redact(problem.message()))
        try:
            prefetcher = Prefetcher(engine)
            ops = DdaOperations(engine, prefetcher, subdir)
            engine.preload_size_indexes()   # sizes with the names: a walk needs no lookup per file
            await engine.preloaded()        # bounded; else the first listing goes out without them
            try:
                pyfuse3.init(ops, str(mountpoint), _options())
            except RuntimeError as err:
                raise MountError(f"{mountpoint}: cannot mount: {why_mount_failed(mountpoint)}") from None
        except BaseException:
            await engine.aclose()
            raise
        return cls(engine, ops, prefetcher, mountpoint)

    @classmethod
    async def start_fd(cls, config: Config, fd: int, subdir: str = "", label: str = "") -> "Mount":
        """Serve a FUSE connection someone else mounted (the CSI node plugin handed us `fd`,
        an open /dev/fuse): libfuse >= 3.3 takes /dev/fd/N as the mountpoint and mounts
        nothing, so this needs no privileges. `label` names the mount in logs and metrics."""
        limit_malloc_arenas()
        engine = await Engine.open(config)
        for problem in engine.problems:
            log.error("%s", redact(problem.message()))
        try:
            prefetcher = Prefetcher(engine)
            ops = DdaOperations(engine, prefetcher, subdir)
            engine.preload_size_indexes()   # sizes with the names: a walk needs no lookup per file
            await engine.preloaded()
            options = (set(pyfuse3.default_options) | {"fsname=dda", "subtype=dda", "ro"}) - {"default_permissions"}
            try:
                pyfuse3.init(ops, f"/dev/fd/{fd}", options)
            except RuntimeError:
                raise MountError(f"cannot serve the FUSE descriptor {fd} handed over by the node plugin") from None
        except BaseException:
            await engine.aclose()
            raise
        return cls(engine, ops, prefetcher, Path(label or f"/dev/fd/{fd}"), handed_fd=fd)

    async def serve(self, handle_signals: bool = True) -> None:
        """Until unmounted or terminated; always leaves the mountpoint clean. Returns
        promptly on terminate() even while readers wait on a remote that never answers."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.terminate)
        fuse = asyncio.create_task(pyfuse3.main())
        stopper = asyncio.create_task(self._stop.wait())
        gone = asyncio.create_task(self.wait_unmounted())
        try:
            await asyncio.wait({fuse, stopper, gone}, return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set():
                log.info("unmounting %s", self.mountpoint)
                pyfuse3.terminate()
                self.session_done = await end_session(fuse)
            elif not fuse.done():
                # Unmounted from outside (`dda unmount`) while requests were still being served
                # (a directory being sized, a fetch): main() would wait for them; end it now.
                log.warning("%s was unmounted; ending the FUSE session", self.mountpoint)
                pyfuse3.terminate()
                self.session_done = await end_session(fuse)
            else:
                fuse.result()   # unmounted from outside (fusermount3 -u): a normal end; errors raise
        finally:
            stopper.cancel()
            gone.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.close()

    def terminate(self) -> None:
        self._stop.set()

    async def wait_unmounted(self, every: float = 0.25) -> None:
        """Returns once our FUSE connection is no longer mounted at the mountpoint (the mount
        table no longer lists it there): `dda unmount`, fusermount3 -u, the kubelet."""
        if not self.device:
            await asyncio.Event().wait()   # unknown device: rely on main() returning
        while True:
            entry = mount_entry(self.mountpoint, resolve=False)   # /proc only: never blocks
            if entry is None or entry[0] != self.device:
                return
            await asyncio.sleep(every)

    async def close(self) -> None:
        if self.session_done:
            try:
                pyfuse3.close(unmount=True)
            except Exception as err:  # the kernel may already have dropped it (fusermount3 -u)
                log.debug("close: %s", err)
        else:
            # Workers still hold the session: freeing it under them would crash libfuse. Detach
            # the mount instead; the process exits right after and the kernel cleans up. In CSI
            # mode the mount is the node plugin's: exiting closes our descriptor, which is enough.
            try:
                if self.handed_fd is not None:
                    raise MountError("not ours to unmount")
                force_unmount(self.mountpoint)
            except MountError as err:
                log.debug("close: %s", err)
        await self.prefetcher.aclose()
        await self.engine.aclose(drain_seconds=2.0)   # SIGTERM must end us promptly


GRACE_SECONDS = 1.0   # in-flight FUSE requests may finish before the session is torn down


def _workers() -> list["asyncio.Task[object]"]:
    # pyfuse3 tags its worker tasks with a `name` attribute ("pyfuse-NN").
    return [t for t in asyncio.all_tasks() if str(getattr(t, "name", "") or "").startswith("pyfuse-")]


async def end_session(fuse: "asyncio.Task[None]", grace: float = GRACE_SECONDS, patience: float = 5.0) -> bool:
    """After pyfuse3.terminate(): until pyfuse3.main() has returned. main() returns only when
    every worker has finished its request; a worker awaiting a read from a remote that never
    answers would hold it until the deadline. Give in-flight requests `grace` seconds, then
    cancel the workers (their readers get an error when the session closes). Returns whether
    main() has finished, i.e. whether the session may be freed (pyfuse3.close): never free
    it while a worker may still touch it."""
    try:
        await asyncio.wait_for(asyncio.shield(fuse), grace)
        return True
    except TimeoutError:
        pass
    except Exception as err:   # the session failed as we stopped it: we are leaving anyway
        log.debug("FUSE main loop: %s", err)
        return fuse.done()
    log.warning("cancelling %d FUSE request(s) still waiting (a remote that does not answer?)", len(_workers()))
    loop = asyncio.get_running_loop()
    end = loop.time() + patience
    while not fuse.done() and loop.time() < end:
        for task in _workers():   # workers may start others while we cancel: every round
            task.cancel()
        await asyncio.wait({fuse}, timeout=0.1)
    if not fuse.done():
        log.error("the FUSE session did not end within %.0fs of cancelling its requests", patience)
        return False
    if not fuse.cancelled() and fuse.exception() is not None:
        log.debug("FUSE main loop after cancelling workers: %r", fuse.exception())
    return True


async def run_foreground(config: Config, mountpoint: Path, subdir: str, allow_non_empty: bool,
                         on_ready: Callable[[Mount], None] | None = None) -> int:
    mount = await Mount.start(config, mountpoint, subdir, allow_non_empty)
    info = mount.engine.info
    assert info is not None
    log.warning("mounted %s @ %s (%s) on %s", info.repo, info.revision, info.commit[:12], mount.mountpoint)
    if on_ready:
        on_ready(mount)
    await mount.serve()
    return 0


def run_daemon(config: Config, mountpoint: Path, subdir: str, allow_non_empty: bool, log_file: Path) -> int:
    """Start a daemon that mounts and serves; returns once the mount is live (or reports why it
    is not). Configuration and credentials travel through a pipe, never on a command line or in
    the daemon's environment (see daemon.py)."""
    from .daemon import spawn

    return spawn(config, mountpoint, subdir, allow_non_empty, log_file)
