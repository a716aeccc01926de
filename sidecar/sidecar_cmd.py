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
from typing import Any, Callable

from .config import Config, load_config
from .errors import ConfigError, DDAError
from .redact import strip_userinfo

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400
DEFAULT_BIND = "0.0.0.0"
GRACE_SECONDS = 1.0        # in-flight FUSE requests may finish before the session is torn down
_TRUE = {"1", "true", "yes", "on"}


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    p = sub.add_parser("sidecar", help="container entrypoint: mount + /metrics, /healthz, /readyz, loader API",
                       description="Mount a revision and serve /metrics, /healthz, /readyz and the loader API "
                                   "(POST /v1/hints, POST /v1/batch-wait) on one port. Every flag has a DDA_ "
                                   "twin: DDA_REPO, DDA_REVISION, DDA_MOUNT, DDA_CACHE_DIR, DDA_CACHE_SIZE, "
                                   "DDA_PORT, DDA_BIND, DDA_SUBDIR, DDA_ALLOW_NON_EMPTY, ...")
    p.add_argument("--repo", help="repository URL (env DDA_REPO)")
    p.add_argument("--mount", help="mountpoint (env DDA_MOUNT)")
    p.add_argument("--port", help=f"HTTP port (env DDA_PORT, default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--bind", help=f"HTTP address (env DDA_BIND, default {DEFAULT_BIND})")
    p.add_argument("--subdir", help="mount only this directory of the repository (env DDA_SUBDIR)")
    p.add_argument("--allow-non-empty", action="store_true", default=None,
                   help="mount over a non-empty directory (env DDA_ALLOW_NON_EMPTY)")
    common(p)
    return p


def _options(ns: argparse.Namespace, env: "os._Environ[str] | dict[str, str]") -> dict[str, Any]:
    mount = ns.mount or env.get("DDA_MOUNT")
    if not mount:
        raise ConfigError("no mountpoint given (pass --mount or set DDA_MOUNT)")
    port_text = ns.port or env.get("DDA_PORT") or str(DEFAULT_PORT)
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"port: expected 0-65535, got {port_text!r}") from None
    allow = ns.allow_non_empty if ns.allow_non_empty is not None else \
        env.get("DDA_ALLOW_NON_EMPTY", "").strip().lower() in _TRUE
    return {"mountpoint": Path(mount), "port": port, "bind": ns.bind or env.get("DDA_BIND") or DEFAULT_BIND,
            "subdir": ns.subdir if ns.subdir is not None else env.get("DDA_SUBDIR", ""), "allow_non_empty": allow}


def run(ns: argparse.Namespace) -> int:
    opts = _options(ns, os.environ)
    flags: dict[str, Any] = {k: getattr(ns, k, None) for k in
                             ("revision", "cache_dir", "cache_size", "jobs", "deadline", "retries", "verify")}
    flags["repo"] = ns.repo
    config = load_config(flags, config_file=getattr(ns, "config_file", None))
    if not config.repo:
        raise ConfigError("no repository given (pass --repo or set DDA_REPO)")
    return asyncio.run(serve(config, **opts))


async def serve(config: Config, mountpoint: Path, port: int, bind: str, subdir: str = "",
                allow_non_empty: bool = False) -> int:
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
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass   # a stale mount (ENOTCONN) or a read-only parent: Mount.start says what is wrong
    mountpoint = mountpoint.resolve()
    health = Health(mountpoint)
    metrics = Metrics(strip_userinfo(config.repo or "")[0], config.revision or "", str(mountpoint),
                      mount_up=lambda: health.last_ok)
    server = LocalServer(metrics, health, bind, port)
    try:
        await server.start()
    except OSError as err:
        raise DDAError(f"cannot listen on {bind}:{port}: {err.strerror or err}") from None
    log.info("serving /metrics, /healthz, /readyz and the loader API on http://%s:%d", bind, server.port)

    mount: Mount | None = None
    stopper = asyncio.create_task(stop.wait())
    code = 0
    try:
        fetch_observers.set(metrics.observers())   # the engine's fetcher reports from its first request
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
        log.warning("mounted %s @ %s (%s) on %s; serving http://%s:%d", info.repo, info.revision, info.commit[:12],
                    mount.mountpoint, bind, server.port)
        await asyncio.wait({fuse, stopper}, return_when=asyncio.FIRST_COMPLETED)
        server.stopping = True
        health.mark_down("stopping")
        if stop.is_set():
            log.warning("unmounting %s", mount.mountpoint)
            pyfuse3.terminate()
            await end_session(fuse, GRACE_SECONDS)
        else:
            error = fuse.exception() if not fuse.cancelled() else None
            log.error("the FUSE session on %s ended unexpectedly (%s); exiting", mount.mountpoint,
                      f"{type(error).__name__}: {error}" if error else "unmounted from outside?")
            code = 1
    finally:
        server.stopping = True
        stopper.cancel()
        await server.close()
        if mount is not None:
            metrics.unbind()
            await mount.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return code


