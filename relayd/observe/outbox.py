"""One webhook endpoint's outbox: the events still to send, kept in an append-only journal.

Takes: events already encoded as webhook bodies (`add`), and the sender's
word that one was received (`done`).
Emits: the pending events in arrival order (`next_due`), and a journal
directory that survives a restart, a `kill -9` and, once synced, a power cut.
Untrusted input: the journal files, which a crash may leave with a torn last
line; such a line is skipped and counted, never fatal.
Fails: OSError from the disk on open, or when an append fails (the caller
counts it); a full outbox drops its oldest event, counted in `dropped`.

Why a journal and not one safeio file per event: an event must be on disk
before `emit` returns, and `emit` runs on the event loop between two mail
deliveries. One `write(2)` of one line to a file opened O_APPEND costs a few
microseconds and survives a `kill -9` (the page cache outlives the process);
`relayd.safeio.write_file` costs two fsyncs and a rename per event, which
would put the disk's latency into every delivery. The journal is fsync'd in
batches off the loop (the owner syncs what `take_dirty` hands it, at most
`SYNC_INTERVAL` after a write), so a power cut can lose the last fraction of
a second of events, never a `kill -9`. A new journal's name is made durable
(its directory fsync'd) before the journals it replaces are removed.

Layout, in the endpoint's directory:
    base.jsonl          the pending events at the last compaction (written with safeio)
    journal.<n>.jsonl   appended since: {"op": "add", ...}, {"op": "done"|"drop", "id": ...}
Replaying base then the journals in order rebuilds the pending set. When the
journals hold many more lines than there are pending events, `rotate`
starts a new journal and `compact` writes the pending events into a new base,
then removes the older journals; a crash between the two only means replaying
a little more.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from relayd.safeio import SYSTEM, write_file

SYNC_INTERVAL = 0.2  # seconds between a write and its fsync, at most
MAX_LINE = 1024 * 1024  # a journal line longer than this is damage, not an event
_BASE = "base.jsonl"
_JOURNAL = re.compile(r"journal\.(\d{1,12})\.jsonl")
OUTBOX_FILE_MODE = 0o600  # events carry addresses: not for other local users
OUTBOX_DIRECTORY_MODE = 0o700


def _journal_number(path: Path) -> int:
    match = _JOURNAL.fullmatch(path.name)
    return int(match.group(1)) if match is not None else 0


@dataclass(slots=True)
class PendingEvent:
    """An event waiting to be sent: its id, kind, body and when it may be tried next."""

    id: str
    kind: str
    body: bytes
    queued_at: float
    attempts: int = 0
    next_try: float = 0.0
    in_flight: bool = False

    def record(self) -> dict[str, object]:
        return {"op": "add", "id": self.id, "kind": self.kind, "at": self.queued_at,
                "body": self.body.decode("utf-8")}


@dataclass(frozen=True, slots=True)
class Replayed:
    """What opening an outbox found: events still pending, and lines that could not be read."""

    pending: int
    damaged_lines: int


@dataclass(slots=True)
class _Rotation:
    old_fd: int
    old_journals: list[Path] = field(default_factory=list)
    # The pending events at the rotation; serialised in the worker thread, not on the
    # event loop (id, kind, body and queued_at never change once an event is added).
    snapshot: list[PendingEvent] = field(default_factory=list)


class Outbox:
    """The durable queue of one endpoint. Not thread-safe: used from the event loop,
    except `sync` and `compact`, which the owner runs in a worker thread one at a time."""

    def __init__(self, directory: Path, *, max_pending: int) -> None:
        self.directory = directory
        self.max_pending = max_pending
        self._pending: OrderedDict[str, PendingEvent] = OrderedDict()
        self._fd: int | None = None
        self._journal_number = 0
        self._lines_since_base = 0
        self._dirty = False
        self.dropped = 0  # events dropped because the outbox was full, since start
        self.write_errors = 0

    # -- opening -------------------------------------------------------------

    def open(self) -> Replayed:
        """Replay the directory, write a fresh base, start a new journal (blocking: run in a thread)."""
        self.directory.mkdir(mode=OUTBOX_DIRECTORY_MODE, parents=True, exist_ok=True)
        journals = self._journals()
        damaged = 0
        for path in [self.directory / _BASE, *journals]:
            damaged += self._replay(path)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self.dropped += 1
        self._journal_number = _journal_number(journals[-1]) + 1 if journals else 1
        self._fd = self._open_journal()
        # The base's directory fsync also makes the new journal's name durable.
        self._write_base([self._line(p.record()) for p in self._pending.values()])
        for path in journals:
            path.unlink(missing_ok=True)
        return Replayed(pending=len(self._pending), damaged_lines=damaged)

    @staticmethod
    def waiting_in(directory: Path) -> int:
        """How many events an outbox directory holds, read without changing it (blocking)."""
        box = Outbox(directory, max_pending=1)
        for path in [directory / _BASE, *box._journals()]:
            box._replay(path)
        return len(box._pending)

    def _journals(self) -> list[Path]:
        found = [path for path in self.directory.iterdir() if _JOURNAL.fullmatch(path.name)]
        return sorted(found, key=_journal_number)

    def _replay(self, path: Path) -> int:
        damaged = 0
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return 0
        with handle:
            for raw in handle:
                if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
                    damaged += 1  # a torn last line (crash mid-write) or garbage
                    continue
                if not self._apply(raw):
                    damaged += 1
        return damaged

    def _apply(self, raw: bytes) -> bool:
        try:
            record = json.loads(raw)
            op, event_id = record["op"], str(record["id"])
            if op == "add":
                if event_id not in self._pending:
                    self._pending[event_id] = PendingEvent(
                        id=event_id, kind=str(record["kind"]), body=str(record["body"]).encode("utf-8"),
                        queued_at=float(record["at"]),
                    )
            elif op in ("done", "drop"):
                self._pending.pop(event_id, None)
            else:
                return False
        except (ValueError, KeyError, TypeError):
            return False
        return True

    def _open_journal(self) -> int:
        path = self.directory / f"journal.{self._journal_number}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, OUTBOX_FILE_MODE)
        self._lines_since_base = 0
        return fd

    # -- the event loop's side -----------------------------------------------

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, event: PendingEvent) -> PendingEvent | None:
        """Journal and queue `event`; returns the oldest event if it had to be dropped to make room."""
        dropped: PendingEvent | None = None
        if len(self._pending) >= self.max_pending:
            _, dropped = self._pending.popitem(last=False)
            self.dropped += 1
            self._append({"op": "drop", "id": dropped.id})
        self._append(event.record())
        self._pending[event.id] = event
        return dropped

    def done(self, event_id: str) -> None:
        """The receiver has it: forget it (journalled; a lost line only means one more send)."""
        if self._pending.pop(event_id, None) is not None:
            self._append({"op": "done", "id": event_id})

    def next_due(self, now: float) -> PendingEvent | None:
        """The oldest event not being sent whose time has come."""
        for event in self._pending.values():
            if not event.in_flight and event.next_try <= now:
                return event
        return None

    def next_try(self) -> float | None:
        """The earliest time an event not being sent may be tried; None when there is none."""
        times = [e.next_try for e in self._pending.values() if not e.in_flight]
        return min(times) if times else None

    def _append(self, record: dict[str, object]) -> None:
        if self._fd is None:
            raise OSError("the outbox is not open")
        line = self._line(record)
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # O_APPEND to a regular file: only on a full disk
                raise OSError("short write to the outbox journal")
        except OSError:
            self.write_errors += 1
            raise
        self._lines_since_base += 1
        self._dirty = True

    @staticmethod
    def _line(record: dict[str, object]) -> bytes:
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"

    # -- maintenance: the owner runs these one at a time -----------------------

    def take_dirty(self) -> int | None:
        """The journal's descriptor if it has unsynced lines (then marked clean), else None."""
        if not self._dirty or self._fd is None:
            return None
        self._dirty = False
        return self._fd

    def wants_compaction(self) -> bool:
        return self._lines_since_base > max(1024, 4 * len(self._pending))

    def rotate(self) -> _Rotation:
        """Start a new journal (on the loop); `compact` then folds the old ones into a new base."""
        if self._fd is None:
            raise OSError("the outbox is not open")
        rotation = _Rotation(old_fd=self._fd, old_journals=self._journals(),
                             snapshot=list(self._pending.values()))
        self._journal_number += 1
        self._fd = self._open_journal()
        self._dirty = True
        return rotation

    def compact(self, rotation: _Rotation) -> None:
        """Blocking: sync the old journal, write the snapshot as the new base, remove the old journals."""
        try:
            os.fsync(rotation.old_fd)
        finally:
            os.close(rotation.old_fd)
        SYSTEM.fsync_directory(self.directory)  # the new journal's name, before anything else
        self._write_base([self._line(p.record()) for p in rotation.snapshot])
        for path in rotation.old_journals:
            path.unlink(missing_ok=True)

    def _write_base(self, lines: list[bytes]) -> None:
        write_file(self.directory / _BASE, b"".join(lines), mode=OUTBOX_FILE_MODE,
                   directory_mode=OUTBOX_DIRECTORY_MODE)

    def close(self) -> None:
        """Sync and close the journal (blocking)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
