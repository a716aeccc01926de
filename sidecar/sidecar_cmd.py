"""`dda sidecar`: the container entrypoint the webhook injects.

Mounts a revision (as `dda mount`) and serves /metrics, /healthz, /readyz and the loader API
on one local port, on the mount's own event loop. Exit status is what Kubernetes needs to see:
0 after SIGTERM/SIGINT (unmounted, promptly, even with readers blocked on a cold read),
non-zero when the FUSE session ends by itself (unmounted from outside, session error) or the
mount cannot start.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import ConfigError, DDAError
from .redact import strip_userinfo
from .settings import Settings, add_arguments, flag_values, load_config

if TYPE_CHECKING:
    from .fuse.mount import Mount

log = logging.getLogger(__name__)

GRACE_SECONDS = 1.0        # in-flight FUSE requests may finish before the session is torn down


SIDECAR_FLAGS = ("repo", "mount", "port", "bind", "subdir", "allow_non_empty", "fuse_fd_socket")


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    p = sub.add_parser("sidecar", help="container entrypoint: mount + /metrics, /healthz, /readyz, loader API",
                       description="Mount a revision and serve /metrics, /healthz, /readyz and the loader API "
                                   "(POST /v1/hints, POST /v1/batch-wait) on one port. Every flag has a DDA_ "
                                   "twin (shown in brackets); see `python -m sidecar.settings --markdown`.")
    add_arguments(p, SIDECAR_FLAGS)            # names, env twins and defaults: sidecar.settings
    common(p)
    return p


async def _stop_when_apps_exit(stop: asyncio.Event) -> None:
    """Fallback mode: the app containers have exited, so the pod (a Job's) can complete."""
    from .appwatch import wait_apps_exited

    await wait_apps_exited()
    log.warning("the app containers have exited; stopping")
    stop.set()


def _env_with_secret(env: "os._Environ[str] | dict[str, str]") -> dict[str, str]:
    """The environment plus the documented credential keys of the Secret the webhook mounted
    (DDA_SECRET_DIR); a variable set explicitly (secretKeyRef) wins over the file."""
    from .secretfiles import SECRET_DIR_ENV, read_secret_dir

    merged = dict(env)
    for key, value in read_secret_dir(env.get(SECRET_DIR_ENV)).items():
        merged.setdefault(key, value)
    return merged


def run(ns: argparse.Namespace) -> int:
    config = load_config(flag_values(ns), env=_env_with_secret(os.environ),
                         config_file=getattr(ns, "config_file", None))
    if not config.mount and not config.fuse_fd_socket:
        raise ConfigError("no mountpoint given (pass --mount or set DDA_MOUNT)")
    if not config.repo:
        raise ConfigError("no repository given (pass --repo or set DDA_REPO)")
    return asyncio.run(serve(config, Path(config.mount) if config.mount else None, port=config.port,
                             bind=config.bind, subdir=config.subdir, allow_non_empty=config.allow_non_empty,
                             exit_with_app=config.exit_with_app, fd_socket=config.fuse_fd_socket))


async def _start_handed(config: Settings, fd_socket: str, subdir: str, seen_at: Path | None) -> "Mount":
    """CSI mode: collect the FUSE descriptor the node plugin offers on `fd_socket` and serve it.
    `seen_at`: where the app containers see the volume (hints name paths under it), if known."""
    from .csi.handoff import receive
    from .fuse.mount import Mount

    fd, note = await asyncio.to_thread(receive, fd_socket)
    try:
        label = str(seen_at or note.get("target_path") or fd_socket)
        log.info("received the FUSE descriptor of %s from the node plugin", label)
        return await Mount.start_fd(config, fd, subdir, label)
    except BaseException:
        os.close(fd)
        raise


async def serve(config: Settings, mountpoint: Path | None, port: int, bind: str, subdir: str = "",
                allow_non_empty: bool = False, exit_with_app: bool = False, fd_socket: str | None = None) -> int:
    """Mount (or, with `fd_socket`, serve the descriptor the CSI node plugin mounted) and serve
    HTTP until SIGTERM or the session ends. `mountpoint`: where the mount is seen, probed by
    /readyz; in CSI mode where the app containers see it (for hints; never probed), or None."""
    import pyfuse3

    from .fetch.scheduler import fetch_observers
    from .fuse.mount import Mount, end_session
    from .metrics import Metrics
    from .server import Health, LocalServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if mountpoint is not None and not fd_socket:
        try:
            mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass   # a stale mount (ENOTCONN) or a read-only parent: Mount.start says what is wrong
        mountpoint = mountpoint.resolve()
    # CSI mode: `mountpoint` is where the app containers see the volume (hinted paths name it);
    # this container does not mount it, so the live FUSE session is the health (it exits when
    # the session ends).
    health = Health(None if fd_socket else mountpoint)
    metrics = Metrics(strip_userinfo(config.repo or "")[0], config.revision or "",
                      str(mountpoint) if mountpoint is not None else str(fd_socket),
                      mount_up=lambda: health.last_ok)
    server = LocalServer(metrics, health, bind, port)
    try:
        await server.start()
    except OSError as err:
        raise DDAError(f"cannot listen on {bind}:{port}: {err.strerror or err}") from None
    log.info("serving /metrics, /healthz, /readyz and the loader API on http://%s:%d", bind, server.port)

    mount: Mount | None = None
    watcher: asyncio.Task[None] | None = None
    stopper = asyncio.create_task(stop.wait())
    code = 0
    try:
        fetch_observers.set(metrics.observers())   # the engine's fetcher reports from its first request
        if fd_socket:
            starting = asyncio.create_task(_start_handed(config, fd_socket, subdir, mountpoint))
        else:
            assert mountpoint is not None
            starting = asyncio.create_task(Mount.start(config, mountpoint, subdir, allow_non_empty))
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.warning("stopped before the mount was ready")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        mount = starting.result()
        info = mount.engine.info
        assert info is not None
        metrics.bind(mount)
        health.commit = info.commit
        server.mount = mount
        fuse = asyncio.create_task(pyfuse3.main())
        gone = asyncio.create_task(mount.wait_unmounted())
        if exit_with_app:
            watcher = asyncio.create_task(_stop_when_apps_exit(stop))
        log.warning("mounted %s @ %s (%s) on %s; serving http://%s:%d", info.repo, info.revision, info.commit[:12],
                    mount.mountpoint, bind, server.port)
        await asyncio.wait({fuse, stopper, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        server.stopping = True
        health.mark_down("stopping")
        if stop.is_set():
            log.warning("unmounting %s", mount.mountpoint)
            pyfuse3.terminate()
            mount.session_done = await end_session(fuse, GRACE_SECONDS)
        else:
            if not fuse.done():   # unmounted from outside while requests were in flight
                pyfuse3.terminate()
                mount.session_done = await end_session(fuse, GRACE_SECONDS)
            error = fuse.exception() if fuse.done() and not fuse.cancelled() else None
            log.error("the FUSE session on %s ended unexpectedly (%s); exiting", mount.mountpoint,
                      f"{type(error).__name__}: {error}" if error else "unmounted from outside?")
            code = 1
    finally:
        server.stopping = True
        stopper.cancel()
        if watcher is not None:
            watcher.cancel()
        await server.close()
        if mount is not None:
            metrics.unbind()
            await mount.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return code


