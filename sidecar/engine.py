"""The streaming engine: one snapshot of a repository, read on demand through the cache.

Frontends (CLI, FUSE, hooks) ask it for stat, listdir and byte ranges; it never downloads
more than the chunks a read touches, plus the .dir manifests of the snapshot.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from .config import Config, remote_settings_key
from .errors import ConfigError, DDAError, HashMismatch, NotFound
from .fetch import Fetcher, ObjectRef
from .fetch.verify_stream import ReadCursor
from .redact import strip_userinfo
from .remotes import Remote, build_remote, object_path
from .snapshot.build import DvcLayout, compose_tree, read_dvc_layout
from .snapshot.dvcfiles import DvcOut, ManifestEntry, parse_manifest
from .snapshot.git import GitSource
from .snapshot.tree import Entry, Tree
from .store import Store


@dataclass(frozen=True)
class SnapshotInfo:
    repo: str           # display URL, without credentials
    revision: str
    commit: str
    commit_time: int
    files: int
    resolve_seconds: float


class Engine:
    def __init__(self, config: Config, git: GitSource, store: Store, fetcher: Fetcher):
        self.config = config
        self.git = git
        self.store = store
        self.fetcher = fetcher
        self.tree: Tree = Tree({})
        self.info: SnapshotInfo | None = None
        self._remotes: dict[str, Remote] = {}
        self._layout: DvcLayout | None = None
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self.follow_ref: str | None = None
        self._blob_bytes = 0
        # Paths whose size came from a remote's answer, not from the repository: such a size
        # is never handed to the fetcher as the truth, and is corrected when the object verifies.
        self._looked_up: set[str] = set()
        fetcher.size_observers.append(self._size_verified)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    async def open(cls, config: Config) -> "Engine":
        if not config.repo:
            raise ConfigError("no repository given (pass a URL or set DDA_REPO)")
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        git = GitSource(config.repo, config.cache_dir, user=config.git_user, token=config.git_token)
        store = Store(config.cache_dir, config.cache_size, config.chunk_size)
        fetcher = Fetcher(store, jobs=config.jobs, retries=config.retries, deadline=config.deadline,
                          strict=config.verify == "before-read")
        engine = cls(config, git, store, fetcher)
        try:
            await engine._resolve(config.revision)
        except BaseException:
            await engine.aclose()
            raise
        return engine

    async def _resolve(self, revision: str | None) -> None:
        started = time.monotonic()
        commit, label = await self.git.resolve(revision)
        ref = self.git.last_ref
        self.follow_ref = ref if ref and ref.startswith("refs/heads/") else None
        entries = await self.git.ls_tree(commit)
        await self.git.start_reader()
        self._layout = await read_dvc_layout(entries, self.git.read_blob)
        manifests = await self._fetch_manifests(self._layout.outputs)
        self.tree = compose_tree(entries, self._layout.outputs, manifests)
        self.info = SnapshotInfo(self.git.display_url, label, commit, await self.git.commit_time(commit),
                                 len(self.tree.files), time.monotonic() - started)

    async def _fetch_manifests(self, outputs: list[DvcOut]) -> dict[str, list[ManifestEntry]]:
        dirs = {o.md5: o for o in outputs if o.is_dir}

        async def one(out: DvcOut) -> tuple[str, list[ManifestEntry]]:
            remote = self.remote(out.remote, out.source)
            ref = ObjectRef(out.md5, remote, object_path(out.md5, out.legacy, is_dir=True), out.legacy, None,
                            f"{out.path} (manifest {out.md5}.dir, from {out.source})")
            data = await self.fetcher.read_all(ref)
            return out.md5, parse_manifest(data, f"{out.source}: manifest {out.md5}.dir")

        return dict(await asyncio.gather(*(one(o) for o in dirs.values())))

    # -- following a branch ---------------------------------------------------------------------
    async def latest_commit(self) -> str | None:
        """The tip of the branch this snapshot follows, now (None for a tag or a commit)."""
        if self.follow_ref is None:
            return None
        refs, _ = await self.git.ls_remote()
        return refs.get(self.follow_ref)

    async def refresh(self) -> tuple[str, str] | None:
        """Move to the branch's new tip, if it moved: (old commit, new commit), else None.
        Explicit by design: a snapshot never changes under a reader by itself. Entries
        handed out before keep reading the old objects."""
        assert self.info is not None
        latest = await self.latest_commit()
        if latest is None or latest == self.info.commit:
            return None
        old = self.info.commit
        await self._resolve(self.follow_ref.removeprefix("refs/heads/") if self.follow_ref else None)
        return old, self.info.commit

    def remote(self, name: str | None, needed_by: str) -> Remote:
        assert self._layout is not None
        config = self._layout.config
        wanted = name or config.default_remote
        if wanted is None:
            override = self.config.remotes.get("default")
            if not override:
                raise ConfigError(f"{needed_by}: the repository has no default DVC remote; set one with "
                                  f"DDA_REMOTE_DEFAULT_URL or in the config file")
            wanted = "default"
        if wanted not in self._remotes:
            spec = config.remotes.get(wanted)
            settings = dict(spec.settings) if spec else {}
            override = self.config.remote_override(remote_settings_key(wanted), wanted == config.default_remote)
            if spec is None and not override:
                raise ConfigError(f"{needed_by}: DVC remote {wanted!r} is not defined in .dvc/config")
            settings.update(override)
            self._remotes[wanted] = build_remote(wanted, settings, repo_dir=self.git.local_path,
                                                 jobs=self.config.jobs, timeout=self.config.request_timeout)
        return self._remotes[wanted]

    # -- reading ------------------------------------------------------------------------------
    def entry(self, path: str) -> Entry:
        found = self.tree.get(path)
        if found is None:
            kind = "a directory" if self.tree.is_dir(path) else "not in"
            raise NotFound(f"{path}: {kind} revision {self.info.revision if self.info else '?'}"
                           if kind == "not in" else f"{path}: is a directory")
        return found

    def ref(self, entry: Entry) -> ObjectRef:
        remote = self.remote(entry.remote, entry.output or entry.path)
        size = None if entry.path in self._looked_up else entry.size
        return ObjectRef(entry.oid, remote, object_path(entry.oid, entry.legacy), entry.legacy, size, entry.path)

    async def stat(self, path: str) -> Entry:
        entry = self.entry(path)
        if entry.size is not None:
            return entry
        if entry.kind == "git":
            size = await self.git.blob_size(entry.oid)
        else:
            size = await self.fetcher.size_of(self.ref(entry))
        return self._sized(entry, size)

    def _sized(self, entry: Entry, size: int) -> Entry:
        # Sizes of a commit never change: remember them in the tree.
        sized = replace(entry, size=size)
        self.tree.files[entry.path] = sized
        if entry.kind == "dvc":
            self._looked_up.add(entry.path)
        return sized

    def _size_verified(self, oid: str, size: int) -> None:
        """A verified object's size replaces one learned from a remote's answer."""
        for path in self._looked_up:
            entry = self.tree.files.get(path)
            if entry is not None and entry.oid == oid and entry.size != size:
                self.tree.files[path] = replace(entry, size=size)

    async def stat_many(self, entries: list[Entry]) -> list[Entry]:
        """True sizes for many entries, batched (one listing or bounded HEADs per remote)."""
        dvc = [e for e in entries if e.size is None and e.kind == "dvc"]
        sizes = await self.fetcher.sizes_of([self.ref(e) for e in dvc]) if dvc else {}
        result = []
        for e in entries:
            if e.size is not None:
                result.append(e)
            elif e.kind == "dvc":
                result.append(self._sized(e, sizes[e.oid]))
            else:
                result.append(self._sized(e, await self.git.blob_size(e.oid)))
        return result

    async def read(self, path: str, offset: int, length: int, reader: ReadCursor | None = None) -> bytes:
        return await self.read_entry(self.entry(path), offset, length, reader)

    async def read_entry(self, entry: Entry, offset: int, length: int, reader: ReadCursor | None = None) -> bytes:
        """Read what `entry` names, even after a refresh replaced the tree it came from.
        `reader`: the cursor of one reader of this file (see Fetcher.read)."""
        if entry.kind == "git":
            blob = await self._blob(entry.oid)
            data = blob[offset:offset + length]
            self.fetcher.stats.bytes_served += len(data)
            return data
        return await self.fetcher.read(self.ref(entry), offset, length, reader)

    async def iter_bytes(self, path: str, piece: int | None = None):  # type: ignore[no-untyped-def]
        """The whole file in pieces of one chunk (what `dda cat` and `dda get` stream)."""
        piece = piece or self.store.chunk_size
        entry = self.entry(path)
        offset = 0
        reader = ReadCursor()
        while True:
            data = await self.read(entry.path, offset, piece, reader)
            if data:
                yield data
            offset += len(data)
            size = entry.size if entry.size is not None else self.fetcher.known_size(self.ref(entry)) \
                if entry.kind == "dvc" else None
            if not data or len(data) < piece or (size is not None and offset >= size):
                return

    async def _blob(self, sha: str) -> bytes:
        if sha in self._blobs:
            self._blobs.move_to_end(sha)
            self.fetcher.stats.cache_hits += 1
            return self._blobs[sha]
        blob = await self.git.read_blob(sha)
        if len(sha) == 40 and hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest() != sha:
            raise HashMismatch(f"git blob {sha}: content does not match its sha1")
        self.fetcher.stats.cache_misses += 1
        self._blobs[sha] = blob
        self._blob_bytes += len(blob)
        while self._blob_bytes > 64 * 1024 * 1024 and len(self._blobs) > 1:
            _, old = self._blobs.popitem(last=False)
            self._blob_bytes -= len(old)
        return blob

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        # After a failure, downloads still under way are abandoned, not waited for.
        await self.aclose(drain_seconds=30.0 if exc_type is None else 0.0)

    async def aclose(self, drain_seconds: float = 30.0) -> None:
        await self.fetcher.drain(drain_seconds)
        await self.git.aclose()
        for remote in self._remotes.values():
            await remote.aclose()
        self.store.close()
