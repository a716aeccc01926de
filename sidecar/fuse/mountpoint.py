"""Checks and repairs of a mountpoint before we mount on it, and unmounting."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

from ..errors import DDAError


class MountError(DDAError):
    pass


def mount_entry(path: Path, resolve: bool = True) -> tuple[str, str] | None:
    """(device "major:minor", filesystem type) of the mount exactly at `path` (the topmost one),
    from /proc/self/mountinfo; None when nothing is mounted there. The daemon serving `path`
    passes an already resolved path and resolve=False: resolving stats the mount itself,
    which would wait for an answer from the very process asking."""
    target = os.path.realpath(path) if resolve else os.fspath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                point = fields[4].encode().decode("unicode_escape")
                if point == target:
                    found = (fields[2], right.split()[0])
    except OSError:
        return None
    return found


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path`, from /proc/self/mountinfo."""
    entry = mount_entry(path)
    return entry[1] if entry else None


_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
PROBE_SECONDS = 3.0


def _statfs_errno(path: Path, timeout: float) -> int | None:
    """statfs() of `path` in a helper thread: the errno it failed with, 0 on success, None when
    it did not answer within `timeout` (a live daemon that is busy: not dead)."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(0)
        except OSError as err:
            result.append(err.errno or -1)

    thread = threading.Thread(target=probe, name="dda-statfs-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def is_stale(path: Path, timeout: float = PROBE_SECONDS) -> bool:
    """A FUSE mount at `path` whose daemon is gone. stat() alone cannot tell: after a read the
    kernel answers it from its attribute cache even when the connection is dead. So: the mount
    table says a FUSE file system is mounted here, and statfs, which the kernel always forwards
    to the daemon (never cached), fails with ENOTCONN/ECONNABORTED."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno in _DEAD
    entry = mount_entry(path)
    if entry is None or not entry[1].startswith("fuse"):
        return False
    return _statfs_errno(path, timeout) in _DEAD


def force_unmount(path: Path) -> None:
    """Lazy unmount: also frees a mount whose daemon died (ENOTCONN)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        proc = subprocess.run([tool, "-u", "-z", str(path)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
    proc = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(f"{path}: cannot unmount: {proc.stderr.strip() or 'unknown error'}")


def prepare(path: Path, allow_non_empty: bool = False) -> list[str]:
    """Make `path` ready for a mount; returns notes for the user (e.g. a recovered stale mount)."""
    notes = []
    if is_stale(path):
        force_unmount(path)
        notes.append(f"{path}: recovered a stale mount (its daemon had died)")
    if not path.exists():
        raise MountError(f"{path}: mountpoint does not exist (create the directory first)")
    if not path.is_dir():
        raise MountError(f"{path}: mountpoint is not a directory")
    fstype = mount_fstype(path)
    # A plain volume mounted there (a pod's emptyDir) is where a sidecar is meant to mount;
    # another FUSE file system is not.
    if fstype is not None and fstype.startswith("fuse") and os.path.ismount(path):
        raise MountError(f"{path}: already a mount point ({fstype}); run `dda unmount {path}` first")
    if not allow_non_empty and any(os.scandir(path)):
        raise MountError(f"{path}: mountpoint is not empty (its files would be hidden); "
                         f"use --allow-non-empty to mount anyway")
    return notes


def unmount(path: Path, lazy: bool = False) -> None:
    if not os.path.ismount(path) and not is_stale(path):
        raise MountError(f"{path}: nothing is mounted here")
    if lazy or is_stale(path):
        force_unmount(path)
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    args = [tool, "-u", str(path)] if tool else ["umount", str(path)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown error"
        if "busy" in detail.lower():
            raise MountError(f"{path}: still in use ({detail}); close the files or use --lazy")
        raise MountError(f"{path}: cannot unmount: {detail}")


CAP_SYS_ADMIN = 21


def _has_capability(bit: int, status: str = "/proc/self/status") -> bool | None:
    try:
        for line in open(status):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        return None
    return None


def why_mount_failed(mountpoint: Path, device: str = "/dev/fuse", uid: int | None = None,
                     has_sys_admin: bool | None = None) -> str:
    """Why the kernel refused our FUSE mount, as one actionable sentence. libfuse says only
    "fuse_session_mount failed", so look: the device, our right to open it, mount(2)'s
    capability (root mounts directly), fusermount3 (everyone else goes through it)."""
    uid = os.getuid() if uid is None else uid
    if not os.path.exists(device):
        return (f"{device} does not exist: give the container the FUSE device (docker run --device /dev/fuse; "
                f"in Kubernetes use the CSI driver or a privileged sidecar) and load the fuse module on the host")
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            return (f"permission denied opening {device} ({err.strerror}): run as root, or give this user "
                    f"read-write access to {device}; in a container add --device /dev/fuse (a device cgroup "
                    f"may forbid it)")
        return f"cannot open {device}: {err.strerror or err}"
    if uid == 0:
        if has_sys_admin is None:
            has_sys_admin = _has_capability(CAP_SYS_ADMIN)
        if has_sys_admin is False:
            return ("mounting is not permitted: this process lacks CAP_SYS_ADMIN (docker run --cap-add SYS_ADMIN, "
                    "possibly with --security-opt apparmor:unconfined; in Kubernetes use the CSI driver or a "
                    "privileged sidecar)")
        return ("mount(2) was refused although we run as root with CAP_SYS_ADMIN (a seccomp or AppArmor "
                f"profile?); check `dmesg` and that {mountpoint} is a directory we may mount on")
    helper = shutil.which("fusermount3")
    if helper is None:
        return "fusermount3 is not installed (it mounts for non-root users): install the fuse3 package"
    if not os.stat(helper).st_mode & 0o4000:
        return f"{helper} is not setuid root, so a non-root user cannot mount: reinstall fuse3 or run as root"
    return (f"fusermount3 refused the mount: check that this user owns {mountpoint} and, for other users to "
            f"read it, that /etc/fuse.conf has user_allow_other")
