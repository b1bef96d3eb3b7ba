"""The queue as it travels over the control socket: compact rows, whole messages, counts.

Takes: `QueueEntry` values on the daemon's side; the JSON the daemon sent, on
relayctl's side.
Emits: `wire_row` (one compact array per message, for `queue.list`),
`entry_to_json` (every envelope and recipient field, for `queue.show`), the
queue's counts by state (for `status` and the metrics gauges), and the same
read back as `QueueRow` / `QueueEntry` values.
Untrusted input: what arrives over the socket; a row or message of the wrong
shape raises ValueError.
Pure: no I/O, no clock, no globals. Shared by the daemon (relayd.ops.control)
and the CLI (relayd.ops.queueview, relayd.ops.cli_queue); nothing here formats text
for a human.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping

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


def wire_row(entry: QueueEntry, in_flight: bool) -> list[Any]:
    """A compact JSON array for one message (what `queue.list` sends)."""
    env = entry.envelope
    return [
        env.id,
        env.tenant,
        env.sender,
        env.received_at,
        env.size,
        1 if entry.frozen else 0,
        1 if in_flight else 0,
        [[r.address, _STATE_LETTER[r.state], r.attempts, r.next_attempt] for r in entry.recipients],
    ]


def row_from_wire(obj: Any) -> QueueRow:
    """Read a `wire_row` back; ValueError when it does not have that shape."""
    try:
        mid, tenant, sender, received, size, frozen, in_flight, rcpts = obj
        recipients = tuple(
            RecipientRow(str(a), _LETTER_STATE[s], int(n), None if t is None else float(t))
            for a, s, n, t in rcpts
        )
        return QueueRow(
            str(mid), str(tenant), str(sender), float(received), int(size),
            bool(frozen), bool(in_flight), recipients,
        )
    except (TypeError, ValueError, KeyError):
        raise ValueError("malformed queue row") from None


def entry_to_json(entry: QueueEntry) -> dict[str, Any]:
    """Every envelope and recipient field (what `queue.show` sends)."""
    env = entry.envelope
    envelope = {name: getattr(env, name) for name in Envelope.__dataclass_fields__}
    envelope["recipients"] = list(env.recipients)
    recipients = [
        {name: getattr(r, name) for name in Recipient.__dataclass_fields__} | {"state": r.state.value}
        for r in entry.recipients
    ]
    return {"envelope": envelope, "recipients": recipients, "frozen": entry.frozen}


def entry_from_json(obj: Any) -> QueueEntry:
    """Read `entry_to_json` back; ValueError when it does not have that shape."""
    try:
        env_fields = dict(obj["envelope"])
        env_fields["recipients"] = tuple(str(a) for a in env_fields["recipients"])
        envelope = Envelope(**env_fields)
        recipients = tuple(
            Recipient(**(dict(r) | {"state": RecipientState(r["state"])})) for r in obj["recipients"]
        )
        return QueueEntry(envelope, recipients, bool(obj["frozen"]))
    except (TypeError, ValueError, KeyError):
        raise ValueError("malformed message description") from None


# ----------------------------------------------------------------- counts


def queue_counts(
    entries: Iterable[QueueEntry],
    in_flight: Collection[str],
    now: float,
    waiting: Mapping[str, float] | None = None,
) -> dict[str, Any]:
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
    return {
        "total": total, "active": active, "deferred": deferred, "frozen": frozen,
        "oldest_age": None if oldest is None else max(0.0, now - oldest),
    }
