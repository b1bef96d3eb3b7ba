"""The last few delivery failures, kept in memory for the status page.

Takes: every event (an `EventSink` in the daemon's fan-out); keeps recipients
deferred or failed and transports that could not be reached.
Emits: `latest()`, newest first, as `relayd.observe.status.FailureLine` values.
Untrusted input: upstream replies and addresses, kept as received (bounded
in length here); the page escapes them.
Bounds: at most `size` lines, each text cut to `MAX_TEXT` characters, so
memory stays fixed whatever the traffic. Nothing survives a restart: the main
log is the history.
"""

from __future__ import annotations

from collections import deque

from relayd.observe import events as ev
from relayd.observe.status import FailureLine

DEFAULT_SIZE = 20
MAX_TEXT = 300


class RecentFailures:
    """A ring of the last `size` failures (the `EventSink` method is `emit`)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._lines: deque[FailureLine] = deque(maxlen=size)

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, (ev.RecipientDeferred, ev.RecipientFailed)):
            kind = "failed" if isinstance(event, ev.RecipientFailed) else "deferred"
            report = event.report
            text = f"{report.reply.code} {report.reply.text}" if report.reply is not None else report.reason
            self._add(FailureLine(event.at, kind, event.queue_id, event.transport, event.recipient, text))
        elif isinstance(event, ev.HostFailed):
            self._add(FailureLine(event.at, "unreachable", event.queue_id, event.transport, "", event.reason))

    def _add(self, line: FailureLine) -> None:
        self._lines.append(FailureLine(line.at, line.kind, line.queue_id, line.transport,
                                       _cut(line.recipient), _cut(line.text)))

    def latest(self) -> list[FailureLine]:
        """The kept failures, newest first."""
        return list(reversed(self._lines))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"
