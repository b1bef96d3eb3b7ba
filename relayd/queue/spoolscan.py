"""The scan at start: rebuilds the queue's index from the spool directory, judging every file it finds.

Takes: the spool (as `ScannedSpool`) and its directory tree.
Emits: `SpoolLoad`: the live entries, problems for the log, ids completed
during the scan, ids of incomplete files removed, and how many files are in
``corrupt/``.
Untrusted input: every name and file on disk. A name that is not a message id,
a file in the wrong shard, a file that does not read back: each is rehomed or
moved to ``corrupt/`` with a reason, never deleted; only a file a stopped
receiver left without its end marker (never acknowledged) is removed. The
scan never touches a file this process is still receiving, nor one whose
writer holds its lock.
Fails: OSError when a shard directory cannot be listed; a file that cannot be
opened or moved is reported and left in place.
"""

from __future__ import annotations

import fcntl
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from relayd.queue.msgid import ALPHABET, is_message_id
from relayd.queue.spoolformat import (
    FILE_MODE,
    SHARD_INDEX,
    UnreadableSpoolFile,
    index_fd,
    is_incomplete,
    same_file,
)
from relayd.queue.spoolio import FlushRequest, SpoolError, SpoolIO, spool_error, write_all
from relayd.values import QueueEntry


@dataclass(frozen=True, slots=True)
class SpoolLoad:
    """What `Spool.load` found: live entries, problems for the log, ids completed during load."""

    entries: list[QueueEntry]
    problems: list[str]
    completed: list[str] = field(default_factory=list)
    corrupt_files: int = 0  # files in corrupt/ after the load, old and new
    discarded: list[str] = field(default_factory=list)  # incomplete files of stopped receivers, removed


class ScannedSpool(Protocol):
    """What the scan needs from the spool it indexes."""

    @property
    def queue_dir(self) -> Path: ...

    @property
    def corrupt_dir(self) -> Path: ...

    @property
    def io(self) -> SpoolIO: ...

    def now(self) -> float: ...

    def path_for(self, id: str) -> Path: ...

    def is_receiving(self, id: str) -> bool: ...

    def complete(self, id: str) -> bool: ...

    def request_flush(self, request: FlushRequest) -> None: ...


class SpoolScan:
    """One scan of the whole queue directory; `run` once."""

    def __init__(self, spool: ScannedSpool) -> None:
        self._spool = spool
        self._queue = spool.queue_dir
        self._entries: list[QueueEntry] = []
        self._problems: list[str] = []
        self._completed: list[str] = []
        self._discarded: list[str] = []

    def run(self) -> SpoolLoad:
        """Index every shard: headers and state records only, never bodies."""
        for name in sorted(os.listdir(self._queue)):
            if len(name) != 1 or name not in ALPHABET:
                self._problems.append(f"queue/{name}: unexpected entry in queue directory, left alone")
        was_enabled = gc.isenabled()
        gc.disable()  # 100,000 new objects would trigger many full collections for nothing
        try:
            for shard in ALPHABET:
                self._load_shard(shard)
        finally:
            if was_enabled:
                gc.enable()
        self._entries.sort(key=lambda e: e.id)
        corrupt_files = count_files_in(self._spool.corrupt_dir, ".reason")
        return SpoolLoad(self._entries, self._problems, self._completed, corrupt_files, self._discarded)

    def _load_shard(self, shard: str) -> None:
        directory = self._queue / shard
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(dir_fd) as it:
                found = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
            for name, is_file in found:
                if not is_file:
                    self._problems.append(f"queue/{shard}/{name}: not a regular file, left alone")
                    continue
                entry = self._load_one(dir_fd, directory, name)
                if entry is None:
                    continue
                if entry.is_complete:
                    if self._spool.complete(entry.id):
                        self._completed.append(entry.id)
                else:
                    self._entries.append(entry)
        finally:
            os.close(dir_fd)

    def _load_one(self, dir_fd: int, directory: Path, name: str) -> QueueEntry | None:
        """Index one file; discard it if a stopped receiver left it incomplete; set it aside if damaged.

        Opens relative to the shard directory's fd, which keeps start-up fast.
        A file removed by another process right after it was opened is still
        indexed; the delivery side then finds it missing and drops it. A file
        this process is still receiving is not touched: its writer indexes it
        once it is acknowledged. Every other writer is gone (the daemon lock
        keeps a second relayd out), so what they left is judged: a file that
        ends before its end marker was never acknowledged and is removed; one
        with its end marker that does not read back is damaged and set aside.
        """
        if not is_message_id(name):
            self._report_aside(directory / name, "file name is not a message id")
            return None
        if name[SHARD_INDEX] != directory.name:
            return self._rehome(directory / name)
        if self._spool.is_receiving(name):
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            return None  # removed meanwhile by another process
        except OSError as exc:
            self._problems.append(f"{name}: cannot open ({exc.strerror}); left in place")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            entry, notes = index_fd(fd, name)
        except UnreadableSpoolFile as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"read error ({exc.strerror})"
        else:
            self._problems.extend(f"{name}: {n}" for n in notes)
            return entry
        finally:
            os.close(fd)
        self._judge_unreadable(directory / name, reason)
        return None

    def _judge_unreadable(self, path: Path, reason: str) -> None:
        """Remove an incomplete file of a stopped receiver; set a damaged one aside."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._problems.append(f"{path.name}: cannot open ({exc.strerror}); left in place")
            return
        try:
            try:
                # Not blocking: a receiver that holds its file's lock is alive.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            if self._spool.is_receiving(path.name) or not same_file(path, fd):
                return
            try:
                incomplete = is_incomplete(fd)
            except OSError:
                incomplete = False
            if not incomplete:
                self._report_aside(path, reason)
                return
            try:
                self._spool.io.unlink(path)
            except FileNotFoundError:
                return
            except OSError as exc:
                self._problems.append(f"{path.name}: incomplete and cannot be removed ({exc.strerror}); left in place")
                return
            self._discarded.append(path.name)
            self._spool.request_flush(FlushRequest(None, (path.parent,)))
        finally:
            os.close(fd)

    def _report_aside(self, path: Path, reason: str) -> None:
        where = f"queue/{path.parent.name}/{path.name}"
        try:
            move_to_corrupt(self._spool, path, reason)
        except SpoolError as exc:
            self._problems.append(f"{where}: {reason}; could not be moved to corrupt/ ({exc})")
            return
        self._problems.append(f"{where}: {reason}; moved to corrupt/")

    def _rehome(self, path: Path) -> QueueEntry | None:
        """Move a message found in the wrong shard directory to where path_for looks."""
        target = self._spool.path_for(path.name)
        try:
            if target.exists():
                if os.path.samefile(path, target):  # case-insensitive file system
                    return self._load_path(target)
                self._report_aside(path, "duplicate of a message in its proper shard")
                return None
            self._spool.io.rename(path, target)
        except OSError as exc:
            self._problems.append(f"{path.name}: in the wrong shard and cannot be moved ({exc.strerror})")
            return None
        self._problems.append(f"{path.name}: was in shard {path.parent.name}, moved to {target.parent.name}")
        self._spool.request_flush(FlushRequest(None, (path.parent, target.parent)))
        return self._load_path(target)

    def _load_path(self, path: Path) -> QueueEntry | None:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return self._load_one(dir_fd, path.parent, path.name)
        finally:
            os.close(dir_fd)


def move_to_corrupt(spool: ScannedSpool, path: Path, reason: str) -> Path:
    """Move `path` to corrupt/ with a .reason file beside it; the new path."""
    corrupt, io = spool.corrupt_dir, spool.io
    target = corrupt / path.name
    n = 0
    while target.exists() or target.with_name(target.name + ".reason").exists():
        n += 1
        target = corrupt / f"{path.name}.{n}"
    try:
        io.rename(path, target)
        note = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(spool.now()))} UTC {reason}\n"
        fd = io.open(
            target.with_name(target.name + ".reason"),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            FILE_MODE,
        )
        try:
            write_all(io, fd, note.encode("utf-8", "backslashreplace"))
        finally:
            io.close(fd)
    except OSError as exc:
        raise spool_error(exc, "setting a damaged message aside") from exc
    spool.request_flush(FlushRequest(None, (path.parent, corrupt)))
    return target


def count_files_in(directory: Path, skip_suffix: str) -> int:
    """Regular files in `directory`, leaving out names ending in `skip_suffix` (if any)."""
    with os.scandir(directory) as it:
        return sum(
            1
            for e in it
            if e.is_file(follow_symlinks=False)
            and not (skip_suffix and e.name.endswith(skip_suffix))
        )
