"""Durable, atomic file writes: the one place that owns temp-write-fsync-rename-fsync.

Takes: a path, the bytes it should hold, the mode (and, for a file root rewrites
on the daemon's behalf, the owner) it should have.
Emits: the file, whole. A temporary file is written beside it (or where the
caller says, e.g. a Maildir's tmp/), fsync'd, renamed over the target (or
hard-linked, when an existing file must never be replaced), then the target's
directory is fsync'd so the new name survives a power cut. A crash at any step
leaves either the old file or the new one, never a mix; the temporary file is
removed when a step fails.
Untrusted input: none; paths come from the configuration or the caller.
Fails: OSError from the step that failed (FileExistsError when `replace` is
false and the target exists); the target is then untouched.

The spool's message files use their own group commit (relayd.queue.spool) and are not
written here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700


class FileOps:
    """The system calls a safe write makes, one method each.

    Tests hand in a subclass that records the order or fails one step, to show
    what a crash between two steps leaves behind.
    """

    def open_new(self, path: Path, mode: int) -> int:
        """Create `path` (never following or reusing an existing name) for writing."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    def fchown(self, fd: int, uid: int, gid: int) -> None:
        os.fchown(fd, uid, gid)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def fsync_directory(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


SYSTEM = FileOps()


def kept_owner(path: Path) -> tuple[int, int] | None:
    """The owner a file rewritten by root should keep: the old file's, else its directory's.

    Only root can give a file away; when root runs relayctl, a file the daemon
    reads must stay readable by the relayd user that owns the state directory.
    None when not running as root (the new file is then simply ours).
    """
    if os.geteuid() != 0:
        return None
    for candidate in (path, path.parent):
        try:
            st = candidate.stat()
        except OSError:
            continue
        return st.st_uid, st.st_gid
    return None


def temp_name_for(path: Path) -> Path:
    """A fresh hidden name beside `path` for its temporary file."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def write_file(
    path: Path,
    data: bytes,
    *,
    mode: int = PRIVATE_MODE,
    owner: tuple[int, int] | None = None,
    replace: bool = True,
    directory_mode: int | None = PRIVATE_DIRECTORY_MODE,
    temp_path: Path | None = None,
    ops: FileOps = SYSTEM,
) -> None:
    """Make `path` hold `data`, with `mode` (and `owner`), atomically and durably.

    `mode` is set with fchmod, so the process umask cannot narrow or widen it.
    With `replace` false an existing `path` is never overwritten (the temporary
    file is hard-linked: FileExistsError). A missing directory is created with
    `directory_mode` (None: the directory must exist). `temp_path` names the
    temporary file when the caller's layout prescribes one (Maildir's tmp/); it
    must be on the same file system as `path`.
    """
    directory = path.parent
    if directory_mode is not None:
        directory.mkdir(mode=directory_mode, parents=True, exist_ok=True)
    temp = temp_path if temp_path is not None else temp_name_for(path)
    fd = ops.open_new(temp, mode)
    try:
        try:
            ops.fchmod(fd, mode)
            if owner is not None:
                ops.fchown(fd, *owner)
            _write_all(fd, data, ops)
            ops.fsync(fd)
        finally:
            ops.close(fd)
        if replace:
            ops.replace(temp, path)
        else:
            ops.link(temp, path)
            ops.unlink(temp)
    except BaseException:
        ops.unlink(temp)
        raise
    ops.fsync_directory(directory)


def _write_all(fd: int, data: bytes, ops: FileOps) -> None:
    view = memoryview(data)
    while view:
        written = ops.write(fd, view)
        view = view[written:]


def write_private_file(path: Path, data: bytes, *, replace: bool = True, keep_owner: bool = False) -> None:
    """Write a secret-bearing file (credential store, key file, tenants file): mode 0600.

    With `keep_owner`, a file rewritten by root keeps the owner of the file it
    replaces (or of its directory), so the daemon's user can still read it. A
    missing directory is created with mode 0700.
    """
    owner = kept_owner(path) if keep_owner else None
    write_file(path, data, mode=PRIVATE_MODE, owner=owner, replace=replace)
