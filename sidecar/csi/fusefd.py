"""The node plugin's privileged half of a FUSE mount: open /dev/fuse, mount(2) it at a target
path with the `fd=N` option, and unmount. The descriptor is then served by an unprivileged
process that received it (handoff.py); the kernel ties the mount to the descriptor, not to the
process that mounted it."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from ..errors import DDAError

FUSE_DEVICE = "/dev/fuse"
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class FuseMountError(DDAError):
    pass


def open_and_mount(target: Path, uid: int, gid: int, readonly: bool = True) -> int:
    """Open /dev/fuse and mount that connection at `target` (an existing directory) as
    `fuse.dda`, owned by `uid`:`gid` (the serving process's user; allow_other so every
    container's user may read). Returns the descriptor, close-on-exec; the caller hands it
    on and closes its copy. Raises FuseMountError naming the target and the errno."""
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.stat(target)
        options = f"fd={fd},rootmode={st.st_mode & 0o170000:o},user_id={uid},group_id={gid},allow_other"
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
        if _libc.mount(b"dda", os.fsencode(target), b"fuse.dda", flags, options.encode()) != 0:
            err = ctypes.get_errno()
            raise FuseMountError(f"{target}: cannot mount FUSE: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(target: Path) -> str:
    """Unmount `target`: a plain unmount, or a lazy one (MNT_DETACH) when it is busy. Works on
    a dead FUSE mount too (its server gone). Returns "unmounted", "detached" or "not mounted";
    raises FuseMountError on any other failure."""
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return "unmounted"
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return "not mounted"
    if err == errno.EBUSY and _libc.umount2(path, MNT_DETACH) == 0:
        return "detached"
    err = ctypes.get_errno() if err == errno.EBUSY else err
    raise FuseMountError(f"{target}: cannot unmount: {os.strerror(err)}")
