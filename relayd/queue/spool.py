"""The spool: the durable queue on disk, the one place a message lives between 250 and delivery.

Takes: an `Envelope` and the body bytes from the listener (`accept`, or
`receive` for a body streamed in pieces), new recipient states from the
delivery side (`update`), and "done" (`complete`).
Emits: `QueueEntry` values; at start `load()` rebuilds the in-memory index of
the queue from disk (relayd.queue.spoolscan) and reports anything it had to
set aside.
Untrusted input: every envelope field and the body come from an SMTP client;
the file format (relayd.queue.spoolformat) stores them so that no client byte
can break its structure. Files on disk are untrusted at load: a file a stopped
receiver left without its end marker was never acknowledged and is removed
(reported in `SpoolLoad.discarded`); anything else that does not read back
exactly is moved to ``corrupt/`` with a reason, never deleted.
Fails: ENOSPC/EDQUOT -> `SpoolFullError` (452 4.3.1); any other OS error ->
`SpoolWriteError` (451 4.3.0). A message that could not be made durable is
removed again, so a restart never delivers mail that was not acknowledged.
`SpoolCorruptError` when a file does not read back (set it aside);
`SpoolEntryMissing` when a message is no longer queued. `complete`,
`set_aside` and the readers are plain blocking calls: cheap, but a caller
doing many of them on the event loop may prefer `asyncio.to_thread`.

Durability: every write returns only once the group commit
(relayd.queue.spoolio) has made it durable, except `update(durable=False)`.

Locking (for later operator tools and a delivery side in another process;
nothing in memory is shared, only files and these locks): a new file is
created with O_EXCL and held under an exclusive ``flock`` until its trailer is
written; state appends, removal and setting aside take an exclusive flock on
the message file and re-check that the name still points at the locked file;
readers take a shared flock. Locks are released before the disk flush, so no
lock is held while waiting for the disk.

This module is the spool's public face: the errors it raises and the values it
returns are importable from here.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from relayd.queue.incoming import IncomingMessage
from relayd.queue.msgid import ALPHABET, is_message_id, new_message_id
from relayd.queue.spoolformat import (
    DIR_MODE,
    FILE_MODE,
    SHARD_INDEX,
    TRAILER_LEN,
    UnreadableSpoolFile,
    format_state_record,
    index_fd,
    message_parts,
    parse_header,
    parse_trailer,
    read_all,
)
from relayd.queue.spoolio import (
    FlushRequest,
    GroupCommit,
    SpoolCorruptError,
    SpoolEntryMissing,
    SpoolError,
    SpoolFullError,
    SpoolIO,
    SpoolWriteError,
    close_quietly,
    fsync_dir,
    spool_error,
    write_all,
)
from relayd.queue.spoolscan import SpoolLoad, SpoolScan, count_files_in, move_to_corrupt
from relayd.values import Envelope, QueueEntry, Recipient

__all__ = [
    "IncomingMessage", "Spool", "SpoolCorruptError", "SpoolEntryMissing", "SpoolError", "SpoolFullError",
    "SpoolIO", "SpoolLoad", "SpoolWriteError",
]

_ID_ATTEMPTS = 10  # O_EXCL collisions are rare; ten in a row means something else is wrong
_FLUSH_MODES = ("syncfs", "fsync")
_WRITER_THREADS = 8  # enough to keep creating files while the journal commits

_T = TypeVar("_T")
_A = TypeVar("_A")
_B = TypeVar("_B")


class Spool:
    """The durable queue under `root`; see the module docstring for format and guarantees."""

    def __init__(
        self,
        root: Path,
        *,
        flush_mode: str = "syncfs",
        io: SpoolIO | None = None,
        clock: Callable[[], float] = time.time,
        on_removed: Callable[[str], None] | None = None,
    ) -> None:
        if flush_mode not in _FLUSH_MODES:
            raise ValueError(f"flush_mode must be one of {', '.join(_FLUSH_MODES)}")
        self._root = Path(root)
        self._queue = self._root / "queue"
        self._corrupt = self._root / "corrupt"
        self._io = io if io is not None else SpoolIO()
        self._clock = clock
        self._commit = GroupCommit(self._io, use_syncfs=flush_mode == "syncfs")
        self._layout_ready = False
        self._writers: ThreadPoolExecutor | None = None
        self._on_removed = on_removed  # told the id of every message that leaves queue/
        # Ids whose file this process is creating and has not yet acknowledged
        # or given up: the scan leaves them to their writer.
        self._receiving: set[str] = set()
        self._receiving_lock = threading.Lock()
        self._load_lock = threading.Lock()

    # -- names ---------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def queue_dir(self) -> Path:
        return self._queue

    @property
    def corrupt_dir(self) -> Path:
        return self._corrupt

    @property
    def io(self) -> SpoolIO:
        """The seam every write goes through (for `IncomingMessage` and the scan)."""
        return self._io

    @property
    def writers(self) -> Executor | None:
        """The writer threads, while started; None means write on the calling thread."""
        return self._writers

    @property
    def flush_failures(self) -> int:
        """Fire-and-forget flushes that failed (for metrics)."""
        return self._commit.flush_failures

    def now(self) -> float:
        return self._clock()

    def new_id(self) -> str:
        return new_message_id(self._clock())

    def path_for(self, id: str) -> Path:
        """Where the message `id` lives; ValueError if `id` is not an id (keeps paths safe)."""
        if not is_message_id(id):
            raise ValueError("not a message id")
        return self._queue / id[SHARD_INDEX] / id

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Create the layout if needed and start the committer, bound to the running loop."""
        if self._commit.running:
            return
        self._ensure_layout()
        self._commit.start(self._root)
        self._writers = ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="relayd-spool-write")

    async def stop(self) -> None:
        """Flush everything still pending, then stop the committer."""
        if not self._commit.running:
            return
        writers, self._writers = self._writers, None
        if writers is not None:
            await asyncio.to_thread(writers.shutdown, wait=True)
        await self._commit.stop()

    # -- writing -------------------------------------------------------------

    async def accept(self, envelope: Envelope, body: bytes) -> QueueEntry:
        """Store a new message; returns only once it is durable.

        On an id collision the message gets a fresh id: use the returned
        entry's id, not the one passed in. On failure nothing is left behind.
        """
        self._ensure_layout()
        envelope, path, fd = await self._off_loop(
            self._write_new, (envelope, body), self._abandon_new
        )
        await self.commit_new(FlushRequest(fd, (path.parent,)), path, envelope.id)
        return QueueEntry(envelope, tuple(Recipient(a) for a in envelope.recipients))

    async def commit_new(self, request: FlushRequest, path: Path, message_id: str) -> None:
        """Make a new message's file durable, or remove it: it was never acknowledged.

        Either way the message stops being "received", so scans judge its file again.
        """
        try:
            await self._commit.make_durable(request)
        except BaseException as exc:
            self.discard(path)
            if isinstance(exc, OSError):
                raise spool_error(exc, "flushing the message to disk") from exc
            raise
        finally:
            self.stop_receiving(message_id)

    async def receive(self, envelope: Envelope) -> IncomingMessage:
        """Start a message whose body arrives in pieces (SMTP DATA, streamed).

        The file is created in ``incoming/`` under an exclusive flock held
        until it is complete, so no queue scan or other process ever sees it
        half written; `IncomingMessage.commit` links it into the queue and
        returns once it is durable, `abort` removes it. The id may differ
        from `envelope.id` (a name already taken): use the returned one.
        """
        self._ensure_layout()
        loop = asyncio.get_running_loop()
        if self._writers is None:
            return self._create_incoming(envelope)
        return await loop.run_in_executor(self._writers, self._create_incoming, envelope)

    def _create_incoming(self, envelope: Envelope) -> IncomingMessage:
        incoming = self._incoming_dir()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_ID_ATTEMPTS):
            if not os.path.lexists(self.path_for(envelope.id)):
                path = incoming / envelope.id
                try:
                    fd = self._io.open(path, flags, FILE_MODE)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise spool_error(exc, "creating the message file") from exc
                else:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    except OSError as exc:
                        close_quietly(self._io, fd)
                        self.discard(path)
                        raise spool_error(exc, "locking the message file") from exc
                    return IncomingMessage(self, envelope, path, fd)
            envelope = replace(envelope, id=self.new_id())
        raise SpoolWriteError(f"no free message id after {_ID_ATTEMPTS} attempts")

    def _incoming_dir(self) -> Path:
        """``<root>/incoming`` (0700): messages still being received."""
        path = self._root / "incoming"
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise spool_error(exc, "creating the incoming directory") from exc
        return path

    def sweep_incoming(self) -> list[str]:
        """Remove what interrupted receptions left in ``incoming/``; the ids removed.

        Nothing there was ever acknowledged: a message is linked into the
        queue before its 250. A file still locked is being received by a live
        session and is left alone.
        """
        directory = self._root / "incoming"
        notes: list[str] = []
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return notes
        for name in names:
            path = directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._io.unlink(path)
            except OSError:
                continue
            finally:
                os.close(fd)
            notes.append(name)
        return notes

    async def update(self, entry: QueueEntry, *, durable: bool = False) -> None:
        """Append `entry`'s recipients and frozen flag as the message's new state.

        With durable=False the record is flushed with the next batch but the
        caller does not wait: a crash may lose it, and the recipients are then
        tried again (at-least-once). Raises SpoolEntryMissing if the message is gone.
        """
        record = format_state_record(entry.recipients, entry.frozen, self._clock())
        fd = await self._off_loop(
            self._append_record, (entry.id, record), self._abandon_append
        )
        request = FlushRequest(fd, ())
        if not durable:
            self.request_flush(request)
            return
        try:
            await self._commit.make_durable(request)
        except OSError as exc:
            raise spool_error(exc, "flushing delivery state") from exc

    def complete(self, id: str) -> bool:
        """Remove a message whose recipients are all final; False if it was already gone."""
        path = self.path_for(id)
        try:
            fd = self._open_locked(path, os.O_RDONLY, fcntl.LOCK_EX, os.open)
        except OSError as exc:
            raise spool_error(exc, "opening the message for removal") from exc
        if fd is None:
            return False
        try:
            self._io.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise spool_error(exc, "removing the message") from exc
        finally:
            os.close(fd)
        self.request_flush(FlushRequest(None, (path.parent,)))
        if self._on_removed is not None:
            self._on_removed(id)
        return True

    def remove(self, id: str) -> bool:
        """Operator removal: the same operation as `complete`."""
        return self.complete(id)

    def set_aside(self, id: str, reason: str) -> Path | None:
        """Move a message to corrupt/ with a .reason file; returns its new path (None if gone)."""
        path = self.path_for(id)
        fd = self._open_locked(path, os.O_RDONLY, fcntl.LOCK_EX, os.open)
        if fd is None:
            return None
        try:
            moved = move_to_corrupt(self, path, reason)
        finally:
            os.close(fd)
        if self._on_removed is not None:
            self._on_removed(id)
        return moved

    # -- reading -------------------------------------------------------------

    def read_body(self, id: str) -> bytes:
        """The body exactly as accepted; SpoolCorruptError if its CRCs do not match."""
        fd = self._open_locked(self.path_for(id), os.O_RDONLY, fcntl.LOCK_SH, os.open)
        if fd is None:
            raise SpoolEntryMissing(f"message {id} is no longer in the queue")
        try:
            data = read_all(fd)
        finally:
            os.close(fd)
        try:
            header = parse_header(data)
            end = header.body_start + header.body_size
            recorded = parse_trailer(data[end : end + TRAILER_LEN])
        except UnreadableSpoolFile as exc:
            raise SpoolCorruptError(f"message {id}: {exc}") from None
        body = data[header.body_start : end]
        line_crc = zlib.crc32(data[header.line_start : header.line_end])
        if zlib.crc32(body, line_crc) != recorded or zlib.crc32(body) != header.body_crc32:
            raise SpoolCorruptError(f"message {id}: checksum mismatch, spool file damaged")
        return body

    def read_entry(self, id: str) -> QueueEntry | None:
        """One message's envelope and replayed state; None if it is not queued."""
        fd = self._open_locked(self.path_for(id), os.O_RDONLY, fcntl.LOCK_SH, os.open)
        if fd is None:
            return None
        try:
            entry, _notes = index_fd(fd, id)
        except UnreadableSpoolFile as exc:
            raise SpoolCorruptError(f"message {id}: {exc}") from None
        finally:
            os.close(fd)
        return entry

    def load(self) -> SpoolLoad:
        """Rebuild the index from disk: headers and state records only, never bodies.

        Unreadable files go to corrupt/ and are reported; messages whose
        recipients are all final are completed (removed).
        """
        with self._load_lock:
            self._ensure_layout()
            return SpoolScan(self).run()

    def count_files(self) -> int:
        """How many message files are queued (cheap: directory listings only)."""
        return sum(count_files_in(self._queue / shard, "") for shard in ALPHABET)

    # -- ids being received ----------------------------------------------------

    def is_receiving(self, id: str) -> bool:
        """True while this process creates `id`'s file and has not acknowledged or dropped it."""
        with self._receiving_lock:
            return id in self._receiving

    def start_receiving(self, id: str) -> None:
        with self._receiving_lock:
            self._receiving.add(id)

    def stop_receiving(self, id: str) -> None:
        with self._receiving_lock:
            self._receiving.discard(id)

    # -- internals: files ----------------------------------------------------

    def _ensure_layout(self) -> None:
        """Create root, queue/, corrupt/ and the 62 shards (0700); tighten modes if needed."""
        if self._layout_ready:
            return
        dirs = [self._root, self._queue, self._corrupt] + [self._queue / s for s in ALPHABET]
        created = False
        try:
            self._root.parent.mkdir(parents=True, exist_ok=True)
            for d in dirs:
                try:
                    os.mkdir(d, DIR_MODE)
                    created = True
                except FileExistsError:
                    pass
                st = os.stat(d, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise SpoolWriteError(f"spool path {d} is not a directory")
                if stat.S_IMODE(st.st_mode) != DIR_MODE:
                    os.chmod(d, DIR_MODE)
            if created:
                for d in [self._root.parent, self._root, self._queue]:
                    fsync_dir(d)
        except OSError as exc:
            raise spool_error(exc, "preparing the spool directory") from exc
        self._layout_ready = True

    async def _off_loop(
        self,
        work: Callable[[_A, _B], _T],
        args: tuple[_A, _B],
        abandon: Callable[[_T], None],
    ) -> _T:
        """Run blocking file work on the writer threads, off the event loop.

        Creating a file waits for the file system journal while a flush is
        committing; doing that on the event loop would stall every session
        and defeat the batching. If the caller is cancelled meanwhile, the
        work still finishes and `abandon` undoes it.
        """
        writers = self._writers
        if writers is None:
            return work(*args)
        job = asyncio.get_running_loop().run_in_executor(writers, work, *args)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(
                lambda f: abandon(f.result()) if not f.cancelled() and f.exception() is None else None
            )
            raise

    def _write_new(self, envelope: Envelope, body: bytes) -> tuple[Envelope, Path, int]:
        """Create and fill a new message file; its fd stays open for the flush."""
        envelope, path, fd = self._create(envelope)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            head, trailer = message_parts(envelope, body)
            for part in (head, body, trailer):
                write_all(self._io, fd, part)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException as exc:
            close_quietly(self._io, fd)
            self.discard(path)
            self.stop_receiving(envelope.id)
            if isinstance(exc, OSError):
                raise spool_error(exc, "writing the message") from exc
            raise
        return envelope, path, fd

    def _abandon_new(self, written: tuple[Envelope, Path, int]) -> None:
        envelope, path, fd = written
        close_quietly(self._io, fd)
        self.discard(path)
        self.stop_receiving(envelope.id)

    def _append_record(self, id: str, record: bytes) -> int:
        """Append one state record under an exclusive lock; the fd stays open for the flush."""
        path = self.path_for(id)
        try:
            fd = self._open_locked(path, os.O_RDWR | os.O_APPEND, fcntl.LOCK_EX, self._io.open)
        except OSError as exc:
            raise spool_error(exc, "opening the message for a state change") from exc
        if fd is None:
            raise SpoolEntryMissing(f"message {id} is no longer in the queue")
        try:
            self._end_torn_line(fd)
            write_all(self._io, fd, record)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            close_quietly(self._io, fd)
            raise spool_error(exc, "recording delivery state") from exc
        return fd

    def _abandon_append(self, fd: int) -> None:
        self.request_flush(FlushRequest(fd, ()))

    def _create(self, envelope: Envelope) -> tuple[Envelope, Path, int]:
        """Create the message file with O_EXCL, taking a new id on collision."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_ID_ATTEMPTS):
            path = self.path_for(envelope.id)
            # Marked before the file exists, so a scan never sees it unmarked
            # while it is being written; the caller unmarks it once the
            # message is acknowledged or dropped.
            self.start_receiving(envelope.id)
            try:
                return envelope, path, self._io.open(path, flags, FILE_MODE)
            except FileExistsError:
                self.stop_receiving(envelope.id)
                envelope = replace(envelope, id=self.new_id())
            except OSError as exc:
                self.stop_receiving(envelope.id)
                raise spool_error(exc, "creating the message file") from exc
        raise SpoolWriteError(f"no free message id after {_ID_ATTEMPTS} attempts")

    def _end_torn_line(self, fd: int) -> None:
        """Before appending, end a record torn by an earlier crash with a newline."""
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            write_all(self._io, fd, b"\n")

    def discard(self, path: Path) -> None:
        """Remove a message that was not acknowledged; an empty file if unlink fails.

        An empty file is set aside at load, never delivered.
        """
        try:
            self._io.unlink(path)
        except FileNotFoundError:
            return
        except OSError:
            try:
                os.truncate(path, 0)
            except OSError:
                pass
            return
        self.request_flush(FlushRequest(None, (path.parent,)))

    @staticmethod
    def _open_locked(
        path: Path, flags: int, lock: int, opener: Callable[[Path, int, int], int]
    ) -> int | None:
        """Open and flock `path`; None if it no longer exists once the lock is held."""
        for _ in range(3):
            try:
                fd = opener(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, lock)
                now = os.stat(path, follow_symlinks=False)
                held = os.fstat(fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError:
                os.close(fd)
                raise
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # replaced while we waited for the lock; look again
        return None

    def request_flush(self, request: FlushRequest) -> None:
        """Flush `request` with the next batch without waiting (inline when not started)."""
        self._commit.request_flush(request)
