"""Recent events per queue id, kept in memory for the control socket.

Takes: every event (it is an `EventSink` in the daemon's fan-out).
Emits: answers to "what happened to message X since mark M" (`lines_since`)
and "what became of recipient R of message X" (`outcome`), so relayctl's
`queue deliver` and `send-test` learn outcomes from events, never by reading
the text log back.
Untrusted input: the events' addresses and replies; the lines are the main
log's own (sanitised) text.
Formatting is left to the reader: recording an event costs an append, the
line is made (with `logline.format_event`, the same text as the log file)
only when the control socket asks.
Bounds: at most `max_messages` queue ids (the least recently touched is
dropped first) and `max_per_message` lines each, so memory stays fixed
whatever the traffic. Nothing survives a restart; the main log file is the
history.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from relayd.observe import events as ev
from relayd.observe.logline import format_event, format_timestamp

MAX_MESSAGES = 4096
MAX_PER_MESSAGE = 64


@dataclass(frozen=True, slots=True)
class Recorded:
    """One event about a message and its order number; its log line is only made when asked for."""

    seq: int
    event: ev.Event


@dataclass(frozen=True, slots=True)
class RecipientVerdict:
    """What became of one recipient: delivered, deferred or failed, and the log line's detail."""

    outcome: str
    detail: str  # the main log line after the marker: ``addr R=.. T=.. H=.. C="..."``


class RecentOutcomes:
    """A bounded ring of recent events indexed by queue id (the `EventSink` method is `emit`)."""

    def __init__(
        self, *, max_messages: int = MAX_MESSAGES, max_per_message: int = MAX_PER_MESSAGE, utc: bool = False
    ) -> None:
        self._max_messages = max_messages
        self._max_per_message = max_per_message
        self._utc = utc
        self._seq = 0
        self._by_id: OrderedDict[str, deque[Recorded]] = OrderedDict()

    def mark(self) -> int:
        """The order number of the latest event; `lines_since(id, mark)` gives what came after it."""
        return self._seq

    def emit(self, event: ev.Event) -> None:
        ids = _queue_ids(event)
        if not ids:
            return
        self._seq += 1
        record = Recorded(self._seq, event)
        for queue_id in ids:
            self._remember(queue_id, record)

    def lines_since(self, queue_id: str, mark: int = 0) -> list[str]:
        """The main log lines about `queue_id` recorded after `mark`, oldest first."""
        lines = (self._line(r.event) for r in self._by_id.get(queue_id, ()) if r.seq > mark)
        return [line for line in lines if line is not None]

    def outcome(self, queue_id: str, recipient: str, mark: int = 0) -> RecipientVerdict | None:
        """The first verdict for `recipient` of `queue_id` after `mark`; None while there is none."""
        for record in self._by_id.get(queue_id, ()):
            event = record.event
            if record.seq <= mark or not isinstance(event, ev.RecipientOutcome):
                continue
            if event.queue_id != queue_id or event.recipient != recipient:
                continue
            text = format_event(event, utc=self._utc) or ""
            detail = text.partition(f"{queue_id} ")[2][3:]  # after "=> ", "-> ", "** " or "== "
            return RecipientVerdict(_verdict(event), detail)
        return None

    def _line(self, event: ev.Event) -> str | None:
        """The main log line for `event`, stamped with the time the event happened."""
        text = format_event(event, utc=self._utc)
        return None if text is None else f"{format_timestamp(event.at, utc=self._utc)} {text}"

    def _remember(self, queue_id: str, record: Recorded) -> None:
        lines = self._by_id.get(queue_id)
        if lines is None:
            lines = self._by_id[queue_id] = deque(maxlen=self._max_per_message)
            while len(self._by_id) > self._max_messages:
                self._by_id.popitem(last=False)
        else:
            self._by_id.move_to_end(queue_id)
        lines.append(record)


def _verdict(event: ev.RecipientOutcome) -> str:
    if isinstance(event, ev.RecipientDelivered):
        return "delivered"
    return "failed" if isinstance(event, ev.RecipientFailed) else "deferred"


def _queue_ids(event: ev.Event) -> tuple[str, ...]:
    """The messages an event is about; a bounce's creation is about the bounce and its original."""
    if isinstance(event, ev.BounceCreated):
        return (event.queue_id, event.bounce_id)
    if isinstance(event, ev.MessageArrived):
        return (event.queue_id,)
    queue_id = getattr(event, "queue_id", "")
    return (queue_id,) if isinstance(queue_id, str) and queue_id else ()
