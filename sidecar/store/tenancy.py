"""Tenant isolation in a shared cache: an object is served to a remote identity only after
that identity has shown it holds the object.

The store is content-addressed and may be shared by every pod on a node (a hostPath cache).
Knowing an md5 is not authorization: a repository naming another's md5 in a hand-written
`.dvc` must not read it from the cache. So each (remote identity, object) pair needs a proof,
kept in the store's index (table `proofs`) and so shared by every process and kept over
restarts:

- content proof: bytes this identity's remote delivered, compared with the verified bytes in
  the store (a window of WINDOW bytes at an offset keyed by the node key: a tenant cannot
  predict it); recorded for free when a normal download verifies, else one ranged read;
- size proof: the remote's own answer for the object's size (a HEAD, a stat), or its
  published size index; needed before a size the index learned elsewhere is shown.

A remote identity is an HMAC-SHA256, keyed by a random node-local key
(CACHE_DIR/store-v2/tenancy.key, 0600), over the remote's URL and every setting that carries credentials: no secret and no
plain hash of one is stored. A refused proof behaves exactly like an empty cache: the remote's
own answer (missing, denied) is the error.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ObjectMissing
from ..remotes.base import Range, Remote
from .identity import expected_length

if TYPE_CHECKING:
    from ..fetch import Fetcher, ObjectRef
    from . import Store

log = logging.getLogger(__name__)

WINDOW = 64            # bytes compared per proof
SHORT_KEPT = 256 * 1024  # a streamed answer shorter than asked (a small object) is noted if this small
KEY_FILE = "tenancy.key"
PENDING_PATHS = 4096   # remembered deliveries awaiting their object's verification (LRU)
PROVEN_MEMO = 65536    # proven pairs remembered in memory (the index holds them all)
_OBJECT_PATH = re.compile(r"(?:^|/)([0-9a-f]{2})/([0-9a-f]{30})$")   # DVC 2 and 3 object keys (md5)
_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")
# remote settings that change neither who reads nor what is read (upload verb, pacing)
_NOT_IDENTITY = frozenset({"method", "jobs", "timeout", "read_timeout", "connect_timeout"})


def node_key(cache_dir: Path) -> bytes:
    """The node-local HMAC key (32 random bytes), created once, 0600, shared by every process
    using `cache_dir`. Raises OSError when it can be neither read nor created."""
    path = Path(cache_dir) / KEY_FILE
    for _ in range(3):
        try:
            with open(path, "rb") as f:
                key = f.read()
            if len(key) == 32:
                return key
            os.unlink(path)      # torn or foreign: a new key only costs proofs again
        except FileNotFoundError:
            pass
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)   # never replaces a key another process just made
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    raise OSError(f"cache directory {cache_dir}: cannot settle the tenancy key {path}")


class ProvingRemote(Remote):
    """A remote as one identity sees it: every call goes to `inner`; what it delivers is noted
    so a verified download proves the object for this identity without another request."""

    def __init__(self, inner: Remote, ident: str, tenancy: "Tenancy"):
        self.inner, self.ident, self._tenancy = inner, ident, tenancy
        self.name = inner.name
        self.display_url = inner.display_url
        self.can_list = inner.can_list
        # the inner client's own width for size requests (an HTTP remote's HEAD session
        # carries 128): hidden here, a walker's sizing queued behind the reads' 16 slots
        self.size_concurrency = inner.size_concurrency

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)   # remote-specific extras (uploads, versions)

    async def read(self, path: str, start: int, end: int | None) -> Range:
        got = await self.inner.read(path, start, end)
        self._tenancy._delivered(self.ident, path, start, got.data, got.total)
        return got

    async def stream(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> int | None:
        # The window lies in the first SHORT_KEPT bytes, and a delivery that ends with its
        # object proves it too: an object between SHORT_KEPT and the chunk asked for (a 7 MB
        # manifest read as one 8 MB chunk) was never noted, and a remount asked again.
        window = self._tenancy._window_of(self.ident, path, start, min(end - start, SHORT_KEPT))
        if window is None:
            return await self.inner.stream(path, start, end, sink)
        lo, hi = window
        seen = bytearray()
        head = bytearray()      # a short answer (an object smaller than asked for) is kept whole
        at = [start]

        def tee(piece: bytes) -> None:
            a, b = max(lo, at[0]), min(hi, at[0] + len(piece))
            if a < b:
                seen.extend(piece[a - at[0]:b - at[0]])
            if at[0] - start + len(piece) <= SHORT_KEPT:
                head.extend(piece)
            at[0] += len(piece)
            sink(piece)

        total = await self.inner.stream(path, start, end, tee)
        if len(seen) == hi - lo and (at[0] == end or (total is not None and at[0] == total)):
            self._tenancy._note(self.ident, path, start, at[0] - start, lo, bytes(seen), total)
        elif at[0] < end and len(head) == at[0] - start and (total is None or at[0] == total):
            self._tenancy._delivered(self.ident, path, start, bytes(head), total)
        return total

    async def size(self, path: str) -> int:
        size = await self.inner.size(path)
        self._tenancy._answered(self.ident, path, size)
        return size

    async def list_sizes(self, prefix: str) -> dict[str, int] | None:
        listed = await self.inner.list_sizes(prefix)
        if listed:
            self._tenancy._listed(self.ident, listed)
        return listed

    async def write(self, path: str, data: bytes) -> None:
        await self.inner.write(path, data)

    async def exists(self, path: str) -> bool:
        return await self.inner.exists(path)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Tenancy:
    """The gate between the shared store and one process's remotes (see the module doc)."""

    def __init__(self, store: "Store", fetcher: "Fetcher"):
        self.store, self.fetcher = store, fetcher
        self._key = node_key(store.root)
        # (ident, path) -> [(chunk start, delivered length, window start, window bytes, total)]
        self._pending: OrderedDict[tuple[str, str], list[tuple[int, int, int, bytes, int | None]]] = OrderedDict()
        self._answers: OrderedDict[tuple[str, str], int] = OrderedDict()   # (ident, path) -> size answered
        self._proven: OrderedDict[tuple[str, str], tuple[int, bool]] = OrderedDict()
        self._done_paths: set[tuple[str, str]] = set()   # (ident, path) proven: deliveries not noted
        self.checks = 0          # proof requests made (tests, metrics)
        # proofs learned, not yet in the index: written in one transaction per batch (a
        # walker's sizing proves thousands a second; a commit each held the index writer)
        self._unwritten: list[tuple[str, str, int, int]] = []
        self._unwritten_lock = threading.Lock()
        self._write_queued = False

    # -- identities ---------------------------------------------------------------------------
    def identity(self, remote: Remote, settings: dict[str, str]) -> str:
        """The identity of `remote` as built from `settings` (its .dvc/config section with our
        overrides): an HMAC over the URL and every setting, credentials included."""
        # every setting but those that shape only uploads or pacing: a publish retried with
        # another upload `method` must not ask again for every size it already knows
        material = {k: str(v) for k, v in settings.items() if k not in _NOT_IDENTITY}
        material["\0display"] = remote.display_url.rstrip("/")
        if str(settings.get("url", "")).lower().startswith("s3://"):
            # botocore also takes credentials from the environment and profiles
            material.update({f"\0env:{k}": os.environ[k] for k in _ENV_CREDENTIALS if k in os.environ})
        return self.identity_of("remote", material)

    def identity_of(self, kind: str, material: dict[str, str | None]) -> str:
        """An identity (32 hex) for any store of objects (`kind`: remote, lfs) reached with
        `material` (its URL and credentials): HMAC-SHA256 under the node key."""
        blob = json.dumps(material, sort_keys=True).encode()
        return hmac.new(self._key, kind.encode() + b"\0" + blob, hashlib.sha256).hexdigest()[:32]

    async def proven(self, ident: str, oid: str) -> bool:
        """Whether identity `ident` showed the bytes of `oid` (a Git LFS object: the server's
        batch answer, or a verified download of ours)."""
        found = await self._lookup(ident, oid)
        return bool(found and found[1])

    def prove(self, ident: str, oid: str, size: int) -> None:
        self._record(ident, oid, None, size, True)

    def wrap(self, remote: Remote, settings: dict[str, str]) -> ProvingRemote:
        return ProvingRemote(remote, self.identity(remote, settings), self)

    def _mac(self, *parts: object) -> int:
        text = "\0".join(map(str, parts)).encode()
        return int.from_bytes(hmac.new(self._key, text, hashlib.sha256).digest()[:8], "big")

    # -- what remotes delivered ---------------------------------------------------------------
    def _window_of(self, ident: str, path: str, start: int, length: int) -> tuple[int, int] | None:
        """Where to keep a window of a delivery of [start, start+length): None when the
        delivery cannot prove anything (not a chunk's start) or the pair is proven already."""
        if length <= 0 or start % self.store.chunk_size or (ident, path) in self._done_paths:
            return None
        width = min(WINDOW, length)
        lo = start + self._mac("window", ident, path, start) % (length - width + 1)
        return lo, lo + width

    def _delivered(self, ident: str, path: str, start: int, data: bytes, total: int | None) -> None:
        window = self._window_of(ident, path, start, len(data))
        if window is not None:
            lo, hi = window
            self._note(ident, path, start, len(data), lo, data[lo - start:hi - start], total)

    def _note(self, ident: str, path: str, start: int, length: int, lo: int, window: bytes,
              total: int | None) -> None:
        key = (ident, path)
        notes = self._pending.setdefault(key, [])
        if len(notes) < 4:                   # a few chunks are enough to prove an object
            notes.append((start, length, lo, window, total))
        self._pending.move_to_end(key)
        while len(self._pending) > PENDING_PATHS:
            self._pending.popitem(last=False)

    def _listed(self, ident: str, listed: dict[str, int]) -> None:
        """A listing is the remote's own answer for every object in it: size proofs."""
        rows = []
        for path, size in listed.items():
            match = _OBJECT_PATH.search(path)
            if match is not None:
                oid = match.group(1) + match.group(2)
                self._remember(ident, oid, None, size, False)
                rows.append((ident, oid, size, 0))
        if rows:
            self.store.index_later(self.store.index.record_proofs, rows)

    def _answered(self, ident: str, path: str, size: int) -> None:
        self._answers[(ident, path)] = size
        self._answers.move_to_end((ident, path))
        while len(self._answers) > PENDING_PATHS:
            self._answers.popitem(last=False)

    # -- proofs -------------------------------------------------------------------------------
    async def _lookup(self, ident: str, oid: str) -> tuple[int, bool] | None:
        memo = self._proven.get((ident, oid))
        if memo is not None:
            return memo
        found = await self.fetcher.astore.run(self.store.index.proof, ident, oid)
        if found is not None:
            self._remember(ident, oid, None, *found)
        return found

    def _remember(self, ident: str, oid: str, path: str | None, size: int, content: bool) -> None:
        old = self._proven.get((ident, oid))
        value = (size, content or bool(old and old[0] == size and old[1]))
        self._proven[(ident, oid)] = value
        self._proven.move_to_end((ident, oid))
        while len(self._proven) > PROVEN_MEMO:
            self._proven.popitem(last=False)
        if path is not None and value[1]:
            self._done_paths.add((ident, path))
            if len(self._done_paths) > PROVEN_MEMO:
                self._done_paths.clear()
            self._pending.pop((ident, path), None)

    def _record(self, ident: str, oid: str, path: str | None, size: int, content: bool) -> None:
        self._remember(ident, oid, path, size, content)
        with self._unwritten_lock:
            self._unwritten.append((ident, oid, size, int(content)))
            if self._write_queued:
                return
            self._write_queued = True
        self.store.index_later(self._write_proofs)

    def _write_proofs(self) -> None:
        """On the store's index writer: every proof recorded since the last batch."""
        with self._unwritten_lock:
            rows, self._unwritten = self._unwritten, []
            self._write_queued = False
        self.store.index.record_proofs(rows)

    def record_sizes(self, remote: Remote, sizes: dict[str, int]) -> None:
        """Sizes `remote` published itself (its size index): proven for its identity."""
        if isinstance(remote, ProvingRemote) and sizes:
            self.store.index.record_proofs([(remote.ident, oid, size, 0) for oid, size in sizes.items()])

    async def preload(self, refs: list["ObjectRef"]) -> None:
        """Look up the proofs of many refs at once (one query per identity and 500 objects),
        so the per-object checks of a bulk stat that follow are answered from memory."""
        wanted: dict[str, list[str]] = {}
        for ref in refs:
            remote = ref.remote
            if isinstance(remote, ProvingRemote) and (remote.ident, ref.oid) not in self._proven:
                wanted.setdefault(remote.ident, []).append(ref.oid)
        for ident, oids in wanted.items():
            found = await self.fetcher.astore.run(self.store.index.proofs, ident, oids)
            for oid, (size, content) in found.items():
                self._remember(ident, oid, None, size, content)

    async def size_proven(self, remote: Remote, oid: str) -> bool:
        """Whether `remote`'s identity has shown a size (or the bytes) of `oid`."""
        return not isinstance(remote, ProvingRemote) or await self._lookup(remote.ident, oid) is not None

    def size_shown_now(self, ref: "ObjectRef") -> bool:
        """`size_proven` from what this process knows (no I/O: bulk stat callbacks on the
        loop); an answer our remote just gave proves it here."""
        remote = ref.remote
        if not isinstance(remote, ProvingRemote):
            return True
        answer = self._answers.pop((remote.ident, ref.path), None)
        if answer is not None and self.fetcher.remembered_size(ref.oid) in (None, answer):
            self._record(remote.ident, ref.oid, None, answer, False)
        return (remote.ident, ref.oid) in self._proven

    async def settle(self, ref: "ObjectRef") -> bool:
        """Turn what this identity's remote delivered or answered for `ref` into a proof, now
        that the store may hold the verified object. True when `ref` is proven for content."""
        remote = ref.remote
        if not isinstance(remote, ProvingRemote):
            return True
        ident, key = remote.ident, (remote.ident, ref.path)
        notes = self._pending.get(key)
        if notes:
            keep = []
            for start, length, lo, window, total in notes:
                verdict = await self.fetcher.astore.run(self._compare, ref.oid, start, length, lo, window, total)
                if verdict is None:
                    keep.append((start, length, lo, window, total))
                elif verdict >= 0:
                    self._record(ident, ref.oid, ref.path, verdict, True)
                    return True
            if keep:
                self._pending[key] = keep
            else:
                self._pending.pop(key, None)
        answer = self._answers.pop(key, None)
        if answer is not None:
            local = await self._local_size(ref)
            if local is None or local == answer:
                self._record(ident, ref.oid, None, answer, False)
        found = await self._lookup(ident, ref.oid)
        return bool(found and found[1])

    def settle_all(self) -> None:
        """Settle every delivery still waiting for its object's verification (at close, after
        the downloads drained): a pass that verified after its last read proves it too."""
        for (ident, path), notes in list(self._pending.items()):
            match = _OBJECT_PATH.search(path)
            if match is None:
                continue        # a versioned key: proven by its next read
            oid = match.group(1) + match.group(2)
            for start, length, lo, window, total in notes:
                size = self._compare(oid, start, length, lo, window, total)
                if size is not None and size >= 0:
                    self._record(ident, oid, path, size, True)
                    break
        self._pending.clear()
        # Sizes our remotes answered that no caller got to look at (a bulk stat cut by its
        # deadline): the fetcher recorded them in the index, so their proofs go there too -
        # else the next process would ask again (sizing never throws progress away).
        rows = []
        for (ident, path), size in list(self._answers.items()):
            match = _OBJECT_PATH.search(path)
            if match is None:
                continue
            oid = match.group(1) + match.group(2)
            if self.fetcher._sizes.get(oid) in (None, size):
                self._remember(ident, oid, None, size, False)
                rows.append((ident, oid, size, 0))
        self._answers.clear()
        if rows:
            self.store.index_later(self.store.index.record_proofs, rows)

    def _compare(self, oid: str, start: int, length: int, lo: int, window: bytes,
                 total: int | None) -> int | None:
        """A delivery against the verified store: the object's size when the window matches,
        -1 when it does not, None when the store does not hold that chunk (yet)."""
        cs = self.store.chunk_size
        idx = start // cs
        header = self.store.header(oid, idx)
        if header is None:
            return None
        size = header.object_size
        if (total is not None and total != size) or length != expected_length(size, idx, cs):
            return -1
        held = self.store.read(oid, idx, lo - start, lo - start + len(window))
        if held is None:
            return None
        return size if hmac.compare_digest(held, window) else -1

    async def _local_size(self, ref: "ObjectRef") -> int | None:
        """A size of `ref`'s object this node knows from anyone (index, verified store)."""
        size = await self.fetcher.indexed_size(replace(ref, size=None))
        return size if size is not None else await self.fetcher.astore.run(self.store.object_size, ref.oid)

    # -- the gate -----------------------------------------------------------------------------
    def admitted(self, ref: "ObjectRef", content: bool = True) -> bool:
        """Cheap check (memory only, no I/O) that `ref` may be served."""
        remote = ref.remote
        if not isinstance(remote, ProvingRemote):
            return True
        found = self._proven.get((remote.ident, ref.oid))
        return found is not None and (found[1] or not content)

    async def admit(self, ref: "ObjectRef", content: bool = True) -> None:
        """Make sure the store serves `ref` (its bytes with `content`, else its size) only to
        an identity that showed it holds the object: at most one request (a ranged read of a
        window, or a size request), under the read's deadline. Raises what the remote
        answered (ObjectMissing, RemoteAuthError, ...) when it does not hold it; returns at
        once when nothing of the object is on this node (the fetch then asks the remote)."""
        remote = ref.remote
        if self.admitted(ref, content) or not isinstance(remote, ProvingRemote):
            return
        await self._lookup(remote.ident, ref.oid)
        if self.admitted(ref, content) or await self.settle(ref) or (not content and self.admitted(ref, False)):
            return
        await self.fetcher._with_deadline(self._prove(ref, content), ref)

    async def _prove(self, ref: "ObjectRef", content: bool) -> None:
        remote = ref.remote
        assert isinstance(remote, ProvingRemote)
        cs = self.store.chunk_size
        run = self.fetcher.astore.run
        held = sorted(await run(self.store.index.present, ref.oid)) if content else []
        if held:
            idx = held[self._mac("chunk", remote.ident, ref.oid) % len(held)]
            header = await run(self.store.header, ref.oid, idx)
            if header is not None:
                length = header.length
                width = min(WINDOW, length)
                lo = idx * cs + self._mac("window", remote.ident, ref.path, idx * cs) % (length - width + 1)
                mine = await run(self.store.read, ref.oid, idx, lo - idx * cs, lo - idx * cs + width)
                if mine is not None:
                    got = await self._ask(ref, lambda: remote.inner.read(ref.path, lo, lo + width))
                    if (got.total is not None and got.total != header.object_size) or \
                            not hmac.compare_digest(got.data, mine):
                        log.warning("%s: remote %r holds another object under %s; not served from the cache",
                                    ref.display, remote.name, ref.path)
                        raise ObjectMissing(f"{ref.path}: another object")
                    self._record(remote.ident, ref.oid, ref.path, header.object_size, True)
                    return
        local = await self._local_size(ref) if ref.size is None else None
        if local is None:
            return      # nothing of it here to leak: the fetch itself asks the remote
        shown = await self._lookup(remote.ident, ref.oid)
        if shown is not None and shown[0] == local:
            return      # our remote told this size; the bytes (none here yet) come from it
        answer = await self._ask(ref, lambda: remote.inner.size(ref.path))
        if answer != local:
            # No bytes of it are held here (else the content proof above ran), so the size this
            # node knew is only an earlier answer - maybe a lie, maybe another tenant's: this
            # remote's answer stands for this read (the fetch learns it again and verifies).
            self.fetcher._size_contradicted(ref, local, answer)
        self._record(remote.ident, ref.oid, None, answer, False)

    async def _ask(self, ref: "ObjectRef", call):  # type: ignore[no-untyped-def]
        """One proof request (with the fetcher's retries on transient failures)."""
        def counted():  # type: ignore[no-untyped-def]
            self.checks += 1
            return call()

        return await self.fetcher.retried_call(ref, counted, "size")
