"""Small frozen values that the stages hand to each other.

Nothing here does I/O. The listener produces an `Envelope`, the spool keeps a
`QueueEntry` per message, the router answers with a `Route`, a transport
answers each attempt with an `AttemptResult`, and the outcome stage turns those
into new `Recipient` states. Keeping these immutable means a stage can never
change what another stage is still looking at.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TypedDict, Unpack


class RecipientState(enum.Enum):
    """Where one recipient of a queued message stands.

    pending -> delivered | deferred | failed; deferred -> delivered | deferred | failed.
    "In flight" is not a stored state: it lives only in the scheduler's memory,
    so a crash mid-delivery leaves the recipient pending or deferred and it is
    tried again (at-least-once).
    """

    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


_ALLOWED_TRANSITIONS: dict[RecipientState, frozenset[RecipientState]] = {
    RecipientState.PENDING: frozenset(
        {RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED}
    ),
    RecipientState.DEFERRED: frozenset(
        {RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED}
    ),
    RecipientState.DELIVERED: frozenset(),
    RecipientState.FAILED: frozenset(),
}


class IllegalTransition(ValueError):
    """A recipient was asked to move to a state its current state cannot reach."""


def check_transition(old: RecipientState, new: RecipientState) -> None:
    if new not in _ALLOWED_TRANSITIONS[old]:
        raise IllegalTransition(f"recipient cannot go from {old.value} to {new.value}")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a client submitted, as it was accepted.

    `sender` is "" for the null reverse-path (bounces). `bounce_of` names the
    message a delivery status notification reports on, so a failing bounce is
    never bounced again.
    """

    id: str
    tenant: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    size: int
    client_ip: str = ""
    client_port: int = 0
    client_helo: str = ""
    local_user: str = ""  # "uid/name" of a local submitter on a Unix-socket listener
    tls: str = ""  # protocol version the client used, e.g. "TLSv1.3"; "" for none
    smtputf8: bool = False
    bounce_of: str | None = None
    protocol: str = "esmtpsa"
    header_message_id: str = ""
    auth_mechanism: str = ""  # "plain" or "login" after SMTP AUTH; "" for a tenant known by its address

    @property
    def is_bounce(self) -> bool:
        return self.sender == ""


class RecipientChanges(TypedDict, total=False):
    """The fields a state change may set besides the state itself."""

    attempts: int
    first_failure: float | None
    next_attempt: float | None
    last_error: str | None
    last_interval: float | None


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient's delivery state, as recorded in the spool."""

    address: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    first_failure: float | None = None
    next_attempt: float | None = None
    last_error: str | None = None
    last_interval: float | None = None

    def moved_to(self, new: RecipientState, **changes: Unpack[RecipientChanges]) -> "Recipient":
        """Return this recipient in a new state; raises IllegalTransition."""
        check_transition(self.state, new)
        return replace(self, state=new, **changes)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A message in the queue: its envelope and per-recipient state."""

    envelope: Envelope
    recipients: tuple[Recipient, ...]
    frozen: bool = False

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def undelivered(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if not r.state.is_final)

    @property
    def is_complete(self) -> bool:
        return all(r.state.is_final for r in self.recipients)

    def next_due(self) -> float | None:
        """Earliest time any open recipient wants an attempt (None: nothing to do)."""
        times = [
            r.next_attempt if r.next_attempt is not None else self.envelope.received_at
            for r in self.undelivered
        ]
        return min(times) if times else None


@dataclass(frozen=True, slots=True)
class Route:
    """Where the router sends a recipient: the matching rule and its transport chain."""

    rule: str
    transports: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """An SMTP reply as received from, or sent to, a peer."""

    code: int
    text: str

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Stage(enum.Enum):
    """Where in an upstream SMTP conversation something happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "EHLO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    AFTER_DATA = "end of data"
    WRITE = "write"


class AttemptOutcome(enum.Enum):
    """What one attempt means for one recipient (decided by failover.classify)."""

    DELIVERED = "delivered"
    NEXT_TRANSPORT = "next_transport"
    DEFER = "defer"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One upstream transaction to attempt: a message to some of its recipients."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The verdict for one recipient after one attempt on one transport."""

    address: str
    outcome: AttemptOutcome
    stage: Stage
    reply: SmtpReply | None = None
    detail: str = ""
    # The reply was made up by relayd (e.g. "upstream lacks SMTPUTF8"), not
    # sent by the upstream: the reason is the detail, never "remote server said".
    local: bool = False

    def describe(self) -> str:
        """A human reason in Exim's words, for the log and for DSNs."""
        if self.local and self.detail:
            return self.detail
        if self.reply is not None:
            after = self.stage.value
            return f"SMTP error from remote mail server after {after}: {self.reply}"
        return self.detail or self.stage.value


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one transport did with one `Delivery`.

    `host`/`ip`/`port` describe the upstream actually talked to (for H= in the
    log); `connection_failed` is true when the transport as a whole was unusable
    (refused, timeout, TLS, AUTH, 421), which makes the scheduler skip it for
    other messages until its own retry time.
    """

    transport: str
    results: tuple[RecipientResult, ...]
    host: str = ""
    ip: str = ""
    port: int = 0
    tls: str = ""
    connection_failed: bool = False
    detail: str = ""

    def for_address(self, address: str) -> RecipientResult | None:
        for r in self.results:
            if r.address == address:
                return r
        return None


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """The final word on one recipient after walking its whole chain once."""

    address: str
    outcome: AttemptOutcome
    rule: str
    transport: str = ""
    host: str = ""
    ip: str = ""
    port: int = 0
    tls: str = ""
    reply: SmtpReply | None = None
    reason: str = ""
    tried: tuple[str, ...] = field(default_factory=tuple)
