"""Writing a repository's files under a destination folder without ever leaving it.

Every path is resolved one component at a time relative to a directory fd opened with
O_NOFOLLOW, so neither a hostile name ('..', absolute) nor a symlink left behind by an earlier
revision can redirect a write. Symlinks and files that stand where the new revision has a
directory are replaced, the way `git checkout` replaces them; they are never followed.
All functions here block (syscalls): call them from a worker thread.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from typing import Callable, TypeVar
from .errors import DDAError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(DDAError):
    """A repository path that would write outside the destination ('..', absolute, empty parts)."""


class DestinationNotAFolder(DDAError):
    """The destination of a folder's download (or a folder above it) is a file."""

    reason = "not_a_directory"


def split_safe(relpath: str) -> list[str]:
    """The components of a repository-relative path; UnsafePath unless each one is a plain name.

    Rejects absolute paths, '', '.', '..' and NUL bytes: a checkout never holds them. Any other
    byte is a plain name character on POSIX (a backslash included): each part is opened
    relative to its parent's fd, so no name can climb out.
    """
    parts = relpath.split("/")
    if relpath.startswith("/") or not relpath or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UnsafePath(f"{relpath!r}: unsafe path in the revision (would write outside the destination)")
    return parts


def _remove_at(name: str, dir_fd: int) -> None:
    """Remove whatever is at `name` (file, symlink or directory tree) without following links."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)   # symlink-attack resistant with dir_fd (fd-based walk)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass   # a concurrent writer removed it first


def _open_subdir(name: str, dir_fd: int) -> int:
    """Open (creating it if needed) the directory `name` inside `dir_fd`; a symlink or file there is replaced."""
    for _ in range(8):   # concurrent writers may race on the same directory; each step is idempotent
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            try:
                os.mkdir(name, 0o777, dir_fd=dir_fd)
            except FileExistsError:
                pass
        except OSError as err:
            # ELOOP: a symlink (O_NOFOLLOW); ENOTDIR: a regular file. git checkout replaces both.
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                _remove_at(name, dir_fd)
            else:
                raise
    raise OSError(errno.EAGAIN, f"could not create directory {name!r}")


def open_parent(root_fd: int, parts: list[str]) -> int:
    """A new directory fd (caller closes it) for the parent of `parts` under `root_fd`;
    directories are created as needed, symlinks and files in their way replaced."""
    fd = os.dup(root_fd)
    try:
        for name in parts[:-1]:
            sub = _open_subdir(name, fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir(root_fd: int, parts: list[str]) -> None:
    """Create (as needed) the directory `parts` under `root_fd`, each level as open_parent
    makes a file's folders (relative to its parent's fd; a symlink or file in the way replaced)."""
    os.close(open_parent(root_fd, [*parts, ""]))


def open_root(dest: str | os.PathLike[str]) -> int:
    """Create (if needed) and open the destination folder the user named; its own path may be a symlink.

    DestinationNotAFolder (one line naming `dest`, nothing written) when it, or a folder above
    it, is something else (`cp -r dir file`: 'cannot overwrite non-directory')."""
    try:
        os.makedirs(dest, exist_ok=True)
        return os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileExistsError, NotADirectoryError) as err:
        where = os.fspath(dest)
        if os.path.lexists(dest) and not os.path.isdir(dest):
            message = f"{where}: exists and is not a folder (name a folder or a new path)"
        else:
            message = f"{where}: cannot create this folder: a part of its path is not a folder ({err.filename})"
        raise DestinationNotAFolder(message, errno=errno.ENOTDIR) from None


# Temporary names are random and short: never a name of the tree (`a` and `.a.dda-part` both
# land), never too long (a 255-byte name's temp would be ENAMETOOLONG), and created with O_EXCL,
# so never an existing file or a planted link.
TEMP_SUFFIX = ".dda-part"
T = TypeVar("T")


def _temp_name() -> str:
    return f".{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _fresh(make: "Callable[[str], T]", what: str) -> tuple[str, T]:
    """`make(name)` with a fresh random temporary name until one is free (EEXIST: another)."""
    for _ in range(16):
        tmp = _temp_name()
        try:
            return tmp, make(tmp)
        except FileExistsError:
            continue   # 2**-64 per try: only a hostile tree could make this loop
    raise OSError(errno.EEXIST, f"could not create a temporary {what} in the destination")


def create_temp(dir_fd: int) -> tuple[str, int]:
    """A fresh temporary file inside `dir_fd` (random name, O_EXCL, O_NOFOLLOW); returns
    (its name, fd open for writing). The caller commits it onto the final name or discards it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return _fresh(lambda tmp: os.open(tmp, flags, 0o666, dir_fd=dir_fd), "file")


def discard(tmp: str, dir_fd: int) -> None:
    """Remove temporary `tmp` inside `dir_fd` if it is still there (cleanup: never raises OSError)."""
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except OSError:
        pass


def commit(tmp: str, name: str, dir_fd: int) -> None:
    """Atomically move `tmp` to `name`; a symlink there is replaced (rename never follows it), a directory removed."""
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as err:
        if err.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
        _remove_at(name, dir_fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def place_symlink(link: str, name: str, dir_fd: int) -> None:
    """Create the symlink `name` -> `link` inside `dir_fd`, replacing whatever is there (as a checkout does)."""
    tmp, _ = _fresh(lambda tmp: os.symlink(link, tmp, dir_fd=dir_fd), "link")
    try:
        commit(tmp, name, dir_fd)
    except BaseException:
        discard(tmp, dir_fd)
        raise
