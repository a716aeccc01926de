"""pyfuse3 operations: a thin adapter over the file-system layer (sidecar.fs).

It keeps what only FUSE needs - the inode table, kernel cache timeouts, xattrs, the
prefetcher's read hooks - and asks `FileSystem` for everything else. Errors become the errno
`sidecar.errors.describe` gives them.

The content of a snapshot is immutable, so the kernel may cache entries, attributes and pages
for as long as it likes (long timeouts, keep_cache) - except a size we have not learned yet:
readdir answers names and types from the snapshot without sizing, and an entry whose size is
unknown goes out with zero timeouts, so the kernel asks (lookup/getattr) before it uses one.
"""
from __future__ import annotations

import asyncio
import bisect
import errno
import functools
import json
import logging
import os
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pyfuse3

from ..engine import Engine
from ..errors import DDAError, HashMismatch, NotFound, describe
from ..fetch.prefetch import Prefetcher, ReadState
from ..fs import Attr, FileSystem, Handle
from ..fs.filesystem import Refreshed
from ..fs.attr import DIR_MODE, DIR_SIZE
from ..snapshot.tree import DIR_ID
from .unlinked import unlinked_ino
from .inodes import InodeTable

log = logging.getLogger(__name__)
TIMEOUT = 24 * 3600.0
XATTR_COMMIT = b"user.dda.commit"
XATTR_STATUS = b"user.dda.status"
XATTR_REFRESH = b"user.dda.refresh"   # reading it on the root moves the mount to the branch's new tip
READDIR_CHUNK = 1024      # names encoded per step of a readdir (a reply takes ~780 at most)
_DOTS = 2                 # readdir offsets 0-1: `.` and `..`
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _fsencode_all(names: list[str]) -> list[bytes]:
    """os.fsencode of each name, in one C call for the lot (NUL never occurs in a name: a
    path can't hold it; if one did, each is encoded alone)."""
    out = "\0".join(names).encode(_FS_ENCODING, _FS_ERRORS).split(b"\0")
    return out if len(out) == len(names) else [os.fsencode(name) for name in names]


def _never_crash(handler):  # type: ignore[no-untyped-def]
    """Errors of the file-system layer become their errno (one log line unless ENOENT); an
    unexpected exception would end pyfuse3's main loop and leave readers with a dead mount:
    answer EIO and log it instead."""
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except DDAError as err:
            info = describe(err)
            if info.errno != errno.ENOENT:
                log.error("%s", info.message)
            raise pyfuse3.FUSEError(info.errno) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


@dataclass
class _Open:
    handle: Handle
    state: ReadState
    inode: int = 0                 # the inode it was opened through
    # (monotonic time, offset, end) of the last read that ran into the deadline
    timed_out: tuple[float, int, int] | None = None

    @property
    def path(self) -> str:
        return self.handle.path


# After a read hits the deadline the kernel retries the same pages at once (its readahead
# failed, so it reads the page synchronously): a retry within this window fails at once, so
# one read() waits one deadline, not two.
RETRY_AFTER_DEADLINE_WINDOW = 1.0


def _rows_changed(moved: Refreshed) -> Callable[[str, list[str]], list[int] | None]:
    """`InodeTable.refresh`'s bulk comparison: indexes of a folder's old names whose entry
    changed (a directory always counts: its listing may differ), from the two trees' arrays
    (a 1M-file walk's table compared without an Entry per file). None: compare per path."""
    old, new = moved.old_tree, moved.new_tree

    def rows(folder: str, names: list[str]) -> list[int] | None:
        if old is None or old.dirs.get(folder) is not names:
            return None
        now = new.dirs.get(folder)
        if now is None:
            return list(range(len(names)))
        before, after = old.row_keys(folder), new.row_keys(folder)
        found, j = [], 0
        for i, name in enumerate(names):
            j = bisect.bisect_left(now, name, j)
            if j == len(now) or now[j] != name:
                found.append(i)              # gone
            elif before[i] is None or after[j] is None or before[i] != after[j]:
                found.append(i)
        return found
    return rows


class DdaOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, engine: Engine, prefetcher: Prefetcher, subdir: str = ""):
        super().__init__()
        self.engine = engine
        self.fs = FileSystem(engine)
        self.prefetcher = prefetcher
        climbs = posixpath.normpath(subdir.lstrip("/") or ".")
        if climbs == ".." or climbs.startswith("../"):
            raise NotFound(f"--subdir {subdir!r}: climbs above the repository; name a directory inside it")
        self.root = engine.tree.normalize(subdir)
        if not engine.tree.is_dir(self.root):
            what = "is a file, not a directory" if self.root in engine.tree.files else "no such directory"
            raise NotFound(f"--subdir {subdir!r}: {what} in revision {engine.info.revision}")
        self.uid, self.gid = os.getuid(), os.getgid()
        # inode <-> repository path, numbered per directory (O(directories) memory; 1 is the root)
        self.inodes = InodeTable(lambda folder: engine.tree.dirs.get(folder), self.root)
        self._open: dict[int, _Open] = {}           # fh -> open file (metrics count these)
        # Inodes a refresh took from their path while files were open on them: they keep
        # answering with the entry of open time (the path gets a fresh inode).
        self._retired: set[int] = set()
        self.status_extra: dict[str, object] = {}
        engine.fetcher.mismatch_observers.append(self._object_failed)
        engine.fetcher.size_observers.append(self._object_resized)

    # -- inode bookkeeping ----------------------------------------------------------------------
    def _inode(self, path: str) -> int:
        try:
            return self.inodes.inode(path)
        except KeyError:                # gone from the snapshot (a refresh while we answered)
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _path(self, inode: int) -> str:
        try:
            return self.inodes.path(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """The kernel dropped its references: old blocks nobody holds are freed. Never raises
        (pyfuse3 has no reply to send a FORGET's error with)."""
        try:
            held = {opened.inode for opened in self._open.values()}
            for inode, count in inode_list:
                self.inodes.forget(inode, count, held)
        except Exception:
            log.exception("internal error in forget")

    def _attrs(self, inode: int, attr: Attr | None, mode: int = 0) -> pyfuse3.EntryAttributes:
        """FUSE attributes of `attr`; None: a size not known yet (zero timeouts: the kernel
        must look it up again before it trusts a size)."""
        out = pyfuse3.EntryAttributes()
        out.st_ino = inode
        out.generation = 0
        out.st_uid, out.st_gid = self.uid, self.gid
        out.st_blksize = 128 * 1024
        if attr is None:
            out.entry_timeout = out.attr_timeout = 0
            out.st_mode, out.st_nlink, out.st_size, out.st_blocks = mode, 1, 0, 0
            out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = self.fs.mtime_ns
            return out
        out.entry_timeout = out.attr_timeout = TIMEOUT
        out.st_mode, out.st_nlink, out.st_size, out.st_blocks = attr.mode, attr.nlink, attr.size, attr.blocks
        out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = attr.mtime_ns
        return out

    # -- metadata -------------------------------------------------------------------------------
    @_never_crash
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        text = os.fsdecode(name)
        if text == ".." and parent == self.root:
            text = "."                              # never above the mounted subdir
        known = self.fs.known_child(parent, text)    # a size already known: no await, no Entry
        path, attr = known if known is not None else await self.fs.lookup(parent, text)
        inode = self._inode(path)
        self.inodes.looked_up(inode)            # the kernel holds it until it sends a FORGET
        return self._attrs(inode, attr)

    @_never_crash
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode in self._retired:
            return self._attrs(inode, self._pinned_attr(inode))
        return self._attrs(inode, await self.fs.stat(self._path(inode)))

    def _pinned_attr(self, inode: int) -> Attr:
        """Attributes of a retired inode: those of the entry its open files were opened on."""
        for opened in self._open.values():
            if opened.inode == inode:
                handle = opened.handle
                return Attr(handle.entry.mode, max(handle.size_at_open, 0), self.fs.mtime_ns, 1)
        raise pyfuse3.FUSEError(errno.ENOENT)    # its last file closed: gone with the old revision

    @_never_crash
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self.fs.readlink(self._path(inode)))

    @_never_crash
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.fs.names(self._path(inode))           # ENOENT / ENOTDIR
        return inode

    @_never_crash
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Names and types from the snapshot: no request, no sizing (a 100k-entry folder
        # answers at once). A size this node already knows (index) goes with its name, with
        # long timeouts (readdirplus: `find -printf %s` needs no lookup); an unknown one goes
        # with zero timeouts and is learned when the kernel looks the entry up.
        # Per entry: no Entry, Attr or path string; three EntryAttributes serve every entry
        # (readdir_reply copies one into the reply buffer at once) and only what differs is set.
        path = self._path(fh)
        self.fs.names(path)                       # ENOENT / ENOTDIR / EIO of a broken output
        tree = self.fs.tree
        if start_id == 0 and tree.has_unsized(path):    # a new pass: what the index knows goes with the names
            await self.fs.fill_known_sizes(path)
            tree = self.fs.tree
        try:
            block = self.inodes.children(path)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if block.names is not tree.dirs.get(path):       # the snapshot moved while we waited
            raise pyfuse3.FUSEError(errno.ENOENT)
        mtime = self.fs.mtime_ns
        unknown = self._entry_attrs(0, mtime)
        known = self._entry_attrs(TIMEOUT, mtime)
        folder = self._entry_attrs(TIMEOUT, mtime)
        folder.st_mode, folder.st_nlink, folder.st_size, folder.st_blocks = DIR_MODE, 2, DIR_SIZE, DIR_SIZE // 512
        # An entry of unknown size goes out without a node id (fuse/unlinked.py): the kernel
        # makes no inode for it and takes no reference (it looks the name up when it needs one).
        unknown_ino = unlinked_ino(unknown)
        # The per-entry loop makes no object and calls nothing it can avoid (1M entries in a
        # `find`): columns straight from the tree, names encoded in bulk, st_mode set only when
        # it changes, and the unknown entry's st_ino written through its view.
        names, ids, sizes, groups, modes = tree.dir_columns(path)
        base = block.start
        reply = pyfuse3.readdir_reply
        # `.` and `..` first, as in a checkout (`ls -a`); offsets 1 and 2, child i is i + 3. The
        # kernel links no inode for either (fuse_direntplus_link skips dot names): no reference.
        if start_id < _DOTS:
            up = path if path == self.root else posixpath.dirname(path)
            for at, (dot, ino) in enumerate(((b".", fh), (b"..", self._dir_inode(up)))):
                if at >= start_id:
                    folder.st_ino, folder.st_nlink = ino, tree.dir_nlink(path if at == 0 else up)
                    if not reply(token, dot, folder, at + 1):
                        return
        unknown_mode = known_mode = -1
        sent_unlinked = 0
        start = i = max(start_id - _DOTS, 0)
        end = len(names)
        full = False
        while i < end and not full:
            chunk = _fsencode_all(names[i:i + READDIR_CHUNK])
            for bname in chunk:
                fid = ids[i]
                if fid == DIR_ID:
                    out = folder
                    out.st_ino = base + i
                    out.st_nlink = tree.dir_nlink(f"{path}/{names[i]}" if path else names[i])
                else:
                    size, mode = sizes[fid], modes[groups[fid]]
                    if size < 0:
                        out = unknown
                        if mode != unknown_mode:
                            out.st_mode = unknown_mode = mode
                        if unknown_ino is None:
                            out.st_ino = base + i
                        else:
                            unknown_ino.value = base + i
                    else:
                        out = known
                        if mode != known_mode:
                            out.st_mode = known_mode = mode
                        out.st_size, out.st_blocks = size, -(-size // 512)
                        out.st_ino = base + i
                if not reply(token, bname, out, i + _DOTS + 1):
                    full = True
                    break
                if out is unknown and unknown_ino is not None:
                    sent_unlinked += 1
                i += 1
        linked = i - start - sent_unlinked
        if linked:
            # readdirplus: one kernel reference per entry sent with its node id (the counts
            # are per block: which entries does not matter)
            self.inodes.looked_up(base + start, linked)

    def _dir_inode(self, path: str) -> int:
        """The inode of directory `path` for a `..` entry (the root's own at the top)."""
        try:
            return self.inodes.inode(path)
        except KeyError:
            return pyfuse3.ROOT_INODE

    def _entry_attrs(self, timeout: float, mtime_ns: int) -> pyfuse3.EntryAttributes:
        """A template for readdir entries: owner, times, timeouts set; mode/size/inode per entry."""
        out = pyfuse3.EntryAttributes()
        out.entry_timeout = out.attr_timeout = timeout
        out.st_uid, out.st_gid = self.uid, self.gid
        out.st_blksize = 128 * 1024
        out.st_nlink = 1
        out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = mtime_ns
        return out

    @_never_crash
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.engine.tree.files) + len(self.engine.tree.dirs)
        data.f_namemax = 255
        return data

    @_never_crash
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not (mode & os.W_OK)

    # -- xattrs: what is served, and live counters --------------------------------------------
    def status(self) -> dict[str, object]:
        from ..metrics import Sources, status_fields

        engine = self.engine
        info = engine.info
        assert info is not None
        # counters: the instruments /metrics exports (sidecar.metrics.INSTRUMENTS)
        counters = status_fields(Sources(engine, self.prefetcher, lambda: len(self._open)))
        return {
            "repo": info.repo, "revision": info.revision, "commit": info.commit, "subdir": self.root,
            "cache_dir": str(engine.config.cache_dir), **counters,
            "problems": [p.message() for p in engine.problems], **self.status_extra,
        }

    @_never_crash
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == XATTR_COMMIT:
            return (self.engine.info.commit if self.engine.info else "").encode()
        if name == XATTR_STATUS and inode == pyfuse3.ROOT_INODE:
            status = self.status()
            status["latest_commit"] = await self._latest_commit()
            status["update_available"] = bool(status["latest_commit"]) and status["latest_commit"] != status["commit"]
            return json.dumps(status).encode()
        if name == XATTR_REFRESH and inode == pyfuse3.ROOT_INODE:
            return json.dumps(await self._refresh()).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def _latest_commit(self) -> str | None:
        try:
            return await asyncio.wait_for(self.engine.latest_commit(), 15)
        except (DDAError, asyncio.TimeoutError) as err:
            log.warning("cannot check the branch for new commits: %s", err)
            return None

    async def _refresh(self) -> dict[str, object]:
        """Swap in the branch's new tip. Open files keep their pinned entries; the kernel's
        cached entries, attributes and pages of what changed are invalidated."""
        moved = await self.fs.refresh()
        if moved is None:
            return {"moved": False, "commit": self.fs.commit}
        held = {opened.inode for opened in self._open.values()}
        # Open files keep size and bytes of open time: a changed path's inode stays theirs and
        # the path's next lookup gets a fresh one (whatever it is now: other bytes, a folder).
        stale, retired = self.inodes.refresh(moved.changed, held, _rows_changed(moved))
        self._retired |= retired
        # After this request has been answered: the kernel may lock what we invalidate.
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(asyncio.to_thread(self._invalidate, stale)))
        return {"moved": True, "old": moved.old_commit, "new": moved.new_commit}

    @staticmethod
    def _invalidate(stale: list[tuple[int, int, str]]) -> None:
        """(inode or 0, parent inode or 0, name): drop the inode's attributes and pages, and
        the parent's entry of that name."""
        for inode, parent, name in stale:
            try:
                if inode:
                    pyfuse3.invalidate_inode(inode, attr_only=False)
                if parent:   # names the kernel never looked up answer ENOENT: not worth a log line
                    pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
            except OSError:
                pass   # never looked up by the kernel, or already forgotten

    # -- integrity: pages and sizes of an object that failed verification -------------------------
    def _inodes_of(self, oid: str) -> list[tuple[int, str]]:
        """(inode, path) of every inode given out for a file of object `oid` (a walk of the
        blocks: a rare event; current blocks are compared by file id, old ones by path)."""
        tree = self.engine.tree
        fids = tree.file_ids_of(oid)
        if not fids:
            return []
        found = []
        for start, folder, names, current in self.inodes.blocks():
            prefix = folder + "/" if folder else ""
            if current and names is tree.dirs.get(folder):
                found += [(start + i, prefix + name) for i, (name, fid, _, _) in enumerate(tree.dir_rows(folder))
                          if fid in fids]
            else:
                for i, name in enumerate(names):
                    entry = tree.files.get(prefix + name)
                    if entry is not None and entry.oid == oid:
                        found.append((start + i, prefix + name))
        return found

    def _object_failed(self, oid: str) -> None:
        """Bytes of `oid` given out unverified were wrong (or could not be verified): the kernel
        drops its pages, and every handle open on it fails its next read - in stream mode a
        reader may have been given, from the shared page cache, pages another handle took."""
        if not self.engine.fetcher.strict:
            for opened in self._open.values():
                cursor = opened.handle.cursor
                if opened.handle.entry.oid != oid or cursor.error is not None \
                        or any(p.failed is not None for p in cursor.passes):
                    continue    # it already knows why (the pass it read from says so)
                cursor.fail(HashMismatch(f"{opened.path}: object {oid} failed verification after some of its "
                                         f"bytes were read", path=opened.path))
        self._invalidate_object(oid)

    def _object_resized(self, oid: str, size: int) -> None:
        """A verified size replaced one learned from a remote: the kernel's attributes follow
        (the fs layer updates the open handles)."""
        self._invalidate_object(oid)

    def _invalidate_object(self, oid: str) -> None:
        stale = [(inode, 0, "") for inode, _ in self._inodes_of(oid)]
        if stale:
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(asyncio.to_thread(self._invalidate, stale)))

    @_never_crash
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [XATTR_COMMIT, XATTR_STATUS] if inode == pyfuse3.ROOT_INODE else [XATTR_COMMIT]


    # -- data -----------------------------------------------------------------------------------
    @_never_crash
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode in self._retired:
            raise pyfuse3.FUSEError(errno.ESTALE)   # a path of an older revision: look it up again
        handle = await self.fs.open(self._path(inode))
        self._open[handle.id] = _Open(handle, ReadState(), inode)
        self.prefetcher.on_open(handle.path)
        return pyfuse3.FileInfo(fh=handle.id, keep_cache=True, direct_io=False)

    @_never_crash
    async def read(self, fh: int, offset: int, length: int) -> bytes:
        opened = self._open.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        handle = opened.handle
        failed = opened.timed_out
        if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER_DEADLINE_WINDOW \
                and offset < failed[2] and failed[1] < offset + length:
            raise pyfuse3.FUSEError(errno.ETIMEDOUT)
        # The handle is pinned to the entry of open time: a refresh never changes a file under its reader.
        try:
            data = await self.fs.read(handle, offset, length)
        except DDAError as err:
            if describe(err).errno == errno.ETIMEDOUT:
                opened.timed_out = (time.monotonic(), offset, offset + length)
            raise
        if data:
            self.prefetcher.on_read(handle.path, opened.state, offset, len(data), handle.size)
        return data

    @_never_crash
    async def release(self, fh: int) -> None:
        opened = self._open.pop(fh, None)
        if opened is not None:
            self.fs.release(opened.handle)    # a retired inode stays retired: ENOENT once unused

    @_never_crash
    async def releasedir(self, fh: int) -> None:
        return None
