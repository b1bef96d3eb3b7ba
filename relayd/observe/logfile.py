"""One log file that logrotate may move: append, reopen, close; used by the main log and the JSON log.

Takes: a path (or None: the lines go to a stream, stderr by default, which is
what a service under systemd wants) and whole lines to append.
Emits: the lines, each written and flushed under a lock, in a file created
with mode 0640 (Exim's: the mail group may read) whatever the umask.
Untrusted input: none; callers pass lines already made safe.
Fails: a write that fails is counted in `write_errors` and reported on stderr
by the caller's `on_error`, never raised: logging must not stop mail.
`reopen` opens the new file before closing the old, so a failure leaves
logging where it was and raises OSError for the caller to report.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Callable, TextIO

LOG_FILE_MODE = 0o640  # Exim's default: the mail group may read, others not.


def open_log_file(path: Path) -> TextIO:
    """Open `path` for appending, line-buffered; a new file gets mode 0640 whatever the umask."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_EXCL, LOG_FILE_MODE)
        os.fchmod(fd, LOG_FILE_MODE)
    except FileExistsError:
        fd = os.open(path, flags, LOG_FILE_MODE)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")


class LogFile:
    """A log's file (or stream), thread-safe; see the module docstring."""

    def __init__(self, path: Path | None, *, stream: TextIO | None,
                 on_error: Callable[[BaseException, str], None]) -> None:
        self._path = path
        self._stream: TextIO = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._file: TextIO | None = open_log_file(path) if path is not None else None
        self._on_error = on_error
        self.write_errors = 0

    def write(self, line: str) -> None:
        with self._lock:
            target = self._file if self._file is not None else self._stream
            try:
                target.write(line)
                target.flush()
            except (OSError, ValueError) as exc:
                self.write_errors += 1
                self._on_error(exc, line)

    def reopen(self) -> None:
        """Open the path again (after logrotate moved the old file away)."""
        if self._path is None:
            return
        fresh = open_log_file(self._path)
        with self._lock:
            old, self._file = self._file, fresh
        if old is not None:
            old.close()

    def close(self) -> None:
        """Close the file; later lines fall back to the stream."""
        with self._lock:
            old, self._file = self._file, None
        if old is not None:
            old.close()
