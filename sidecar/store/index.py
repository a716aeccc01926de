"""The store's index in SQLite (WAL): which chunks exist and when they were last used, the
md5 -> size index, and which objects verified whole. Safe for several processes."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (oid TEXT NOT NULL, idx INTEGER NOT NULL, nbytes INTEGER NOT NULL,
                                   atime REAL NOT NULL, PRIMARY KEY (oid, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_atime ON chunks (atime);
CREATE TABLE IF NOT EXISTS sizes (oid TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS complete (oid TEXT PRIMARY KEY) WITHOUT ROWID;
"""


class Index:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._touched: dict[tuple[str, int], float] = {}
        self._last_flush = time.monotonic()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _many(self, sql: str, rows: list[tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # sizes -----------------------------------------------------------------------------------
    def size(self, oid: str) -> int | None:
        rows = self._run("SELECT size FROM sizes WHERE oid=?", (oid,))
        return rows[0][0] if rows else None

    def sizes(self, oids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(oids), 500):
            part = oids[i:i + 500]
            marks = ",".join("?" * len(part))
            found.update(self._run(f"SELECT oid, size FROM sizes WHERE oid IN ({marks})", tuple(part)))
        return found

    def record_sizes(self, sizes: dict[str, int]) -> None:
        if sizes:
            self._many("INSERT OR REPLACE INTO sizes (oid, size) VALUES (?, ?)", list(sizes.items()))

    # chunks ----------------------------------------------------------------------------------
    def add_chunk(self, oid: str, idx: int, nbytes: int) -> None:
        self._run("INSERT OR REPLACE INTO chunks (oid, idx, nbytes, atime) VALUES (?, ?, ?, ?)",
                  (oid, idx, nbytes, time.time()))

    def touch(self, oid: str, idx: int) -> None:
        """Record a use; written in batches because warm reads must stay cheap."""
        self._touched[(oid, idx)] = time.time()
        if time.monotonic() - self._last_flush > 5:
            self.flush()

    def flush(self) -> None:
        touched, self._touched = self._touched, {}
        self._last_flush = time.monotonic()
        if touched:
            self._many("UPDATE chunks SET atime=? WHERE oid=? AND idx=?",
                       [(t, oid, idx) for (oid, idx), t in touched.items()])

    def present(self, oid: str) -> set[int]:
        return {row[0] for row in self._run("SELECT idx FROM chunks WHERE oid=?", (oid,))}

    def forget_chunk(self, oid: str, idx: int) -> None:
        self._run("DELETE FROM chunks WHERE oid=? AND idx=?", (oid, idx))
        self._run("DELETE FROM complete WHERE oid=?", (oid,))

    def forget_object(self, oid: str) -> None:
        self._run("DELETE FROM chunks WHERE oid=?", (oid,))
        self._run("DELETE FROM complete WHERE oid=?", (oid,))

    def used_bytes(self) -> int:
        return self._run("SELECT COALESCE(SUM(nbytes), 0) FROM chunks")[0][0]

    def oldest(self, limit: int) -> list[tuple[str, int, int]]:
        self.flush()
        return self._run("SELECT oid, idx, nbytes FROM chunks ORDER BY atime LIMIT ?", (limit,))

    # verification ----------------------------------------------------------------------------
    def is_complete(self, oid: str) -> bool:
        return bool(self._run("SELECT 1 FROM complete WHERE oid=?", (oid,)))

    def mark_complete(self, oid: str) -> None:
        self._run("INSERT OR IGNORE INTO complete (oid) VALUES (?)", (oid,))

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()
