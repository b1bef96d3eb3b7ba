"""The main log: one line per mail event, in the shape of Exim's mainlog.

Takes: events (`relayd.observe.events`) through `MainLog.emit`, as one sink of the
daemon's fan-out, plus an injected clock. `format_event` is the one place
that says which line each event becomes. The older per-kind methods
(`arrival`, `delivered`, `info`...) write the same lines; relayctl uses them
for its edits while relayd is stopped.
Emits: lines such as ``2026-01-01 12:00:00 1abc-000001 => x@gmail.com
R=acme T=gmail H=smtp.gmail.com [1.2.3.4]:587 X=TLS1.3 C="250 2.0.0 OK"``
to a file opened in append mode (0640) or to a stream.
Untrusted input: addresses, HELO names, logins, upstream replies and client
data. Every such field goes through `sanitize()`, which escapes CR, LF and all
other non-printing characters and truncates the field, so no client or
upstream can forge or split a log line. Bodies and secrets are never passed in.
Fails: a write error (disk full, log volume gone) is counted in `write_errors`
and echoed on stderr instead of raised, so logging never stops mail from
moving; `reopen()` raises if the new file cannot be opened and keeps the old one.

The lines themselves are made by the pure functions of relayd.observe.logline
(re-exported here); `MainLog` adds the time and does the writing.

Markers, as in Exim: ``<=`` arrival, ``=>`` delivery, ``->`` a further
recipient of the same delivery, ``==`` deferral, ``**`` permanent failure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from relayd.observe import events as ev
from relayd.observe.logfile import LOG_FILE_MODE, LogFile
from relayd.observe.logline import (
    MAX_FIELD,
    format_arrival,
    format_auth_failed,
    format_auth_throttled,
    format_bounce_created,
    format_bounce_dropped,
    format_bounce_suppressed,
    format_completed,
    format_connection_refused,
    format_daemon,
    format_deferred,
    format_delivered,
    format_event,
    format_failed,
    format_host_failed,
    format_rejected,
    format_rejections_suppressed,
    format_session_dropped,
    format_timestamp,
    sanitize,
)
from relayd.values import DeliveryReport, QueueEntry

# What other modules take from here besides MainLog: the line formats, shared with relayd.observe.logline.
__all__ = ["LOG_FILE_MODE", "MainLog", "MAX_FIELD", "format_arrival", "format_auth_failed",
    "format_auth_throttled", "format_bounce_created", "format_bounce_dropped", "format_bounce_suppressed",
    "format_completed", "format_connection_refused", "format_daemon", "format_deferred", "format_delivered",
    "format_event", "format_failed", "format_host_failed", "format_rejected", "format_rejections_suppressed",
    "format_session_dropped", "format_timestamp", "sanitize"]



class MainLog:
    """Writes timestamped mainlog lines: `emit(event)` (the `EventSink` method) or one method per kind; thread-safe.

    With `path` None the lines go to `stream` (stderr by default), which is
    what a service under systemd wants. `utc` stamps lines in UTC instead of
    local time.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Callable[[], float] = time.time,
        stream: TextIO | None = None,
        utc: bool = False,
    ) -> None:
        self._clock = clock
        self._utc = utc
        self._file = LogFile(path, stream=stream, on_error=_report_write_error)

    @property
    def write_errors(self) -> int:
        return self._file.write_errors

    def reopen(self) -> None:
        """Open the path again (after logrotate moved the old file away); OSError leaves the old one."""
        self._file.reopen()

    def close(self) -> None:
        """Close the file; later lines fall back to the stream."""
        self._file.close()

    def emit(self, event: ev.Event) -> None:
        """The event's line, if the main log shows this kind of event (the `EventSink` method)."""
        text = format_event(event, utc=self._utc)
        if text is not None:
            self._write(text)

    def arrival(
        self,
        entry: QueueEntry,
        *,
        client_ip: str,
        client_port: int,
        helo: str,
        protocol: str,
        tls: str | None,
        auth: str | None,
        user: str = "",
    ) -> None:
        self._write(
            format_arrival(
                entry,
                client_ip=client_ip,
                client_port=client_port,
                helo=helo,
                protocol=protocol,
                tls=tls,
                auth=auth,
                user=user,
            )
        )

    def delivered(self, queue_id: str, report: DeliveryReport, *, first: bool) -> None:
        self._write(format_delivered(queue_id, report, first=first))

    def deferred(
        self, queue_id: str, report: DeliveryReport, *, next_attempt: float | None
    ) -> None:
        self._write(format_deferred(queue_id, report, next_attempt=next_attempt, utc=self._utc))

    def host_failed(
        self, queue_id: str, *, transport: str, host: str, ip: str, port: int, reason: str
    ) -> None:
        self._write(
            format_host_failed(
                queue_id, transport=transport, host=host, ip=ip, port=port, reason=reason
            )
        )

    def failed(self, queue_id: str, report: DeliveryReport) -> None:
        self._write(format_failed(queue_id, report))

    def completed(self, queue_id: str) -> None:
        self._write(format_completed(queue_id))

    def bounce_created(
        self, queue_id: str, *, bounce_id: str, sender: str, size: int | None = None
    ) -> None:
        self._write(format_bounce_created(queue_id, bounce_id=bounce_id, sender=sender, size=size))

    def bounce_dropped(self, queue_id: str, report: DeliveryReport) -> None:
        self._write(format_bounce_dropped(queue_id, report))

    def bounce_suppressed(self, queue_id: str, *, sender: str, reason: str) -> None:
        self._write(format_bounce_suppressed(queue_id, sender=sender, reason=reason))

    def rejected(
        self,
        *,
        client_ip: str,
        stage: str,
        reply: str,
        detail: str = "",
        address: str | None = None,
    ) -> None:
        self._write(
            format_rejected(
                client_ip=client_ip, stage=stage, reply=reply, detail=detail, address=address
            )
        )

    def auth_failed(
        self, *, client_ip: str, login: str | None, helo: str = "", mechanism: str = ""
    ) -> None:
        self._write(
            format_auth_failed(client_ip=client_ip, login=login, helo=helo, mechanism=mechanism)
        )

    def connection_refused(self, *, client_ip: str, reason: str, suppressed: int = 0) -> None:
        self._write(format_connection_refused(client_ip=client_ip, reason=reason, suppressed=suppressed))

    def session_dropped(self, *, client_ip: str, reason: str) -> None:
        self._write(format_session_dropped(client_ip=client_ip, reason=reason))

    def rejections_suppressed(self, *, client_ip: str, count: int) -> None:
        self._write(format_rejections_suppressed(client_ip=client_ip, count=count))

    def auth_throttled(self, *, client_ip: str, login: str, reason: str, retry_after: float) -> None:
        self._write(
            format_auth_throttled(client_ip=client_ip, login=login, reason=reason, retry_after=retry_after)
        )

    def info(self, text: str) -> None:
        self._write(format_daemon(text))

    def warning(self, text: str) -> None:
        self._write(format_daemon(text, level="warning"))

    def error(self, text: str) -> None:
        self._write(format_daemon(text, level="error"))

    def _write(self, text: str) -> None:
        self._file.write(f"{format_timestamp(self._clock(), utc=self._utc)} {text}\n")


def _report_write_error(exc: BaseException, line: str) -> None:
    """Last resort when the log itself cannot be written: stderr, never an exception."""
    try:
        sys.stderr.write(f"relayd: main log write failed ({exc.__class__.__name__}): {line}")
    except (OSError, ValueError):
        pass
