"""The JSON log: one JSON object per line for every event the main log shows, for Loki, Elastic or journald.

Takes: events through `JsonLog.emit` (one sink of the daemon's fan-out);
`log_format: json` puts it in place of the Exim-shaped main log, and
`json_log_file:` runs it beside it.
Emits: per event the main log writes a line for, one object: ``time`` (RFC
3339, UTC), ``event`` (the webhook kind name: message_arrived, delivered, deferred,
bounced, bounce_created, notice...), the event's fields by name (the queue
entry and delivery report flattened: queue_id, tenant, sender, recipient,
rule, transport, host, ip, port, tls, reply, reason...), and ``message``, the
main log's line without its timestamp. Same events, same facts, so either log
can be read alone.
Untrusted input: addresses, HELO names and upstream replies; JSON escaping
(ASCII only) makes every control character and Unicode line separator inert
(no line can be forged or split) and each
text field is cut to `MAX_FIELD` characters. Bodies and secrets are never in
events.
Fails: like the main log: a write error is counted in `write_errors` and
echoed on stderr, never raised; `reopen()` raises if the new file cannot be
opened and keeps the old one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TextIO

from relayd.observe import events as ev
from relayd.observe.logfile import LogFile
from relayd.observe.logline import MAX_FIELD, arrival_auth, format_event
from relayd.observe.webhookbody import iso_time, kind_of
from relayd.values import DeliveryReport, QueueEntry, SmtpReply


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 3] + "..."


def _entry_fields(entry: QueueEntry) -> dict[str, object]:
    env = entry.envelope
    return {
        "queue_id": env.id, "tenant": env.tenant, "sender": _cut(env.sender),
        "recipients": [_cut(r.address) for r in entry.recipients] or [_cut(r) for r in env.recipients],
        "size": env.size, "client_ip": env.client_ip, "client_port": env.client_port,
        "helo": _cut(env.client_helo), "local_user": _cut(env.local_user), "protocol": env.protocol,
        "tls": env.tls, "auth": _cut(arrival_auth(env)),
        "message_id": _cut(env.header_message_id.strip().strip("<>")), "bounce_of": env.bounce_of,
    }


def _report_fields(report: DeliveryReport) -> dict[str, object]:
    return {
        "recipient": _cut(report.address), "rule": report.rule, "transport": report.transport,
        "host": _cut(report.host), "ip": report.ip, "port": report.port, "tls": report.tls,
        "reply": _cut(str(report.reply)) if report.reply is not None else None,
        "reason": _cut(report.reason),
    }


def _value(value: object) -> object:
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, SmtpReply):
        return _cut(str(value))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _cut(str(value))


def event_fields(event: ev.Event) -> dict[str, object]:
    """The event's facts by name: a queue entry and a delivery report are flattened into their fields."""
    fields: dict[str, object] = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "at":
            continue
        if isinstance(value, QueueEntry):
            fields.update(_entry_fields(value))
        elif isinstance(value, DeliveryReport):
            fields.update(_report_fields(value))
        elif f.name == "next_attempt" and isinstance(value, (int, float)):
            fields[f.name] = iso_time(value)
        else:
            fields[f.name] = _value(value)
    return fields


def json_record(event: ev.Event, *, utc: bool = False) -> dict[str, object] | None:
    """The JSON log object for `event`; None for an event the main log does not show either.

    `message` is the main log's line as `MainLog` with the same `utc` writes it
    (a deferral's "next try" in local time by default); `time` and
    `next_attempt` are RFC 3339 UTC whatever `utc` says.
    """
    message = format_event(event, utc=utc)
    if message is None:
        return None
    return {"time": iso_time(event.at), "event": kind_of(event), **event_fields(event), "message": message}


def json_line(event: ev.Event, *, utc: bool = False) -> str | None:
    record = json_record(event, utc=utc)
    if record is None:
        return None
    # ASCII only: a reply holding U+2028 or U+0085 must not split the line for
    # readers that treat those as line ends (Python's splitlines among them).
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


class JsonLog:
    """Writes one JSON object per line: `emit(event)` (the `EventSink` method); thread-safe.

    With `path` None the lines go to `stream` (stderr by default); `utc` as for `MainLog`.
    """

    def __init__(self, path: Path | None, *, stream: TextIO | None = None, utc: bool = False) -> None:
        self._utc = utc
        self._file = LogFile(path, stream=stream, on_error=_report_write_error)

    @property
    def write_errors(self) -> int:
        return self._file.write_errors

    def emit(self, event: ev.Event) -> None:
        line = json_line(event, utc=self._utc)
        if line is not None:
            self._file.write(line)

    def reopen(self) -> None:
        """Open the path again (after logrotate moved the file); the old file stays on failure."""
        self._file.reopen()

    def close(self) -> None:
        self._file.close()


def _report_write_error(exc: BaseException, _line: str) -> None:
    try:
        sys.stderr.write(f"relayd: JSON log write failed ({exc.__class__.__name__})\n")
    except (OSError, ValueError):
        pass
