"""The messages a tenant quota holds, on disk: `<spool_dir>/quota-holds.sqlite`.

Takes: `hold(queue_id, tenant, until, reason)` when a tenant with
`on_quota: hold` submits past its quota; `release(queue_id)` when the
message got a place in a new window (or left the queue).
Emits: every hold at start (`load`), so a restart keeps holding what was held.
Untrusted input: none (ids come from the spool, tenants from the config).
How it fails: SQLite errors become `HoldStoreError` with the file name; the
caller answers the submission with a temporary failure rather than accept
a message it could not mark as held (else it would go out past the quota).

A separate small database, not a spool state record: a hold is the quota's
bookkeeping, not the message's delivery state, and it is asked for by id at
start without reading any message file. Written in WAL mode with
synchronous=NORMAL like the window counters: a hold survives a kill -9 of
relayd; a power cut may lose the newest holds, which then go out at once
(at most a few messages past a quota, never a lost message).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from relayd.observe.counters import CounterError

FILE_NAME = "quota-holds.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_holds (
    queue_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    held_at REAL NOT NULL,
    until REAL NOT NULL,
    reason TEXT NOT NULL
) WITHOUT ROWID
"""


class HoldStoreError(CounterError):
    """The hold database could not be read or written (the message names the file).

    A kind of CounterError: at start both stop relayd with the file's name.
    """


@dataclass(frozen=True, slots=True)
class QuotaHold:
    queue_id: str
    tenant: str
    held_at: float
    until: float  # the end of the window whose cap was reached: the earliest release
    reason: str  # "daily quota of tenant acme reached (1000 messages), resets 2026-12-02 00:00 UTC"


class HoldStore:
    """See the module docstring. Thread-safe: called from worker threads one call at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    @classmethod
    def in_directory(cls, directory: Path) -> "HoldStore":
        return cls(directory / FILE_NAME)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA busy_timeout = 5000")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute(_SCHEMA)
            except sqlite3.Error as error:
                raise HoldStoreError(f"{self.path}: cannot open the quota hold database: {error}") from None
            self._db = db
        return self._db

    def load(self) -> list[QuotaHold]:
        """Every hold, oldest first."""
        with self._lock:
            try:
                rows = self._conn().execute(
                    "SELECT queue_id, tenant, held_at, until, reason FROM quota_holds ORDER BY held_at, queue_id"
                ).fetchall()
            except sqlite3.Error as error:
                raise HoldStoreError(f"{self.path}: cannot read the quota holds: {error}") from None
        return [QuotaHold(str(r[0]), str(r[1]), float(r[2]), float(r[3]), str(r[4])) for r in rows]

    def hold(self, held: QuotaHold) -> None:
        self._write(
            "INSERT INTO quota_holds (queue_id, tenant, held_at, until, reason) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (queue_id) DO UPDATE SET until = excluded.until, reason = excluded.reason",
            (held.queue_id, held.tenant, held.held_at, held.until, held.reason),
        )

    def release(self, queue_id: str) -> None:
        self._write("DELETE FROM quota_holds WHERE queue_id = ?", (queue_id,))

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            try:
                self._conn().execute(sql, args)
            except sqlite3.Error as error:
                raise HoldStoreError(f"{self.path}: cannot record a quota hold: {error}") from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
