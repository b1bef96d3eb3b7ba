"""Process hygiene for the daemon: no core dumps, no master key left in the environment.

Takes: the process's own environment and resource limits, at start-up.
Emits: a process that cannot dump core (PR_SET_DUMPABLE 0, RLIMIT_CORE 0) and
whose environment, including the copy the kernel shows in /proc/PID/environ,
no longer holds $RELAYD_MASTER_KEY; the key text is handed back to the caller.
Untrusted input: none (the process's own state).
How it fails: never fatally. Where the kernel or a seccomp filter refuses a
step (systemd's SystemCallFilter forbids setrlimit; the unit sets
LimitCORE=0 instead), the step is skipped and `describe()` says what holds.

Why: the daemon's memory holds every upstream password in clear and the
master key; a core file or a readable environment would hand them to anyone
who can read /var/lib/systemd/coredump or /proc.

Why the environment needs more than `del os.environ[...]`: unsetenv() only
drops libc's pointer. /proc/PID/environ reads the original strings the kernel
copied onto the stack at execve(), which stay as they were; so the value is
overwritten there in place, after checking that the bytes found at the
kernel's env_start..env_end are exactly what /proc/self/environ shows.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import MutableMapping

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
_MAX_ENV_AREA = 1 << 20  # bytes; the kernel's own cap on argv+envp is far below on sane systems


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def disable_core_dumps() -> None:
    """Make the process undumpable and its core limit 0 (each step best effort)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        pass  # seccomp (systemd @resources) or a hard limit we may not lower: LimitCORE=0 covers it
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def is_dumpable() -> bool | None:
    """PR_GET_DUMPABLE for this process; None when it cannot be asked."""
    libc = _libc()
    if libc is None:
        return None
    result = int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    return None if result < 0 else result != 0


def core_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_CORE)
    return int(soft)


def describe() -> str:
    """One log sentence on what protects the process's memory right now."""
    dumpable = is_dumpable()
    limit = core_limit()
    state = "unknown" if dumpable is None else ("yes" if dumpable else "no")
    shown = "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
    return f"process hardening: dumpable={state} core_limit={shown}"


def take_from_environment(name: str, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Remove `name` from the environment everywhere it can be read; return its value.

    Removes it from `os.environ` (and so from libc's environ and any child's)
    and overwrites the kernel's copy behind /proc/self/environ.
    """
    env = os.environ if environ is None else environ
    value = env.pop(name, None)
    if environ is None or environ is os.environ:
        scrub_initial_environment(name)
    return value


def scrub_initial_environment(name: str) -> bool:
    """Zero `name=value` in the environment block the kernel set up at execve().

    Returns True when something was overwritten. Does nothing unless the
    memory at the kernel's env_start..env_end reads exactly as
    /proc/self/environ, so a misread address can never corrupt memory.
    """
    area = _environment_area()
    if area is None:
        return False
    start, end = area
    try:
        with open("/proc/self/environ", "rb") as f:
            shown = f.read(_MAX_ENV_AREA + 1)
    except OSError:
        return False
    if len(shown) != end - start or ctypes.string_at(start, end - start) != shown:
        return False
    prefix = name.encode() + b"="
    changed = False
    offset = 0
    for entry in shown.split(b"\0"):
        if entry.startswith(prefix):
            ctypes.memset(start + offset, 0, len(entry))
            changed = True
        offset += len(entry) + 1
    return changed


def _environment_area() -> tuple[int, int] | None:
    """env_start and env_end from /proc/self/stat (fields 50 and 51), or None."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    try:
        start, end = int(fields[47]), int(fields[48])
    except (IndexError, ValueError):
        return None
    if not 0 < start < end or end - start > _MAX_ENV_AREA:
        return None
    return start, end
