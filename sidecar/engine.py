"""The streaming engine: one snapshot of a repository, read on demand through the cache.

Frontends (CLI, FUSE, hooks) ask it for stat, listdir and byte ranges; it never downloads
more than the chunks a read touches, plus the .dir manifests of the snapshot.
"""
from __future__ import annotations

import asyncio
import bisect
import ctypes
import functools
import hashlib
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from .config import Config, remote_settings_key
from . import sizeindex
from .errors import ConfigError, DDAError, HashMismatch, NotFound, ObjectMissing, OutputUnavailable
from .fetch import Fetcher, ObjectRef
from .fetch.priority import PREFETCH, current_priority
from .fetch.sizing import size_all
from .fetch.verify_stream import ReadCursor
from .redact import redact, strip_userinfo
from .remotes import Remote, build_remote, object_path
from .remotes.base import versioned_path
from .snapshot.build import DvcLayout, compose_tree, read_dvc_layout
from .snapshot.dvcfiles import DvcOut, ManifestEntry, parse_manifest
from .snapshot.git import GitSource
from .snapshot.tree import Entry, Problem, Tree
from .store import Store
from .store.tenancy import Tenancy

_IMPORT = "\0import"   # Entry.root prefix of imported outputs: "\0import<index>:<root in the source>"
_SOURCE = "\0source"   # Entry.root of import-url outputs read from their source: "\0source<index>"
log = logging.getLogger(__name__)


SIZE_INDEX_SECONDS = 10.0   # the most a stat waits for a published size index
STAT_AHEAD_AFTER = 2         # size misses in one directory, in name order, before the rest of it is sized ahead
STAT_AHEAD_GAP = 8           # names between two misses that still count as "in order" (a walker)
STAT_AHEAD_WINDOW = 8192     # the most files a directory's stat-ahead runs past its reader's last stat
STAT_AHEAD_STEP = 2048       # files sized per round of the stat-ahead (its pool drains between rounds)
SIZE_INDEX_MIN_FILES = 1000  # smaller directories are sized per file (an index saves little)
FILL_BATCH = 4096            # sizes a listing looks up per trip (below the tenancy's proof memo)


def _give_back_memory() -> None:
    """Hand the heap that parsing the manifests freed back to the OS. glibc keeps it
    otherwise: a 1M-file manifest peaks near 900 MB while parsed, and the daemon would stay
    at ~300 MB RSS for a tree that takes 50 MB."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def _loaded_marker(manifest_md5: str) -> str:
    """Key in the persistent size index saying this manifest's published sizes are loaded."""
    return f"{manifest_md5}.dir.sizes"


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
        # The shared cache serves an object to a remote identity only once it showed it holds it.
        self.tenancy = Tenancy(store, fetcher)
        self.tree: Tree = Tree({})
        self.info: SnapshotInfo | None = None
        self._remotes: dict[str, Remote] = {}
        self._layout: DvcLayout | None = None
        self._lfs: Any = None
        self._lfs_ident = ""
        self._imports: dict[str, tuple[int, Any]] = {}   # source url@rev -> (index, ImportOrigin)
        self._sources: list[Remote] = []                 # import-url sources (see _url_import)
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self.follow_ref: str | None = None
        self._blob_bytes = 0
        # Sizes that came from a remote's answer, not from the repository (a flag per file in
        # the tree; Entry.looked_up on what it hands out) are never handed to the fetcher as
        # the truth, and are corrected when the object verifies.
        fetcher.size_observers.append(self._size_verified)
        self._dir_outputs: dict[str, DvcOut] = {}
        self._output_files: dict[str, int] = {}          # manifest md5 -> files it lists
        self._size_index_tried: set[str] = set()
        self._size_index_loads: dict[str, asyncio.Task[None]] = {}
        self._preloads: set[asyncio.Task[bool]] = set()   # size indexes read ahead by a mount
        self._sizing: dict[tuple[str, int], asyncio.Future[int]] = {}   # (oid, remote) -> its size request
        self._size_misses: dict[str, tuple[int, int]] = {}     # directory -> (name index of its last miss, misses in a row)
        self._stat_ahead: dict[str, asyncio.Future[None]] = {}  # directory -> its background sizing
        self._read_at: dict[str, int] = {}          # directory sized ahead -> where its reader stats now
        self._reader_moved: dict[str, asyncio.Event] = {}

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    async def open(cls, config: Config) -> "Engine":
        if not config.repo:
            raise ConfigError("no repository given (pass a URL or set DDA_REPO)")
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        git = GitSource(config.repo, config.cache_dir, user=config.git_user, token=config.git_token,
                        deadline=config.deadline, ca_bundle=config.ca_bundle)
        # opening scans and may rebuild the index: on a thread, like every later store step
        store = await asyncio.to_thread(Store, config.cache_dir, config.cache_size, config.chunk_size)
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
        outputs, import_problems = await self._resolve_imports(self._layout.outputs)
        manifests, problems = await self._fetch_manifests(outputs)
        self.tree = compose_tree(entries, outputs, manifests, self._layout.problems + import_problems + problems,
                                 self._layout.symlinks, self._layout.lfs)
        self._dir_outputs = {o.path: o for o in outputs if o.is_dir and o.files is None}   # a manifest on the remote
        self._output_files = {md5: len(items) for md5, items in manifests.items()}
        del manifests
        _give_back_memory()
        self.info = SnapshotInfo(self.git.display_url, label, commit, await self.git.commit_time(commit),
                                 len(self.tree.files), time.monotonic() - started)

    async def _resolve_imports(self, outputs: list[DvcOut]) -> tuple[list[DvcOut], list[Problem]]:
        """Point each `dvc import`ed output at its source repository's remote (where `dvc pull`
        gets it); an unreachable source is a Problem of that output only."""
        from .snapshot.imports import resolve_import

        resolved: list[DvcOut] = []
        problems: list[Problem] = []
        cache: dict[tuple[str, str, str], object] = {}
        # import-url outputs: one existence check each, all at once
        url_outs = [o for o in outputs if o.url_source is not None and o.unavailable is None]
        url_found = iter(await asyncio.gather(*(self._url_import(o) for o in url_outs)))
        for out in outputs:
            if out.unavailable is not None:
                problems.append(Problem(out.path, out.source, out.unavailable, out.is_dir))
                continue
            if out.url_source is not None:
                found = next(url_found)
                (resolved if isinstance(found, DvcOut) else problems).append(found)  # type: ignore[arg-type]
                continue
            if out.imported is None:
                resolved.append(out)
                continue
            key = (out.imported.url, out.imported.rev_lock, out.imported.path)
            try:
                if key not in cache:
                    cache[key] = await resolve_import(
                        out.imported, cache_dir=self.config.cache_dir, main_url=self.git.url,
                        user=self.config.git_user, token=self.config.git_token, ca_bundle=self.config.ca_bundle)
                origin = cache[key]
            except DDAError as err:
                # DVC 2 pushed imported data to the consumer's remote too: use it when it is there.
                if await self._on_own_remote(out):
                    resolved.append(out)
                else:
                    problems.append(Problem(out.path, out.source, f"{out.source}: {err}", out.is_dir))
                continue
            if not out.md5:   # `dvc import --no-download`: what the source's output records
                if origin.out.path != out.imported.path:
                    problems.append(Problem(out.path, out.source, f"{out.source}: imported with --no-download from "
                                            f"inside the directory output {origin.out.path!r} of the source; only "
                                            f"a whole output is resolved without a recorded md5", False))
                    continue
                o = origin.out
                out = replace(out, md5=o.md5, is_dir=o.is_dir, size=o.size, nfiles=o.nfiles, isexec=o.isexec,
                              files=o.files, versions=o.versions, legacy=o.legacy)
            index = self._imports.setdefault(origin.url + "@" + key[1], (len(self._imports), origin))[0]
            resolved.append(replace(out, remote=origin.out.remote, root=f"{_IMPORT}{index}:{origin.out.root}",
                                    legacy=origin.out.legacy if out.md5 == origin.out.md5 else out.legacy))
        return resolved, problems

    async def _url_import(self, out: DvcOut) -> DvcOut | Problem:
        """A `dvc import-url` output: from the repository's remote when it holds the object
        (where `dvc pull` gets it), else from its recorded source, verified against the md5
        the .dvc file records; else it is reported unavailable. See remotes/source.py."""
        from .remotes.source import build_source

        src = out.url_source
        assert src is not None
        if await self._on_own_remote(out):
            return out
        why = "not on the DVC remote"
        if out.is_dir:
            return Problem(out.path, out.source, f"{out.source}: {why}, and a directory is not read from its "
                                                 f"import-url source ({strip_userinfo(src.url)[0]})", True)
        try:
            base = self.git.local_path / src.base if self.git.local_path is not None else None
            remote = build_source(src.url, base, version_id=src.version_id, jobs=self.config.jobs,
                                  timeout=self.config.request_timeout, ca_bundle=self.config.ca_bundle)
            try:
                async with asyncio.timeout(self.config.deadline):    # a hung source must not hold the snapshot
                    there = await remote.exists("")
            except TimeoutError:
                await remote.aclose()
                raise DDAError(f"no answer from {remote.display_url} within {self.config.deadline:g}s") from None
            if there:
                index = len(self._sources)
                self._sources.append(remote)
                return replace(out, root=f"{_SOURCE}{index}")
            await remote.aclose()
            cause = f"missing at its source {remote.display_url}"
        except DDAError as err:
            cause = f"its source cannot be read: {err}"
        return Problem(out.path, out.source, f"{out.source}: import-url output {why}, and {cause}", False)

    async def _on_own_remote(self, out: DvcOut) -> bool:
        try:
            remote = self.remote(out.remote, out.source, out.root)
            # Bounded by the deadline (not only the request timeout): a hung remote must not
            # hold the whole snapshot; the output is then read from its source, verified.
            async with asyncio.timeout(self.config.deadline):
                return await remote.exists(object_path(out.md5, out.legacy, is_dir=out.is_dir))
        except (DDAError, TimeoutError):
            return False

    async def _fetch_manifests(self, outputs: list[DvcOut]) -> tuple[dict[str, list[ManifestEntry]], list[Problem]]:
        """Every directory output's manifest; one that cannot be had becomes a Problem of
        that output (shown at its path), never a failure of the revision."""
        dirs = [o for o in outputs if o.is_dir and o.files is None]
        found: dict[str, list[ManifestEntry]] = {}
        problems: list[Problem] = []

        async def one(out: DvcOut) -> None:
            try:
                remote = self.remote(out.remote, out.source, out.root)
                ref = ObjectRef(out.md5, remote, object_path(out.md5, out.legacy, is_dir=True), out.legacy, None,
                                f"{out.path} (manifest {out.md5}.dir, from {out.source})")
                await self.tenancy.admit(ref)
                data = await self.fetcher.read_all(ref)
                await self.tenancy.settle(ref)
                found[out.md5] = parse_manifest(data, f"{out.source}: manifest {out.md5}.dir")
            except DDAError as err:
                problems.append(Problem(out.path, out.source, str(err), is_dir=True))

        await asyncio.gather(*(one(o) for o in dirs))
        # Two outputs may share a manifest: one that failed for one failed for both.
        for out in dirs:
            if out.md5 not in found and not any(p.path == out.path for p in problems):
                problems.append(Problem(out.path, out.source, f"{out.source}: manifest {out.md5}.dir unavailable",
                                        is_dir=True))
        return found, sorted(problems, key=lambda p: p.path or "")

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

    @property
    def problems(self) -> list[Problem]:
        """Outputs of this snapshot that cannot be shown (each reported once by frontends)."""
        return self.tree.problems

    def remote(self, name: str | None, needed_by: str, root: str = "") -> Remote:
        """The remote `name` (None: the default) of the DVC (sub)repository at folder `root`,
        as its .dvc/config declares it, with our overrides applied."""
        assert self._layout is not None
        if root.startswith(_SOURCE):   # an import-url output read from its recorded source
            return self._sources[int(root[len(_SOURCE):])]
        layout, identity, repo_dir = self._layout, root, None
        if root.startswith(_IMPORT):   # an imported output: the source repository's remotes
            index, _, root = root[len(_IMPORT):].partition(":")
            origin = next(o for i, o in self._imports.values() if i == int(index))
            layout, repo_dir = origin.layout, origin.repo_dir
        config = layout.configs.get(root) or layout.config
        wanted = name or config.default_remote
        if wanted is None:
            override = self.config.remotes.get("default")
            if not override:
                raise ConfigError(f"{needed_by}: the repository has no default DVC remote; set one with "
                                  f"DDA_REMOTE_DEFAULT_URL or in the config file")
            wanted = "default"
        key = f"{identity}\0{wanted}"
        if key not in self._remotes:
            if not identity.startswith(_IMPORT):   # our checkout's folder: looked up only here (per file, it showed)
                repo_dir = self.git.local_path
            spec = config.remotes.get(wanted)
            settings = dict(spec.settings) if spec else {}
            override = self.config.remote_override(remote_settings_key(wanted), wanted == config.default_remote)
            if identity.startswith(_IMPORT) and not self._same_storage(wanted, spec):
                override = {}   # our credentials are for our remotes: never sent to an import's storage
            if spec is None and not override:
                raise ConfigError(f"{needed_by}: DVC remote {wanted!r} is not defined in .dvc/config")
            settings.update(override)
            if repo_dir is not None and root:
                repo_dir = repo_dir / root
            self._remotes[key] = self.tenancy.wrap(
                build_remote(wanted, settings, repo_dir=repo_dir, jobs=self.config.jobs,
                             timeout=self.config.request_timeout, ca_bundle=self.config.ca_bundle), settings)
        return self._remotes[key]

    def _same_storage(self, name: str, spec: Any) -> bool:
        """Whether an import's remote `name` is the same storage as our remote of that name."""
        assert self._layout is not None
        ours = next((c.remotes.get(name) for c in self._layout.configs.values() if name in c.remotes), None)
        return bool(spec and ours and spec.settings.get("url") == ours.settings.get("url"))

    # -- reading ------------------------------------------------------------------------------
    def entry(self, path: str) -> Entry:
        problem = self.tree.problem_at(path)
        if problem is not None:
            raise OutputUnavailable(problem.message())
        found = self.tree.get(path)
        if found is None:
            kind = "a directory" if self.tree.is_dir(path) else "not in"
            raise NotFound(f"{path}: {kind} revision {self.info.revision if self.info else '?'}"
                           if kind == "not in" else f"{path}: is a directory", path=path)
        return found

    def ref(self, entry: Entry) -> ObjectRef:
        remote = self.remote(entry.remote, entry.output or entry.path, entry.root)
        if entry.version is not None:   # cloud-versioned: the object sits at its own path, by version
            root = entry.root.partition(":")[2] if entry.root.startswith(_IMPORT) else entry.root
            key = entry.path[len(root) + 1:] if root else entry.path
            return ObjectRef(entry.oid, remote, versioned_path(key, entry.version), False, entry.size, entry.path)
        size = None if entry.looked_up else entry.size   # a size learned from an answer: checked again
        if entry.root.startswith(_SOURCE):   # the one object of an import-url source (errors name it)
            return ObjectRef(entry.oid, remote, remote.display_url, entry.legacy, size, entry.path)
        return ObjectRef(entry.oid, remote, object_path(entry.oid, entry.legacy), entry.legacy, size, entry.path)

    async def stat(self, path: str) -> Entry:
        return await self.sized(self.entry(path))

    async def sized(self, entry: Entry, *, stat_ahead: bool = False) -> Entry:
        """`entry` with its true size (one request at most: a HEAD, or git's blob header;
        none when the persistent index or the directory's published size index knows it).
        stat_ahead=True (a stat/lookup, not an open): a walker stat-ing its way through a
        directory gets the rest of it sized in the background (see _size_missed)."""
        if stat_ahead and self._read_at:
            self._reader_at(entry.path)
        if entry.size is not None:
            return entry
        if entry.kind == "git":
            size = await self.git.blob_size(entry.oid)
        else:
            ref = self.ref(entry)
            size = await self.fetcher.indexed_size(ref)
            if size is None and await self._use_size_index(entry.output):
                size = await self.fetcher.indexed_size(ref)
            if size is not None and not self.tenancy.admitted(ref, content=False):
                await self.tenancy.admit(ref, content=False)    # a node-shared index: ours to show?
            if size is not None:          # the common case of a walker: no task
                self.fetcher.counters.add("dda_cache_reads", 1, "metadata", "hit")
                return self._sized(entry, size)
            if stat_ahead:
                self._size_missed(entry.path)
            size = await self._size_of(ref)
        return self._sized(entry, size)

    async def _size_of(self, ref: ObjectRef, *, cold: bool = False) -> int:
        """`fetcher.size_of`, one request per object however many ask at once (a stat and
        the directory's stat-ahead). cold=True: a bulk sizing found nothing of the object on
        this node (the index and the store, asked for its whole batch): only the request is
        left, and our remote's answer proves the size for our identity (`_may_show` records it)."""
        key = (ref.oid, id(ref.remote))    # per remote: each identity is gated on its own
        while True:
            task = self._sizing.get(key)
            if task is None:
                if cold:
                    return await self._size_inline(ref, key)
                task = asyncio.ensure_future(self._size_shown(ref))
                self._sizing[key] = task
                task.add_done_callback(lambda _t: self._sizing.pop(key, None))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if task.cancelled() and me is not None and not me.cancelling():
                    continue      # the bulk sizing that asked was stopped, not us: ask ourselves
                raise

    async def _size_inline(self, ref: ObjectRef, key: tuple[str, int]) -> int:
        """A bulk sizing's request, run in the caller's own task (no task per object: a 100k
        stat-ahead is 100k of these); a stat of the same object meanwhile waits on the future
        it leaves in `_sizing` (one request however many ask)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._sizing[key] = future
        try:
            size = await self._size_asked(ref)
        except BaseException as err:
            if not future.done():
                if isinstance(err, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(err)
                    future.exception()    # retrieved: nobody may be waiting (no "never retrieved" log)
            raise
        else:
            if not future.done():
                future.set_result(size)
            return size
        finally:
            if self._sizing.get(key) is future:
                del self._sizing[key]

    async def _size_asked(self, ref: ObjectRef) -> int:
        """One request for a size nothing on this node knew; our remote's answer proves it
        for our identity at once (a caller cancelled meanwhile leaves no unproven size)."""
        size = self.fetcher.known_size(ref)    # learned since its batch was checked (a stat's own request)
        if size is not None:
            return size
        size = await self.fetcher.ask_size(ref)
        self.tenancy.size_shown_now(ref)
        return size

    async def _size_shown(self, ref: ObjectRef) -> int:
        """`fetcher.size_of`, behind the tenancy gate: a size this node learned from another
        remote identity is shown only once `ref`'s own remote answered for the object."""
        if not self.tenancy.admitted(ref, content=False):
            await self.tenancy.admit(ref, content=False)
        size = await self.fetcher.size_of(ref)   # the index again: a gated caller may have skipped it
        await self.tenancy.settle(ref)
        return size

    def _may_show(self, ref: ObjectRef) -> bool:
        """Whether a size handed over in bulk (from the shared index) may be shown for `ref`
        (no I/O: what this process knows; stat_many looks the proofs up first)."""
        return self.tenancy.size_shown_now(ref)

    def _size_missed(self, path: str) -> None:
        """Count a size the index did not know; after STAT_AHEAD_AFTER in one directory, each
        a few names after the one before (a walker in name order: `find -printf %s`, `ls -l`,
        a scandir+stat loop; not a reader opening random files), size the rest of that
        directory in the background - bounded pool, background priority, each size recorded
        as it lands - so the walker's next stats find their answers instead of one round trip
        each."""
        parent, _, name = path.rpartition("/")
        if parent in self._stat_ahead:
            return
        at = bisect.bisect_left(self.tree.dirs.get(parent) or [], name)
        last, misses = self._size_misses.get(parent, (-1, 0))
        misses = misses + 1 if last >= 0 and 0 < at - last <= STAT_AHEAD_GAP else 1
        self._size_misses[parent] = (at, misses)
        if misses < STAT_AHEAD_AFTER:
            return
        token = current_priority.set(PREFETCH)
        try:
            self._stat_ahead[parent] = asyncio.ensure_future(self._stat_ahead_dir(parent))
        finally:
            current_priority.reset(token)

    def _reader_at(self, path: str) -> None:
        """A stat in a directory being sized ahead: its reader is at `path`'s name now."""
        parent, _, name = path.rpartition("/")
        if parent not in self._read_at:
            return
        names = self.tree.dirs.get(parent)
        if names:
            self.reader_at(parent, bisect.bisect_left(names, name))

    def reader_at(self, parent: str, at: int) -> None:
        """A stat of the child at name index `at` of directory `parent` (answered without
        `sized`: its size was known): a stat-ahead of `parent` follows its reader there."""
        read_at = self._read_at.get(parent)
        if read_at is not None and at > read_at:
            self._read_at[parent] = at
            self._reader_moved[parent].set()

    async def _stat_ahead_dir(self, parent: str) -> None:
        """Size `parent`'s files in name order (a walker's order) in rounds of
        STAT_AHEAD_STEP, never more than STAT_AHEAD_WINDOW past the reader's last stat: a
        reader that stops (`ls -l | head`) stops it too."""
        tree = self.tree
        names = tree.dirs.get(parent) or []
        prefix = parent + "/" if parent else ""
        self._read_at.setdefault(parent, 0)
        moved = self._reader_moved.setdefault(parent, asyncio.Event())

        groups: dict[tuple, Any] = {}     # group -> (remote, legacy, source root)

        def todo(start: int, stop: int):  # type: ignore[no-untyped-def]
            # from the tree's arrays: no Entry per file (Tree.unsized_between)
            for fid, name, oid, group in tree.unsized_between(parent, start, stop):
                ref = self._group_ref(groups, group, oid, prefix + name)
                yield (fid, ref), ref

        def learned(item: tuple[int, ObjectRef], size: int) -> None:
            fid, ref = item
            # else the stat that needs it asks itself; a refresh meanwhile: the new tree's stat asks
            if self._may_show(ref) and self.tree is tree:
                tree.set_looked_up_size(fid, size)

        ask = functools.partial(self._size_of, cold=True)
        done = 0
        try:
            while done < len(names):
                stop = min(len(names), done + STAT_AHEAD_STEP, self._read_at[parent] + STAT_AHEAD_WINDOW)
                if stop <= done:    # far enough ahead: wait for the reader
                    moved.clear()
                    await moved.wait()
                    continue
                await size_all(self.fetcher, todo(done, stop), learned, size_of=ask)
                done = stop
        except DDAError as err:   # a stat that needs the failed one reports it itself
            log.info("%s: sizing ahead stopped: %s", parent or ".", err)
        finally:
            self._read_at.pop(parent, None)
            self._reader_moved.pop(parent, None)

    def _sized(self, entry: Entry, size: int) -> Entry:
        # Sizes of an object never change: remember them in the current tree where it holds the
        # same object at that path (an entry from before a refresh changes nothing else).
        sized = replace(entry, size=size, looked_up=entry.kind == "dvc")
        current = self.tree.files.get(entry.path)
        if current is not None and current.oid == entry.oid and current.kind == entry.kind and current.size is None:
            self.tree.set_size(entry.path, size, looked_up=entry.kind == "dvc")
        return sized

    def _size_verified(self, oid: str, size: int) -> None:
        """A verified object's size replaces one learned from a remote's answer."""
        self.tree.resize_object(oid, size)

    async def known_sizes(self, entries: list[Entry]) -> list[Entry]:
        """`entries` with the sizes this node already knows filled in - the fetcher's memory,
        then the persistent index in one query (a published size index, once loaded, is
        there; read on a store thread) - and recorded in the tree. Never a request: what a listing may do (a FUSE
        readdirplus hands these sizes to the kernel, so a `find -printf %s` needs no lookups)."""
        want = [e for e in entries if e.size is None and e.kind == "dvc"]
        if not want:
            return entries
        fetcher = self.fetcher
        known = {e.oid: fetcher._sizes[e.oid] for e in want if e.oid in fetcher._sizes}
        rest = [e.oid for e in want if e.oid not in known and e.oid not in fetcher._contradicted]
        if rest:
            known.update(await fetcher.astore.sizes(rest))    # on a store thread
        if known:   # only sizes our own remotes showed (the index is node-shared): store/tenancy.py
            shown = [e for e in want if e.oid in known]
            await self.tenancy.preload([self.ref(e) for e in shown])
            for e in shown:
                if not self._may_show(self.ref(e)):
                    del known[e.oid]
        if not known:
            return entries
        return [self._sized(e, known[e.oid]) if e.size is None and e.kind == "dvc" and e.oid in known else e
                for e in entries]

    async def fill_known_sizes(self, folder: str, probe: int = 32) -> int:
        """Put into the tree every size of the files directly in `folder` that this node
        knows and our remotes showed (the fetcher's memory, then the persistent index: one
        trip per FILL_BATCH files; never a request), so a listing hands them out with the
        names (a FUSE readdirplus: `find -printf %s` needs no lookup per file). The first
        `probe` unsized files are asked first: a cold folder costs that one query. No Entry
        is made per file (a 100k-file folder). Returns how many sizes were set."""
        tree = self.tree     # the tree listed (a refresh may replace self.tree meanwhile)
        rows = tree.unsized(folder, probe)       # a cold folder (the common case) costs only these
        if not rows:
            return 0
        refs: dict[tuple, Any] = {}      # group -> (remote, legacy, source root), per call
        first = await self._shown_sizes(rows, refs)
        if not first:
            return 0
        rows = tree.unsized(folder)     # same tree: its first `probe` rows are the ones asked
        for i in range(probe, len(rows), FILL_BATCH):
            first.update(await self._shown_sizes(rows[i:i + FILL_BATCH], refs))
        return tree.set_sizes(folder, first)     # one pass over the folder

    async def _shown_sizes(self, rows: list[tuple[str, str, tuple]], groups: dict[tuple, Any]) -> dict[str, int]:
        """md5 -> size for the `rows` (Tree.unsized) this node knows, kept only where our own
        remote showed the size (the index is node-shared: store/tenancy.py)."""
        fetcher = self.fetcher
        known: dict[str, int] = {}
        rest = []
        for _, oid, _ in rows:
            size = fetcher._sizes.get(oid)
            if size is not None:
                known[oid] = size
            elif oid not in fetcher._contradicted:
                rest.append(oid)
        if rest:
            known.update(await fetcher.astore.sizes(rest))    # on a store thread
        if not known:
            return known
        refs: dict[str, ObjectRef] = {}
        for _, oid, group in rows:
            if oid in known and oid not in refs:
                refs[oid] = self._group_ref(groups, group, oid, oid)
        await self.tenancy.preload(list(refs.values()))
        return {oid: known[oid] for oid, ref in refs.items() if self._may_show(ref)}

    def _group_ref(self, groups: dict[tuple, Any], group: tuple, oid: str, display: str) -> ObjectRef:
        """`ref` of an unsized DVC file given by its tree group and md5 (Tree.unsized rows; no
        Entry): the remote is looked up once per group (`groups` is the caller's memo)."""
        made = groups.get(group)
        if made is None:
            _, _, legacy, remote_name, output, root = group
            made = groups[group] = (self.remote(remote_name, output or display, root), legacy,
                                    root.startswith(_SOURCE))
        remote, legacy, source = made
        return ObjectRef(oid, remote, remote.display_url if source else object_path(oid, legacy), legacy, None,
                         display)

    async def stat_many(self, entries: list[Entry], failed: dict[str, Exception] | None = None) -> list[Entry]:
        """True sizes for many entries: the persistent index, the directories' published size
        indexes, then one request per object still unknown (bounded pool, each under its own
        deadline, each size recorded as it lands: an error keeps what was learned before it).
        Raises the first error; with `failed` given, each entry whose size could not be learned
        stays unsized and its error goes into `failed[entry.path]` instead (`dda ls`/`get`
        show or write the others)."""
        # What this node knows first: a listing of a folder sized before asks nothing (not
        # even for the published size index).
        result = await self.known_sizes(list(entries))
        for output in {e.output for e in result if e.size is None and e.kind == "dvc"}:
            await self._use_size_index(output)

        def failing(i: int, err: Exception) -> None:
            if failed is None:
                raise err
            failed[result[i].path] = err

        for i, e in enumerate(result):
            if e.size is None and e.kind == "git":
                try:
                    result[i] = self._sized(e, await self.git.blob_size(e.oid))
                except DDAError as err:
                    failing(i, err)

        unshown: list[int] = []

        def learned(i: int, size: int) -> None:
            if self._may_show(self.ref(result[i])):
                result[i] = self._sized(result[i], size)
            else:
                unshown.append(i)

        # the proofs in batches, off the loop, before the per-file checks (kept in a bounded memo)
        await self.tenancy.preload([self.ref(e) for e in result if e.size is None and e.kind == "dvc"])
        await size_all(self.fetcher, ((i, self.ref(e)) for i, e in enumerate(result)
                                      if e.size is None and e.path not in (failed or ())),
                       learned, size_of=functools.partial(self._size_of, cold=True),
                       on_error=None if failed is None else failing)
        if unshown:     # sizes learned through another remote identity: asked of ours, bounded
            slots = asyncio.Semaphore(self.fetcher.jobs)

            async def one(i: int) -> None:
                async with slots:
                    try:
                        result[i] = self._sized(result[i], await self._size_of(self.ref(result[i])))
                    except Exception as err:   # noqa: BLE001 - that entry's own failure
                        failing(i, err)

            await asyncio.gather(*(one(i) for i in unshown))
        return result

    # -- the shared size index ------------------------------------------------------------------
    async def _use_size_index(self, output: str | None) -> bool:
        """Before the first request that sizes a file of a big directory output (at least
        SIZE_INDEX_MIN_FILES files), read that directory's published size index into the
        persistent index, where every sizing path looks first: then `find -printf %s` costs
        one request, not one per file. Once per output per engine; never again on this node
        once loaded (a marker in the index: a remount asks nothing). Listing, reading and
        small directories never cause this request. True when it waited for a load (the
        persistent index may know more now)."""
        out = self._dir_outputs.get(output) if output else None
        if out is None or out.md5 in self._size_index_tried:
            return False
        if self._output_files.get(out.md5, 0) < SIZE_INDEX_MIN_FILES or \
                (await self.fetcher.astore.size(_loaded_marker(out.md5)) is not None and
                 await self.tenancy.size_proven(self.remote(out.remote, out.source, out.root), _loaded_marker(out.md5))):
            self._size_index_tried.add(out.md5)
            return False
        task = self._size_index_loads.get(out.md5)
        if task is None:
            task = asyncio.ensure_future(self._load_size_index(out))
            self._size_index_loads[out.md5] = task
        await asyncio.shield(task)
        self._size_index_tried.add(out.md5)
        self._size_index_loads.pop(out.md5, None)
        return True

    def preload_size_indexes(self) -> None:
        """For a mount (long-lived, walked by `find`/`du`/loaders): start reading the published
        size index of every big directory output now, in the background, so the names the kernel
        lists already carry their sizes (readdirplus) and a walk needs no lookup per file. One
        request per big output at most, once per node (the loaded marker); a listing still never
        waits on it (a mount waits for it before it serves: `preloaded`), and one-shot
        commands (ls, cat, get) keep loading it lazily."""
        for path, out in self._dir_outputs.items():
            if self._output_files.get(out.md5, 0) >= SIZE_INDEX_MIN_FILES:
                task = asyncio.ensure_future(self._preload_size_index(path))
                self._preloads.add(task)
                task.add_done_callback(self._preload_done)

    async def preloaded(self, timeout: float = 2 * SIZE_INDEX_SECONDS) -> None:
        """Wait until the size indexes `preload_size_indexes` started are read (the request
        bounded by SIZE_INDEX_SECONDS, the whole wait by `timeout` seconds, after which they
        go on in the background; a failure is logged, never raised): a mount is ready once
        the names it will list carry every size published for them."""
        if self._preloads:
            await asyncio.wait(list(self._preloads), timeout=timeout)

    async def _preload_size_index(self, path: str, probe: int = 32) -> bool:
        """Read `path`'s size index unless this node already knows the sizes of its first
        `probe` files (a remount after a walk: no request at all, index published or not)."""
        first = list(itertools.islice((e for e in self.tree.walk_files(path) if e.kind == "dvc"), probe))
        if first and all(e.size is not None for e in await self.known_sizes(first)):
            return False
        return await self._use_size_index(path)

    def _preload_done(self, task: "asyncio.Task[bool]") -> None:
        self._preloads.discard(task)
        if not task.cancelled() and task.exception() is not None:   # an optimisation: logged, never raised
            log.warning("size index preload failed: %s", redact(str(task.exception())))

    async def _load_size_index(self, out: DvcOut) -> None:
        remote = self.remote(out.remote, out.source, out.root)
        key = sizeindex.index_path(out.md5, out.legacy)
        where = f"{out.path}: size index {remote.display_url}/{key}"
        try:
            # Bounded apart from the deadline: an unresponsive remote must not hold a stat
            # long (the index is an optimisation; per-file sizing still works).
            cap = sizeindex.max_bytes(self._output_files.get(out.md5, 0))
            async with asyncio.timeout(min(self.fetcher.deadline, SIZE_INDEX_SECONDS)):
                # One byte past what a true index can take: more means it is not one.
                got = await self.fetcher._remote_call(remote, lambda: remote.read(key, 0, cap + 1), "size")
            if len(got.data) > cap or (got.total is not None and got.total > cap):
                raise sizeindex.SizeIndexInvalid(f"{where}: larger than an index of "
                                                 f"{self._output_files.get(out.md5, 0)} files can be")
            # The manifest's md5s only once an index exists (a 1M-entry set is not free).
            sizes = sizeindex.decode(got.data, out.md5, await self._manifest_md5s(out), where)
        except ObjectMissing:
            return                                  # none published: sized per file when asked
        except (DDAError, TimeoutError) as err:     # unreadable or wrong: never trusted
            log.warning("%s ignored: %s", where, err or "timed out")
            return
        # Into the tree at once, folder by folder (no Entry per file): a walker's next lookups
        # and readdirs answer from memory.
        tree = self.tree
        for folder in [d for d in tree.dirs if d == out.path or d.startswith(out.path + "/")]:
            tree.set_sizes(folder, sizes)

        def record() -> None:   # on a store thread, in one trip; the marker after the sizes it vouches for
            self.store.index.record_sizes(sizes)
            self.store.index.record_sizes({_loaded_marker(out.md5): len(sizes)})
            # our remote said so: proven for its identity
            self.tenancy.record_sizes(remote, {**sizes, _loaded_marker(out.md5): len(sizes)})

        await self.fetcher.astore.run(record)
        log.info("%s: %d sizes", where, len(sizes))

    async def _manifest_md5s(self, out: DvcOut) -> set[str]:
        remote = self.remote(out.remote, out.source, out.root)
        ref = ObjectRef(out.md5, remote, object_path(out.md5, out.legacy, is_dir=True), out.legacy, None,
                        f"{out.path} (manifest {out.md5}.dir, from {out.source})")
        await self.tenancy.admit(ref)
        data = await self.fetcher.read_all(ref)   # in the cache since the snapshot was built
        raw = parse_manifest(data, f"{out.source}: manifest {out.md5}.dir").md5   # 16 bytes per entry
        return {raw[i:i + 16].hex() for i in range(0, len(raw), 16)}

    async def publish_sizes(self, path: str) -> list[tuple[str, str, int]]:
        """Publish the size index of every directory output at or below `path` (or the one
        holding `path`): [(output path, remote key, files)]. Sizes are learned as `stat_many`
        learns them (index, then one request per unknown file)."""
        root = Tree.normalize(path)
        outs = [o for o in self._dir_outputs.values()
                if not root or o.path == root or o.path.startswith(root + "/") or root.startswith(o.path + "/")]
        if not outs:
            raise NotFound(f"{path or '.'}: no DVC-tracked directory at or below it", path=path)
        done = []
        for out in sorted(outs, key=lambda o: o.path):
            entries = [e for e in self.tree.walk_files(out.path) if e.output == out.path]
            sized = await self.stat_many(entries)
            sizes = {e.oid: e.size for e in sized if e.size is not None}
            expected = await self._manifest_md5s(out)
            if sizes.keys() != expected:   # a git file shadowing part of the output, or a clash
                raise DDAError(f"{out.path}: the snapshot holds {len(sizes)} of the manifest's "
                               f"{len(expected)} objects; not publishing a partial size index")
            remote = self.remote(out.remote, out.source, out.root)
            key = sizeindex.index_path(out.md5, out.legacy)
            await self.fetcher._remote_call(remote, lambda: remote.write(key, sizeindex.encode(out.md5, sizes)),
                                            "write")
            await self.fetcher.astore.run(self.store.index.record_sizes, {_loaded_marker(out.md5): len(sizes)})
            await self.fetcher.astore.run(self.tenancy.record_sizes, remote, {_loaded_marker(out.md5): len(sizes)})
            done.append((out.path, key, len(sizes)))
        return done

    async def read(self, path: str, offset: int, length: int, reader: ReadCursor | None = None) -> bytes:
        return await self.read_entry(self.entry(path), offset, length, reader)

    async def read_entry(self, entry: Entry, offset: int, length: int, reader: ReadCursor | None = None) -> bytes:
        """Read what `entry` names, even after a refresh replaced the tree it came from.
        `reader`: the cursor of one reader of this file (see Fetcher.read)."""
        if entry.kind == "broken":
            problem = self.tree.broken.get(entry.output or entry.path)
            raise OutputUnavailable(problem.message() if problem else f"{entry.path}: unavailable")
        if entry.kind == "lfs":
            lfs = self._lfs_client(entry.path)
            if await self.tenancy.proven(self._lfs_ident, entry.oid):
                data = await lfs.read(entry.oid, entry.size or 0, offset, length, entry.path)
            else:   # the store is node-shared: our server shows it holds it, or we download it
                held = await self.fetcher.astore.has(entry.oid, 0)
                if held:
                    await lfs.holds(entry.oid, entry.size or 0, entry.path)
                data = await lfs.read(entry.oid, entry.size or 0, offset, length, entry.path, download=not held)
                self.tenancy.prove(self._lfs_ident, entry.oid, entry.size or 0)
            self.fetcher.counters.add("dda_served_bytes", len(data))
            return data
        if entry.kind == "git":
            blob = await self._blob(entry.oid)
            data = blob[offset:offset + length]
            self.fetcher.counters.add("dda_served_bytes", len(data))
            return data
        ref = self.ref(entry)
        if self.tenancy.admitted(ref):
            return await self.fetcher.read(ref, offset, length, reader)
        await self.tenancy.admit(ref)     # never another identity's bytes from the shared cache
        data = await self.fetcher.read(ref, offset, length, reader)
        await self.tenancy.settle(ref)    # a verified download from our remote proves it for free
        return data

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

    def _lfs_client(self, needed_by: str) -> Any:
        """The Git LFS endpoint of the repository: `lfs.url` of its .lfsconfig, else the git
        URL + `/info/lfs` (as git-lfs finds it). Git credentials go to the same origin only."""
        if self._lfs is None:
            from .remotes.lfs import LfsClient
            from .remotes.tls import verify_for
            from .snapshot.imports import _same_origin

            url = self._layout.lfs_url if self._layout else None
            if url is None and self.git.url.startswith(("http://", "https://")):
                url = self.git.url + ("/info/lfs" if self.git.url.endswith(".git") else ".git/info/lfs")
            if url is None:
                raise ConfigError(f"{needed_by}: a Git LFS object, and the repository names no LFS server "
                                  f"(.lfsconfig lfs.url) nor is it on http(s)")
            clean, url_user, url_token = strip_userinfo(url)
            same = _same_origin(clean, self.git.url)
            user, token = url_user or (self.git.user if same else None), url_token or (self.git.token if same else None)
            self._lfs_ident = self.tenancy.identity_of("lfs", {"url": clean, "user": user, "token": token})
            self._lfs = LfsClient(clean, self.store, user=user, token=token,
                                  verify=verify_for("lfs", None, self.config.ca_bundle),
                                  timeout=self.config.request_timeout)
        return self._lfs

    async def _blob(self, sha: str) -> bytes:
        if sha in self._blobs:
            self._blobs.move_to_end(sha)
            self.fetcher.counters.add("dda_cache_reads", 1, "data", "hit")
            return self._blobs[sha]
        blob = await self.git.read_blob(sha)
        if len(sha) == 40 and not await asyncio.to_thread(_blob_matches, blob, sha):
            raise HashMismatch(f"git blob {sha}: content does not match its sha1")
        self.fetcher.counters.add("dda_cache_reads", 1, "data", "miss")
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

    def forget_credentials(self) -> None:
        """Remove the credential files we wrote (git's 0600 config); sync, safe to call twice:
        also from a caller whose aclose() ran out of time (the hooks at interpreter exit)."""
        self.git._forget_credential_file()

    async def aclose(self, drain_seconds: float = 30.0) -> None:
        try:
            await self._aclose(drain_seconds)
        finally:
            self.forget_credentials()   # whatever happened above: no secret outlives us on disk

    async def _aclose(self, drain_seconds: float) -> None:
        for task in list(self._preloads):
            task.cancel()
        await asyncio.gather(*self._preloads, return_exceptions=True)
        for task in self._stat_ahead.values():
            task.cancel()
        await asyncio.gather(*self._stat_ahead.values(), return_exceptions=True)
        sizing = list(self._sizing.values())     # requests no caller waits for any more
        for task in sizing:
            if not task.done():
                task.cancel()
        await asyncio.gather(*sizing, return_exceptions=True)
        await self.fetcher.drain(drain_seconds)
        await self.fetcher.astore.run(self.tenancy.settle_all)   # before the store closes: its writer records them
        await self.git.aclose()
        for remote in [*self._remotes.values(), *self._sources]:
            await remote.aclose()
        if self._lfs is not None:
            await self._lfs.aclose()
        await self.fetcher.aclose()
        await asyncio.to_thread(self.store.close)


def _blob_matches(blob: bytes, sha: str) -> bool:
    """Whether `blob` is the git blob `sha` (hashed on a thread: blobs may be large)."""
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest() == sha
