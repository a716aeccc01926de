"""The frontend-neutral file system over one Engine (the way mountpoint-s3 puts `fs` under its
FUSE adapter): every frontend - the FUSE mount, the in-process hooks, `dda ls/cat/get` - asks
these methods and turns the answers and errors into its own shapes.

Rules it keeps for every frontend:
- names and types come from the snapshot alone: `listdir` never asks a remote and never sizes;
- a size is learned only when someone asks for it (`stat`, `lookup`, `open`), one entry at a
  time, or in bulk where a frontend wants many at once (`stat_many`; `stat_each` for `dda ls`/`get`,
  where one file that cannot be sized is an error in its own row, never the batch's);
- a handle is pinned to the entry (object id, size, mode) it was opened on: a refresh to a new
  commit never changes what an open file reads;
- errors are `sidecar.errors.DDAError`s carrying errno and reason; frontends map them with
  `sidecar.errors.describe`, never by their text.

All methods run on the engine's event loop.
"""
from __future__ import annotations

import itertools
import os
import posixpath
import stat as _st
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator, Mapping

from ..engine import Engine
from ..errors import (BadHandle, DDAError, IsADirectory, NotADirectory, NotASymlink, NotFound,
                      ObjectResized,
                      OutputUnavailable, RemoteError,
                      SymlinkLoop, describe)
from ..fetch.verify_stream import ReadCursor
from ..snapshot.tree import Entry, Tree
from .attr import Attr, DirEntry, Kind, dir_attr

MAX_SYMLINK_HOPS = 40          # as the kernel's ELOOP limit
MAX_LINK_TARGET = 1 << 20


@dataclass(slots=True)
class Handle:
    """An open file: the entry (object and size) it was opened on, whatever happens later
    (a refresh never changes it; only a size proved wrong by the verified object does)."""

    id: int
    path: str
    entry: Entry         # sized
    commit: str | None
    # what this reader took before its object was verified (sidecar.fetch.verify_stream)
    cursor: ReadCursor = field(default_factory=ReadCursor)
    # the size this reader was told at open (st_size): if the verified object proves it wrong,
    # every later read of this handle fails - the reader's idea of the file's length is wrong
    size_at_open: int = -1
    # whether anyone was told the size (a mount's st_size, a seek to the end): a handle nobody
    # was told it (`dda cat/get`, a hooks read from the start) follows the verified object
    shown: bool = True

    def __post_init__(self) -> None:
        if self.size_at_open < 0:
            self.size_at_open = self.entry.size if self.entry.size is not None else -1

    @property
    def size(self) -> int:
        assert self.entry.size is not None
        return self.entry.size


@dataclass(frozen=True)
class Refreshed:
    """What a refresh did: the commits, and which paths changed between the two snapshots."""

    old_commit: str
    new_commit: str
    old_files: Mapping[str, Entry]   # the old snapshot's files (a view, not a copy)
    new_tree: Tree
    old_tree: Tree | None = None     # the old snapshot (bulk comparisons: Tree.row_keys)

    def changed(self, path: str) -> bool:
        """Whether what the kernel (or anyone) knows about `path` may be stale: a directory
        (its listing may differ), a path that appeared or vanished, or other content/mode."""
        if path in self.new_tree.dirs:
            return True
        old, new = self.old_files.get(path), self.new_tree.files.get(path)
        return old is None or new is None or old.oid != new.oid or old.mode != new.mode


class FileSystem:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._handles: dict[int, Handle] = {}
        self._ids = itertools.count(1)
        engine.fetcher.size_observers.append(self._object_resized)

    def _object_resized(self, oid: str, size: int) -> None:
        """A verified size replaced one learned from a remote: open handles follow."""
        for handle in self._handles.values():
            if handle.entry.oid == oid and handle.entry.size != size:
                handle.entry = replace(handle.entry, size=size)

    # -- the snapshot ---------------------------------------------------------------------------
    @property
    def tree(self) -> Tree:
        return self.engine.tree

    @property
    def commit(self) -> str | None:
        return self.engine.info.commit if self.engine.info else None

    @property
    def revision(self) -> str:
        return self.engine.info.revision if self.engine.info else "?"

    @property
    def mtime_ns(self) -> int:
        """Every path of a snapshot has its commit's time."""
        return (self.engine.info.commit_time if self.engine.info else 0) * 10**9

    @staticmethod
    def normalize(path: str) -> str:
        return Tree.normalize(path)

    def kind(self, path: str) -> Kind | None:
        """'file', 'dir', 'symlink' or None, from the snapshot alone (no request)."""
        tree = self.tree
        entry = tree.files.get(path)
        if entry is not None:
            return "symlink" if entry.is_symlink else "file"
        return "dir" if path in tree.dirs else None

    def entry(self, path: str) -> Entry | None:
        """The file or symlink entry at `path` (None: a directory or nothing)."""
        return self.tree.files.get(path)

    def _missing(self, path: str) -> DDAError:
        problem = self.tree.problem_at(path)
        if problem is not None:     # inside an output that cannot be shown: EIO naming the cause
            return OutputUnavailable(problem.message(), path=path)
        return NotFound(f"{path}: not in revision {self.revision}", path=path)

    def _available(self, path: str) -> None:
        """OutputUnavailable when `path` is (inside) an output the snapshot cannot show."""
        problem = self.tree.problem_at(path)
        if problem is not None:
            raise OutputUnavailable(problem.message(), path=path)

    # -- listing: names and types, never sizes -------------------------------------------------------
    def names(self, path: str) -> list[str]:
        """The names in directory `path`, sorted (no request, no sizing)."""
        self._available(path)
        names = self.tree.dirs.get(path)
        if names is None:
            if path in self.tree.files:
                raise NotADirectory(f"{path}: not a directory", path=path)
            raise self._missing(path)
        return names

    def listdir(self, path: str) -> list[DirEntry]:
        """Entries of directory `path` with their types (and sizes only where already known)."""
        return list(self.iter_dir(path))

    def iter_dir(self, path: str, start: int = 0) -> Iterator[DirEntry]:
        """`listdir(path)[start:]`, made one entry at a time: a FUSE readdir answers a 100k
        folder in many calls, each from its own offset, and must not rebuild it every time."""
        tree = self.tree
        prefix = path + "/" if path else ""
        names = self.names(path)
        for i in range(start, len(names)):
            name = names[i]
            child = prefix + name
            entry = tree.files.get(child)
            if entry is None:
                yield DirEntry(name, child, "dir", _st.S_IFDIR | 0o755, None)
            else:
                yield DirEntry(name, child, "symlink" if entry.is_symlink else "file", entry.mode, entry.size)

    async def fill_known_sizes(self, path: str, probe: int = 32) -> None:
        """Put every size of folder `path` this node already knows into the snapshot (the
        persistent index, a loaded size index; read on a store thread, never a request), so
        a listing hands them out with the names (a FUSE readdirplus: `find -printf %s` needs
        no lookup). It probes with the first `probe` unsized files: when the index knows none
        of them (a cold folder) that one query is all (Engine.fill_known_sizes). A size
        missed either way is only a lookup later, never a wrong size."""
        self.names(path)       # ENOENT / ENOTDIR
        await self.engine.fill_known_sizes(path, probe)

    def walk_files(self, path: str) -> Iterator[Entry]:
        """Every file and symlink at or below `path`, in path order."""
        return self.tree.walk_files(path)

    # -- metadata -------------------------------------------------------------------------------
    def attr_of(self, entry: Entry | None) -> Attr:
        """Attributes of a sized entry (None: a directory)."""
        if entry is None:
            return dir_attr(self.mtime_ns)
        assert entry.size is not None, "attr_of() needs a sized entry"
        return Attr(entry.mode, entry.size, self.mtime_ns, 1)

    def known_attr(self, path: str) -> Attr | None:
        """Attributes without any request, or None while the size is unknown."""
        entry = self.tree.files.get(path)
        if entry is None:
            if path in self.tree.dirs:
                return dir_attr(self.mtime_ns, self.tree.dir_nlink(path))
            raise self._missing(path)
        return self.attr_of(entry) if entry.size is not None else None

    async def stat(self, path: str, *, follow: bool = False) -> Attr:
        """Attributes of `path`; learns the size of that one entry if it is not known yet.
        follow=True resolves symlinks inside the snapshot first (os.stat), else lstat."""
        if follow:
            path = await self.resolve(path)
        entry = self.tree.files.get(path)
        if entry is None:
            if path in self.tree.dirs:
                return dir_attr(self.mtime_ns, self.tree.dir_nlink(path))
            raise self._missing(path)
        return self.attr_of(await self.engine.sized(entry, stat_ahead=True))

    async def lookup(self, parent: str, name: str) -> tuple[str, Attr]:
        """The child `name` of directory `parent`: (its path, its attributes)."""
        if parent not in self.tree.dirs:
            raise NotADirectory(f"{parent}: not a directory", path=parent) if parent in self.tree.files \
                else self._missing(parent)
        if name == ".":
            path = parent
        elif name == "..":
            path = posixpath.dirname(parent)
        else:
            path = f"{parent}/{name}" if parent else name
        return path, await self.stat(path)

    def known_child(self, parent: str, name: str) -> tuple[str, Attr] | None:
        """`lookup(parent, name)` when the child is a file or symlink whose size is already
        known: (its path, its attributes) straight from the tree's arrays, with no Entry and no
        await (a `find -printf %s` behind a stat-ahead is 100k of these); the stat-ahead of
        `parent` hears where its reader is. None: ask `lookup` (a directory, an unknown size,
        no such name, `.`/`..`)."""
        row = self.tree.child(parent, name)
        if row is None or row[1] < 0 or row[3] < 0:
            return None
        self.engine.reader_at(parent, row[0])
        return (f"{parent}/{name}" if parent else name), Attr(row[2], row[3], self.mtime_ns, 1)

    async def stat_many(self, paths: list[str]) -> list[tuple[str, Attr]]:
        """Attributes of many paths at once, sizes learned in bulk (one listing per remote
        folder where the remote lists, else bounded requests). Raises the first error."""
        return [(p, a) for p, a in await self._stat_batch(paths, None)]   # type: ignore[misc]

    async def stat_each(self, paths: list[str]) -> list[tuple[str, Attr | DDAError]]:
        """`stat_many`, but a path whose size could not be learned (its object missing on the
        remote, its request past its own deadline) gets its error in place of its attributes
        and the others are answered: for `dda ls` and `dda get`, which show or write the rest
        and name the failures. A path not in the snapshot still raises."""
        failed: dict[str, Exception] = {}
        return await self._stat_batch(paths, failed)

    async def _stat_batch(self, paths: list[str], failed: dict[str, Exception] | None
                          ) -> list[tuple[str, Attr | DDAError]]:
        tree = self.tree
        entries = []
        for p in paths:
            entry = tree.files.get(p)
            if entry is None and p not in tree.dirs:
                raise self._missing(p)
            if entry is not None:
                entries.append(entry)
        sized = {e.path: e for e in await self.engine.stat_many(entries, failed)} if entries else {}
        rows: list[tuple[str, Attr | DDAError]] = []
        for p in paths:
            err = failed.get(p) if failed else None
            if err is not None:
                rows.append((p, _as_error(err, p)))
            else:
                rows.append((p, self.attr_of(sized.get(p))))
        return rows

    async def readlink(self, path: str) -> str:
        entry = self.tree.files.get(path)
        if entry is None:
            if path in self.tree.dirs:
                raise NotASymlink(f"{path}: not a symbolic link", path=path)
            raise self._missing(path)
        if not entry.is_symlink:
            raise NotASymlink(f"{path}: not a symbolic link", path=path)
        return os.fsdecode(await self.engine.read_entry(entry, 0, MAX_LINK_TARGET))

    async def resolve(self, path: str, hidden: Callable[[str], bool] | None = None) -> str:
        """`path` with its symlinks followed inside the snapshot. NotFound for a dangling
        link, one that leaves the repository (absolute or above its root), or one whose
        target `hidden` rejects; SymlinkLoop after 40 hops."""
        seen = path
        for _ in range(MAX_SYMLINK_HOPS):
            entry = self.tree.files.get(path)
            if entry is None:
                if path in self.tree.dirs:
                    return path
                raise self._missing(seen)
            if not entry.is_symlink:
                return path
            target = await self.readlink(path)
            if target.startswith("/"):
                raise NotFound(f"{seen}: points outside the repository", path=seen)
            path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if path == ".." or path.startswith("../"):
                raise NotFound(f"{seen}: points outside the repository", path=seen)
            path = "" if path == "." else path
            if hidden is not None and hidden(path):
                raise self._missing(seen)
        raise SymlinkLoop(f"{seen}: too many levels of symbolic links", path=seen)

    # -- data -----------------------------------------------------------------------------------
    async def open(self, path: str, *, follow: bool = False, shown: bool = True) -> Handle:
        """A handle pinned to the entry at `path` now (sized): reads through it see this
        object even after a refresh moves the snapshot to another commit. shown=False: the
        caller tells nobody the size (a stream to its end): when the verified object proves a
        size learned from a remote wrong, reads follow the object instead of failing
        (`show_size` marks the moment someone is told)."""
        if follow:
            path = await self.resolve(path)
        self._available(path)
        entry = self.tree.files.get(path)
        if entry is None:
            if path in self.tree.dirs:
                raise IsADirectory(f"{path}: is a directory", path=path)
            raise self._missing(path)
        handle = Handle(next(self._ids), path, await self.engine.sized(entry), self.commit, shown=shown)
        self._handles[handle.id] = handle
        return handle

    @staticmethod
    def show_size(handle: Handle) -> int:
        """The handle's size, as told to someone (a seek to the end, an fstat): from now on a
        verified object that proves it wrong fails this handle's reads (never a file cut short)."""
        if not handle.shown:
            handle.shown, handle.size_at_open = True, handle.size
        return handle.size_at_open

    def handle(self, handle_id: int) -> Handle:
        try:
            return self._handles[handle_id]
        except KeyError:
            raise BadHandle(f"no open file with handle {handle_id}") from None

    @property
    def open_count(self) -> int:
        return len(self._handles)

    async def read(self, handle: Handle, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` of the handle's object (b"" at or past its end).
        Raises HashMismatch on a read after the object failed verification (its earlier
        bytes were wrong), and ObjectResized when the size this reader was given proved wrong."""
        self._check_size(handle)
        if length <= 0:
            return b""
        if offset >= handle.size and not (await self._settle_size(handle) and offset < handle.size):
            return b""
        size = handle.size
        want = min(length, size - offset)
        data = await self.engine.read_entry(handle.entry, offset, want, handle.cursor)
        self._check_size(handle)
        if len(data) < want and not handle.shown:
            await self._settle_size(handle)     # (an observer may have resized it already)
            want = min(want, max(0, handle.size - offset))     # the verified object is shorter
            data = data[:want]
        if len(data) < want:
            # A short answer inside the object would read as its end: a file cut short, exit 0.
            raise RemoteError(f"{handle.path}: got {len(data)} of {want} bytes at offset {offset} "
                              f"(the object has {size})", path=handle.path)
        return data

    async def _settle_size(self, handle: Handle) -> bool:
        """For a handle nobody was told the size of, whose size came from a remote's answer (a
        HEAD, a size index): take the size the fetcher has learned since from the object
        itself (a read contradicted the answer and learned it again). True when it changed.
        A large object's truth arrives with its first chunk, before its md5 is checked: that
        check still fails the read that reaches the end if its bytes were wrong."""
        entry = handle.entry
        if handle.shown or not entry.looked_up or entry.kind != "dvc":
            return False
        truth = await self.engine.fetcher.indexed_size(self.engine.ref(entry))
        if truth is None or truth == handle.size:
            return False
        handle.entry = replace(entry, size=truth)
        return True

    @staticmethod
    def _check_size(handle: Handle) -> None:
        # The size came from a remote's answer and the verified object says otherwise: fail
        # rather than hand out a file cut at the wrong length (the next open is right).
        if handle.shown and handle.size != handle.size_at_open:
            raise ObjectResized(f"{handle.path}: its size changed from {handle.size_at_open} to {handle.size} "
                                f"while open; open it again", path=handle.path)

    async def iter_bytes(self, handle: Handle, piece: int | None = None) -> AsyncIterator[bytes]:
        """The handle's whole object in pieces of one chunk (what `dda cat` and `get` stream)."""
        piece = piece or self.engine.store.chunk_size
        offset = 0
        while offset < handle.size or not handle.shown:   # unshown: the read at the end settles it
            data = await self.read(handle, offset, piece)
            if not data:
                return
            yield data
            offset += len(data)

    def release(self, handle: Handle | int) -> None:
        self._handles.pop(handle if isinstance(handle, int) else handle.id, None)

    # -- following a branch ---------------------------------------------------------------------
    async def latest_commit(self) -> str | None:
        return await self.engine.latest_commit()

    async def refresh(self) -> Refreshed | None:
        """Move to the branch's new tip, if it moved. Open handles keep their entries."""
        old_tree = self.tree              # never changed but for sizes
        moved = await self.engine.refresh()
        if moved is None:
            return None
        return Refreshed(moved[0], moved[1], old_tree.files, self.tree, old_tree)


def _as_error(err: Exception, path: str) -> DDAError:
    """`err` as a DDAError (a deadline may arrive as a bare TimeoutError), about `path`."""
    if isinstance(err, DDAError):
        return err
    info = describe(err)
    return DDAError(info.message, path=path, errno=info.errno, reason=info.reason)
