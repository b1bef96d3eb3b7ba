"""The spool's I/O seam (`SpoolIO`), its errors, and the group commit that makes writes durable.

Takes: file descriptors and directories whose changes must reach the disk
(`FlushRequest`), from the spool's writer threads and the event loop.
Emits: nothing but completion: `GroupCommit.make_durable` returns once its
request is on disk, or raises the OSError the flush met.
Untrusted input: none; the paths and descriptors are the spool's own.
Fails: the flush's OSError, which `spool_error` turns into `SpoolFullError`
(ENOSPC/EDQUOT, 452 4.3.1) or `SpoolWriteError` (451 4.3.0).

Durability (group commit): `Spool.accept` writes the file on one of a few
writer threads (creating a file waits for the file system journal while a
flush commits, and that must not stall the event loop; measured here, writing
on the loop shrank batches to about one message each), then hands it to one
committer thread and waits. The committer takes every request waiting at that
moment and makes them durable with one ``syncfs(2)`` on the spool's file
system; requests that arrive during a flush wait for the next one. If syncfs
is missing or fails, the batch falls back to fsync of each file plus fsync of
each directory whose entries changed; that also tells exactly which requests
failed. A request returns only after its batch is durable.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relayd.queue.spoolformat import FILE_MODE

_SYNCFS_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class SpoolError(Exception):
    """Base of every error the spool raises."""


class SpoolFullError(SpoolError):
    """No room on the spool's disk (ENOSPC/EDQUOT); the client should retry later."""

    smtp_code = 452
    enhanced_code = "4.3.1"


class SpoolWriteError(SpoolError):
    """The message could not be made durable for another OS reason."""

    smtp_code = 451
    enhanced_code = "4.3.0"


class SpoolCorruptError(SpoolError):
    """A spool file does not read back as written; the caller should set it aside."""


class SpoolEntryMissing(SpoolError):
    """No queue file for this id (already completed, removed or set aside)."""



# ---------------------------------------------------------------------------
# OS calls that can fail in interesting ways, behind one small seam.


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages; does not wait, promises nothing


class SpoolIO:
    """The OS calls the spool's writes go through; tests subclass it to inject faults."""

    def __init__(self) -> None:
        self._syncfs = _load_syncfs()
        self._sync_file_range = _load_sync_file_range()

    def open(self, path: Path, flags: int, mode: int = FILE_MODE) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def syncfs(self, fd: int) -> None:
        """Flush the whole file system holding `fd` (Linux); OSError(ENOSYS) elsewhere."""
        if self._syncfs is None:
            raise OSError(errno.ENOSYS, "syncfs is not available")
        if self._syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing a range out now (Linux), so a big message
        being received does not pile up dirty pages that the next group commit
        (syncfs) would have to wait for. Not a durability step: errors are ignored."""
        if self._sync_file_range is not None:
            self._sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def link(self, src: Path, dst: Path) -> None:
        """A second name for `src`; FileExistsError if `dst` exists (never replaces)."""
        os.link(src, dst)

def spool_error(exc: OSError, doing: str) -> SpoolError:
    """The spool error (and so the SMTP reply) for an OS error met while `doing` something."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    text = f"spool: {doing} failed ({name}: {exc.strerror or exc})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(text)
    return SpoolWriteError(text)


def fsync_dir(path: Path) -> None:
    """fsync a directory outside the seam (creating the layout, before any message exists)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(io: SpoolIO, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = io.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def close_quietly(io: SpoolIO, fd: int | None) -> None:
    if fd is not None:
        try:
            io.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# The group commit.


@dataclass(slots=True)
class FlushRequest:
    fd: int | None  # a file to fsync in fallback mode; the committer closes it
    directories: tuple[Path, ...]  # directories whose entries changed
    future: asyncio.Future[None] | None = None


class GroupCommit:
    """One committer thread making batches of requests durable; see the module docstring."""

    def __init__(self, io: SpoolIO, *, use_syncfs: bool) -> None:
        self._io = io
        self._use_syncfs = use_syncfs
        self._cond = threading.Condition()
        self._pending: list[FlushRequest] = []
        self._accepting = False  # committer running and taking requests
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._root_fd: int | None = None
        self.flush_failures = 0  # fire-and-forget flushes that failed (for metrics)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, root: Path) -> None:
        """Start the committer, bound to the running loop, flushing the file system of `root`."""
        self._loop = asyncio.get_running_loop()
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with self._cond:
            self._accepting, self._stopping = True, False
        self._thread = threading.Thread(
            target=self._run_committer, name="relayd-spool-commit", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Flush everything still pending, then stop the committer."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(thread.join)
        self._thread = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    async def make_durable(self, request: FlushRequest) -> None:
        """Wait until `request` has been flushed; raises the flush's OSError."""
        future: asyncio.Future[None] | None = None
        with self._cond:
            if self._accepting and self._loop is not None:
                future = self._loop.create_future()
                request.future = future
                self._pending.append(request)
                self._cond.notify()
        if future is None:
            error = self._flush_inline(request)
            if error is not None:
                raise error
            return
        await future

    def request_flush(self, request: FlushRequest) -> None:
        """Flush with the next batch without waiting (inline when no committer runs)."""
        with self._cond:
            if self._accepting:
                self._pending.append(request)
                self._cond.notify()
                return
        if self._flush_inline(request) is not None:
            self.flush_failures += 1

    def _flush_inline(self, request: FlushRequest) -> OSError | None:
        try:
            return self._flush_batch([request], None)[0]
        finally:
            close_quietly(self._io, request.fd)

    def _run_committer(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    self._accepting = False
                    return
                batch, self._pending = self._pending, []
            try:
                errors = self._flush_batch(batch, self._root_fd)
            except Exception as exc:  # a bug here must not leave sessions waiting forever
                errors = [OSError(errno.EIO, f"spool flush failed: {exc!r}")] * len(batch)
            for request, error in zip(batch, errors):
                close_quietly(self._io, request.fd)
                self._settle(request, error)

    def _settle(self, request: FlushRequest, error: OSError | None) -> None:
        if request.future is None:
            if error is not None:
                self.flush_failures += 1
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, request.future, error)
        except RuntimeError:
            pass  # the loop is closed; nobody is waiting any more

    def _flush_batch(self, batch: list[FlushRequest], root_fd: int | None) -> list[OSError | None]:
        """Make every request in `batch` durable; one error slot per request."""
        if self._use_syncfs and root_fd is not None:
            try:
                self._io.syncfs(root_fd)
                return [None] * len(batch)
            except OSError as exc:
                if exc.errno in _SYNCFS_UNSUPPORTED:
                    self._use_syncfs = False
                # Otherwise fall through: fsync per file tells which requests failed.
        return self._fsync_each(batch)

    def _fsync_each(self, batch: list[FlushRequest]) -> list[OSError | None]:
        errors: list[OSError | None] = [None] * len(batch)
        by_dir: dict[Path, list[int]] = {}
        for i, request in enumerate(batch):
            if request.fd is not None:
                try:
                    self._io.fsync(request.fd)
                except OSError as exc:
                    errors[i] = exc
            for d in request.directories:
                by_dir.setdefault(d, []).append(i)
        for d, members in by_dir.items():
            try:
                fd = self._io.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0)
                try:
                    self._io.fsync(fd)
                finally:
                    self._io.close(fd)
            except OSError as exc:
                for i in members:
                    errors[i] = errors[i] or exc
        return errors



def _resolve(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():
        return  # the waiting session was cancelled
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
