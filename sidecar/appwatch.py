"""Fallback mode (no native sidecars): notice when the pod's app containers have exited.

A regular sidecar container keeps a Job's pod running after the app is done. With the pod's
`shareProcessNamespace: true` (set by the webhook in fallback mode) the sidecar sees every
process of the pod. Each container has its own mount namespace, so the app's processes are
those in a mount namespace other than ours, except PID 1 (the pod's pause process). Once such
processes have been seen and then none is left for `settle` seconds, the app is done.

Limit: an app that starts and exits between two polls (`every`, 0.25 s) is never seen; the
sidecar then keeps running as before (documented in the chart's README).
"""
from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

ENV = "DDA_EXIT_WITH_APP"


OTHER_USER = -1   # a process we may not inspect


def _mnt_ns(pid: str) -> int | None:
    """The mount namespace's inode; OTHER_USER when the process belongs to another user (an
    unprivileged sidecar may not look into it); None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except PermissionError:
        return OTHER_USER
    except OSError:
        return None


def app_processes(proc: str = "/proc") -> list[int]:
    """PIDs of processes in another mount namespace than ours (other containers of the pod),
    PID 1 (the pause process) excepted. An unprivileged sidecar (csi mode) cannot read the
    namespace of another user's process; every process of its own container runs as its own
    user, so such a process is another container's."""
    mine = _mnt_ns("self")
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or entry == "1":
            continue
        ns = _mnt_ns(entry)
        if ns is not None and ns != mine:
            found.append(int(entry))
    return found


async def wait_apps_exited(every: float = 0.25, settle: float = 2.0) -> None:
    """Returns once the app containers' processes have appeared and then all exited (none for
    `settle` seconds). Never returns while no app process has been seen."""
    seen = False
    quiet_since: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        apps = await asyncio.to_thread(app_processes)
        now = loop.time()
        if apps:
            if not seen:
                log.info("app processes seen (%d); the sidecar will stop when they have exited", len(apps))
            seen, quiet_since = True, None
        elif seen:
            quiet_since = quiet_since if quiet_since is not None else now
            if now - quiet_since >= settle:
                return
        await asyncio.sleep(every)
