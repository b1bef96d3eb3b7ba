"""The admin audit log: one JSON line per administrative action done with relayctl.

Takes: the action (`tenant.add`, `secret.set`, ...), its target (a tenant or
credential name), its outcome, who ran it (`SUDO_USER`, else the login name of
the real uid) and the time.
Emits: lines appended to the audit log (`audit_log:` in relay.yaml), e.g.
``{"action": "tenant.add", "outcome": "ok", "target": "acme", "time": "2025-...Z",
"uid": 0, "who": "alice"}``. The file is created with mode 0600.
Untrusted input: the target and error texts come from the command line and
relayctl's own messages; json.dumps escapes them, so one record is always one
line. Never recorded: passwords, hashes, keys (records carry no free-form
fields besides the target and relayctl's own error sentence, which never
holds a secret).
How it fails: `AuditLog.open()` raises OSError when the log cannot be
written, before the action runs, so an action is never done unrecorded;
a failed append after the action raises OSError too.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pwd
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

Command = Callable[[Namespace], int]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One admin action, as written to the log."""

    time: float
    who: str
    uid: int
    action: str
    target: str
    outcome: str  # "ok" or "failed"
    error: str | None = None  # relayctl's own one-line reason, for a failure


def format_record(record: AuditRecord) -> str:
    """The JSON line for a record (ending in a newline); pure."""
    stamp = datetime.datetime.fromtimestamp(record.time, datetime.timezone.utc)
    fields: dict[str, object] = {
        "time": stamp.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "who": record.who,
        "uid": record.uid,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
    }
    if record.error is not None:
        fields["error"] = record.error
    return json.dumps(fields, sort_keys=True, ensure_ascii=True) + "\n"


def invoking_user(environ: Mapping[str, str], uid: int) -> str:
    """Who ran relayctl: the sudo caller if any, else the real uid's login name, else `uid N`."""
    sudo_user = environ.get("SUDO_USER", "").strip()
    if sudo_user:
        return sudo_user
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class AuditLog:
    """An append-only file of `AuditRecord`s; one O_APPEND write per record."""

    def __init__(self, path: Path, *, who: str, uid: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._who = who
        self._uid = uid
        self._clock = clock
        self._fd: int | None = None

    def open(self) -> None:
        """Open (creating it, mode 0600) for appending; raises OSError if that is impossible."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OSError(exc.errno, f"cannot write the audit log ({reason}); nothing was changed",
                          str(self.path)) from None

    def record(self, action: str, target: str, outcome: str, error: str | None = None) -> None:
        """Append one record and make it durable."""
        self.open()
        assert self._fd is not None
        line = format_record(AuditRecord(self._clock(), self._who, self._uid, action, target,
                                         outcome, error))
        os.write(self._fd, line.encode("utf-8"))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def audited(
    action: str,
    *,
    locate: Callable[[Namespace], Path],
    target: Callable[[Namespace], str],
    describe: Callable[[BaseException], str],
) -> Callable[[Command], Command]:
    """Wrap a relayctl command so that it is recorded in the audit log.

    `locate` finds the log (it may read relay.yaml); the log is opened before
    the command runs. A command that cannot start because relay.yaml does not
    load is not recorded: there is no audit log to name yet. The outcome is "ok" for exit status 0, else "failed";
    an exception is recorded as failed with `describe(exc)` and re-raised.
    """

    def wrap(command: Command) -> Command:
        @functools.wraps(command)
        def run(args: Namespace) -> int:
            environ: Mapping[str, str] = getattr(args, "environ", os.environ)
            log = AuditLog(locate(args), who=invoking_user(environ, os.getuid()), uid=os.getuid())
            log.open()
            try:
                code = command(args)
            except BaseException as exc:
                log.record(action, target(args), "failed", describe(exc))
                raise
            else:
                log.record(action, target(args), "ok" if code == 0 else "failed",
                           None if code == 0 else f"exit status {code}")
                return code
            finally:
                log.close()

        return run

    return wrap
