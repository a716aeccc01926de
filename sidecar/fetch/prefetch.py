"""Fetching ahead of readers: sequential readahead with a growing window, directory-level
prefetch for small files, and prefetch hints (an ordered path list, e.g. a shuffled epoch).

All of it queues behind demand reads (priorities in `priority.py`) and stays within a byte
window ahead of what readers have consumed, so it never floods the cache.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..counters import PrefetchStats
from ..errors import DDAError
from .priority import PREFETCH, READAHEAD, current_priority

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)


@dataclass
class ReadState:
    """Per open file: where the next sequential read would start and how far to look ahead."""
    next_offset: int = 0
    window: int = 0
    next_chunk: int = 0       # first chunk index not yet handed to readahead


@dataclass
class _DirWalk:
    last_index: int = -1
    streak: int = 0
    opened: set[str] = field(default_factory=set)
    planned: bool = False
    # Following the reader's pace: files fetched ahead and not yet opened, and their bytes.
    ahead: dict[str, int] = field(default_factory=dict)
    ahead_bytes: int = 0
    moved: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Hints:
    order: list[str]
    members: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.members = set(self.order)


class Prefetcher:
    def __init__(self, engine: "Engine", *, max_window: int = 64 * 1024 * 1024, dir_trigger: int = 8,
                 concurrency: int | None = None, max_ahead_bytes: int | None = None,
                 dir_window_files: int = 32, dir_window_bytes: int = 32 * 1024 * 1024):
        self.engine = engine
        self.max_window = max_window
        self.dir_trigger = dir_trigger   # distinct files opened in a directory before we fetch ahead
        # A directory walk is fetched at most this far ahead of its reader (issue 11: after
        # 8 opens the whole rest of a 100k folder was planned, and readers queued behind it).
        self.dir_window_files = dir_window_files
        self.dir_window_bytes = dir_window_bytes
        # Directory prefetch runs few requests at once, so a reader's own reads (and the
        # threads a local remote reads on) are never queued behind it.
        self._dir_slots = asyncio.Semaphore(max(1, min(4, engine.config.jobs // 4)))
        self.counters = engine.fetcher.counters     # counted where the event happens
        self.stats = PrefetchStats(self.counters)    # a read-only view by field names
        self._slots = asyncio.Semaphore(concurrency or engine.config.jobs * 2)
        self.max_ahead_bytes = max_ahead_bytes or max(64 * 1024 * 1024, engine.config.cache_size // 4)
        self._ahead_bytes = 0
        self._ahead_changed = asyncio.Event()
        self._prefetched: dict[str, int] = {}     # path -> bytes, fetched ahead and not yet opened
        self._inflight: set[str] = set()
        self._dirs: dict[str, _DirWalk] = {}
        self._hints: _Hints | None = None
        self._hint_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._followers: set[asyncio.Task[None]] = set()   # directory walks (may wait on their reader)

    # -- readers tell us what they do ---------------------------------------------------------
    def on_open(self, path: str) -> None:
        size = self._prefetched.pop(path, None)
        if size is not None:
            self.counters.add("dda_prefetch_used_files")
            self._ahead_bytes -= size
            self._ahead_changed.set()
        parent, name = posixpath.split(path)
        walk = self._dirs.get(parent)
        if walk is not None and walk.planned:
            got = walk.ahead.pop(name, None)
            if got is not None:
                walk.ahead_bytes -= got
            walk.opened.add(name)
            walk.last_index = bisect.bisect_left(self.engine.tree.dirs.get(parent) or [], name)
            walk.moved.set()
        if self._hints is None or path not in self._hints.members:
            self._follow_directory(path)   # the hints, when given, know the order better

    def on_read(self, path: str, state: ReadState, offset: int, length: int, size: int) -> None:
        chunk = self.engine.store.chunk_size
        end = offset + length
        if offset == state.next_offset and offset > 0:
            state.window = min(self.max_window, max(chunk, state.window * 2))
        elif offset != state.next_offset:
            state.window = 0          # a seek: start over
            state.next_chunk = 0
        state.next_offset = end
        if not state.window or end >= size:
            return
        # Whole chunks only, each handed over once: the reader's own chunk is already coming.
        first = max(state.next_chunk, end // chunk + 1)
        last = (min(size, end + state.window) - 1) // chunk
        if last >= first:
            state.next_chunk = last + 1
            self._spawn(self._readahead(path, first, last), READAHEAD)

    # -- directory walks ----------------------------------------------------------------------
    def _follow_directory(self, path: str) -> None:
        """A reader working through a directory, in listing order or shuffled (an epoch),
        gets the rest of that directory fetched ahead of it, within the byte window."""
        tree = self.engine.tree
        parent, name = posixpath.split(path)
        names = tree.dirs.get(parent)
        if not names:
            return
        walk = self._dirs.setdefault(parent, _DirWalk())
        if walk.planned:
            return
        index = bisect.bisect_left(names, name)
        walk.streak = walk.streak + 1 if index == walk.last_index + 1 else 0
        walk.last_index = index
        walk.opened.add(name)
        if walk.streak < 2 and len(walk.opened) < self.dir_trigger:
            return
        walk.planned = True
        token = current_priority.set(PREFETCH)
        try:
            follower = asyncio.create_task(self._follow_dir(parent, walk, index))
        finally:
            current_priority.reset(token)
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)

    async def _follow_dir(self, parent: str, walk: _DirWalk, start: int) -> None:
        """Fetch the directory in listing order from just after the reader, wrapping round
        (right for a sequential walk, as good as any for a shuffled one), never more than
        dir_window_files / dir_window_bytes ahead: each file the reader opens lets one more
        go. A sequential reader that overtakes the plan moves it to where the reader is."""
        tree = self.engine.tree
        names = tree.dirs.get(parent) or []
        prefix = parent + "/" if parent else ""
        done = 0
        cursor = start + 1
        pending: set[asyncio.Task[None]] = set()
        try:
            while done < len(names):
                if walk.streak >= 2 and walk.last_index + 1 > cursor:
                    done += walk.last_index + 1 - cursor    # the reader got there first
                    cursor = walk.last_index + 1
                    continue
                name = names[cursor % len(names)]
                cursor += 1
                done += 1
                if name in walk.opened or name in walk.ahead:
                    continue
                entry = tree.files.get(prefix + name)
                if entry is None or entry.kind != "dvc":
                    continue
                while len(walk.ahead) >= self.dir_window_files or walk.ahead_bytes >= self.dir_window_bytes:
                    walk.moved.clear()
                    await walk.moved.wait()
                walk.ahead[name] = 0
                await self._dir_slots.acquire()
                task = asyncio.create_task(self._dir_file(prefix + name, walk, name))
                pending.add(task)
                task.add_done_callback(pending.discard)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            raise

    async def _dir_file(self, path: str, walk: _DirWalk, name: str) -> None:
        try:
            await self._prefetch_file(path)
            size = self._prefetched.get(path, 0)
            if name in walk.ahead:
                walk.ahead[name] = size
                walk.ahead_bytes += size
        finally:
            self._dir_slots.release()

    # -- hints --------------------------------------------------------------------------------
    def hint(self, paths: list[str]) -> tuple[int, list[str]]:
        """Follow `paths` in order from now on, replacing earlier hints. Returns (accepted,
        unknown paths)."""
        tree = self.engine.tree
        accepted, unknown = [], []
        for p in paths:
            norm = tree.normalize(p)
            (accepted if norm in tree.files else unknown).append(norm)
        if self._hint_task is not None:
            self._hint_task.cancel()
        for stale in [p for p in self._prefetched if self._hints and p in self._hints.members]:
            self.counters.add("dda_prefetch_wasted_files")
            self._ahead_bytes -= self._prefetched.pop(stale)
        self._hints = _Hints(accepted)
        token = current_priority.set(PREFETCH)
        try:
            self._hint_task = asyncio.create_task(self._follow_plan(accepted, self._hints))
        finally:
            current_priority.reset(token)
        return len(accepted), unknown

    async def _follow_plan(self, plan: list[str], hints: _Hints | None) -> None:
        """Fetch `plan` in order, never more than the byte window ahead of the readers."""
        pending: set[asyncio.Task[None]] = set()
        try:
            for path in plan:
                if hints is not None and hints is not self._hints:
                    return   # replaced by newer hints
                while self._ahead_bytes > self.max_ahead_bytes:
                    self._ahead_changed.clear()
                    await self._ahead_changed.wait()
                await self._slots.acquire()
                task = asyncio.create_task(self._prefetch_file(path, slot_held=True))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            raise

    async def wait_idle(self) -> None:
        """Until every fetch started so far has finished and nothing more starts without a
        reader moving (a directory walk waiting for its reader counts as idle)."""
        quiet = 0
        while quiet < 3:
            tasks = list(self._tasks) + ([self._hint_task] if self._hint_task else [])
            tasks = [t for t in tasks if not t.done()]
            if tasks:
                quiet = 0
                await asyncio.gather(*tasks, return_exceptions=True)
            else:
                quiet += 1
                await asyncio.sleep(0.01)

    # -- the work -----------------------------------------------------------------------------
    def _spawn(self, coro, priority: int) -> None:  # type: ignore[no-untyped-def]
        token = current_priority.set(priority)
        try:
            task = asyncio.create_task(coro)
        finally:
            current_priority.reset(token)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prefetch_file(self, path: str, slot_held: bool = False) -> None:
        holding = slot_held
        try:
            if path in self._inflight or path in self._prefetched:
                return
            self._inflight.add(path)
            if not holding:
                await self._slots.acquire()
                holding = True
            entry = await self.engine.stat(path)
            if entry.kind != "dvc":
                return
            ref = self.engine.ref(entry)
            if not await self.engine.fetcher.cached(ref):
                await self.engine.fetcher.prefetch(ref)
                self.counters.add("dda_prefetch_issued_files")
                self.counters.add("dda_prefetch_issued_bytes", entry.size or 0)
                self._prefetched[path] = entry.size or 0
                self._ahead_bytes += entry.size or 0
        except DDAError as err:
            self.counters.add("dda_prefetch_failures")
            log.info("prefetch of %s failed: %s", path, err)
        finally:
            self._inflight.discard(path)
            if holding:
                self._slots.release()

    async def _readahead(self, path: str, first: int, last: int) -> None:
        try:
            entry = self.engine.entry(path)
            if entry.kind != "dvc":
                return
            ref = self.engine.ref(entry)
            chunk = self.engine.store.chunk_size
            jobs = []
            for idx in range(first, last + 1):
                if not await self.engine.fetcher.astore.has(ref.oid, idx):
                    jobs.append(self.engine.fetcher.prefetch(ref, idx * chunk, chunk))
                    self.counters.add("dda_readahead_chunks")
            await asyncio.gather(*jobs)
        except DDAError as err:
            self.counters.add("dda_prefetch_failures")
            log.info("readahead of %s failed: %s", path, err)

    async def aclose(self) -> None:
        if self._hint_task is not None:
            self._hint_task.cancel()
        for task in [*self._tasks, *self._followers]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._followers, *([self._hint_task] if self._hint_task else []),
                             return_exceptions=True)
