"""The store's index in SQLite (WAL): which chunks exist and when they were last used, and the
md5 -> size index. Safe for several processes.

The index is a cache of the chunk files, not their master: a missing, truncated or garbage
index is replaced by an empty one, which the store then fills again from the chunk headers.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import CacheFull
from .verify import EMPTY_MD5

log = logging.getLogger(__name__)

_SCHEMA = """
-- One row per file of the store's `chunks/` folders: a chunk (idx >= 0, nbytes of data) or the
-- chunk digests of a verified object (idx = -1, nbytes 0); `disk` is what the file takes on
-- disk (st_blocks, at least its size in 4 KiB blocks). Digests are evicted LRU like chunks.
CREATE TABLE IF NOT EXISTS chunks (oid TEXT NOT NULL, idx INTEGER NOT NULL, nbytes INTEGER NOT NULL,
                                   atime REAL NOT NULL, disk INTEGER NOT NULL DEFAULT 0,
                                   PRIMARY KEY (oid, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_atime ON chunks (atime);
CREATE TABLE IF NOT EXISTS sizes (oid TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Which remote identity showed it holds which object (store/tenancy.py): its size, and whether
-- it showed the bytes too (content = 1) or only the size.
CREATE TABLE IF NOT EXISTS proofs (ident TEXT NOT NULL, oid TEXT NOT NULL, size INTEGER NOT NULL,
                                   content INTEGER NOT NULL, PRIMARY KEY (ident, oid)) WITHOUT ROWID;
-- The bytes the files of `chunks/` take on disk, kept by triggers: every writer of every
-- process reads the exact total in O(1) before it writes (the budget holds across processes).
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), disk INTEGER NOT NULL);
INSERT OR IGNORE INTO totals (id, disk) VALUES (0, 0);
-- The names of the triggers before the `disk` column, so that an older dda sharing the cache
-- (a node cache during an upgrade) creates none of its own; its rows (no `disk`) get the size
-- it assumed: header and data in 4 KiB blocks.
CREATE TRIGGER IF NOT EXISTS chunks_add AFTER INSERT ON chunks BEGIN
  UPDATE totals SET disk = disk + new.disk WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS chunks_del AFTER DELETE ON chunks BEGIN
  UPDATE totals SET disk = disk - old.disk WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS chunks_upd AFTER UPDATE OF disk ON chunks BEGIN
  UPDATE totals SET disk = disk - old.disk + new.disk WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS chunks_older_writer AFTER INSERT ON chunks WHEN new.disk = 0 BEGIN
  UPDATE chunks SET disk = ((new.nbytes + 512 + 4095) / 4096) * 4096 WHERE oid = new.oid AND idx = new.idx; END;
"""
# An index from before the `disk` column: its chunk rows and totals are dropped (the store
# refills them from the chunk files, as for a lost index); sizes and proofs are kept.
_OLD_CHUNKS = """BEGIN IMMEDIATE;
DROP TRIGGER IF EXISTS chunks_add; DROP TRIGGER IF EXISTS chunks_del; DROP TRIGGER IF EXISTS chunks_upd;
DROP TABLE IF EXISTS chunks; DROP TABLE IF EXISTS totals; DELETE FROM meta WHERE key = 'built';
COMMIT;
"""
# The distinct identities of `proofs`, by a skip scan of its primary key (O(identities)).
_IDENTS = """WITH RECURSIVE t(i) AS (SELECT min(ident) FROM proofs
  UNION ALL SELECT (SELECT min(ident) FROM proofs WHERE ident > t.i) FROM t WHERE t.i IS NOT NULL)
SELECT i FROM t WHERE i IS NOT NULL"""
# A recorded size a read may return: never 0 for an md5 but that of no bytes (a lying HEAD or
# size index, or a truncated object, recorded by an older version: see verify.impossible_size).
_POSSIBLE = f"(size != 0 OR oid = '{EMPTY_MD5}' OR length(oid) != 32)"
SUMS_IDX = -1       # the row of an object's digest file (store/identity.py pack_sums)
FILE_BLOCK = 4096   # the allocation unit assumed when the file system reports less


def disk_size(nbytes: int, blocks: int = 0) -> int:
    """Bytes a file of `nbytes` takes on disk: its st_blocks (`blocks`, 512-byte units) when
    known, never less than its size in whole 4 KiB blocks (a file system may report blocks
    late, e.g. ZFS before its transaction commits)."""
    return max(-(-nbytes // FILE_BLOCK) * FILE_BLOCK, blocks * 512)


READ_BUSY_SECONDS = 2.0     # a reader (WAL: almost never blocked) gives up after this


def _full(err: sqlite3.Error) -> bool:
    text = str(err).lower()
    return "full" in text or "cannot rollback" in text


class Index:
    def __init__(self, path: Path):
        self.path = path
        self.rebuilt = False     # True when this open found no usable index (the store refills it)
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as err:
            if _full(err):
                raise CacheFull(f"cache index {path}: no space left on the device") from None
            log.warning("cache: index %s is unreadable (%s); starting a new one from the chunk files", path, err)
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(f"{path}{suffix}")
                except FileNotFoundError:
                    pass
            self._db = self._open()
        # One read connection per thread (WAL: readers see the last commit and never wait on
        # a writer, ours or another process's); the write connection is serialized by _lock.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._touched: dict[tuple[str, int], float] = {}
        self._touch_lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA recursive_triggers=ON")   # INSERT OR REPLACE fires the delete trigger
            # Keep the WAL small: its bytes count against the cache budget.
            db.execute("PRAGMA wal_autocheckpoint=64")
            db.execute("PRAGMA journal_size_limit=262144")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
            if columns and "disk" not in columns:
                db.executescript(_OLD_CHUNKS)
            db.executescript(_SCHEMA)
            built = db.execute("SELECT value FROM meta WHERE key='built'").fetchone()
            if built is None:
                db.execute("DELETE FROM chunks")
                db.execute("UPDATE totals SET disk = 0")
                self.rebuilt = True
        except BaseException:
            db.close()
            raise
        return db

    def mark_built(self) -> None:
        self._run("INSERT OR REPLACE INTO meta (key, value) VALUES ('built', ?)", (str(time.time()),))

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as err:
                if _full(err):
                    raise CacheFull(f"cache index {self.path}: no space left on the device") from None
                raise

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=READ_BUSY_SECONDS, check_same_thread=False,
                                 isolation_level=None)
            db.execute("PRAGMA query_only=1")
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """A query on this thread's read connection: never waits behind a writer."""
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.OperationalError as err:
            if _full(err):
                raise CacheFull(f"cache index {self.path}: no space left on the device") from None
            raise

    def _many(self, sql: str, rows: list[tuple]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(sql, rows)
                    self._db.execute("COMMIT")
                except BaseException:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass      # SQLite rolled back itself (a full disk does that)
                    raise
            except sqlite3.OperationalError as err:
                if _full(err):
                    raise CacheFull(f"cache index {self.path}: no space left on the device") from None
                raise

    # sizes -----------------------------------------------------------------------------------
    def size(self, oid: str) -> int | None:
        rows = self._read(f"SELECT size FROM sizes WHERE oid=? AND {_POSSIBLE}", (oid,))
        return rows[0][0] if rows else None

    def sizes(self, oids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(oids), 500):
            part = oids[i:i + 500]
            marks = ",".join("?" * len(part))
            found.update(self._read(f"SELECT oid, size FROM sizes WHERE oid IN ({marks}) AND {_POSSIBLE}",
                                    tuple(part)))
        return found

    def holding(self, oids: list[str]) -> set[str]:
        """The objects among `oids` that have a file in the store (a chunk or a digest file:
        the index knows every file of `chunks/`), in one query per 500: a cold folder's bulk
        sizing opens no file for objects the store does not hold."""
        found: set[str] = set()
        for i in range(0, len(oids), 500):
            part = oids[i:i + 500]
            marks = ",".join("?" * len(part))
            found.update(o for (o,) in self._read(f"SELECT DISTINCT oid FROM chunks WHERE oid IN ({marks})",
                                                  tuple(part)))
        return found

    def record_sizes(self, sizes: dict[str, int]) -> None:
        if sizes:
            self._many("INSERT OR REPLACE INTO sizes (oid, size) VALUES (?, ?)", list(sizes.items()))

    def forget_size(self, oid: str) -> None:
        self._run("DELETE FROM sizes WHERE oid=?", (oid,))

    # proofs (store/tenancy.py) ---------------------------------------------------------------
    def proof(self, ident: str, oid: str) -> tuple[int, bool] | None:
        """(size, content shown) that remote identity `ident` proved for `oid`, or None."""
        rows = self._read("SELECT size, content FROM proofs WHERE ident=? AND oid=?", (ident, oid))
        return (rows[0][0], bool(rows[0][1])) if rows else None

    def proofs(self, ident: str, oids: list[str]) -> dict[str, tuple[int, bool]]:
        """`proof` for many objects of one identity (a query per 500)."""
        found: dict[str, tuple[int, bool]] = {}
        for i in range(0, len(oids), 500):
            part = oids[i:i + 500]
            marks = ",".join("?" * len(part))
            for oid, size, content in self._read(f"SELECT oid, size, content FROM proofs WHERE ident=? AND oid IN "
                                                 f"({marks})", (ident, *part)):
                found[oid] = (size, bool(content))
        return found

    def record_proofs(self, rows: list[tuple[str, str, int, int]]) -> None:
        """(ident, oid, size, content): a content proof is never downgraded by a size proof
        of the same size; another size replaces the row."""
        if rows:
            self._many("INSERT INTO proofs (ident, oid, size, content) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (ident, oid) DO UPDATE SET content = CASE WHEN size = excluded.size "
                       "THEN max(content, excluded.content) ELSE excluded.content END, size = excluded.size",
                       rows)

    # chunks ----------------------------------------------------------------------------------
    def add_chunk(self, oid: str, idx: int, nbytes: int, disk: int, atime: float | None = None) -> None:
        """A file of the store: chunk `idx` holding `nbytes` of data (idx SUMS_IDX: a digest
        file, nbytes 0), taking `disk` bytes on disk (disk_size())."""
        self._run("INSERT OR REPLACE INTO chunks (oid, idx, nbytes, disk, atime) VALUES (?, ?, ?, ?, ?)",
                  (oid, idx, nbytes, disk, atime or time.time()))

    def add_chunks(self, rows: list[tuple[str, int, int, int, float]]) -> None:
        """Many `add_chunk` rows (oid, idx, nbytes, disk, atime) in one transaction."""
        if rows:
            self._many("INSERT OR REPLACE INTO chunks (oid, idx, nbytes, disk, atime) VALUES (?, ?, ?, ?, ?)", rows)

    def chunk_row(self, oid: str, idx: int) -> tuple[int, int] | None:
        """(nbytes, disk) of one file's row, or None."""
        rows = self._read("SELECT nbytes, disk FROM chunks WHERE oid=? AND idx=?", (oid, idx))
        return (rows[0][0], rows[0][1]) if rows else None

    def touch(self, oid: str, idx: int) -> None:
        """Record a use, in memory only: a warm read never waits on SQLite (another process
        may hold the write lock). `flush` writes them (the store's flusher thread, eviction)."""
        with self._touch_lock:
            self._touched[(oid, idx)] = time.time()

    def flush(self) -> None:
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        if touched:
            try:
                self._many("UPDATE chunks SET atime=? WHERE oid=? AND idx=?",
                           [(t, oid, idx) for (oid, idx), t in touched.items()])
            except BaseException:
                with self._touch_lock:    # kept for the next flush
                    for key, t in touched.items():
                        self._touched.setdefault(key, t)
                raise

    def present(self, oid: str) -> set[int]:
        """Indices of the chunks of `oid` in the store (its digest file is not a chunk)."""
        return {row[0] for row in self._read("SELECT idx FROM chunks WHERE oid=? AND idx >= 0", (oid,))}

    def forget_proofs_of_gone(self, oids: list[str]) -> int:
        """Content proofs (store/tenancy.py) of objects none of whose chunks is left: they
        go with the bytes they proved (a later download proves again, for free). Returns the
        rows removed."""
        if not oids:
            return 0
        # Proofs are keyed (ident, oid): one key lookup per identity (a handful), never a scan.
        idents = [row[0] for row in self._read(_IDENTS)]
        if not idents:
            return 0
        with self._lock:
            before = self._db.total_changes
        self._many("DELETE FROM proofs WHERE ident = ? AND oid = ? AND content = 1 AND NOT EXISTS "
                   "(SELECT 1 FROM chunks WHERE chunks.oid = ? AND chunks.idx >= 0)",
                   [(ident, oid, oid) for oid in set(oids) for ident in idents])
        with self._lock:
            return self._db.total_changes - before

    def forget_chunk(self, oid: str, idx: int) -> None:
        self._run("DELETE FROM chunks WHERE oid=? AND idx=?", (oid, idx))

    def forget_chunks(self, rows: list[tuple[str, int]]) -> None:
        """`forget_chunk` for many (oid, idx) in one transaction."""
        if rows:
            self._many("DELETE FROM chunks WHERE oid=? AND idx=?", rows)

    def forget_object(self, oid: str) -> None:
        self._run("DELETE FROM chunks WHERE oid=?", (oid,))

    def used_bytes(self) -> int:
        return self._read("SELECT COALESCE(SUM(nbytes), 0) FROM chunks")[0][0]

    def disk_bytes(self) -> int:
        """What the files of `chunks/` take on disk (chunk headers, digest files and block
        rounding included; not the folders themselves: Store.disk_usage())."""
        return self._read("SELECT disk FROM totals WHERE id = 0")[0][0]

    def oldest(self, limit: int) -> list[tuple[str, int, int]]:
        """(oid, idx, bytes on disk) of the least recently used files (chunks, digests)."""
        self.flush()
        return self._read("SELECT oid, idx, disk FROM chunks ORDER BY atime LIMIT ?", (limit,))

    def pending(self) -> list[tuple[str, int]]:
        """Rows of unverified chunk files (their oid reads `<oid>~<tag>`)."""
        return self._read("SELECT oid, idx FROM chunks WHERE oid LIKE '%~%'")

    def close(self) -> None:
        try:
            self.flush()
        except Exception:   # closing must not fail (a full disk, a vanished index)
            pass
        with self._lock:
            self._db.close()
        with self._readers_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
