"""The one stat model every frontend shows (FUSE attributes, the hooks' os.stat_result, `dda ls`)."""
from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Literal

Kind = Literal["file", "dir", "symlink"]
BLKSIZE = 128 * 1024          # preferred I/O size: what the kernel and buffered readers ask for
DIR_MODE = stat.S_IFDIR | 0o755
DIR_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Attr:
    """What stat() says about one path of a snapshot. Inode numbers and owners are the
    frontend's business (FUSE keeps a table, the hooks hash the path; uid/gid: the reader's)."""

    mode: int            # st_mode: S_IFDIR, S_IFREG or S_IFLNK plus permission bits
    size: int            # bytes; a directory says 4096, a symlink the length of its target
    mtime_ns: int        # the commit's time: every path of a snapshot has it
    nlink: int

    @property
    def blocks(self) -> int:
        """st_blocks: 512-byte units, as `du` counts them."""
        return -(-self.size // 512)

    @property
    def blksize(self) -> int:
        return BLKSIZE

    @property
    def mtime(self) -> int:
        return self.mtime_ns // 10**9

    @property
    def kind(self) -> Kind:
        if stat.S_ISDIR(self.mode):
            return "dir"
        return "symlink" if stat.S_ISLNK(self.mode) else "file"


def dir_attr(mtime_ns: int, nlink: int = 2) -> Attr:
    """A directory's attributes; nlink: 2 + its subdirectories, as a checkout has (Tree.dir_nlink)."""
    return Attr(DIR_MODE, DIR_SIZE, mtime_ns, nlink)


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One name of a listing: its type comes from the snapshot; no size (sizes cost requests)."""

    name: str
    path: str            # repository path
    kind: Kind
    mode: int            # st_mode type and permission bits (S_IFDIR for a directory)
    size: int | None     # known without asking anyone (else None: stat() it)
