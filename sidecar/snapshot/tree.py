"""The immutable view of one commit: what a checkout looks like after `dvc pull`.

Stored compactly so a 1M-file tree fits in a daemon's memory (issue 11, item 3): per
directory a sorted list of interned child names and a parallel array of file ids (-1: a
subdirectory); per file, in flat arrays, its object id as raw bytes (md5: 16, git sha: 20),
its size (-1: not known yet), its mode and a small "group" number naming (kind, legacy,
remote, output). `Entry` objects are made on demand and never stored.

`Tree.files` and `Tree.dirs` are read-only mapping views with the shapes they always had
(path -> Entry, directory -> sorted names); the only mutation is `set_size`.
"""
from __future__ import annotations

import bisect
import posixpath
import stat
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Literal

from ..errors import DDAError

_WIDTH = 20          # bytes per object id slot (a git sha1; an md5 uses 16 of them)
_DIR = -1


@dataclass(frozen=True)
class Entry:
    path: str
    kind: Literal["git", "dvc"]
    mode: int                 # st_mode bits of a regular file or symlink
    size: int | None          # None only until looked up (never shown to users as a size)
    oid: str                  # git blob sha or DVC md5
    legacy: bool = False      # DVC 2 object
    remote: str | None = None # DVC remote name (None: the default one)
    output: str | None = None # the DVC output this file belongs to

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


class TreeBuilder:
    """Collects files (in any order, a later `add` of a path replacing an earlier one) and
    builds a Tree in O(n log k) for n files in directories of at most k entries."""

    def __init__(self) -> None:
        self._children: dict[str, list[tuple[str, int]]] = {"": []}
        self._names: dict[str, str] = {}
        self._oids = bytearray()
        self._oid_len = bytearray()
        self._sizes = array("q")
        self._modes = array("I")
        self._groups = array("H")
        self._group_ids: dict[tuple, int] = {}
        self._odd_oids: dict[int, str] = {}       # ids that are not 16/20-byte hex (kept as text)
        self._outputs: list[str | None] = []      # output of each file (for errors)

    def _intern(self, name: str) -> str:
        return self._names.setdefault(name, name)

    def _register_dir(self, path: str) -> None:
        chain = []
        while path not in self._children:     # "" is always there
            chain.append(path)
            self._children[path] = []
            path = posixpath.dirname(path)
        for new in chain:
            parent, name = posixpath.split(new)
            self._children[parent].append((self._intern(name), _DIR))

    def add(self, path: str, kind: str, mode: int, size: int | None, oid: str, legacy: bool = False,
            remote: str | None = None, output: str | None = None) -> None:
        """Add (or replace) the file or symlink at repository path `path`."""
        fid = len(self._sizes)
        group = (kind, legacy, remote, output)
        gid = self._group_ids.get(group)
        if gid is None:
            gid = self._group_ids[group] = len(self._group_ids)
        raw = None
        if len(oid) in (32, 40):
            try:
                raw = bytes.fromhex(oid)
            except ValueError:
                raw = None
        if raw is None:
            self._odd_oids[fid] = oid
            raw = b""
        self._oids += raw.ljust(_WIDTH, b"\0")
        self._oid_len.append(len(raw))
        self._sizes.append(-1 if size is None else size)
        self._modes.append(mode)
        self._groups.append(gid)
        self._outputs.append(output)
        parent, name = posixpath.split(path)
        self._register_dir(parent)
        self._children[parent].append((self._intern(name), fid))

    def build(self) -> "Tree":
        """The Tree; DDAError where a path is both a file and a directory."""
        groups = [None] * len(self._group_ids)
        for group, gid in self._group_ids.items():
            groups[gid] = group
        names: dict[str, list[str]] = {}
        ids: dict[str, array] = {}
        for parent, kids in self._children.items():
            kids.sort(key=lambda k: k[0])     # stable: a later add of a name comes last
            out_names: list[str] = []
            out_ids = array("i")
            for name, fid in kids:
                if out_names and out_names[-1] == name:
                    prev = out_ids[-1]
                    if prev == _DIR and fid == _DIR:
                        continue
                    if prev != _DIR and fid != _DIR:
                        out_ids[-1] = fid          # the later one replaces the earlier
                        continue
                    file_id = prev if prev != _DIR else fid
                    path = f"{parent}/{name}" if parent else name
                    where = self._outputs[file_id] or path
                    raise DDAError(f"{where}: {path!r} is a file, but something below it needs it to be a "
                                   f"directory")
                out_names.append(name)
                out_ids.append(fid)
            names[parent] = out_names
            ids[parent] = out_ids
        self._children = {}
        tree = Tree.__new__(Tree)
        tree._init(names, ids, bytes(self._oids), bytes(self._oid_len), self._sizes, self._modes, self._groups,
                   groups, self._odd_oids)
        return tree


class _Files(Mapping):
    """path -> Entry (made on demand) for every file and symlink of a Tree."""

    def __init__(self, tree: "Tree"):
        self._tree = tree

    def __getitem__(self, path: str) -> Entry:
        entry = self._tree._entry(path)
        if entry is None:
            raise KeyError(path)
        return entry

    def get(self, path: str, default: Entry | None = None) -> Entry | None:  # type: ignore[override]
        entry = self._tree._entry(path)
        return default if entry is None else entry

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._tree._file_id(path) is not None

    def __len__(self) -> int:
        return self._tree._nfiles

    def __iter__(self) -> Iterator[str]:
        for entry in self._tree.walk_files(""):
            yield entry.path

    def __setitem__(self, path: str, entry: Entry) -> None:
        """Only sizes change (see Tree.set_size)."""
        if entry.size is not None:
            self._tree.set_size(path, entry.size)


class _Dirs(Mapping):
    """directory path -> its sorted child names."""

    def __init__(self, tree: "Tree"):
        self._names = tree._names

    def __getitem__(self, path: str) -> list[str]:
        return self._names[path]

    def get(self, path: str, default: list[str] | None = None) -> list[str] | None:  # type: ignore[override]
        return self._names.get(path, default)

    def __contains__(self, path: object) -> bool:
        return path in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)


class Tree:
    def __init__(self, files: dict[str, Entry]):
        """A tree of `files` (path -> Entry); big trees are built with TreeBuilder instead."""
        builder = TreeBuilder()
        for path, e in files.items():
            builder.add(path, e.kind, e.mode, e.size, e.oid, e.legacy, e.remote, e.output)
        built = builder.build()
        self.__dict__.update(built.__dict__)
        self.files = _Files(self)
        self.dirs = _Dirs(self)

    def _init(self, names: dict[str, list[str]], ids: dict[str, array], oids: bytes, oid_len: bytes,
              sizes: array, modes: array, groups: array, group_table: list, odd: dict[int, str]) -> None:
        self._names = names
        self._ids = ids
        self._oids = oids
        self._oid_len = oid_len
        self._sizes = sizes
        self._modes = modes
        self._groups = groups
        self._group_table = group_table
        self._odd = odd
        self._nfiles = sum(1 for i in ids.values() for f in i if f != _DIR)
        self.files = _Files(self)
        self.dirs = _Dirs(self)

    # -- lookups --------------------------------------------------------------------------------
    def _file_id(self, path: str) -> int | None:
        parent, name = posixpath.split(path)
        names = self._names.get(parent)
        if names is None or not name:
            return None
        i = bisect.bisect_left(names, name)
        if i == len(names) or names[i] != name:
            return None
        fid = self._ids[parent][i]
        return None if fid == _DIR else fid

    def _make(self, path: str, fid: int) -> Entry:
        kind, legacy, remote, output = self._group_table[self._groups[fid]]
        oid = self._odd.get(fid)
        if oid is None:
            n = self._oid_len[fid]
            oid = self._oids[fid * _WIDTH:fid * _WIDTH + n].hex()
        size = self._sizes[fid]
        return Entry(path, kind, self._modes[fid], None if size < 0 else size, oid, legacy, remote, output)

    def _entry(self, path: str) -> Entry | None:
        fid = self._file_id(path)
        return None if fid is None else self._make(path, fid)

    def set_size(self, path: str, size: int) -> None:
        """Remember the size of the file at `path` (sizes of an object never change)."""
        fid = self._file_id(path)
        if fid is not None:
            self._sizes[fid] = size

    @staticmethod
    def normalize(path: str) -> str:
        path = posixpath.normpath("/" + path.replace("\\", "/")).lstrip("/")
        return "" if path == "." else path

    def get(self, path: str) -> Entry | None:
        return self._entry(self.normalize(path))

    def is_dir(self, path: str) -> bool:
        return self.normalize(path) in self._names

    def exists(self, path: str) -> bool:
        path = self.normalize(path)
        return path in self._names or self._file_id(path) is not None

    def listdir(self, path: str) -> list[str]:
        return self._names[self.normalize(path)]

    def walk_files(self, path: str = "") -> Iterator[Entry]:
        """Every file at or below `path`, in path order (as sorted() orders the full paths);
        memory: one directory level per depth, never the whole tree."""
        root = self.normalize(path)
        fid = self._file_id(root) if root else None
        if fid is not None:
            yield self._make(root, fid)
            return
        if root not in self._names:
            return
        yield from self._walk(root)

    def _walk(self, root: str) -> Iterator[Entry]:
        prefix = root + "/" if root else ""
        names, ids = self._names[root], self._ids[root]
        # Full-path order puts "a/b.txt" before "a/b/x": sort subdirectories as "name/".
        order = sorted(range(len(names)), key=lambda i: names[i] + "/" if ids[i] == _DIR else names[i]) \
            if _DIR in ids else range(len(names))
        for i in order:
            fid = ids[i]
            if fid == _DIR:
                yield from self._walk(prefix + names[i])
            else:
                yield self._make(prefix + names[i], fid)

    def memory_bytes(self) -> int:
        """Bytes the tree's own structures take (names counted once each), for tests/metrics."""
        seen: set[int] = set()
        total = sys.getsizeof(self._names) + sys.getsizeof(self._ids)
        for d, names in self._names.items():
            total += sys.getsizeof(d) + sys.getsizeof(names) + sys.getsizeof(self._ids[d])
            for n in names:
                if id(n) not in seen:
                    seen.add(id(n))
                    total += sys.getsizeof(n)
        return total + sum(sys.getsizeof(x) for x in (self._oids, self._oid_len, self._sizes, self._modes,
                                                          self._groups))
