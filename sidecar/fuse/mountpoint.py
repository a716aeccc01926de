"""Checks and repairs of a mountpoint before we mount on it, and unmounting."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import DDAError


class MountError(DDAError):
    pass


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path`, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                point = fields[4].encode().decode("unicode_escape")
                if point == target:
                    found = right.split()[0]
    except OSError:
        return None
    return found


def is_stale(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError as err:
        return err.errno == errno.ENOTCONN


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
