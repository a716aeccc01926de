"""The immutable view of one commit: what a checkout looks like after `dvc pull`.

Stored compactly so a 1M-file tree fits in a daemon's memory (issue 11, item 3): per
directory a sorted list of interned child names and a parallel array of file ids (-1: a
subdirectory); per file, in flat arrays, its md5 as 16 raw bytes, its size (-1: not known
yet) and a "group" number naming what files share (kind, mode, legacy, remote, output,
root). What few files have (a git sha, an LFS oid, a symlink target, a cloud version id)
sits in small dicts by file id. `Entry` objects are made on demand and never stored.

`Tree.files` and `Tree.dirs` are read-only mapping views with the shapes they always had
(path -> Entry, directory -> sorted names); the only mutation is `set_size`.
"""
from __future__ import annotations

import bisect
import posixpath
import stat
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

FILE_MODE = stat.S_IFREG | 0o644
EXEC_MODE = stat.S_IFREG | 0o755
LINK_MODE = stat.S_IFLNK | 0o777    # a symlink as a checkout shows it


@dataclass(frozen=True)
class Entry:
    path: str
    kind: Literal["git", "dvc", "broken", "lfs"]
    mode: int                 # st_mode bits of a regular file or symlink
    size: int | None          # None only until looked up (never shown to users as a size)
    oid: str                  # git blob sha, DVC md5, LFS sha256 ("" for a broken output)
    legacy: bool = False      # DVC 2 object
    remote: str | None = None # DVC remote name (None: the default one)
    output: str | None = None # the DVC output this file belongs to
    root: str = ""            # folder of the DVC (sub)repository the output belongs to
    target: str | None = None # a git symlink's target, as committed
    version: str | None = None  # cloud-versioned remote: the object's version id (key = path in its repo)
    # The size came from a remote's answer, not the repository: never handed to the fetcher
    # as the truth (checked again; corrected when the object verifies).
    looked_up: bool = field(default=False, compare=False, repr=False)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True)
class Problem:
    """One output (or git entry) that cannot be shown as `dvc pull` would: reported once,
    shown at `path` (when known) and every read inside it fails naming `cause`."""
    path: str | None   # repository path of the output (None: not known)
    source: str        # the file that declared it (.dvc, dvc.lock, git tree)
    cause: str         # one line, already naming the file and field
    is_dir: bool = False

    def message(self) -> str:
        where = self.path if self.path is not None else self.source
        return f"{where}: unavailable: {self.cause}"


_DIR = -1            # a directory's slot in its parent's id array
DIR_ID = _DIR        # the same, for readers of Tree.dir_columns
_DIR_MODE = stat.S_IFDIR | 0o755
_MD5_LEN = 16
# the md5 of no bytes: the one DVC object a size of 0 can be true for (store/verify.py); a
# .dvc file or manifest saying 0 for any other md5 is not believed (size unknown: learned from
# the verified object, as `dvc pull` would give its bytes)
_EMPTY_MD5 = bytes.fromhex("d41d8cd98f00b204e9800998ecf8427e")


class ManifestClash(ValueError):
    """A manifest that cannot be laid out as a folder (a name twice, a file used as a folder):
    args = (the repository path in question, one line saying why)."""

    def __str__(self) -> str:
        return str(self.args[-1])


class TreeBuilder:
    """Collects files (a later `add` of a path replacing an earlier one), empty folders and
    removals, and builds a Tree in O(n log k) for n files in folders of at most k entries.
    While building, each folder is a dict name -> file id (or _DIR); a folder filled from one
    compact manifest in name order is kept "sealed" instead, as the sorted names and ids the
    Tree will hold (no dict entry per file), and turned into a dict only if changed later.
    No path string and no Entry is kept per file."""

    def __init__(self) -> None:
        self._dirs: dict[str, dict[str, int]] = {"": {}}
        self._sealed: dict[str, tuple[list[str], array]] = {}   # folder -> its files (sorted), when sealed
        self._explicit: set[str] = set()          # folders kept even when empty
        self._oids = bytearray()                  # 16 bytes per file id
        self._sizes = array("q")
        self._groups = array("I")
        self._group_ids: dict[tuple, int] = {}
        self._odd: dict[int, str] = {}            # oids that are not an md5 (git sha, LFS, "")
        self._targets: dict[int, str] = {}
        self._versions: dict[int, str] = {}

    # -- what is there ----------------------------------------------------------------------------
    def is_file(self, path: str) -> bool:
        parent, name = posixpath.split(path)
        kids = self._dirs.get(parent)
        return kids is not None and (kids.get(name, _DIR) != _DIR or self._in_sealed(parent, name))

    def _in_sealed(self, folder: str, name: str) -> bool:
        sealed = self._sealed.get(folder)
        if sealed is None:
            return False
        i = bisect.bisect_left(sealed[0], name)
        return i < len(sealed[0]) and sealed[0][i] == name

    def _thaw(self, folder: str) -> None:
        """A sealed folder about to change: its files go into its dict."""
        sealed = self._sealed.pop(folder, None)
        if sealed is not None:
            self._dirs[folder].update(zip(*sealed))

    def file_above(self, path: str) -> str | None:
        """The nearest ancestor of `path` that is a file, if any."""
        parent = posixpath.dirname(path)
        while parent:
            if self.is_file(parent):
                return parent
            parent = posixpath.dirname(parent)
        return None

    # -- changes ----------------------------------------------------------------------------------
    def _dir(self, path: str) -> dict[str, int]:
        kids = self._dirs.get(path)
        if kids is None:
            parent, name = posixpath.split(path)
            above = self._dir(parent)
            if above.get(name, _DIR) != _DIR or self._in_sealed(parent, name):
                raise ManifestClash(path, f"{path!r} is a file, but other entries need it to be a directory")
            kids = self._dirs[path] = {}
            above[sys.intern(name)] = _DIR
        return kids

    def _group(self, kind: str, mode: int, legacy: bool, remote: str | None, output: str | None,
               root: str) -> int:
        key = (kind, mode, legacy, remote, output, root)
        gid = self._group_ids.get(key)
        if gid is None:
            gid = self._group_ids[key] = len(self._group_ids)
        return gid

    def add(self, path: str, kind: str, mode: int, size: int | None, oid: str, legacy: bool = False,
            remote: str | None = None, output: str | None = None, root: str = "", target: str | None = None,
            version: str | None = None) -> None:
        """Add (or replace) the file or symlink at repository path `path`."""
        parent, name = posixpath.split(path)
        kids = self._dir(parent)
        self._thaw(parent)
        if kids.get(name) == _DIR:
            self.clear(path)
        fid = self._new(oid, size, self._group(kind, mode, legacy, remote, output, root))
        if target is not None:
            self._targets[fid] = target
        if version is not None:
            self._versions[fid] = version
        kids[sys.intern(name)] = fid

    def _new(self, oid: str, size: int | None, gid: int) -> int:
        fid = len(self._sizes)
        raw = bytes.fromhex(oid) if len(oid) == 2 * _MD5_LEN and oid == oid.lower() and _is_hex(oid) else None
        if raw is None:
            self._odd[fid] = oid
            raw = bytes(_MD5_LEN)
        self._oids += raw
        if size == 0 and fid not in self._odd and raw != _EMPTY_MD5:
            size = None
        self._sizes.append(-1 if size is None else size)
        self._groups.append(gid)
        return fid

    def add_dir(self, path: str) -> None:
        """A folder shown even when empty (a submodule, an empty tracked directory)."""
        self._dir(path)
        self._explicit.add(path)

    def clear(self, path: str) -> None:
        """Remove whatever lies at or below `path` (files, folders, empty folders)."""
        parent, name = posixpath.split(path)
        kids = self._dirs.get(parent)
        if kids is not None and self._in_sealed(parent, name):
            self._thaw(parent)
        if kids is not None and kids.pop(name, None) == _DIR:
            stack = [path]
            while stack:
                folder = stack.pop()
                self._sealed.pop(folder, None)
                below = self._dirs.pop(folder, {})
                stack.extend(f"{folder}/{n}" for n, fid in below.items() if fid == _DIR)
        prefix = path + "/"
        if self._explicit:
            self._explicit = {d for d in self._explicit if not (d == path or d.startswith(prefix))}

    def add_manifest(self, base: str, items: "Sequence[Any]", kind: str, legacy: bool, remote: str | None,
                     output: str, root: str, pick: "Any") -> None:
        """Lay a directory output's entries under `base` (cleared by the caller). `pick(remote,
        versions)` -> (remote, version id). Raises ManifestClash (and leaves `base` cleared)
        when two entries name one file or a file is needed as a folder."""
        try:
            if hasattr(items, "md5") and hasattr(items, "dir_of"):
                self._add_compact(base, items, kind, legacy, remote, output, root)
            else:
                for item in items:
                    where, version = pick(remote, item.versions)
                    path = f"{base}/{item.relpath}"
                    parent, name = posixpath.split(path)
                    kids = self._dir(parent)
                    self._thaw(parent)
                    if name in kids:
                        raise ManifestClash(path, _clash(item.relpath, kids[name]))
                    fid = self._new(item.md5, item.size,
                                    self._group(kind, EXEC_MODE if item.isexec else FILE_MODE, legacy, where,
                                                output, root))
                    if version is not None:
                        self._versions[fid] = version
                    kids[sys.intern(name)] = fid
            self._dir(base)
        except ManifestClash as clash:
            self.clear(base)
            path = clash.args[0]
            if path.startswith(base + "/") and len(clash.args) == 2 and "is a file" in clash.args[1]:
                raise ManifestClash(path, _clash(path[len(base) + 1:], _DIR)) from None
            raise

    def _add_compact(self, base: str, manifest: Any, kind: str, legacy: bool, remote: str | None, output: str,
                     root: str) -> None:
        folders = [self._dir(f"{base}/{d}" if d else base) for d in manifest.dirs]
        start = len(self._sizes)
        plain = self._group(kind, FILE_MODE, legacy, remote, output, root)
        self._oids += manifest.md5
        self._sizes.extend(manifest.sizes)
        if 0 in manifest.sizes:      # 0 bytes for an md5 that is not the empty one: unknown
            md5, sizes = manifest.md5, self._sizes
            for i, size in enumerate(manifest.sizes):
                if size == 0 and md5[i * _MD5_LEN:(i + 1) * _MD5_LEN] != _EMPTY_MD5:
                    sizes[start + i] = -1
        if any(manifest.isexec):
            run = self._group(kind, EXEC_MODE, legacy, remote, output, root)
            self._groups.extend(run if x else plain for x in manifest.isexec)
        else:
            self._groups.extend(array("I", [plain]) * len(manifest))
        names, dir_of = manifest.names, manifest.dir_of
        # Files of each folder, in manifest order; DVC writes manifests sorted, so each
        # folder's names usually come sorted and the lists are what the Tree keeps.
        listed: list[list[str]] = [[] for _ in folders]
        fids: list[array] = [array("i") for _ in folders]
        ordered = True
        for i in range(len(names)):
            d = dir_of[i]
            here, name = listed[d], names[i]
            if here and name <= here[-1]:
                ordered = False
                break
            here.append(name)
            fids[d].append(start + i)
        if not ordered:
            del listed, fids
            for i in range(len(names)):
                kids = folders[dir_of[i]]
                name = names[i]
                if name in kids:
                    raise ManifestClash(f"{base}/{manifest.relpath(i)}", _clash(manifest.relpath(i), kids[name]))
                kids[name] = start + i
            return
        paths = [f"{base}/{d}" if d else base for d in manifest.dirs]
        for path, here, ids in zip(paths, listed, fids):
            if here:
                self._sealed[path] = (here, ids)
        for path in self._dirs_under(base):   # a subfolder named like a file of its parent
            parent, name = posixpath.split(path)
            if self._in_sealed(parent, name):
                raise ManifestClash(path, f"{path!r} is a file, but other entries need it to be a directory")

    def _dirs_under(self, base: str) -> Iterator[str]:
        stack = [base]
        while stack:
            folder = stack.pop()
            for name, fid in self._dirs.get(folder, {}).items():
                if fid == _DIR:
                    path = f"{folder}/{name}"
                    yield path
                    stack.append(path)

    # -- the result -------------------------------------------------------------------------------
    def build(self, problems: Iterable["Problem"] = ()) -> "Tree":
        """The Tree (call once: the builder hands its arrays over). Folders left with
        nothing below them (their content removed) vanish, unless added with add_dir."""
        keep: dict[str, bool] = {}
        for path in sorted(self._dirs, key=lambda d: -d.count("/") if d else 1):   # deepest first
            kids = self._dirs[path]
            keep[path] = path in self._explicit or path in self._sealed or any(
                fid != _DIR or keep.get(f"{path}/{n}" if path else n, False) for n, fid in kids.items())
        names: dict[str, list[str]] = {}
        ids: dict[str, array] = {}
        for path, kids in self._dirs.items():
            if not keep[path] and path:
                continue
            prefix = path + "/" if path else ""
            sealed = self._sealed.pop(path, None)
            if sealed is not None:
                subs = [n for n, fid in kids.items() if fid == _DIR and keep.get(prefix + n, False)]
                if not subs:      # the common case: the manifest's own lists, no copy
                    names[path], ids[path] = sealed
                    continue
                kids = dict(kids)
                kids.update(zip(*sealed))
            listed = sorted(n for n, fid in kids.items() if fid != _DIR or keep.get(prefix + n, False))
            names[path] = listed
            ids[path] = array("i", map(kids.__getitem__, listed))
        groups: list[tuple] = [()] * len(self._group_ids)
        for group, gid in self._group_ids.items():
            groups[gid] = group
        tree = Tree.__new__(Tree)
        tree._init(names, ids, self._oids, self._sizes, self._groups, groups, self._odd, self._targets,
                   self._versions, problems)
        self._dirs, self._sealed = {"": {}}, {}
        return tree


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
        return True
    except ValueError:
        return False


def _clash(relpath: str, existing: int) -> str:
    if existing == _DIR:
        return f"{relpath!r} is a file, but other entries need it to be a directory"
    return f"names a file twice ({relpath!r})"


class _Files(Mapping[str, Entry]):
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


class _Dirs(Mapping[str, list[str]]):
    """directory path -> its sorted child names (the tree's own list: do not change it)."""

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
    """One commit's checkout, compact (see the module docstring): `files` and `dirs` are
    read-only views; `problems`/`broken` are the outputs shown as unavailable."""

    def __init__(self, files: Mapping[str, Entry], empty_dirs: Iterable[str] = (),
                 problems: Iterable[Problem] = ()):
        """A tree of `files` (path -> Entry) and `empty_dirs`; big trees are built with
        TreeBuilder (compose_tree) instead."""
        builder = TreeBuilder()
        for path, e in files.items():
            builder.add(path, e.kind, e.mode, e.size, e.oid, e.legacy, e.remote, e.output, e.root, e.target,
                        e.version)
        for d in empty_dirs:
            if d:
                builder.add_dir(d)
        built = builder.build(problems)
        self.__dict__.update(built.__dict__)
        self.files = _Files(self)
        self.dirs = _Dirs(self)

    def _init(self, names: dict[str, list[str]], ids: dict[str, array], oids: bytearray, sizes: array,
              groups: array, group_table: list[tuple], odd: dict[int, str], targets: dict[int, str],
              versions: dict[int, str], problems: Iterable[Problem]) -> None:
        self._names = names
        self._ids = ids
        self._oids = oids
        self._sizes = sizes
        self._groups = groups
        self._group_table = group_table
        self._odd = odd
        self._targets = targets
        self._versions = versions
        self._looked = bytearray()    # file id -> 1: its size came from a remote's answer
        self._nlinks: dict[str, int] = {}   # directory -> st_nlink (dir_nlink's memo)
        self._nfiles = sum(len(i) - i.count(_DIR) for i in ids.values())
        self.problems = list(problems)
        # Output path -> its problem, for outputs shown as unavailable.
        self.broken = {p.path: p for p in self.problems if p.path}
        self.files = _Files(self)
        self.dirs = _Dirs(self)

    # -- lookups ----------------------------------------------------------------------------------
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
        kind, mode, legacy, remote, output, root = self._group_table[self._groups[fid]]
        oid = self._odd.get(fid)
        if oid is None:
            oid = self._oids[fid * _MD5_LEN:fid * _MD5_LEN + _MD5_LEN].hex()
        size = self._sizes[fid]
        return Entry(path, kind, mode, None if size < 0 else size, oid, legacy, remote, output, root,
                     self._targets.get(fid), self._versions.get(fid), bool(self._looked) and self._looked[fid] == 1)

    def _entry(self, path: str) -> Entry | None:
        fid = self._file_id(path)
        return None if fid is None else self._make(path, fid)

    def set_size(self, path: str, size: int, looked_up: bool | None = None) -> None:
        """Remember the size of the file at `path` (sizes of an object never change).
        looked_up: whether that size came from a remote's answer (None: leave as it was)."""
        fid = self._file_id(path)
        if fid is None:
            return
        self._sizes[fid] = size
        if looked_up is not None and (looked_up or self._looked):
            if not self._looked:
                self._looked = bytearray(len(self._sizes))
            self._looked[fid] = 1 if looked_up else 0

    def resize_object(self, oid: str, size: int) -> int:
        """Set `size` on every file of object `oid` whose size came from a remote's answer
        (a verified object corrected it); returns how many changed. A scan of the md5 bytes
        in C, no path or Entry made: corrections are rare, trees are big."""
        if not self._looked:
            return 0
        if len(oid) == 2 * _MD5_LEN and oid == oid.lower() and _is_hex(oid):
            raw, fids, at = bytes.fromhex(oid), [], self._oids.find(bytes.fromhex(oid))
            while at >= 0:
                if at % _MD5_LEN == 0 and at // _MD5_LEN not in self._odd:
                    fids.append(at // _MD5_LEN)
                at = self._oids.find(raw, at + 1)
        else:
            fids = [fid for fid, other in self._odd.items() if other == oid]
        changed = 0
        for fid in fids:
            if fid < len(self._looked) and self._looked[fid] and self._sizes[fid] != size:
                self._sizes[fid] = size
                changed += 1
        return changed

    def dir_rows(self, path: str, start: int = 0) -> Iterator[tuple[str, int, int, int]]:
        """(name, file id, st_mode, size) of each child of directory `path` from index `start`,
        in name order, straight from the arrays (no Entry, no path string): file id -1 is a
        subdirectory (mode S_IFDIR|0755), size -1 not known yet. KeyError: not a directory."""
        names, ids = self._names[path], self._ids[path]
        sizes, groups = self._sizes, self._groups
        modes = [group[1] for group in self._group_table]
        for i in range(start, len(names)):
            fid = ids[i]
            if fid == _DIR:
                yield names[i], -1, _DIR_MODE, -1
            else:
                yield names[i], fid, modes[groups[fid]], sizes[fid]

    def dir_columns(self, path: str) -> tuple[list[str], "array[int]", "array[int]", "array[int]", list[int]]:
        """The arrays behind directory `path`'s listing, for a per-entry loop that must make
        no object (FUSE readdir of 1M files): (names in name order, file id per name - -1 a
        subdirectory -, size per file id - -1 not known -, group per file id, st_mode per
        group). Read only: the sizes array fills in place as sizes are learned. KeyError: not
        a directory."""
        return (self._names[path], self._ids[path], self._sizes, self._groups,
                [group[1] for group in self._group_table])

    def dir_nlink(self, path: str) -> int:
        """st_nlink of directory `path` as a checkout has it: 2 plus one per subdirectory
        (each one's `..`); 2 when `path` is not a directory. Counted in C over the folder's id
        array, once per folder (memo)."""
        n = self._nlinks.get(path)
        if n is None:
            ids = self._ids.get(path)
            n = self._nlinks[path] = 2 + (ids.count(_DIR) if ids is not None else 0)
        return n

    def has_unsized(self, path: str) -> bool:
        """Whether directory `path` has a file whose size is not known yet (no Entry made)."""
        sizes = self._sizes
        return any(fid != _DIR and sizes[fid] < 0 for fid in self._ids.get(path, ()))

    def row_keys(self, path: str) -> list[tuple[bytes | str, int] | None]:
        """Per child of directory `path`, in name order: None for a subdirectory, else (its
        object id - 16 md5 bytes or the odd id -, its mode); equal keys mean the same content
        and mode (comparing two snapshots without making Entry objects). KeyError: not a
        directory."""
        oids, odd, groups = self._oids, self._odd, self._groups
        modes = [group[1] for group in self._group_table]
        keys: list[tuple[bytes | str, int] | None] = []
        for fid in self._ids[path]:
            if fid == _DIR:
                keys.append(None)
            else:
                other = odd.get(fid)
                at = fid * _MD5_LEN
                keys.append((oids[at:at + _MD5_LEN] if other is None else other, modes[groups[fid]]))
        return keys

    def file_ids_of(self, oid: str) -> set[int]:
        """File ids of object `oid` (a scan of the md5 bytes in C; for rare events)."""
        if len(oid) == 2 * _MD5_LEN and oid == oid.lower() and _is_hex(oid):
            raw, fids, at = bytes.fromhex(oid), set(), self._oids.find(bytes.fromhex(oid))
            while at >= 0:
                if at % _MD5_LEN == 0 and at // _MD5_LEN not in self._odd:
                    fids.add(at // _MD5_LEN)
                at = self._oids.find(raw, at + 1)
            return fids
        return {fid for fid, other in self._odd.items() if other == oid}

    def unsized(self, folder: str, limit: int | None = None) -> list[tuple[str, str, tuple]]:
        """(name, md5, group) of the DVC files directly in `folder` (not below) whose size is
        not known, in name order - no path or Entry made: a 100k-file folder's sizes are
        filled in bulk (Engine.fill_known_sizes). `group`: (kind, mode, legacy, remote, output,
        root), shared by the files of one output. Cloud-versioned files are left out (their
        objects are found by version, not by md5). limit: at most that many rows (the first
        ones), so a probe of a cold folder builds no row for the rest."""
        names, ids = self._names.get(folder), self._ids.get(folder)
        if names is None or ids is None or limit == 0:
            return []
        sizes, groups, table, oids, odd = self._sizes, self._groups, self._group_table, self._oids, self._odd
        out = []
        for name, fid in zip(names, ids):
            if fid == _DIR or sizes[fid] >= 0 or fid in self._versions:
                continue
            group = table[groups[fid]]
            if group[0] != "dvc":
                continue
            oid = odd.get(fid)
            out.append((name, oid if oid is not None else oids[fid * _MD5_LEN:(fid + 1) * _MD5_LEN].hex(), group))
            if len(out) == limit:
                break
        return out

    def unsized_between(self, folder: str, start: int, stop: int) -> list[tuple[int, str, str, tuple]]:
        """`unsized`, for the children of `folder` at name indexes [start, stop) only, each as
        (file id, name, md5, group): a stat-ahead round of a 100k-file folder makes no Entry
        and looks at no other row. Empty when `folder` is not a directory."""
        names, ids = self._names.get(folder), self._ids.get(folder)
        if names is None or ids is None:
            return []
        sizes, groups, table, oids, odd, versions = (self._sizes, self._groups, self._group_table, self._oids,
                                                     self._odd, self._versions)
        out = []
        for i in range(max(0, start), min(stop, len(names))):
            fid = ids[i]
            if fid == _DIR or sizes[fid] >= 0 or fid in versions:
                continue
            group = table[groups[fid]]
            if group[0] != "dvc":
                continue
            oid = odd.get(fid)
            out.append((fid, names[i], oid if oid is not None else oids[fid * _MD5_LEN:(fid + 1) * _MD5_LEN].hex(),
                        group))
        return out

    def set_looked_up_size(self, fid: int, size: int) -> bool:
        """Set the size of file `fid` (from `unsized_between`) learned from a remote's answer,
        if it is still unknown; True when set. No path, no Entry."""
        own = self._sizes
        if own[fid] >= 0:
            return False
        own[fid] = size
        if not self._looked:
            self._looked = bytearray(len(own))
        self._looked[fid] = 1
        return True

    def child(self, parent: str, name: str) -> tuple[int, int, int, int] | None:
        """(name index, file id, st_mode, size or -1) of the child `name` of directory
        `parent` (file id -1: a subdirectory), straight from the arrays; None when there is
        no such child."""
        names = self._names.get(parent)
        if names is None:
            return None
        i = bisect.bisect_left(names, name)
        if i == len(names) or names[i] != name:
            return None
        fid = self._ids[parent][i]
        if fid == _DIR:
            return i, -1, _DIR_MODE, -1
        return i, fid, self._group_table[self._groups[fid]][1], self._sizes[fid]

    def set_sizes(self, folder: str, sizes: "Mapping[str, int]", looked_up: bool = True) -> int:
        """Set the size of every unsized file directly in `folder` whose object (md5) is in
        `sizes` (object sizes never change); returns how many were set. No path or Entry
        made, like `unsized`. looked_up: the sizes came from a remote's answer."""
        names, ids = self._names.get(folder), self._ids.get(folder)
        if names is None or ids is None or not sizes:
            return 0
        own, oids, odd, groups, table = self._sizes, self._oids, self._odd, self._groups, self._group_table
        done = []
        for fid in ids:
            if fid == _DIR or own[fid] >= 0 or fid in self._versions or table[groups[fid]][0] != "dvc":
                continue
            oid = odd.get(fid)
            size = sizes.get(oid if oid is not None else oids[fid * _MD5_LEN:(fid + 1) * _MD5_LEN].hex())
            if size is not None:
                own[fid] = size
                done.append(fid)
        if done and looked_up:
            if not self._looked:
                self._looked = bytearray(len(own))
            for fid in done:
                self._looked[fid] = 1
        return len(done)

    def memory_bytes(self) -> int:
        """Bytes the tree's own structures take (names counted once each), for benches."""
        seen: set[int] = set()
        total = sys.getsizeof(self._names) + sys.getsizeof(self._ids)
        for d, names in self._names.items():
            total += sys.getsizeof(d) + sys.getsizeof(names) + sys.getsizeof(self._ids[d])
            for n in names:
                if id(n) not in seen:
                    seen.add(id(n))
                    total += sys.getsizeof(n)
        return total + sum(sys.getsizeof(x) for x in (self._oids, self._sizes, self._groups, self._odd,
                                                      self._targets, self._versions, self._looked))

    @staticmethod
    def normalize(path: str) -> str:
        """A user-given path as a tree key: '/' separates names; a backslash is an ordinary
        character (POSIX), and `..` cannot climb above the repository."""
        path = posixpath.normpath("/" + path).lstrip("/")
        return "" if path == "." else path

    def problem_at(self, path: str) -> Problem | None:
        """The problem of the unavailable output at or above `path`, if any."""
        path = self.normalize(path)
        if not self.broken:
            return None
        while True:
            if path in self.broken:
                return self.broken[path]
            if not path:
                return None
            path = posixpath.dirname(path)

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
        memory: one folder level per depth, never the whole tree."""
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
        # Full-path order puts "a/b.txt" before "a/b/x": sort subfolders as "name/".
        order = sorted(range(len(names)), key=lambda i: names[i] + "/" if ids[i] == _DIR else names[i]) \
            if _DIR in ids else range(len(names))
        for i in order:
            fid = ids[i]
            if fid == _DIR:
                yield from self._walk(prefix + names[i])
            else:
                yield self._make(prefix + names[i], fid)

    def resolve(self, path: str, max_links: int = 40) -> str | None:
        """`path` with git symlinks followed inside the tree (None: a link points outside
        the repository, or is dangling). Raises OSError(ELOOP) on a symlink loop."""
        import errno
        import os

        names = [n for n in self.normalize(path).split("/") if n]
        done: list[str] = []
        hops = 0
        while names:
            name = names.pop(0)
            current = "/".join(done + [name])
            entry = self.files.get(current)
            if entry is not None and entry.is_symlink:
                hops += 1
                if hops > max_links:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if entry.target is None or entry.target.startswith("/"):
                    return None
                joined = posixpath.normpath(posixpath.join("/".join(done), entry.target))
                if joined == ".." or joined.startswith("../"):
                    return None
                names = [n for n in joined.split("/") if n not in ("", ".")] + names
                done = []
                continue
            if current not in self.files and current not in self.dirs:
                return None
            done.append(name)
        return "/".join(done)
