"""The hooks' state: which paths they serve (root, exclusions), the runtime that serves them,
and the translation of file-system answers (sidecar.fs) into what `os` and `open` return.

Only the standard library is imported here at import time (the .pth line imports the package
at every interpreter start); the engine comes with the first use.
"""
from __future__ import annotations

import errno
import io
import os
import posixpath
import re
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

from .runtime import Runtime

READ_BLOCK = 1024 * 1024          # BufferedReader size: each engine call moves at least 1 MiB
_FAKE_DEV = 0x0DDA0000            # st_dev of remote entries (no real device has it)
_RETRY_OPEN_AFTER = 5.0           # seconds before retrying a failed engine open

# The installed hooks (None: not installed). Set by api.install_hooks/uninstall_hooks.
current: "Hooks | None" = None


@dataclass(frozen=True)
class HooksInfo:
    root: str
    repo: str
    revision: str | None
    commit: str | None
    files: int


# ------------------------------------------------------------------------------------------------
# exclusion globs

def glob_regex(pattern: str) -> re.Pattern[str]:
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


def check_exclude(exclude: object) -> list[str]:
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
# small helpers

def inode(rel: str) -> int:
    return (zlib.crc32(rel.encode("utf-8", "surrogateescape")) << 20) ^ len(rel) | 1 << 40


def fsname(path: Any) -> Any:
    try:
        return os.fspath(path)
    except TypeError:
        return path


def display(repo: Any) -> str:
    try:
        from ..redact import strip_userinfo
        return strip_userinfo(str(repo))[0]
    except Exception:  # noqa: BLE001
        return "<repository>"


def os_error(err: BaseException, path: Any) -> OSError:
    """The OSError a hooked function raises for an error of the file-system layer: the errno
    of the one mapping (sidecar.errors.describe) - a deadline is ETIMEDOUT, a missing path
    ENOENT - and the message, with the path as filename."""
    from ..errors import describe

    info = describe(err)
    if info.errno == errno.ENOENT:
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), fsname(path))
    return OSError(info.errno, f"dda: {info.message}", fsname(path))


def to_stat_result(attr: Any, ino: int) -> os.stat_result:
    """The fs layer's Attr as os.stat_result (owner: this process's user)."""
    mtime, ns = attr.mtime, attr.mtime_ns
    return os.stat_result((attr.mode, ino, _FAKE_DEV, attr.nlink, os.getuid(), os.getgid(), attr.size,
                           mtime, mtime, mtime),
                          {"st_atime": float(mtime), "st_mtime": float(mtime), "st_ctime": float(mtime),
                           "st_atime_ns": ns, "st_mtime_ns": ns, "st_ctime_ns": ns,
                           "st_blksize": attr.blksize, "st_blocks": attr.blocks, "st_rdev": 0})


# ------------------------------------------------------------------------------------------------
# the hooks' state

class Hooks:
    def __init__(self, *, root: str, config: Any, exclude: list[str], env_payload: dict[str, Any]):
        self.root = root
        self.root_slash = root if root.endswith("/") else root + "/"
        real = os.path.realpath(root)
        self.alt_root = real if real != root else None
        self.config = config
        self.exclude = exclude
        self._patterns = [glob_regex(p) for p in exclude]
        self.env_payload = env_payload
        self.cache_prefix = os.path.abspath(str(config.cache_dir)).rstrip("/") + "/"
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.runtime: Runtime | None = None
        self.open_error: tuple[float, BaseException] | None = None
        self.orphans: list[Any] = []       # runtimes of a parent process, kept (never closed) after fork
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

    # -- the runtime ---------------------------------------------------------------------------
    def in_loop_thread(self) -> bool:
        rt = self.runtime
        return rt is not None and threading.get_ident() == getattr(rt, "ident", None)

    def runtime_or_raise(self, path: Any) -> Runtime:
        rt = self.runtime
        if rt is not None and self.pid == os.getpid():
            return rt
        with self.lock:
            if self.pid != os.getpid():
                self.after_fork()
            if self.runtime is not None:
                return self.runtime
            if self.open_error and time.monotonic() - self.open_error[0] < _RETRY_OPEN_AFTER:
                err = self.open_error[1]
            else:
                try:
                    self.runtime = Runtime(self.config)
                    self.open_error = None
                    return self.runtime
                except Exception as exc:  # noqa: BLE001
                    self.open_error = (time.monotonic(), exc)
                    err = exc
        raise OSError(errno.EIO, f"dda: cannot open repository {display(self.config.repo)}: {err}",
                      fsname(path)) from None

    def after_fork(self) -> None:
        if self.runtime is not None:
            self.orphans.append(self.runtime)     # the parent's loop thread does not exist here
        self.runtime = None
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.open_error = None

    def fs(self, path: Any) -> Any:
        """The file system (sidecar.fs.FileSystem) of this process's runtime."""
        return self.runtime_or_raise(path).fs

    def call(self, coro: Any, path: Any) -> Any:
        """Run a file-system coroutine; its errors become the OSError of the one mapping."""
        from ..errors import DDAError

        try:
            return self.runtime_or_raise(path).call(coro)
        except (DDAError, TimeoutError) as err:
            raise os_error(err, path) from None

    # -- lookups -------------------------------------------------------------------------------
    def lookup(self, rel: str, path: Any) -> tuple[str, Any] | None:
        """('file', Entry) / ('dir', None) / None for a repository path, symlinks followed
        inside the tree (a link out of it, or to an excluded path, is not there)."""
        fs = self.fs(path)
        entry = fs.entry(rel)
        if entry is not None and entry.is_symlink:
            try:
                rel = self.call(fs.resolve(rel, hidden=self.excluded if self._patterns else None), path)
            except FileNotFoundError:
                return None
            entry = fs.entry(rel)
        if entry is not None:
            return "file", entry
        return ("dir", None) if fs.kind(rel) == "dir" else None

    def lentry(self, rel: str, path: Any) -> tuple[str, Any] | None:
        fs = self.fs(path)
        entry = fs.entry(rel)
        if entry is not None:
            return "file", entry
        return ("dir", None) if fs.kind(rel) == "dir" else None

    def remote_readlink(self, rel: str, path: Any) -> str | None:
        """The target of the repository symlink `rel`, as committed (None: nothing there;
        OSError EINVAL: not a symlink, as os.readlink says)."""
        fs = self.fs(path)
        kind = fs.kind(rel)
        if kind is None:
            return None
        if kind != "symlink":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), os.fsdecode(os.fspath(path)))
        return self.call(fs.readlink(rel), path)

    def dir_target(self, rel: str, path: Any) -> str:
        """The tree directory a (possibly symlinked) repository path resolves to."""
        fs = self.fs(path)
        if fs.kind(rel) != "symlink":
            return rel
        return self.call(fs.resolve(rel), path)

    def remote_names(self, rel: str, path: Any) -> list[str] | None:
        """Names of a repository directory from the snapshot (no request, no sizes)."""
        names = self.fs(path).tree.dirs.get(rel)
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
    def remote_stat(self, rel: str, path: Any, follow: bool) -> os.stat_result | None:
        """os.stat_result of a repository path (None: not there); learns this one entry's
        size when it is not known yet, nothing more."""
        found = self.lookup(rel, path) if follow else self.lentry(rel, path)
        if found is None:
            return None
        from ..fs import dir_attr

        kind, entry = found
        fs = self.fs(path)
        if entry is None:                   # a directory, or a symlink followed to one
            return to_stat_result(dir_attr(fs.mtime_ns, fs.tree.dir_nlink(rel)), inode(rel))
        attr = fs.attr_of(entry) if entry.size is not None else self.call(fs.stat(entry.path), path)
        return to_stat_result(attr, inode(entry.path))

    def open_remote(self, rel: str, file: Any, mode: str, buffering: int, encoding: Any, errors: Any,
                    newline: Any) -> Any:
        from .files import RemoteFile

        found = self.lookup(rel, file)
        if found is None:
            return None
        kind, entry = found
        name = os.fspath(file)
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), fsname(file))
        # Pinned: the handle keeps this entry's object, whatever refresh_hooks() does later.
        handle = self.call(self.fs(file).open(entry.path, shown=False), file)
        raw = RemoteFile(self, handle, name, file)
        binary = "b" in mode
        if buffering == 0:
            if not binary:
                raw.close()
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
        from .patching import orig

        found = self.lookup(rel_dir, path)
        if found is None or found[0] != "dir":
            return False
        try:
            orig.mkdir(self.root)
        except FileExistsError:
            pass
        # One component at a time, relative to the parent's fd and never through a symlink: a
        # local symlink over a repository folder must not make us create folders where it points.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in (p for p in rel_dir.split("/") if p):
                try:
                    orig.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except OSError as err:     # ELOOP/ENOTDIR: a local symlink or file is in the way
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        return False
                    raise
                os.close(fd)
                fd = child
        finally:
            os.close(fd)
        return True

    def enter_dir(self, rel: str, path: Any) -> str | None:
        """For os.chdir into a directory that exists only in the repository: the local path
        to change into, its directories created on local disk (as a checkout has them). A
        symlink is followed inside the repository, as chdir follows it in a checkout (getcwd
        then names the target). None: not in the repository. NotADirectoryError for a file."""
        found = self.lookup(rel, path)
        if found is None:
            return None
        if found[0] != "dir":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), fsname(path))
        target = self.dir_target(rel, path)
        if not self.materialize(target, path):
            return None
        return self.root if not target else self.root.rstrip("/") + "/" + target

    def info(self) -> HooksInfo:
        rt = self.runtime
        info = rt.engine.info if rt is not None else None
        return HooksInfo(root=self.root, repo=display(self.config.repo), revision=self.config.revision,
                         commit=info.commit if info else None, files=info.files if info else 0)
