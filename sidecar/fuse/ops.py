"""pyfuse3 operations over an Engine's immutable Tree.

The snapshot never changes under a mount, so the kernel may cache entries, attributes and
pages for as long as it likes (long timeouts, keep_cache).
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import posixpath
import stat
from dataclasses import dataclass, field, replace

import pyfuse3

from ..engine import Engine
from ..errors import DDAError, DeadlineExceeded, HashMismatch, NotFound
from ..fetch.prefetch import Prefetcher, ReadState
from ..fetch.verify_stream import ReadCursor
from ..snapshot.tree import Entry

log = logging.getLogger(__name__)
TIMEOUT = 24 * 3600.0
XATTR_COMMIT = b"user.dda.commit"
XATTR_STATUS = b"user.dda.status"
XATTR_REFRESH = b"user.dda.refresh"   # reading it on the root moves the mount to the branch's new tip


def _never_crash(handler):  # type: ignore[no-untyped-def]
    """An unexpected exception in a handler would end pyfuse3's main loop and leave readers
    with a dead mount: answer EIO and log it instead."""
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


@dataclass
class _Open:
    path: str
    entry: Entry
    state: ReadState
    cursor: ReadCursor = field(default_factory=ReadCursor)   # unverified bytes this handle took


class DdaOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, engine: Engine, prefetcher: Prefetcher, subdir: str = ""):
        super().__init__()
        self.engine = engine
        self.prefetcher = prefetcher
        self.root = engine.tree.normalize(subdir)
        if not engine.tree.is_dir(self.root):
            raise NotFound(f"--subdir {subdir!r}: no such directory in revision {engine.info.revision}")
        self.mtime_ns = (engine.info.commit_time if engine.info else 0) * 10**9
        self.uid, self.gid = os.getuid(), os.getgid()
        self._paths: list[str] = ["", ""]           # inode -> repository path (1 is the root)
        self._paths[pyfuse3.ROOT_INODE] = self.root
        self._inodes: dict[str, int] = {self.root: pyfuse3.ROOT_INODE}
        self._sized_dirs: set[str] = set()
        self._open: dict[int, _Open] = {}
        self._next_fh = 1
        self.status_extra: dict[str, object] = {}
        engine.fetcher.mismatch_observers.append(self._object_failed)
        engine.fetcher.size_observers.append(self._object_resized)

    # -- inode bookkeeping ----------------------------------------------------------------------
    def _inode(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = len(self._paths)
            self._paths.append(path)
            self._inodes[path] = inode
        return inode

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except IndexError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, inode: int, path: str, entry: Entry | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mtime_ns
        attr.st_blksize = 128 * 1024
        if entry is None:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 4096
        else:
            assert entry.size is not None
            attr.st_mode = entry.mode
            attr.st_nlink = 1
            attr.st_size = entry.size
        attr.st_blocks = -(-attr.st_size // 512)
        return attr

    async def _entry(self, path: str) -> Entry | None:
        """The entry with its true size (None for a directory)."""
        tree = self.engine.tree
        if path in tree.dirs:
            return None
        entry = tree.files.get(path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if entry.size is None:
            entry = await self._guard(self.engine.stat(path), path)
        return entry

    async def _guard(self, coro, path: str):  # type: ignore[no-untyped-def]
        """Engine errors become errno values (and one log line), never a crashed daemon."""
        try:
            return await coro
        except pyfuse3.FUSEError:
            raise
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except DeadlineExceeded as err:
            log.error("%s", err)
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except DDAError as err:
            log.error("%s", err)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _size_directory(self, path: str) -> None:
        """Learn every child's size at once (one LIST per remote folder, or bounded HEADs)."""
        if path in self._sized_dirs:
            return
        tree = self.engine.tree
        prefix = path + "/" if path else ""
        children = [tree.files[prefix + n] for n in tree.dirs.get(path, []) if prefix + n in tree.files]
        unsized = [e for e in children if e.size is None]
        if unsized:
            await self._guard(self.engine.stat_many(unsized), path)
        self._sized_dirs.add(path)

    # -- metadata -------------------------------------------------------------------------------
    @_never_crash
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            path = parent
        elif text == "..":
            path = posixpath.dirname(parent) if parent != self.root else parent
        else:
            path = f"{parent}/{text}" if parent else text
        tree = self.engine.tree
        if path not in tree.files and path not in tree.dirs:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = await self._entry(path)
        return self._attrs(self._inode(path), path, entry)

    @_never_crash
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        return self._attrs(inode, path, await self._entry(path))

    @_never_crash
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._path(inode)
        entry = self.engine.tree.files.get(path)
        if entry is None or not entry.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await self._guard(self.engine.read(path, 0, 1 << 20), path)

    @_never_crash
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        if path not in self.engine.tree.dirs:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_never_crash
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path(fh)
        await self._size_directory(path)
        tree = self.engine.tree
        names = tree.dirs[path]
        prefix = path + "/" if path else ""
        for index in range(start_id, len(names)):
            child = prefix + names[index]
            entry = tree.files.get(child)
            attrs = self._attrs(self._inode(child), child, entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attrs, index + 1):
                return

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
        engine = self.engine
        stats = engine.fetcher.stats
        info = engine.info
        assert info is not None
        return {
            "repo": info.repo, "revision": info.revision, "commit": info.commit, "subdir": self.root,
            "files": info.files, "cache_dir": str(engine.config.cache_dir),
            "cache_used_bytes": engine.store.used_bytes(), "cache_budget_bytes": engine.store.budget,
            "requests": stats.requests, "bytes_fetched": stats.bytes_fetched, "bytes_served": stats.bytes_served,
            "cache_hits": stats.cache_hits, "cache_misses": stats.cache_misses, "retries": stats.retries,
            "errors": dict(stats.errors), "prefetch": vars(self.prefetcher.stats).copy(),
            "open_files": len(self._open), **self.status_extra,
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
        """Swap in the branch's new tip. Open files keep their old entries; the kernel's
        cached entries, attributes and pages of what changed are invalidated."""
        old_files = dict(self.engine.tree.files)
        moved = await self._guard(self.engine.refresh(), "refresh")
        if moved is None:
            return {"moved": False, "commit": self.engine.info.commit if self.engine.info else None}
        tree = self.engine.tree
        self.mtime_ns = (self.engine.info.commit_time if self.engine.info else 0) * 10**9
        self._sized_dirs.clear()
        stale: list[tuple[int, int | None, str]] = []      # (inode, parent inode, name)
        for path, inode in list(self._inodes.items()):
            old, new = old_files.get(path), tree.files.get(path)
            is_dir = path in tree.dirs
            if is_dir or old is None or new is None or old.oid != new.oid or old.mode != new.mode:
                parent = self._inodes.get(posixpath.dirname(path)) if path != self.root else None
                stale.append((inode, parent, posixpath.basename(path)))
        # After this request has been answered: the kernel may lock what we invalidate.
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(asyncio.to_thread(self._invalidate, stale)))
        return {"moved": True, "old": moved[0], "new": moved[1]}

    @staticmethod
    def _invalidate(stale: list[tuple[int, int | None, str]]) -> None:
        for inode, parent, name in stale:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=False)
                if parent is not None:
                    pyfuse3.invalidate_entry_async(parent, os.fsencode(name))
            except OSError:
                pass   # never looked up by the kernel, or already forgotten

    # -- integrity: pages and sizes of an object that failed verification -------------------------
    def _inodes_of(self, oid: str) -> list[tuple[int, str]]:
        files = self.engine.tree.files
        return [(inode, path) for path, inode in self._inodes.items()
                if path in files and files[path].oid == oid]

    def _object_failed(self, oid: str) -> None:
        """Bytes of `oid` given out unverified were wrong (or could not be verified): every
        handle open on it fails its next read, and the kernel drops the pages it cached."""
        error = HashMismatch(f"object {oid} failed verification after some of its bytes were read")
        for handle in self._open.values():
            if handle.entry.oid == oid:
                handle.cursor.fail(error)
        stale = [(inode, None, "") for inode, _ in self._inodes_of(oid)]
        if stale:
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(asyncio.to_thread(self._invalidate, stale)))

    def _object_resized(self, oid: str, size: int) -> None:
        """A verified size replaced one learned from a remote: handles and the kernel's
        attributes follow."""
        for handle in self._open.values():
            if handle.entry.oid == oid and handle.entry.size != size:
                handle.entry = replace(handle.entry, size=size)
        stale = [(inode, None, "") for inode, _ in self._inodes_of(oid)]
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
        path = self._path(inode)
        entry = await self._entry(path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = _Open(path, entry, ReadState())
        self.prefetcher.on_open(path)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @_never_crash
    async def read(self, fh: int, offset: int, length: int) -> bytes:
        handle = self._open.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        size = handle.entry.size or 0
        if offset >= size:
            return b""
        # The entry captured at open: a refresh never changes a file under its reader.
        data = await self._guard(self.engine.read_entry(handle.entry, offset, length, handle.cursor), handle.path)
        if handle.entry.size != size:
            # The size this reader was given came from a remote and proved wrong while reading:
            # fail rather than hand out a file cut at the wrong length (the next open is right).
            log.error("%s: its size changed from %d to %s while reading; failing this read", handle.path, size,
                      handle.entry.size)
            raise pyfuse3.FUSEError(errno.EIO)
        self.prefetcher.on_read(handle.path, handle.state, offset, len(data), size)
        return data

    @_never_crash
    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)

    @_never_crash
    async def releasedir(self, fh: int) -> None:
        return None
