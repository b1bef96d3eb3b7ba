"""The embedded window counters: one SQLite database in WAL mode in the spool directory.

Takes: `add` / `count` calls of the `relayd.observe.counters.WindowCounters` seam.
Emits: counts that survive a restart and a kill -9 of relayd.
Untrusted input: none (keys come from configured names); a database file
that is not one of ours fails the open with a `CounterError` naming it.
How it fails: any SQLite error becomes a `CounterError`; the database is
never deleted or rebuilt behind the operator's back.

Why SQLite and not a journal file in the spool: a counter is a
read-modify-write of one small number per key and window, asked for far
more often than it changes. An append-only journal would need a replay at
start, a compaction step and its own torn-record handling; SQLite gives the
atomic increment (`INSERT ... ON CONFLICT DO UPDATE ... RETURNING`), an
index by key and window, and crash safety that is tested far beyond what
relayd could write. WAL mode lets `relayctl` read the counts while relayd
writes them.

Durability: `synchronous=NORMAL` in WAL mode. A committed increment is in
the WAL file before `add` returns, so it survives a kill -9 of the process
(the page cache outlives it); a power failure can lose the increments since
the last checkpoint, which costs at most a few messages over a quota, never
a message. A full fsync per delivery would double the disk flushes relayd
already makes for the spool.

Every call runs on one worker thread that owns the connection, so the
event loop never waits on the disk and SQLite sees one writer. Increments
are group-committed: the `add` calls made while the thread is busy (or in the
same turn of the event loop) go into one transaction, so the cost per
delivery stays a fraction of one SQLite commit however fast mail flows.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from relayd.observe.counters import CounterError, Window

FILE_NAME = "counters.sqlite"
# Windows that ended are deleted at most this often (seconds): one DELETE,
# not one per add.
_EXPIRE_EVERY = 300.0
_BUSY_TIMEOUT_MS = 5000  # relayctl reading at the same moment
_SCHEMA = """
CREATE TABLE IF NOT EXISTS window_counts (
    key TEXT NOT NULL,
    slot TEXT NOT NULL,
    n INTEGER NOT NULL,
    ends REAL NOT NULL,
    PRIMARY KEY (key, slot)
) WITHOUT ROWID
"""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Add:
    """One increment waiting for the next transaction, and who waits for its result."""

    key: str
    slot: str
    ends: float
    n: int
    now: float
    future: "asyncio.Future[int]"


class SqliteCounters:
    """A `WindowCounters` in `<directory>/counters.sqlite` (WAL mode); see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relayd-counters")
        self._db: sqlite3.Connection | None = None
        self._expired_at = 0.0
        self._closed = False
        self._pending: list[_Add] = []  # increments waiting for the next transaction
        self._busy = False  # a transaction of increments is running on the thread

    @classmethod
    def in_directory(cls, directory: Path) -> "SqliteCounters":
        return cls(directory / FILE_NAME)

    def open(self) -> None:
        """Open (creating) the database now, on the counters' thread; raises CounterError.

        Without it the first call opens it; relayd calls it at start so a
        damaged file stops the start with its name rather than a later count.
        """
        self._run(self._conn)

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(_SCHEMA)
        except sqlite3.Error as error:
            raise CounterError(
                f"{self.path}: cannot open the counter database: {error} (move the file aside to "
                "start counting afresh)"
            ) from None
        return db

    def _run(self, work: Callable[[], T]) -> T:
        """Run `work` on the counters' thread and wait (start-up and tests, outside the loop)."""
        return self._executor.submit(work).result()

    async def _call(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # -- the seam -----------------------------------------------------------------

    async def add(self, key: str, window: Window, n: int, now: float) -> int:
        if n < 0:
            raise ValueError("a count only grows")
        if self._closed:
            raise CounterError(f"{self.path}: the counter database is closed")
        start, ends = window.bounds(now)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append(_Add(key, window.slot_at(start), ends, n, now, future))
        if len(self._pending) == 1 and not self._busy:
            loop.call_soon(self._commit_pending, loop)  # after the rest of this turn's adds
        return await future

    def _commit_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every waiting increment to the thread as one transaction (one at a time)."""
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            job = loop.run_in_executor(self._executor, self._add_all, [(a.key, a.slot, a.ends, a.n, a.now) for a in batch])
        except RuntimeError:  # the thread was shut down (close) meanwhile
            for add in batch:
                if not add.future.done():
                    add.future.set_exception(CounterError(f"{self.path}: the counter database is closed"))
            return
        self._busy = True

        def done(finished: "asyncio.Future[list[int]]") -> None:
            self._busy = False
            error = finished.exception()
            for i, add in enumerate(batch):
                if add.future.done():
                    continue
                if error is not None:
                    add.future.set_exception(error)
                else:
                    add.future.set_result(finished.result()[i])
            self._commit_pending(loop)

        job.add_done_callback(done)

    async def count(self, key: str, window: Window, now: float) -> int:
        slot = window.slot(now)
        return await self._call(lambda: self._count(key, slot))

    async def close(self) -> None:
        self._closed = True
        await self._call(self._close)
        self._executor.shutdown(wait=False)

    def count_now(self, key: str, window: Window, now: float) -> int:
        """`count` for a caller outside the event loop (start-up, relayctl with the daemon stopped)."""
        slot = window.slot(now)
        return self._run(lambda: self._count(key, slot))

    def close_now(self) -> None:
        self._run(self._close)
        self._executor.shutdown(wait=True)

    # -- on the counters' thread ----------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise CounterError(f"{self.path}: the counter database is closed")
        if self._db is None:
            self._db = self._open()
        return self._db

    def _add_all(self, adds: list[tuple[str, str, float, int, float]]) -> list[int]:
        """Every increment in one transaction; the new counts in order. All or none."""
        db = self._conn()
        totals: list[int] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                now = max(add[4] for add in adds)
                if now - self._expired_at >= _EXPIRE_EVERY:
                    db.execute("DELETE FROM window_counts WHERE ends <= ?", (now,))
                    self._expired_at = now
                for key, slot, ends, n, _now in adds:
                    row = db.execute(
                        "INSERT INTO window_counts (key, slot, n, ends) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (key, slot) DO UPDATE SET n = n + excluded.n RETURNING n",
                        (key, slot, n, ends),
                    ).fetchone()
                    totals.append(int(row[0]))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise CounterError(f"{self.path}: cannot record a count: {error}") from None
        return totals

    def _count(self, key: str, slot: str) -> int:
        db = self._conn()
        try:
            row = db.execute("SELECT n FROM window_counts WHERE key = ? AND slot = ?", (key, slot)).fetchone()
        except sqlite3.Error as error:
            raise CounterError(f"{self.path}: cannot read a count: {error}") from None
        return int(row[0]) if row is not None else 0

    def _close(self) -> None:
        self._closed = True
        if self._db is not None:
            self._db.close()
            self._db = None
