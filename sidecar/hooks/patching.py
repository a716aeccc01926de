"""Patching: the replacement functions (open, os.stat, os.listdir, ...) and the table of what
they replace. Each tries the original first; only a path under the root that is missing on
local disk (or a directory listing, to merge) asks the repository. The loop thread and paths
outside the root always get the original.

References to the patched functions that modules took before install_hooks() (`from builtins
import open as bltn_open` in tarfile, bz2 and tokenize, `from os import stat` in user code) are
patched too, module by module (see `_bound_references`); references kept elsewhere (in a class,
a dict, a closure) and C-level readers never see the hooks (use `dda mount`).
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import posixpath
import sys
import types
from typing import Any

from . import core
from .core import fsname
from .files import MergedScandir


class _Originals:
    """What the replacements call: the functions in place when the hooks were installed."""

    def __init__(self) -> None:
        self.capture()

    def capture(self) -> None:
        self.open = builtins.open
        self.stat = os.stat
        self.lstat = os.lstat
        self.readlink = os.readlink
        self.access = os.access
        self.listdir = os.listdir
        self.scandir = os.scandir
        self.mkdir = os.mkdir
        self.chdir = os.chdir
        self.listxattr = getattr(os, "listxattr", None)


orig = _Originals()
_saved: list[tuple[Any, str, Any]] = []     # (owner, attribute, original object) of the live patches


def _active() -> core.Hooks | None:
    h = core.current
    if h is None or h.in_loop_thread():
        return None
    return h


def _open(file: Any, mode: str = "r", buffering: int = -1, encoding: Any = None, errors: Any = None,
          newline: Any = None, closefd: bool = True, opener: Any = None) -> Any:
    h = core.current
    if h is None or isinstance(file, int) or opener is not None:
        return orig.open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    rel = h.rel(file)
    if rel is None:
        return orig.open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    try:
        return orig.open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        if any(c in mode for c in "wax+"):
            parent = posixpath.dirname(rel)
            if not h.materialize(parent, file):
                raise
            return orig.open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        result = h.open_remote(rel, file, mode, buffering, encoding, errors, newline)
        if result is None:
            raise
        return result


def _stat(path: Any, *, dir_fd: Any = None, follow_symlinks: bool = True) -> os.stat_result:
    h = core.current
    if h is None or dir_fd is not None:
        return orig.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    rel = h.rel(path)
    if rel is None:
        return orig.stat(path, follow_symlinks=follow_symlinks)
    try:
        return orig.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        result = h.remote_stat(rel, path, follow_symlinks)
        if result is None:
            raise
        return result


def _lstat(path: Any, *, dir_fd: Any = None) -> os.stat_result:
    h = core.current
    if h is None or dir_fd is not None:
        return orig.lstat(path, dir_fd=dir_fd)
    rel = h.rel(path)
    if rel is None:
        return orig.lstat(path)
    try:
        return orig.lstat(path)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        result = h.remote_stat(rel, path, False)
        if result is None:
            raise
        return result


def _readlink(path: Any, *, dir_fd: Any = None) -> Any:
    h = core.current
    if h is None or dir_fd is not None:
        return orig.readlink(path, dir_fd=dir_fd)
    rel = h.rel(path)
    if rel is None:
        return orig.readlink(path)
    try:
        return orig.readlink(path)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        target = h.remote_readlink(rel, path)
        if target is None:
            raise
        return os.fsencode(target) if isinstance(path, bytes) else target


def _access(path: Any, mode: int, *, dir_fd: Any = None, effective_ids: bool = False,
            follow_symlinks: bool = True) -> bool:
    result = orig.access(path, mode, dir_fd=dir_fd, effective_ids=effective_ids, follow_symlinks=follow_symlinks)
    h = _active()
    if result or h is None or dir_fd is not None:
        return result
    rel = h.rel(path)
    if rel is None:
        return result
    try:
        orig.lstat(path)
        return result                      # it exists locally: the local answer stands
    except FileNotFoundError:
        pass
    except OSError:
        return result
    try:
        found = h.lookup(rel, path) if follow_symlinks else h.lentry(rel, path)
    except OSError:
        return False
    if found is None or mode & os.W_OK:
        return False
    kind, entry = found
    if mode & os.X_OK and kind == "file" and not entry.mode & 0o111:
        return False
    return True


def _listdir(path: Any = None) -> list[Any]:
    h = core.current
    if h is None or isinstance(path, int):
        return orig.listdir(path)
    arg = "." if path is None else path
    rel = h.rel(arg)
    if rel is None or h.in_loop_thread():
        return orig.listdir(path)
    as_bytes = isinstance(os.fspath(arg), bytes)
    try:
        local = orig.listdir(path)
    except FileNotFoundError:
        found = h.lookup(rel, arg)
        if found is None:
            raise
        if found[0] != "dir":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), fsname(arg)) from None
        names = h.remote_names(h.dir_target(rel, arg), arg) or []
        return [os.fsencode(n) for n in names] if as_bytes else list(names)
    try:
        names = h.remote_names(rel, arg)
    except OSError as err:
        h.warn_once(err)
        return local
    if not names:
        return local
    seen = {os.fsdecode(n) for n in local} if as_bytes else set(local)
    extra = [n for n in names if n not in seen]
    if as_bytes:
        return local + [os.fsencode(n) for n in extra]
    return local + extra


def _scandir(path: Any = None) -> Any:
    h = core.current
    if h is None or isinstance(path, int):
        return orig.scandir(path) if path is not None else orig.scandir()
    arg = "." if path is None else path
    rel = h.rel(arg)
    if rel is None or h.in_loop_thread():
        return orig.scandir(path) if path is not None else orig.scandir()
    base = os.fspath(arg)
    try:
        local = orig.scandir(path) if path is not None else orig.scandir()
    except FileNotFoundError:
        found = h.lookup(rel, arg)
        if found is None:
            raise
        if found[0] != "dir":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), fsname(arg)) from None
        target = h.dir_target(rel, arg)
        return MergedScandir(None, h, target, base, h.remote_names(target, arg) or [])
    try:
        names = h.remote_names(rel, arg)
    except OSError as err:
        h.warn_once(err)
        return local
    if not names:
        return local
    return MergedScandir(local, h, rel, base, names)


def _mkdir(path: Any, mode: int = 0o777, *, dir_fd: Any = None) -> None:
    try:
        return orig.mkdir(path, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        h = _active()
        if h is None or dir_fd is not None:
            raise
        rel = h.rel(path)
        if rel is None or not rel or not h.materialize(posixpath.dirname(rel), path):
            raise
    return orig.mkdir(path, mode)


def _chdir(path: Any) -> None:
    try:
        return orig.chdir(path)
    except FileNotFoundError:
        h = _active()
        if h is None or isinstance(path, int):
            raise
        rel = h.rel(path)
        if rel is None:
            raise
        target = h.enter_dir(rel, path)
        if target is None:
            raise
    # The directory now exists on local disk (empty; listings merge the repository's entries),
    # so the real current directory is the checkout's: getcwd, abspath, Path.cwd/resolve,
    # relative paths in C code and in child processes all agree.
    return orig.chdir(target)


def _listxattr(path: Any = None, *, follow_symlinks: bool = True) -> list[str]:
    assert orig.listxattr is not None
    try:
        return orig.listxattr(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        h = _active()
        if h is None or path is None:
            raise
        rel = h.rel(path)
        if rel is None:
            raise
        found = h.lookup(rel, path) if follow_symlinks else h.lentry(rel, path)
        if found is None:
            raise
        return []


def _patch_table() -> list[tuple[Any, str, Any]]:
    table: list[tuple[Any, str, Any]] = [
        (builtins, "open", _open), (io, "open", _open),
        (os, "stat", _stat), (os, "lstat", _lstat), (os, "readlink", _readlink),
        (os, "access", _access),
        (os, "listdir", _listdir), (os, "scandir", _scandir), (os, "mkdir", _mkdir), (os, "chdir", _chdir),
    ]
    if orig.listxattr is not None:
        table.append((os, "listxattr", _listxattr))
    # Python 3.13+: glob's globber (used by glob and pathlib) binds os.lstat/os.scandir at import.
    glob_mod = sys.modules.get("glob")
    if glob_mod is None:
        import glob as glob_mod  # noqa: PLC0415
    globber = getattr(glob_mod, "_StringGlobber", None)
    if globber is not None:
        if "lstat" in vars(globber):
            table.append((globber, "lstat", staticmethod(_lstat)))
        if "scandir" in vars(globber):
            table.append((globber, "scandir", staticmethod(_scandir)))
    return table


# Modules whose globals are never rebound: the patched owners themselves, and this package
# (its `orig` must keep the originals).
_SKIP_MODULES = frozenset({"builtins", "io", "_io", "os", "posix", "nt", __name__})


def _bound_references(table: list[tuple[Any, str, Any]]) -> list[tuple[Any, str, Any]]:
    """Module-level names that hold an original the table replaces, bound at import time
    under any name: tarfile.bltn_open, bz2._builtin_open and tokenize._builtin_open (hence
    linecache) in Python 3.11-3.13, `from os import stat` in user code and libraries. A module
    imported after install_hooks() binds the replacement itself and needs nothing."""
    replacement_of = {id(original): (original, repl) for owner, name, repl in table
                      if not isinstance(owner, type)
                      for original in [getattr(owner, name)]}
    found = []
    for mod_name, module in list(sys.modules.items()):
        if (not isinstance(module, types.ModuleType) or mod_name in _SKIP_MODULES
                or mod_name.partition(".")[0] == "sidecar"):
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attr, value in list(namespace.items()):
            hit = replacement_of.get(id(value))
            if hit is not None and hit[0] is value and not (attr.startswith("__") and attr.endswith("__")):
                found.append((module, attr, hit[1]))
    return found


def _library_references() -> list[tuple[Any, Any, Any]]:
    """References kept in a library's own tables, for the libraries data pipelines use:
    numpy's DataSource (np.loadtxt, np.genfromtxt) keeps `open` in a dict made at import."""
    found: list[tuple[Any, Any, Any]] = []
    datasource = sys.modules.get("numpy.lib._datasource")
    openers = getattr(getattr(datasource, "_file_openers", None), "_file_openers", None)
    if isinstance(openers, dict) and openers.get(None) is orig.open:
        found.append((openers, None, _open))
    return found


def _get(owner: Any, name: Any) -> Any:
    if isinstance(owner, dict):
        return owner[name]
    return vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)


def _set(owner: Any, name: Any, value: Any) -> None:
    if isinstance(owner, dict):
        owner[name] = value
    else:
        setattr(owner, name, value)


def apply_patches() -> None:
    # The replacements call whatever was there before them (another library's patch included).
    orig.capture()
    table = _patch_table()
    for owner, name, replacement in table + _bound_references(table) + _library_references():
        _saved.append((owner, name, _get(owner, name)))
        _set(owner, name, replacement)


def restore_patches() -> None:
    while _saved:
        owner, name, original = _saved.pop()
        _set(owner, name, original)

