"""The file object the hooks' open() returns, and os.scandir's entries for repository paths."""
from __future__ import annotations

import errno
import io
import os
from types import GenericAlias
from typing import Any, Iterable

from ..fs import FileSystem
from .core import Hooks, inode

_READALL_PIECE = 64 * 1024 * 1024


class RemoteFile(io.RawIOBase):
    """Raw, seekable, read-only file over a file-system handle (sidecar.fs.Handle): each read
    is a ranged read of the object the handle was opened on, even after refresh_hooks()."""

    def __init__(self, hooks: Hooks, handle: Any, name: Any, original: Any):
        super().__init__()
        self._hooks = hooks
        self._handle = handle     # opened shown=False: told to nobody until a seek to the end
        self._pos = 0
        self._orig_name = original
        self.name = name
        self.mode = "rb"

    @property
    def _size(self) -> int:
        # live: until someone is told the size (a seek to the end), a size learned from a
        # remote that the verified object contradicts is replaced, and the read goes on
        return self._handle.size

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
        # The current runtime's file system (a forked child has its own) reads the pinned handle.
        return hooks.call(hooks.fs(self._orig_name).read(self._handle, offset, length), self._orig_name)

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            if self._handle.shown or not len(view):
                return 0
            want = len(view)     # at the end of a size nobody was told: the read there settles it
        data = self._read(self._pos, want)
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        pieces = []
        while self._pos < self._size or not self._handle.shown:   # unshown: the read at the end settles it
            left = self._size - self._pos
            data = self._read(self._pos, min(_READALL_PIECE, left) if left > 0 else _READALL_PIECE)
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
            pos = FileSystem.show_size(self._handle) + offset     # told: from now on it must hold
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

    def close(self) -> None:
        if not self.closed:
            rt = self._hooks.runtime
            if rt is not None:
                rt.fs.release(self._handle)
        super().close()


class RemoteDirEntry:
    """Behaves like os.DirEntry for an entry that exists only in the repository. Its type
    comes from the snapshot; stat() learns this one entry's size, nothing more."""

    __slots__ = ("name", "path", "_hooks", "_rel", "_kind", "_entry", "_stat")
    __class_getitem__ = classmethod(GenericAlias)

    def __init__(self, hooks: Hooks, name: Any, path: Any, rel: str, kind: str, entry: Any):
        self.name = name
        self.path = path
        self._hooks = hooks
        self._rel = rel
        self._kind = kind
        self._entry = entry
        self._stat: dict[bool, os.stat_result] = {}

    def __fspath__(self) -> Any:
        return self.path

    @property
    def _size(self) -> int:
        # live: until someone is told the size (a seek to the end), a size learned from a
        # remote that the verified object contradicts is replaced, and the read goes on
        return self._handle.size

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
        return inode(self._rel)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if follow_symlinks not in self._stat:
            result = self._hooks.remote_stat(self._rel, self.path, follow_symlinks)
            if result is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.path)
            self._stat[follow_symlinks] = result
        return self._stat[follow_symlinks]


class MergedScandir:
    """Local entries first (real os.DirEntry objects), then the repository's other entries."""

    def __init__(self, local: Any, hooks: Hooks, rel: str, path: Any, names: list[str]):
        self._local = local
        self._hooks = hooks
        self._rel = rel
        self._names = names
        self._seen: set[str] = set()
        self._remote: Iterable[Any] | None = None
        self._bytes = isinstance(path, bytes)
        self._base = path

    def __iter__(self) -> "MergedScandir":
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

    def _make(self, name: str) -> RemoteDirEntry:
        hooks, rel = self._hooks, self._rel
        child = f"{rel}/{name}" if rel else name
        entry = hooks.fs(self._base).entry(child)
        kind = "file" if entry is not None else "dir"
        if self._bytes:
            bname = os.fsencode(name)
            path = bname if self._base in (b"", None) else os.path.join(self._base, bname)
            return RemoteDirEntry(hooks, bname, path, child, kind, entry)
        path = name if self._base == "" else os.path.join(self._base, name)
        return RemoteDirEntry(hooks, name, path, child, kind, entry)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        self._remote = iter(())

    def __enter__(self) -> "MergedScandir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
