"""The queue as it travels over the control socket: compact rows, whole messages, counts.

Takes: `QueueEntry` values on the daemon's side; the JSON the daemon sent, on
relayctl's side.
Emits: `wire_row` (one compact array per message, for `queue.list`),
`entry_to_json` (every envelope and recipient field, for `queue.show`), the
queue's counts by state (for `status` and the metrics gauges), and the same
read back as `QueueRow` / `QueueEntry` values.
Untrusted input: what arrives over the socket; a row or message of the wrong
shape, or a field of the wrong type, raises ValueError.
Pure: no I/O, no clock, no globals. Shared by the daemon (relayd.ops.control)
and the CLI (relayd.ops.queueview, relayd.ops.cli_queue); nothing here formats text
for a human.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

from relayd.jsonwire import JsonObject, JsonValue, as_float, as_int
from relayd.values import Envelope, QueueEntry, Recipient, RecipientState

# One letter per recipient state on the wire (keeps 100,000 rows small).
_STATE_LETTER = {
    RecipientState.PENDING: "P",
    RecipientState.DELIVERED: "D",
    RecipientState.DEFERRED: "Z",
    RecipientState.FAILED: "F",
}
_LETTER_STATE = {letter: state for state, letter in _STATE_LETTER.items()}


@dataclass(frozen=True, slots=True)
class RecipientRow:
    address: str
    state: RecipientState
    attempts: int
    next_attempt: float | None


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One queued message as `mailq` needs it (no body, no last errors)."""

    id: str
    tenant: str
    sender: str
    received_at: float
    size: int
    frozen: bool
    in_flight: bool
    recipients: tuple[RecipientRow, ...]

    @property
    def open_recipients(self) -> tuple[RecipientRow, ...]:
        return tuple(r for r in self.recipients if not r.state.is_final)

    def next_due(self) -> float | None:
        times = [
            r.next_attempt if r.next_attempt is not None else self.received_at
            for r in self.open_recipients
        ]
        return min(times) if times else None


# --------------------------------------------------------------- wire rows


def wire_row(entry: QueueEntry, in_flight: bool) -> list[JsonValue]:
    """A compact JSON array for one message (what `queue.list` sends)."""
    env = entry.envelope
    recipients: list[JsonValue] = [
        [r.address, _STATE_LETTER[r.state], r.attempts, r.next_attempt] for r in entry.recipients
    ]
    return [
        env.id,
        env.tenant,
        env.sender,
        env.received_at,
        env.size,
        1 if entry.frozen else 0,
        1 if in_flight else 0,
        recipients,
    ]


def _recipient_row(obj: JsonValue) -> RecipientRow:
    if not isinstance(obj, list):
        raise TypeError("not a list")
    a, s, n, t = obj
    if not isinstance(s, str):
        raise TypeError("not a state letter")
    return RecipientRow(str(a), _LETTER_STATE[s], as_int(n), None if t is None else as_float(t))


def row_from_wire(obj: JsonValue) -> QueueRow:
    """Read a `wire_row` back; ValueError when it does not have that shape."""
    try:
        if not isinstance(obj, list):
            raise TypeError("not a list")
        mid, tenant, sender, received, size, frozen, in_flight, rcpts = obj
        if not isinstance(rcpts, list):
            raise TypeError("not a list")
        recipients = tuple(_recipient_row(r) for r in rcpts)
        return QueueRow(
            str(mid), str(tenant), str(sender), as_float(received), as_int(size),
            bool(frozen), bool(in_flight), recipients,
        )
    except (TypeError, ValueError, KeyError):
        raise ValueError("malformed queue row") from None


def entry_to_json(entry: QueueEntry) -> JsonObject:
    """Every envelope and recipient field (what `queue.show` sends)."""
    env = entry.envelope
    envelope: JsonObject = {name: getattr(env, name) for name in Envelope.__dataclass_fields__}
    envelope["recipients"] = list(env.recipients)
    recipients: list[JsonValue] = [
        {name: getattr(r, name) for name in Recipient.__dataclass_fields__} | {"state": r.state.value}
        for r in entry.recipients
    ]
    return {"envelope": envelope, "recipients": recipients, "frozen": entry.frozen}


def entry_from_json(obj: JsonValue) -> QueueEntry:
    """Read `entry_to_json` back, checking every field's type; ValueError when it does not fit."""
    try:
        fields = _object(obj)
        recipients = fields["recipients"]
        if not isinstance(recipients, list):
            raise TypeError("not a list")
        return QueueEntry(
            _envelope(_object(fields["envelope"])),
            tuple(_recipient(_object(r)) for r in recipients),
            bool(fields["frozen"]),
        )
    except (TypeError, ValueError, KeyError):
        raise ValueError("malformed message description") from None


def _object(value: JsonValue) -> JsonObject:
    if not isinstance(value, dict):
        raise TypeError("not an object")
    return value


def _text(value: JsonValue) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _optional_text(value: JsonValue) -> str | None:
    return None if value is None else _text(value)


def _flag(value: JsonValue) -> bool:
    if not isinstance(value, bool):
        raise TypeError("not true or false")
    return value


def _integer(value: JsonValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _number(value: JsonValue) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("not a number")
    return value


def _optional_number(value: JsonValue) -> float | None:
    return None if value is None else _number(value)


def _envelope(o: JsonObject) -> Envelope:
    """Each field checked for its type, so a wrong one is an error here, not a surprise later."""
    addresses = o["recipients"]
    if not isinstance(addresses, list):
        raise TypeError("not a list")
    return Envelope(
        id=_text(o["id"]), tenant=_text(o["tenant"]), sender=_text(o["sender"]),
        recipients=tuple(_text(a) for a in addresses),
        received_at=_number(o["received_at"]), size=_integer(o["size"]),
        client_ip=_text(o["client_ip"]), client_port=_integer(o["client_port"]),
        client_helo=_text(o["client_helo"]), local_user=_text(o["local_user"]), tls=_text(o["tls"]),
        smtputf8=_flag(o["smtputf8"]), bounce_of=_optional_text(o["bounce_of"]), protocol=_text(o["protocol"]),
        header_message_id=_text(o["header_message_id"]), auth_mechanism=_text(o["auth_mechanism"]),
    )


def _recipient(o: JsonObject) -> Recipient:
    return Recipient(
        address=_text(o["address"]), state=RecipientState(o["state"]), attempts=_integer(o["attempts"]),
        first_failure=_optional_number(o["first_failure"]), next_attempt=_optional_number(o["next_attempt"]),
        last_error=_optional_text(o["last_error"]), last_interval=_optional_number(o["last_interval"]),
    )


# ----------------------------------------------------------------- counts


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """The queue by state and the age of its oldest message (None when empty)."""

    total: int
    active: int
    deferred: int
    frozen: int
    oldest_age: float | None

    def by_state(self) -> dict[str, int]:
        return {"active": self.active, "deferred": self.deferred, "frozen": self.frozen}

    def as_json(self) -> dict[str, int | float | None]:
        return {"total": self.total, **self.by_state(), "oldest_age": self.oldest_age}


def queue_counts(
    entries: Iterable[QueueEntry],
    in_flight: Collection[str],
    now: float,
    waiting: Mapping[str, float] | None = None,
) -> QueueCounts:
    """Messages by state (active/deferred/frozen) and the oldest message's age.

    A message in delivery counts as active; one that is due but held back
    because every transport is in its retry wait (`waiting`) as deferred.
    Written as one plain loop: it runs on the daemon's event loop over the
    whole queue.
    """
    waiting = waiting or {}
    active = deferred = frozen = total = 0
    oldest: float | None = None
    final = (RecipientState.DELIVERED, RecipientState.FAILED)
    for entry in entries:
        total += 1
        env = entry.envelope
        received = env.received_at
        if oldest is None or received < oldest:
            oldest = received
        if entry.frozen:
            frozen += 1
            continue
        mid = env.id
        if mid in in_flight:
            active += 1
            continue
        due: float | None = None
        for r in entry.recipients:
            if r.state in final:
                continue
            t = received if r.next_attempt is None else r.next_attempt
            if due is None or t < due:
                due = t
        held = waiting.get(mid)
        if held is not None and (due is None or held > due):
            due = held
        if due is not None and due > now:
            deferred += 1
        else:
            active += 1
    return QueueCounts(total, active, deferred, frozen, None if oldest is None else max(0.0, now - oldest))
