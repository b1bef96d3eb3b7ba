"""Room on the spool: whether a new message may be taken, before any byte of it is read.

Takes: the spool directory and `SpoolLimits` (free-space reserve, per-tenant
share); each queued message's tenant and size (`track`/`forget`); from the
delivery side, why recording delivery state fails (None while it works).
Emits: a refusal reply (`452 4.3.1 ...`) or None, for the listener to give at
MAIL FROM and again before DATA.
Untrusted input: the SIZE a client declares (only ever added to what is
needed, never trusted to be small).
How it fails: a `statvfs` that fails counts as "no room" (refuse, never 250
on a spool we cannot see).

Why (Postfix's queue_minfree, made a default): the queue must always be able
to record delivery outcomes and queue bounces. New mail is refused while free
space on the spool's file system is under the reserve, so what is already
queued can still make progress; and while recording delivery state fails
(ENOSPC, EIO) nothing new is taken at all. The per-tenant share keeps one
tenant's backlog from filling the disk for every other tenant: only that
tenant is refused.

`statvfs` is asked at most once per `cache_seconds`; a MAIL FROM costs a dict
lookup and two comparisons otherwise.

The emergency reserve file (`EMERGENCY_RESERVE`, as CockroachDB's ballast):
the reserve above only holds while relayd is the one filling the disk. When
another process takes the last block, recording what was delivered fails,
and a restart before space returns would send it all again. So relayd keeps
a pre-allocated file of `emergency_reserve_size` bytes in the spool; the
first delivery-state write that fails with ENOSPC removes it, and the
outcome is written into the room it leaves. It is put back once there is
room for it above the reserve again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from relayd import replies
from relayd.config.model import SpoolLimits
from relayd.values import QueueEntry

# Room kept for state records, bounces and the file system's own needs on top
# of the messages counted in the default reserve.
STATE_ROOM = 64 * 1024 * 1024
# How many maximum-size messages the default reserve keeps room for.
RESERVE_MESSAGES = 4
# Free inodes under which new mail is refused as for free bytes: every
# message and every bounce is a file.
MIN_FREE_FILES = 1000
STATVFS_CACHE_SECONDS = 1.0
EMERGENCY_RESERVE = "emergency-reserve"
# Size of the emergency reserve file: enough for thousands of state records
# and a few bounces, and never more than 1/64 of a small file system.
EMERGENCY_RESERVE_BYTES = 8 * 1024 * 1024
EMERGENCY_RESERVE_CHECK_SECONDS = 2.0


def default_reserve(largest_message: int) -> int:
    """The reserve when none is configured: 4 maximum-size messages plus 64 MiB."""
    return RESERVE_MESSAGES * largest_message + STATE_ROOM


@dataclass(frozen=True, slots=True)
class DiskRoom:
    """What statvfs said about the spool's file system."""

    total_bytes: int
    free_bytes: int  # available to the (unprivileged) daemon: f_bavail
    free_files: int  # f_favail; 0 where the file system does not count inodes


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """One tenant's share of the queue."""

    messages: int = 0
    bytes: int = 0


def read_disk_room(path: Path) -> DiskRoom:
    st = os.statvfs(path)
    free_files = st.f_favail if st.f_files > 0 else MIN_FREE_FILES * 2
    return DiskRoom(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, free_files)


def emergency_reserve_size(total_bytes: int) -> int:
    return max(0, min(EMERGENCY_RESERVE_BYTES, total_bytes // 64))


def tenant_over_share(message: str, tenant: str) -> str:
    return f"452 4.3.1 Queue share of tenant {tenant} is full ({message}); try again later"


class SpoolRoom:
    """Admission of new mail by free space, per-tenant share and spool health."""

    def __init__(
        self,
        root: Path,
        limits: Callable[[], SpoolLimits],
        largest_message: Callable[[], int],
        *,
        disk_room: Callable[[Path], DiskRoom] = read_disk_room,
        clock: Callable[[], float] = time.monotonic,
        cache_seconds: float = STATVFS_CACHE_SECONDS,
        state_failure: Callable[[], str | None] = lambda: None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._root = root
        self._limits = limits
        self._largest_message = largest_message
        self._disk_room = disk_room
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._log = log
        self._room: DiskRoom | None = None
        self._room_at = float("-inf")
        # Removals are reported from the spool's worker threads, arrivals on the loop.
        self._lock = threading.Lock()
        self._sizes: dict[str, tuple[str, int]] = {}  # message id -> (tenant, bytes)
        self._usage: dict[str, TenantUsage] = {}
        self._state_failure = state_failure
        self._low_reported = False
        # The emergency reserve file was removed and is not back yet: new mail
        # waits until there is room to put it back.
        self._reserve_released = False

    # -- queue accounting ------------------------------------------------------

    def track(self, entry: QueueEntry) -> None:
        """Count a queued message against its tenant (idempotent)."""
        env = entry.envelope
        with self._lock:
            if entry.id in self._sizes:
                return
            self._sizes[entry.id] = (env.tenant, env.size)
            old = self._usage.get(env.tenant, TenantUsage())
            self._usage[env.tenant] = TenantUsage(old.messages + 1, old.bytes + env.size)

    def forget(self, message_id: str) -> None:
        """A message left the queue (delivered, removed, set aside)."""
        with self._lock:
            found = self._sizes.pop(message_id, None)
            if found is None:
                return
            tenant, size = found
            old = self._usage.get(tenant, TenantUsage())
            left = TenantUsage(max(0, old.messages - 1), max(0, old.bytes - size))
            if left.messages == 0:
                self._usage.pop(tenant, None)
            else:
                self._usage[tenant] = left

    def usage(self, tenant: str) -> TenantUsage:
        with self._lock:
            return self._usage.get(tenant, TenantUsage())

    # -- admission ---------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """For `relayctl status`: free space, the reserve and whether state can be recorded."""
        room = self.disk()
        return {
            "free_bytes": room.free_bytes if room is not None else None,
            "free_files": room.free_files if room is not None else None,
            "reserve_bytes": self.reserve(),
            "state_write_failure": self._state_failure(),
            "emergency_reserve_used": self._reserve_released,
        }

    def reserve(self) -> int:
        configured = self._limits().min_free
        return configured if configured is not None else default_reserve(self._largest_message())

    def disk(self) -> DiskRoom | None:
        """statvfs of the spool, cached for a short interval; None if it cannot be read."""
        now = self._clock()
        if self._room is None or now - self._room_at >= self._cache_seconds:
            try:
                self._room = self._disk_room(self._root)
            except OSError:
                self._room = None
            self._room_at = now
        return self._room

    def refusal(self, tenant: str, declared_size: int = 0) -> str | None:
        """The 452 reply for a new message of `tenant`, or None when there is room."""
        if self._state_failure() is not None:
            return replies.SPOOL_FULL
        room = self.disk()
        if room is None:
            return replies.SPOOL_FULL
        needed = self.reserve() + max(0, declared_size)
        if self._reserve_released:
            needed += 2 * emergency_reserve_size(room.total_bytes)
        if room.free_bytes < needed or room.free_files < MIN_FREE_FILES:
            self._report_low(room)
            return replies.SPOOL_FULL
        self._low_reported = False
        return self._tenant_refusal(tenant, room, declared_size)

    def _tenant_refusal(self, tenant: str, room: DiskRoom, declared_size: int) -> str | None:
        limits = self._limits()
        used = self.usage(tenant)
        if used.messages >= limits.tenant_max_messages:
            return tenant_over_share(f"{used.messages} messages queued", tenant)
        max_bytes = limits.tenant_max_bytes
        if max_bytes is None:
            max_bytes = room.total_bytes // 2
        if used.bytes + max(0, declared_size) > max_bytes:
            return tenant_over_share(f"{used.bytes} bytes queued", tenant)
        return None

    # -- the emergency reserve file ------------------------------------------------

    @property
    def emergency_reserve(self) -> Path:
        return self._root / EMERGENCY_RESERVE

    def keep_emergency_reserve(self) -> bool:
        """Create the emergency reserve file if it is missing and there is room for it (blocking I/O).

        Returns whether the file is in place. Room means: its size on top of
        the free-space reserve, so making it never starts refusing mail.
        """
        path = self.emergency_reserve
        if path.exists():
            return True
        try:
            room = self._disk_room(self._root)
        except OSError:
            return False
        size = emergency_reserve_size(room.total_bytes)
        if size == 0:
            return False
        if room.free_bytes < self.reserve() + 2 * size:
            self._reserve_released = True  # e.g. a start on a full disk: wait for room as after a release
            return False
        partial = path.with_name(path.name + ".new")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(partial, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            return False
        self._room_at = float("-inf")
        self._reserve_released = False
        return True

    async def keep_emergency_reserve_in_place(self, interval: float = EMERGENCY_RESERVE_CHECK_SECONDS) -> None:
        """Put the emergency reserve file back whenever it is gone and there is room (runs until cancelled)."""
        while True:
            await asyncio.sleep(interval)
            if self._reserve_released:
                await asyncio.to_thread(self.keep_emergency_reserve)

    def release_emergency_reserve(self) -> bool:
        """Remove the emergency reserve file so delivery state can be written; False if there was none."""
        try:
            os.unlink(self.emergency_reserve)
        except OSError:
            return False
        self._room_at = float("-inf")
        self._reserve_released = True
        if self._log is not None:
            self._log(
                f"spool: the disk is full; emergency reserve file {self.emergency_reserve} removed "
                "so that delivery outcomes can be recorded"
            )
        return True

    def _report_low(self, room: DiskRoom) -> None:
        if self._low_reported or self._log is None:
            return
        self._low_reported = True
        self._log(
            f"spool: free space {room.free_bytes} bytes, {room.free_files} files is under the "
            f"reserve of {self.reserve()} bytes, {MIN_FREE_FILES} files: new mail refused with 452 4.3.1"
        )
