"""A message written to the spool while its body arrives (SMTP DATA, streamed), in format 2.

Takes: the envelope and body pieces from the listener (through the daemon's
`QueuedBody`), in order: `begin`, `write`..., then `commit` or `abort`.
Emits: the `QueueEntry` of the committed message, once it is durable.
Untrusted input: the body bytes, stored as counted bytes and never parsed;
memory stays bounded (at most `_WRITE_BATCH` bytes gathered before a write).
Fails: `SpoolFullError` / `SpoolWriteError` from any write or the flush; the
unfinished file is then removed, so a restart never delivers mail that was
not acknowledged.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

from relayd.queue.spoolformat import (
    MAGIC_STREAMED,
    STREAMED_PLACEHOLDER,
    STREAMED_SLOT_LEN,
    encode_streamed_envelope_line,
    streamed_size_line,
)
from relayd.queue.spoolio import FlushRequest, SpoolIO, SpoolWriteError, close_quietly, spool_error, write_all
from relayd.values import Envelope, QueueEntry, Recipient

_T = TypeVar("_T")
_A = TypeVar("_A")


class ReceivingSpool(Protocol):
    """What an incoming message needs from the spool that created it."""

    @property
    def io(self) -> SpoolIO: ...

    @property
    def writers(self) -> Executor | None: ...

    def path_for(self, id: str) -> Path: ...

    def start_receiving(self, id: str) -> None: ...

    def stop_receiving(self, id: str) -> None: ...

    async def commit_new(self, request: FlushRequest, path: Path, message_id: str) -> None: ...

    def discard(self, path: Path) -> None: ...


_WRITE_BATCH = 128 * 1024  # body bytes gathered before one write on a writer thread


class IncomingMessage:
    """A message file being filled as DATA arrives (format 2); see `Spool.receive`.

    Memory stays bounded: `write` gathers at most `_WRITE_BATCH` bytes, then
    hands them to a writer thread (the disk may block; the event loop must
    not) and waits, which also paces the client. The CRCs are computed on
    that thread too. Nothing is flushed before `commit`, which shares the
    spool's group commit like `accept`.
    """

    def __init__(self, spool: ReceivingSpool, envelope: Envelope, path: Path, fd: int) -> None:
        self._spool = spool
        self.envelope = envelope
        self._path = path
        self._fd: int | None = fd
        self._pending = bytearray()
        self._slot_at = 0
        self._size = 0
        self._crc = 0  # envelope line + body: the trailer's CRC
        self._body_crc = 0
        self._writing = False  # a write runs on a writer thread
        self._remove_after_write = False  # aborted meanwhile: remove once it is done
        self._closed = False
        self._linked: Path | None = None  # the queue name, once linked and until committed

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def size(self) -> int:
        """Body bytes taken so far."""
        return self._size + len(self._pending)

    async def begin(self, envelope: Envelope) -> None:
        """Write the format line, `envelope` (same id) and the size placeholder."""
        if envelope.id != self.envelope.id:
            raise ValueError("begin() must keep the id the spool gave")
        self.envelope = envelope
        line = encode_streamed_envelope_line(envelope)
        self._crc = zlib.crc32(line)
        self._slot_at = len(MAGIC_STREAMED) + len(line)
        await self._in_thread(self._write_raw, MAGIC_STREAMED + line + STREAMED_PLACEHOLDER)

    async def write(self, data: bytes) -> None:
        """Add body bytes; written to disk in batches."""
        self._pending += data
        if len(self._pending) >= _WRITE_BATCH:
            await self._write_pending()

    async def commit(self) -> QueueEntry:
        """Finish the file, link it into the queue, return once durable.

        Raises SpoolFullError / SpoolWriteError; the message is then removed.
        """
        await self._write_pending()
        spool = self._spool
        final = spool.path_for(self.id)
        # From the link into the queue until it is durable, the file is in the
        # queue but not yet acknowledged: a scan must leave it alone.
        spool.start_receiving(self.id)
        try:
            fd = await self._in_thread(self._finish, final)
        except BaseException:
            spool.stop_receiving(self.id)
            raise
        self._fd, self._linked, self._closed = None, None, True  # the flush owns fd and file now
        await spool.commit_new(FlushRequest(fd, (self._path.parent, final.parent)), final, self.id)
        envelope = replace(self.envelope, size=self._size)
        return QueueEntry(envelope, tuple(Recipient(a) for a in envelope.recipients))

    def abort(self) -> None:
        """Remove the unfinished file (the session ended, or the message was refused)."""
        if self._closed:
            return
        self._closed = True
        if self._writing:
            self._remove_after_write = True
        else:
            self._remove()

    # -- internals -----------------------------------------------------------

    def _remove(self) -> None:
        fd, self._fd = self._fd, None
        close_quietly(self._spool.io, fd)
        try:
            self._spool.io.unlink(self._path)
        except OSError:
            pass  # swept at the next start; it was never acknowledged
        linked, self._linked = self._linked, None
        if linked is not None:  # cancelled while being linked into the queue: never acknowledged
            self._spool.discard(linked)

    async def _write_pending(self) -> None:
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            await self._in_thread(self._write_body, data)

    async def _in_thread(self, work: Callable[[_A], _T], arg: _A) -> _T:
        if self._closed:
            raise SpoolWriteError("spool: the message was abandoned")
        writers = self._spool.writers
        if writers is None:
            return work(arg)
        job = asyncio.get_running_loop().run_in_executor(writers, work, arg)
        self._writing = True
        job.add_done_callback(self._write_done)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            self.abort()
            raise

    def _write_done(self, _job: object) -> None:
        self._writing = False
        if self._remove_after_write:
            self._remove_after_write = False
            self._remove()

    def _write_raw(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            write_all(self._spool.io, self._fd, data)
        except OSError as exc:
            raise spool_error(exc, "writing the message") from exc

    def _write_body(self, data: bytes) -> None:
        self._write_raw(data)
        assert self._fd is not None
        self._spool.io.start_writeback(self._fd, self._slot_at + STREAMED_SLOT_LEN + self._size, len(data))
        self._crc = zlib.crc32(data, self._crc)
        self._body_crc = zlib.crc32(data, self._body_crc)
        self._size += len(data)

    def _finish(self, final: Path) -> int:
        """Trailer, size line, link into the queue, unlock; the fd for the flush."""
        fd = self._fd
        assert fd is not None
        io = self._spool.io
        try:
            write_all(io, fd, b"\nrelayd-end %08x\n" % self._crc)
            slot = streamed_size_line(self._size, self._body_crc)
            if io.pwrite(fd, slot, self._slot_at) != len(slot):
                raise OSError(errno.EIO, "short write of the size line")
            io.link(self._path, final)
            self._linked = final
        except FileExistsError:
            raise SpoolWriteError(f"spool: message id {self.id} is already queued") from None
        except OSError as exc:
            raise spool_error(exc, "writing the message") from exc
        try:
            io.unlink(self._path)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise spool_error(exc, "moving the message into the queue") from exc
        return fd
