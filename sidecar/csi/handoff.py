"""Handing a FUSE descriptor from the node plugin to the pod's sidecar over a unix socket
(SCM_RIGHTS), with a small JSON note about the volume. The plugin listens (it publishes the
volume before any container of the pod starts); the sidecar connects when it starts."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from ..errors import DDAError

MAX_NOTE = 64 * 1024


class HandoffError(DDAError):
    pass


@contextlib.contextmanager
def short_address(path: Path | str) -> Iterator[str]:
    """An address for `path` that fits AF_UNIX's 108 bytes: the kubelet's emptyDir paths
    (/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>/<file>) do not. The
    folder is opened (O_PATH) and named through /proc/self/fd for as long as the block runs."""
    path = Path(path)
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)


def listen(path: Path, uid: int, gid: int) -> socket.socket:
    """A listening, non-blocking unix socket at `path` that only `uid` (and root) may connect
    to. A stale socket file from an earlier publish is replaced."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with short_address(path) as address:
            sock.bind(address)
        os.chown(path, uid, gid)
        os.chmod(path, 0o600)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_once(sock: socket.socket, fd: int, note: dict[str, Any]) -> int:
    """Until a peer connects to `sock`; sends it `fd` and `note`. Returns the peer's pid. The
    caller closes `fd` and `sock` afterwards (its own copies)."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(sock)
    with conn:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        conn.setblocking(True)
        await asyncio.to_thread(socket.send_fds, conn, [json.dumps(note).encode()], [fd])
    return pid


def receive(path: str | Path, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """The sidecar's side: connect to `path` and receive (descriptor, note). Raises
    HandoffError with one line saying what failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            with short_address(path) as address:
                sock.connect(address)
            data, fds, _, _ = socket.recv_fds(sock, MAX_NOTE, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as err:
            raise HandoffError(f"cannot receive the FUSE descriptor from {path}: {err.strerror or err}") from None
    if not fds:
        raise HandoffError(f"{path}: the node plugin sent no FUSE descriptor")
    try:
        note = json.loads(data or b"{}")
        if not isinstance(note, dict):
            raise ValueError
    except ValueError:
        os.close(fds[0])
        raise HandoffError(f"{path}: unreadable note from the node plugin") from None
    return fds[0], note
