"""FUSE inode numbers for a snapshot in O(directories) memory, not O(files) (issue 11, item 3).

readdirplus hands the kernel an inode for every listed entry, so `find` over a 1M-file tree
would make 1M table rows if each inode were a row. Instead, inodes are numbered in blocks: the
first time a directory's children need inodes, the directory gets a contiguous range, one inode
per child in the snapshot's sorted name order (inode = block start + index in the names list).

- inode -> path: a bisect over the block starts (array 'Q') to the block, then the block's
  directory path + the name at that index. A block keeps a reference to the names list it was
  made from, so an inode of an older listing still names the path it was given for.
- path -> inode: the parent directory's current block, then a bisect of the name.

A refresh to a new commit keeps a directory's block when its listing is the same (its inodes
stay), and retires it when the listing changed or one of its changed children has open files:
the next lookup of a child gets a new block (fresh inodes), while the old block still resolves
the inodes the kernel holds. An old block is freed once the kernel has forgotten every inode
of it (lookup counts are kept per block: each lookup reply and each readdirplus entry adds one,
a FORGET takes its count away), so memory stays bounded across refreshes.
"""
from __future__ import annotations

import bisect
import posixpath
from array import array
from collections.abc import Callable, Iterable, Iterator

ROOT_INODE = 1


class _Block:
    """The inodes [start, start + len(names)) of the children of directory `folder`."""

    __slots__ = ("start", "folder", "names", "refs", "current")

    def __init__(self, start: int, folder: str, names: list[str]):
        self.start = start
        self.folder = folder
        self.names = names        # the snapshot's sorted child names when the block was made
        self.refs = 0             # lookups the kernel holds on inodes of this block
        self.current = True       # still the block new lookups of `folder`'s children get

    def path(self, index: int) -> str:
        name = self.names[index]
        return f"{self.folder}/{name}" if self.folder else name


class InodeTable:
    """Inode <-> repository path for one mount. `names_of(folder)` gives the current snapshot's
    sorted child names of a directory (None: not a directory now); `root` is the mounted
    directory (inode 1). Every method is O(log) in the number of blocks plus the folder's size
    where it bisects a names list; memory is one block per directory whose children were
    handed out (plus old blocks the kernel still holds)."""

    def __init__(self, names_of: Callable[[str], list[str] | None], root: str):
        self._names_of = names_of
        self.root = root
        self._starts = array("Q")                 # block starts, ascending
        self._blocks: list[_Block] = []            # parallel to _starts
        self._current: dict[str, _Block] = {}      # directory -> the block its children get now
        self._next = ROOT_INODE + 1

    # -- numbering --------------------------------------------------------------------------------
    def children(self, folder: str) -> _Block:
        """The current block of `folder`'s children (made now if none). KeyError: not a
        directory in the snapshot."""
        block = self._current.get(folder)
        if block is None:
            names = self._names_of(folder)
            if names is None:
                raise KeyError(folder)
            block = _Block(self._next, folder, names)
            self._next += max(len(names), 1)
            self._starts.append(block.start)
            self._blocks.append(block)
            self._current[folder] = block
        return block

    def inode(self, path: str) -> int:
        """The inode of `path` (a path at or below the root that exists in the snapshot);
        KeyError when it does not."""
        if path == self.root:
            return ROOT_INODE
        parent, name = posixpath.split(path)
        block = self.children(parent)
        names = block.names
        i = bisect.bisect_left(names, name)
        if i == len(names) or names[i] != name:
            raise KeyError(path)
        return block.start + i

    def known(self, path: str) -> int | None:
        """The inode `path` has now, without making a block (None: none given out)."""
        if path == self.root:
            return ROOT_INODE
        parent, name = posixpath.split(path)
        block = self._current.get(parent)
        if block is None:
            return None
        i = bisect.bisect_left(block.names, name)
        return block.start + i if i < len(block.names) and block.names[i] == name else None

    def _block_at(self, inode: int) -> tuple[int, _Block] | None:
        at = bisect.bisect_right(self._starts, inode) - 1
        if at < 0:
            return None
        block = self._blocks[at]
        return (at, block) if inode - block.start < len(block.names) else None

    def path(self, inode: int) -> str:
        """The repository path `inode` was given for (KeyError: never given, or freed)."""
        if inode == ROOT_INODE:
            return self.root
        found = self._block_at(inode)
        if found is None:
            raise KeyError(inode)
        return found[1].path(inode - found[1].start)

    # -- the kernel's lookup counts ------------------------------------------------------------------
    def looked_up(self, inode: int, count: int = 1) -> None:
        """The kernel took `count` references on `inode` (a lookup reply, readdirplus entries:
        pass the first inode of a run of entries of one block and their number)."""
        if inode != ROOT_INODE:
            found = self._block_at(inode)
            if found is not None:
                found[1].refs += count

    def forget(self, inode: int, count: int, held: Iterable[int] = ()) -> None:
        """The kernel dropped `count` references on `inode`; an old block nobody holds any
        more is freed (unless one of the `held` inodes - open files - is in it)."""
        if inode == ROOT_INODE:
            return
        found = self._block_at(inode)
        if found is not None:
            found[1].refs -= count
            self._maybe_free(found[0], found[1], held)

    def _maybe_free(self, at: int, block: _Block, held: Iterable[int]) -> None:
        if block.current or block.refs > 0:
            return
        end = block.start + len(block.names)
        if any(block.start <= inode < end for inode in held):
            return
        del self._starts[at]
        del self._blocks[at]

    # -- a new snapshot -------------------------------------------------------------------------------
    def refresh(self, changed: Callable[[str], bool], held: set[int],
                changed_rows: Callable[[str, list[str]], Iterable[int] | None] | None = None,
                ) -> tuple[list[tuple[int, int, str]], set[int]]:
        """Follow a new snapshot (`names_of` answers from it now). `changed(path)`: whether what
        the kernel knows of `path` may be stale; `changed_rows(folder, old names)`, if given:
        the indexes of those names that changed, in bulk (None: ask `changed` per path);
        `held`: inodes with open files. Returns (what the kernel must drop: (inode or 0 for the
        name alone, parent inode or 0, name) - the root is (1, 0, its name) - and the inodes
        retired: held, changed, kept by their open files while their path gets a fresh inode)."""
        stale: list[tuple[int, int, str]] = [(ROOT_INODE, 0, posixpath.basename(self.root))]
        retired: set[int] = set()
        folders = list(self._current.items())
        parents = {folder: self.known(folder) or 0 for folder, _ in folders}    # the numbers the kernel has
        for folder, block in folders:
            now = self._names_of(folder)
            drop = now is None or (now is not block.names and now != block.names)
            parent = parents[folder]
            prefix = folder + "/" if folder else ""
            rows = changed_rows(folder, block.names) if changed_rows is not None else None
            if rows is None:
                rows = [i for i, name in enumerate(block.names) if changed(prefix + name)]
            for i in rows:
                inode = block.start + i
                stale.append((inode, parent, block.names[i]))
                if inode in held:
                    retired.add(inode)
                    drop = True
            if drop:
                # Its children get fresh inodes: the kernel drops every name of the old listing,
                # so it forgets the old inodes (then the block is freed) instead of mixing both.
                stale.extend((0, parent, name) for name in block.names if parent)
                block.current = False
                del self._current[folder]
            else:
                block.names = now           # the same names: the old list can go
        # A file open through an inode of an older block (its folder was renumbered while it
        # stayed open) is checked too: its path may have changed under it since.
        for inode in held:
            found = self._block_at(inode) if inode != ROOT_INODE and inode not in retired else None
            if found is not None and not found[1].current and changed(found[1].path(inode - found[1].start)):
                stale.append((inode, 0, ""))
                retired.add(inode)
        for at in range(len(self._blocks) - 1, -1, -1):
            self._maybe_free(at, self._blocks[at], held)
        return stale, retired

    # -- what there is ------------------------------------------------------------------------------
    def blocks(self) -> Iterator[tuple[int, str, list[str], bool]]:
        """(start, folder, names, current) of every block."""
        for block in self._blocks:
            yield block.start, block.folder, block.names, block.current

    def __len__(self) -> int:
        """How many blocks there are (the table's size: O(directories), never O(files))."""
        return len(self._blocks)

    def inodes(self, folders: Iterable[str] | None = None) -> Iterator[tuple[int, str]]:
        """(inode, path) of every inode given out (for tests and rare events)."""
        for block in self._blocks:
            if folders is None or block.folder in folders:
                for i in range(len(block.names)):
                    yield block.start + i, block.path(i)
