"""In-process streaming: `install_hooks()` for notebooks and scripts that cannot mount.

After `install_hooks()`, paths under the hooks' root that are missing on local disk are served
by the streaming engine (same cache as `dda` and `dda mount`): `open`/`io.open` in read modes,
`os.stat`/`lstat`/`access`/`listdir`/`scandir`/`mkdir`/`listxattr`, and through them `os.walk`,
`os.path.*`, `glob`, `shutil` and `pathlib`. Local files always win; writes go to local disk.

Design:
- The engine is async; it runs on a private event loop in a daemon thread and is called
  synchronously (`asyncio.run_coroutine_threadsafe`). The loop thread itself (and the cache
  directory) always get the original functions, so the engine can never call into itself.
- Fast path: a path that is an int (fd) or that does not lie under the root goes straight to
  the original function; under the root, the original is tried first and only ENOENT (or a
  directory listing, to merge) asks the engine.
- fork: `os.register_at_fork` gives a child a fresh loop and engine (opened lazily on first use,
  pinned to the parent's commit). spawn/forkserver: `install_hooks` exports DDA_HOOKS (JSON of
  its arguments); a `.pth` line (see `PTH_LINE`, `install_autoload()`) re-installs the hooks at
  interpreter start when that variable is set.
- This module imports only the standard library at import time; the engine is imported on
  first use (the `.pth` line runs at every interpreter start).

Limits: C-level readers (OpenCV, TensorFlow file ops, anything that opens paths in C or needs
`fileno()`/mmap) bypass Python and see only local files: use `dda mount` for them. Functions
bound before `install_hooks()` under another name (`from os import stat`) are not patched.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import posixpath
import re
import stat as _st
import sys
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from types import GenericAlias
from typing import Any, Iterable

ENV_VAR = "DDA_HOOKS"
PTH_NAME = "dda_sidecar_hooks.pth"
# One line for site-packages/*.pth: re-installs the hooks in spawn/forkserver children. It
# costs one dict lookup when DDA_HOOKS is unset.
PTH_LINE = ('import os; os.environ.get("DDA_HOOKS") and '
            '__import__("sidecar.hooks", fromlist=["_"])._reinstall_from_env()\n')

READ_BLOCK = 1024 * 1024          # BufferedReader size: each engine call moves at least 1 MiB
_READALL_PIECE = 64 * 1024 * 1024
_FAKE_DEV = 0x0DDA0000            # st_dev of remote entries (no real device has it)
_RETRY_OPEN_AFTER = 5.0           # seconds before retrying a failed engine open

__all__ = ["install_hooks", "uninstall_hooks", "hooks_installed", "HooksInfo", "install_autoload",
           "remove_autoload", "PTH_LINE", "refresh_hooks", "latest_commit"]


# ------------------------------------------------------------------------------------------------
# originals

_ORIG_OPEN = builtins.open
_ORIG_IO_OPEN = io.open
_ORIG_STAT = os.stat
_ORIG_LSTAT = os.lstat
_ORIG_ACCESS = os.access
_ORIG_LISTDIR = os.listdir
_ORIG_SCANDIR = os.scandir
_ORIG_MKDIR = os.mkdir
_ORIG_LISTXATTR = getattr(os, "listxattr", None)

_retired_loops: list[Any] = []
_saved: list[tuple[Any, str, Any]] = []     # (owner, attribute, original object) of the live patches
_state: "_Hooks | None" = None
_install_lock = threading.RLock()


@dataclass(frozen=True)
class HooksInfo:
    root: str
    repo: str
    revision: str | None
    commit: str | None
    files: int


# ------------------------------------------------------------------------------------------------
# exclusion globs

def _glob_regex(pattern: str) -> re.Pattern[str]:
    """gitignore-like: `**` crosses '/', `*` and `?` do not; a pattern without '/' matches a
    name at any depth; a match on a directory excludes everything below it."""
    pat = pattern.strip().lstrip("/")
    anchored = "/" in pat.rstrip("/")
    pat = pat.rstrip("/")
    out, i = [], 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pat.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pat.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pat[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    body = "".join(out)
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(f"^{prefix}{body}(?:/.*)?$", re.DOTALL)


def _check_exclude(exclude: object) -> list[str]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, bytes)):
        raise TypeError(f"install_hooks(exclude=...): expected a list of glob patterns such as "
                        f"[{exclude!r}], got a single string")
    patterns = list(exclude)  # type: ignore[call-overload]
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"install_hooks(exclude=...): each pattern must be a str, got {p!r}")
    return [p for p in patterns if p.strip()]


# ------------------------------------------------------------------------------------------------
# the engine, on its own loop thread

class _Runtime:
    def __init__(self, config: Any):
        import asyncio

        from .engine import Engine

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dda-hooks-loop", daemon=True)
        self.thread.start()
        self.ready.wait()
        try:
            self.engine = self.call(Engine.open(config))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    def _run(self) -> None:
        self.ident = threading.get_ident()
        self._asyncio.set_event_loop(self.loop)
        self.ready.set()
        self.loop.run_forever()

    def pause(self) -> bool:
        """Before fork: stop the loop thread so that the child cannot inherit a lock it held
        (sqlite, ssl, malloc...). Pending calls wait and go on after resume()."""
        if threading.get_ident() == self.ident or not self.thread.is_alive():
            return False
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        return not self.thread.is_alive()

    def resume(self) -> None:
        self.ready.clear()
        self.thread = threading.Thread(target=self._run, name="dda-hooks-loop", daemon=True)
        self.thread.start()
        self.ready.wait()

    def call(self, coro: Any) -> Any:
        future = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        async def shut() -> None:
            await self.engine.aclose()
            await self._asyncio.sleep(0.05)     # let subprocess exits and transports settle

        try:
            future = self._asyncio.run_coroutine_threadsafe(shut(), self.loop)
            future.result(timeout)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            # Never closed nor collected: asyncio subprocess transports left behind by the engine
            # close themselves on the loop when they are collected, which fails on a closed loop.
            _retired_loops.append(self.loop)


# ------------------------------------------------------------------------------------------------
# the hooks' state

class _Hooks:
    def __init__(self, *, root: str, config: Any, exclude: list[str], env_payload: dict[str, Any]):
        self.root = root
        self.root_slash = root if root.endswith("/") else root + "/"
        real = os.path.realpath(root)
        self.alt_root = real if real != root else None
        self.config = config
        self.exclude = exclude
        self._patterns = [_glob_regex(p) for p in exclude]
        self.env_payload = env_payload
        self.cache_prefix = os.path.abspath(str(config.cache_dir)).rstrip("/") + "/"
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.runtime: _Runtime | None = None
        self.open_error: tuple[float, BaseException] | None = None
        self.orphans: list[Any] = []       # engines of a parent process, kept (never closed) after fork
        self._sized_dirs: set[str] = set()
        self._warned = False

    # -- paths ---------------------------------------------------------------------------------
    def rel(self, path: Any) -> str | None:
        """The repository-relative path of `path`, or None when the hooks must not touch it."""
        if isinstance(path, int):
            return None
        try:
            p = os.fspath(path)
        except TypeError:
            return None
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not p.startswith("/"):
            try:
                p = posixpath.join(os.getcwd(), p)
            except OSError:
                return None
        elif not p.startswith(self.root) and "/." not in p and "//" not in p and self.alt_root is None:
            return None      # the cheap common case: an absolute path elsewhere
        p = posixpath.normpath(p)
        if p.startswith(self.root_slash):
            rel = p[len(self.root_slash):]
        elif p == self.root:
            rel = ""
        elif self.alt_root and (p == self.alt_root or p.startswith(self.alt_root + "/")):
            rel = p[len(self.alt_root) + 1:]
        else:
            return None
        if rel and (p + "/").startswith(self.cache_prefix):
            return None
        if rel == ".git" or rel.startswith(".git/"):
            return None
        if self._patterns and rel and any(r.match(rel) for r in self._patterns):
            return None
        return rel

    def excluded(self, rel: str) -> bool:
        return bool(self._patterns) and any(r.match(rel) for r in self._patterns)

    # -- the engine ------------------------------------------------------------------------------
    def in_loop_thread(self) -> bool:
        rt = self.runtime
        return rt is not None and threading.get_ident() == getattr(rt, "ident", None)

    def runtime_or_raise(self, path: Any) -> _Runtime:
        rt = self.runtime
        if rt is not None and self.pid == os.getpid():
            return rt
        with self.lock:
            if self.pid != os.getpid():
                self._after_fork()
            if self.runtime is not None:
                return self.runtime
            if self.open_error and time.monotonic() - self.open_error[0] < _RETRY_OPEN_AFTER:
                err = self.open_error[1]
            else:
                try:
                    self.runtime = _Runtime(self.config)
                    self.open_error = None
                    return self.runtime
                except Exception as exc:  # noqa: BLE001
                    self.open_error = (time.monotonic(), exc)
                    err = exc
        raise OSError(errno.EIO, f"dda: cannot open repository {_display(self.config.repo)}: {err}",
                      _fsname(path)) from None

    def _after_fork(self) -> None:
        if self.runtime is not None:
            self.orphans.append(self.runtime)     # the parent's loop thread does not exist here
        self.runtime = None
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.open_error = None

    def engine(self, path: Any) -> Any:
        return self.runtime_or_raise(path).engine

    def lookup(self, rel: str, path: Any) -> tuple[str, Any] | None:
        """('file', Entry) / ('dir', None) / None for a repository path (symlinks followed
        inside the tree)."""
        engine = self.engine(path)
        tree = engine.tree
        for _ in range(40):
            entry = tree.files.get(rel)
            if entry is None:
                return ("dir", None) if rel in tree.dirs else None
            if not entry.is_symlink:
                return "file", entry
            target = os.fsdecode(self.call(engine.read(rel, 0, 4096), path))
            if target.startswith("/"):
                return None
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
            if rel == "..." or rel.startswith("../") or rel == "..":
                return None
            rel = "" if rel == "." else rel
            if self.excluded(rel):
                return None
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", _fsname(path))

    def lentry(self, rel: str, path: Any) -> tuple[str, Any] | None:
        tree = self.engine(path).tree
        entry = tree.files.get(rel)
        if entry is None:
            return ("dir", None) if rel in tree.dirs else None
        return "file", entry

    def call(self, coro: Any, path: Any) -> Any:
        from .errors import DDAError, NotFound

        try:
            return self.runtime_or_raise(path).call(coro)
        except NotFound as err:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), _fsname(path)) from err
        except DDAError as err:
            raise OSError(errno.EIO, f"dda: {err}", _fsname(path)) from None

    def sized(self, entry: Any, path: Any) -> Any:
        if entry.size is not None:
            return entry
        return self.call(self.engine(path).stat(entry.path), path)

    def size_directory(self, rel_dir: str, path: Any) -> None:
        """Learn the sizes of a directory's files at once (one LIST per folder or bounded HEADs)."""
        if rel_dir in self._sized_dirs:
            return
        engine = self.engine(path)
        tree = engine.tree
        prefix = rel_dir + "/" if rel_dir else ""
        unsized = [tree.files[prefix + n] for n in tree.dirs.get(rel_dir, [])
                   if prefix + n in tree.files and tree.files[prefix + n].size is None]
        if unsized:
            self.call(engine.stat_many(unsized), path)
        self._sized_dirs.add(rel_dir)

    def remote_names(self, rel: str, path: Any) -> list[str] | None:
        names = self.engine(path).tree.dirs.get(rel)
        if names is None:
            return None
        if self._patterns:
            prefix = rel + "/" if rel else ""
            names = [n for n in names if not self.excluded(prefix + n)]
        if rel == "":
            names = [n for n in names if n != ".git"]
        return names

    def warn_once(self, err: BaseException) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"dda hooks: listing shows local entries only: {err}", RuntimeWarning, stacklevel=3)

    # -- results ---------------------------------------------------------------------------------
    def stat_result(self, kind: str, entry: Any, rel: str, path: Any) -> os.stat_result:
        info = self.engine(path).info
        mtime = int(info.commit_time) if info else 0
        if kind == "dir":
            mode, size, nlink = _st.S_IFDIR | 0o755, 4096, 2
        elif entry.is_symlink:
            mode, size, nlink = entry.mode, len(self.call(self.engine(path).read(rel, 0, 4096), path)), 1
        else:
            entry = self.sized(entry, path)
            mode = entry.mode if _st.S_ISREG(entry.mode) else _st.S_IFREG | 0o644
            size, nlink = entry.size, 1
        ino = _inode(rel)
        ns = mtime * 10**9
        return os.stat_result((mode, ino, _FAKE_DEV, nlink, os.getuid(), os.getgid(), size, mtime, mtime, mtime),
                              {"st_atime": float(mtime), "st_mtime": float(mtime), "st_ctime": float(mtime),
                               "st_atime_ns": ns, "st_mtime_ns": ns, "st_ctime_ns": ns,
                               "st_blksize": 128 * 1024, "st_blocks": -(-size // 512), "st_rdev": 0})

    def remote_stat(self, rel: str, path: Any, follow: bool) -> os.stat_result | None:
        found = self.lookup(rel, path) if follow else self.lentry(rel, path)
        if found is None:
            return None
        kind, entry = found
        return self.stat_result(kind, entry, rel if entry is None else entry.path, path)

    def open_remote(self, rel: str, file: Any, mode: str, buffering: int, encoding: Any, errors: Any,
                    newline: Any) -> Any:
        found = self.lookup(rel, file)
        if found is None:
            return None
        kind, entry = found
        name = os.fspath(file)
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), _fsname(file))
        entry = self.sized(entry, file)
        raw = _RemoteFile(self, entry.path, entry.size, name, file)
        binary = "b" in mode
        if buffering == 0:
            if not binary:
                raise ValueError("can't have unbuffered text I/O")
            return raw
        size = buffering if buffering > 1 else READ_BLOCK
        buffered = io.BufferedReader(raw, size)
        if binary:
            return buffered
        text = io.TextIOWrapper(buffered, io.text_encoding(encoding), errors, newline,
                                line_buffering=buffering == 1)
        text.mode = mode  # type: ignore[misc]
        return text

    def materialize(self, rel_dir: str, path: Any) -> bool:
        """Create on local disk the directories of `rel_dir` that exist only in the repository,
        so that writes below a streamed directory land on local disk. False: not a remote dir."""
        found = self.lookup(rel_dir, path)
        if found is None or found[0] != "dir":
            return False
        current = self.root
        parts = [p for p in rel_dir.split("/") if p]
        for part in [None, *parts]:
            if part is not None:
                current = current.rstrip("/") + "/" + part
            try:
                _ORIG_MKDIR(current)
            except FileExistsError:
                pass
        return True


def _inode(rel: str) -> int:
    return (zlib.crc32(rel.encode("utf-8", "surrogateescape")) << 20) ^ len(rel) | 1 << 40


def _fsname(path: Any) -> Any:
    try:
        return os.fspath(path)
    except TypeError:
        return path


def _display(repo: Any) -> str:
    try:
        from .redact import strip_userinfo
        return strip_userinfo(str(repo))[0]
    except Exception:  # noqa: BLE001
        return "<repository>"


# ------------------------------------------------------------------------------------------------
# the file object

class _RemoteFile(io.RawIOBase):
    """Raw, seekable, read-only file: each read is a ranged read through the engine."""

    def __init__(self, hooks: _Hooks, rel: str, size: int, name: Any, original: Any):
        super().__init__()
        self._hooks = hooks
        self._rel = rel
        self._size = size
        self._pos = 0
        self._orig_name = original
        self.name = name
        self.mode = "rb"

    def __repr__(self) -> str:
        return f"<dda streamed file name={self.name!r} size={self._size}>"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation(
            f"{self.name}: streamed by dda install_hooks() and has no file descriptor "
            f"(C-level readers need `dda mount`)")

    def isatty(self) -> bool:
        return False

    def _read(self, offset: int, length: int) -> bytes:
        hooks = self._hooks
        return hooks.call(hooks.engine(self._orig_name).read(self._rel, offset, length), self._orig_name)

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._read(self._pos, want)
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        pieces = []
        while self._pos < self._size:
            data = self._read(self._pos, min(_READALL_PIECE, self._size - self._pos))
            if not data:
                break
            pieces.append(data)
            self._pos += len(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self.name)
        self._pos = pos
        return pos

    def tell(self) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return self._pos

    def truncate(self, size: Any = None) -> int:
        raise io.UnsupportedOperation("truncate")


# ------------------------------------------------------------------------------------------------
# os.scandir results

class _RemoteDirEntry:
    """Behaves like os.DirEntry for an entry that exists only in the repository."""

    __slots__ = ("name", "path", "_hooks", "_rel", "_kind", "_entry", "_stat", "_dir")
    __class_getitem__ = classmethod(GenericAlias)

    def __init__(self, hooks: _Hooks, name: Any, path: Any, rel: str, rel_dir: str, kind: str, entry: Any):
        self.name = name
        self.path = path
        self._hooks = hooks
        self._rel = rel
        self._dir = rel_dir
        self._kind = kind
        self._entry = entry
        self._stat: dict[bool, os.stat_result] = {}

    def __fspath__(self) -> Any:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"

    def _followed(self) -> tuple[str, Any] | None:
        if self._entry is not None and self._entry.is_symlink:
            return self._hooks.lookup(self._rel, self.path)
        return self._kind, self._entry

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        if not follow_symlinks or self._entry is None or not self._entry.is_symlink:
            return self._kind == "dir"
        found = self._followed()
        return found is not None and found[0] == "dir"

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        if not follow_symlinks or self._entry is None or not self._entry.is_symlink:
            return self._kind == "file" and not (self._entry and self._entry.is_symlink)
        found = self._followed()
        return found is not None and found[0] == "file"

    def is_symlink(self) -> bool:
        return self._entry is not None and self._entry.is_symlink

    def is_junction(self) -> bool:
        return False

    def inode(self) -> int:
        return _inode(self._rel)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if follow_symlinks not in self._stat:
            if self._kind == "file":
                self._hooks.size_directory(self._dir, self.path)
            result = self._hooks.remote_stat(self._rel, self.path, follow_symlinks)
            if result is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.path)
            self._stat[follow_symlinks] = result
        return self._stat[follow_symlinks]


class _MergedScandir:
    """Local entries first (real os.DirEntry objects), then the repository's other entries."""

    def __init__(self, local: Any, hooks: _Hooks, rel: str, path: Any, names: list[str]):
        self._local = local
        self._hooks = hooks
        self._rel = rel
        self._names = names
        self._seen: set[str] = set()
        self._remote: Iterable[Any] | None = None
        self._bytes = isinstance(path, bytes)
        self._base = path

    def __iter__(self) -> "_MergedScandir":
        return self

    def __next__(self) -> Any:
        if self._local is not None:
            try:
                entry = next(self._local)
            except StopIteration:
                self._local.close()
                self._local = None
            else:
                self._seen.add(os.fsdecode(entry.name))
                return entry
        if self._remote is None:
            self._remote = iter([n for n in self._names if n not in self._seen])
        for name in self._remote:  # type: ignore[union-attr]
            return self._make(name)
        raise StopIteration

    def _make(self, name: str) -> _RemoteDirEntry:
        hooks, rel = self._hooks, self._rel
        child = f"{rel}/{name}" if rel else name
        tree = hooks.engine(self._base).tree
        entry = tree.files.get(child)
        kind = "file" if entry is not None else "dir"
        if self._bytes:
            bname = os.fsencode(name)
            path = bname if self._base in (b"", None) else os.path.join(self._base, bname)
            return _RemoteDirEntry(hooks, bname, path, child, rel, kind, entry)
        path = name if self._base == "" else os.path.join(self._base, name)
        return _RemoteDirEntry(hooks, name, path, child, rel, kind, entry)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        self._remote = iter(())

    def __enter__(self) -> "_MergedScandir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------------------------------------
# the replacement functions

def _active() -> _Hooks | None:
    h = _state
    if h is None or h.in_loop_thread():
        return None
    return h


def _open(file: Any, mode: str = "r", buffering: int = -1, encoding: Any = None, errors: Any = None,
          newline: Any = None, closefd: bool = True, opener: Any = None) -> Any:
    h = _state
    if h is None or isinstance(file, int) or opener is not None:
        return _ORIG_OPEN(file, mode, buffering, encoding, errors, newline, closefd, opener)
    rel = h.rel(file)
    if rel is None:
        return _ORIG_OPEN(file, mode, buffering, encoding, errors, newline, closefd, opener)
    try:
        return _ORIG_OPEN(file, mode, buffering, encoding, errors, newline, closefd, opener)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        if any(c in mode for c in "wax+"):
            parent = posixpath.dirname(rel)
            if not h.materialize(parent, file):
                raise
            return _ORIG_OPEN(file, mode, buffering, encoding, errors, newline, closefd, opener)
        result = h.open_remote(rel, file, mode, buffering, encoding, errors, newline)
        if result is None:
            raise
        return result


def _stat(path: Any, *, dir_fd: Any = None, follow_symlinks: bool = True) -> os.stat_result:
    h = _state
    if h is None or dir_fd is not None:
        return _ORIG_STAT(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    rel = h.rel(path)
    if rel is None:
        return _ORIG_STAT(path, follow_symlinks=follow_symlinks)
    try:
        return _ORIG_STAT(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        result = h.remote_stat(rel, path, follow_symlinks)
        if result is None:
            raise
        return result


def _lstat(path: Any, *, dir_fd: Any = None) -> os.stat_result:
    h = _state
    if h is None or dir_fd is not None:
        return _ORIG_LSTAT(path, dir_fd=dir_fd)
    rel = h.rel(path)
    if rel is None:
        return _ORIG_LSTAT(path)
    try:
        return _ORIG_LSTAT(path)
    except FileNotFoundError:
        if h.in_loop_thread():
            raise
        result = h.remote_stat(rel, path, False)
        if result is None:
            raise
        return result


def _access(path: Any, mode: int, *, dir_fd: Any = None, effective_ids: bool = False,
            follow_symlinks: bool = True) -> bool:
    result = _ORIG_ACCESS(path, mode, dir_fd=dir_fd, effective_ids=effective_ids, follow_symlinks=follow_symlinks)
    h = _active()
    if result or h is None or dir_fd is not None:
        return result
    rel = h.rel(path)
    if rel is None:
        return result
    try:
        _ORIG_LSTAT(path)
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
    h = _state
    if h is None or isinstance(path, int):
        return _ORIG_LISTDIR(path)
    arg = "." if path is None else path
    rel = h.rel(arg)
    if rel is None or h.in_loop_thread():
        return _ORIG_LISTDIR(path)
    as_bytes = isinstance(os.fspath(arg), bytes)
    try:
        local = _ORIG_LISTDIR(path)
    except FileNotFoundError:
        found = h.lookup(rel, arg)
        if found is None:
            raise
        if found[0] != "dir":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), _fsname(arg)) from None
        names = h.remote_names(_dir_target(h, rel, arg), arg) or []
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


def _dir_target(h: _Hooks, rel: str, path: Any) -> str:
    """The tree directory a (possibly symlinked) repository path resolves to."""
    tree = h.engine(path).tree
    if rel in tree.dirs:
        return rel
    # follow symlinks the way lookup() does, remembering where we end up
    for _ in range(40):
        entry = tree.files.get(rel)
        if entry is None or not entry.is_symlink:
            return rel
        target = os.fsdecode(h.call(h.engine(path).read(rel, 0, 4096), path))
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    return rel


def _scandir(path: Any = None) -> Any:
    h = _state
    if h is None or isinstance(path, int):
        return _ORIG_SCANDIR(path) if path is not None else _ORIG_SCANDIR()
    arg = "." if path is None else path
    rel = h.rel(arg)
    if rel is None or h.in_loop_thread():
        return _ORIG_SCANDIR(path) if path is not None else _ORIG_SCANDIR()
    base = os.fspath(arg)
    try:
        local = _ORIG_SCANDIR(path) if path is not None else _ORIG_SCANDIR()
    except FileNotFoundError:
        found = h.lookup(rel, arg)
        if found is None:
            raise
        if found[0] != "dir":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), _fsname(arg)) from None
        target = _dir_target(h, rel, arg)
        return _MergedScandir(None, h, target, base, h.remote_names(target, arg) or [])
    try:
        names = h.remote_names(rel, arg)
    except OSError as err:
        h.warn_once(err)
        return local
    if not names:
        return local
    return _MergedScandir(local, h, rel, base, names)


def _mkdir(path: Any, mode: int = 0o777, *, dir_fd: Any = None) -> None:
    try:
        return _ORIG_MKDIR(path, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        h = _active()
        if h is None or dir_fd is not None:
            raise
        rel = h.rel(path)
        if rel is None or not rel or not h.materialize(posixpath.dirname(rel), path):
            raise
    return _ORIG_MKDIR(path, mode)


def _listxattr(path: Any = None, *, follow_symlinks: bool = True) -> list[str]:
    assert _ORIG_LISTXATTR is not None
    try:
        return _ORIG_LISTXATTR(path, follow_symlinks=follow_symlinks)
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
        (os, "stat", _stat), (os, "lstat", _lstat), (os, "access", _access),
        (os, "listdir", _listdir), (os, "scandir", _scandir), (os, "mkdir", _mkdir),
    ]
    if _ORIG_LISTXATTR is not None:
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


def _apply_patches() -> None:
    global _ORIG_OPEN, _ORIG_STAT, _ORIG_LSTAT, _ORIG_ACCESS, _ORIG_LISTDIR, _ORIG_SCANDIR, _ORIG_MKDIR
    global _ORIG_LISTXATTR
    # The replacements call whatever was there before them (another library's patch included).
    _ORIG_OPEN, _ORIG_STAT, _ORIG_LSTAT = builtins.open, os.stat, os.lstat
    _ORIG_ACCESS, _ORIG_LISTDIR, _ORIG_SCANDIR, _ORIG_MKDIR = os.access, os.listdir, os.scandir, os.mkdir
    _ORIG_LISTXATTR = getattr(os, "listxattr", None)
    for owner, name, replacement in _patch_table():
        original = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
        _saved.append((owner, name, original))
        setattr(owner, name, replacement)


def _restore_patches() -> None:
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner, name, original)


# ------------------------------------------------------------------------------------------------
# configuration

def _git_out(cwd: str, *args: str) -> str | None:
    import subprocess

    try:
        proc = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _local_remote_settings(checkout: str) -> dict[str, dict[str, str]]:
    """Credentials a DVC user keeps in .dvc/config.local (`dvc remote modify --local`)."""
    path = os.path.join(checkout, ".dvc", "config.local")
    try:
        with _ORIG_OPEN(path, "rb") as f:
            text = f.read()
    except OSError:
        return {}
    from .settings import remote_settings_key
    from .snapshot.dvcfiles import parse_dvc_config

    try:
        parsed = parse_dvc_config(text, path)
    except Exception:  # noqa: BLE001 - a broken config.local must not stop the hooks
        return {}
    return {remote_settings_key(name): dict(spec.settings) for name, spec in parsed.remotes.items()}


def _build(repo: str | None, revision: str | None, root: str | os.PathLike[str] | None, exclude: Any,
           settings: dict[str, Any], remotes: dict[str, dict[str, str]] | None,
           env: Any) -> tuple[str, Any, list[str], dict[str, Any]]:
    from .errors import ConfigError
    from .settings import load_config, names, remote_settings_key

    known = set(names("engine")) - {"repo", "revision", "remotes"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"install_hooks(): unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    exclude_list = _check_exclude(exclude)
    flags = {k: v for k, v in settings.items() if v is not None}
    if revision is not None:
        flags["revision"] = revision
    config = load_config(flags, env)
    if exclude is None and config.hooks_exclude:
        exclude_list = list(config.hooks_exclude)
    cwd = os.getcwd()
    checkout_remotes: dict[str, dict[str, str]] = {}
    repo = repo or config.repo or None
    if root is None and config.hooks_root:
        root = config.hooks_root
    if repo is None:
        top = _git_out(str(root) if root is not None else cwd, "rev-parse", "--show-toplevel")
        if not top:
            raise ConfigError("install_hooks(): not inside a git checkout; pass a repository URL "
                              "(install_hooks('https://host/owner/repo.git')) or set DDA_REPO")
        repo = top                      # the checkout itself: works offline, even unpushed
        if root is None:
            root = top
        if config.revision is None:
            config.revision = _git_out(top, "rev-parse", "HEAD^{commit}")
    if os.path.isdir(os.path.join(str(repo), ".dvc")):
        checkout_remotes = _local_remote_settings(str(repo))
    config.repo = repo
    root_str = posixpath.normpath(os.path.abspath(os.fspath(root if root is not None else cwd)))
    merged: dict[str, dict[str, str]] = {}
    for source in (checkout_remotes, config.remotes, remotes or {}):
        for name, values in source.items():
            merged.setdefault(remote_settings_key(name), {}).update({k: str(v) for k, v in values.items()})
    config.remotes = merged
    payload = {"repo": repo, "revision": config.revision, "root": root_str, "exclude": exclude_list,
               "settings": {k: str(v) for k, v in flags.items() if k != "revision"},
               "remotes": remotes or {}}
    return root_str, config, exclude_list, payload


# ------------------------------------------------------------------------------------------------
# public API

def install_hooks(repo: str | None = None, revision: str | None = None,
                  root: str | os.PathLike[str] | None = None, *, exclude: Iterable[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None,
                  remotes: dict[str, dict[str, str]] | None = None, lazy: bool = False,
                  **settings: Any) -> HooksInfo:
    """Serve the repository's files under `root` to this process (and its workers).

    repo      git URL or local path; default DDA_REPO, else the current git checkout (then the
              revision defaults to its HEAD commit and `root` to its top directory).
    revision  branch, tag or commit (default DDA_REVISION, else HEAD / the default branch).
    root      the local directory that stands for the repository root (default DDA_HOOKS_ROOT,
              else the checkout's top, else the current directory).
    exclude   list of globs relative to root (gitignore-like) never served from the repository
              (default: DDA_HOOKS_EXCLUDE, comma-separated).
    cache_dir, cache_size, jobs, deadline, ...: as `Config` (default: DDA_* variables).
    remotes   per-remote overrides {"name": {"user": ..., "password": ...}}.
    lazy      do not open the repository now (first use opens it).

    Installing again replaces the previous installation.
    """
    global _state
    if cache_dir is not None:
        settings["cache_dir"] = os.fspath(cache_dir)
    root_str, config, exclude_list, payload = _build(repo, revision, root, exclude, settings, remotes, os.environ)
    hooks = _Hooks(root=root_str, config=config, exclude=exclude_list, env_payload=payload)
    with _install_lock:
        if _state is not None:
            uninstall_hooks()
        if not lazy:
            hooks.runtime = _Runtime(config)       # fail here, loudly, not on the first read
            info = hooks.runtime.engine.info
            if info is not None:
                config.revision = info.commit      # workers see exactly this commit
                payload["revision"] = info.commit
        _apply_patches()
        _state = hooks
        os.environ[ENV_VAR] = json.dumps(payload)
    return _info(hooks)


def _info(hooks: _Hooks) -> HooksInfo:
    rt = hooks.runtime
    info = rt.engine.info if rt is not None else None
    return HooksInfo(root=hooks.root, repo=_display(hooks.config.repo), revision=hooks.config.revision,
                     commit=info.commit if info else None, files=info.files if info else 0)


def latest_commit() -> str | None:
    """The tip of the branch the hooks follow, now; compare with `hooks_installed().commit`."""
    hooks = _active()
    if hooks is None or hooks.runtime is None:
        raise RuntimeError("install_hooks() first")
    return hooks.runtime.call(hooks.runtime.engine.latest_commit())


def refresh_hooks() -> tuple[str, str] | None:
    """Serve the branch's new tip (after `dda upload` or a push): (old, new) commit, or None
    if it has not moved. Explicit by design: files never change under a reader by themselves;
    files already open keep reading the old content. New workers start on the new commit."""
    hooks = _active()
    if hooks is None or hooks.runtime is None:
        raise RuntimeError("install_hooks() first")
    moved = hooks.runtime.call(hooks.runtime.engine.refresh())
    if moved is not None:
        hooks.config.revision = moved[1]
        hooks.env_payload["revision"] = moved[1]
        hooks._sized_dirs.clear()
        os.environ[ENV_VAR] = json.dumps(hooks.env_payload)
    return moved


def uninstall_hooks() -> None:
    """Restore every patched function (the very same objects) and close the engine."""
    global _state
    with _install_lock:
        hooks, _state = _state, None
        _restore_patches()
        os.environ.pop(ENV_VAR, None)
        if hooks is not None and hooks.runtime is not None and hooks.pid == os.getpid():
            hooks.runtime.close()
            hooks.runtime = None


def hooks_installed() -> HooksInfo | None:
    h = _state
    return _info(h) if h is not None else None


def _reinstall_from_env() -> None:
    """Called at interpreter start (the .pth line) in spawn/forkserver children."""
    raw = os.environ.get(ENV_VAR)
    if not raw or _state is not None:
        return
    try:
        payload = json.loads(raw)
        install_hooks(payload.get("repo"), payload.get("revision"), payload.get("root"),
                      exclude=payload.get("exclude") or [], remotes=payload.get("remotes") or None, lazy=True,
                      **(payload.get("settings") or {}))
    except Exception as err:  # noqa: BLE001 - never break interpreter start
        print(f"dda: could not re-install hooks from {ENV_VAR}: {err}", file=sys.stderr)


_paused: list[_Runtime] = []


def _before_fork() -> None:
    h = _state
    rt = h.runtime if h is not None and h.pid == os.getpid() else None
    if rt is not None and rt.pause():
        _paused.append(rt)


def _after_fork_in_parent() -> None:
    while _paused:
        _paused.pop().resume()


def _after_fork_in_child() -> None:
    global _install_lock
    _install_lock = threading.RLock()     # another thread may have held it at fork time
    _paused.clear()
    h = _state
    if h is not None:
        h._after_fork()


def install_autoload(site_dir: str | None = None) -> str:
    """Write the .pth file that re-installs the hooks in spawn/forkserver children (the package
    ships it; this is for environments where it is missing). Returns its path."""
    if site_dir is None:
        import sysconfig
        site_dir = sysconfig.get_paths()["purelib"]
    path = os.path.join(site_dir, PTH_NAME)
    with _ORIG_OPEN(path, "w") as f:
        f.write(PTH_LINE)
    return path


def remove_autoload(site_dir: str | None = None) -> None:
    if site_dir is None:
        import sysconfig
        site_dir = sysconfig.get_paths()["purelib"]
    try:
        os.unlink(os.path.join(site_dir, PTH_NAME))
    except FileNotFoundError:
        pass


def _close_at_exit() -> None:
    h = _state
    if h is not None and h.runtime is not None and h.pid == os.getpid():
        try:
            h.runtime.close(timeout=2.0)
        except Exception:  # noqa: BLE001
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)

import atexit  # noqa: E402

atexit.register(_close_at_exit)
