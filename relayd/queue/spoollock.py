"""The spool's daemon lock: one relayd per spool, and relayctl's offline edits apart from it.

While relayd runs it holds an exclusive flock on ``<spool_dir>/daemon.lock``;
relayctl takes the same lock before touching the spool directly (the daemon
not running), so offline edits and a starting daemon never overlap.
Fails: `acquire` returns None when the lock stays taken for `timeout`
seconds; the daemon then raises `SpoolInUse`.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "daemon.lock"


class SpoolInUse(OSError):
    """Another process holds the spool's daemon lock."""


def lock_path(spool_dir: Path) -> Path:
    return spool_dir / LOCK_NAME


class SpoolLock:
    """An flock on ``<spool_dir>/daemon.lock``: exclusive for relayd, for relayctl's offline edits."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, *, exclusive: bool, timeout: float) -> "SpoolLock | None":
        """Take the lock, polling up to `timeout` seconds; None when it stays taken."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                return cls(fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
            except OSError:
                os.close(fd)
                raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
