"""What happened, as frozen values: the seam between the stages and whoever records it.

Takes: nothing; the stages (listener, delivery, daemon, control) build one
event value per fact and hand it to an `EventSink`.
Emits: nothing itself. The sinks are the Exim-shaped main log
(`relayd.observe.mainlog.MainLog`), the Prometheus metrics (`relayd.observe.metrics.RelayMetrics`)
and the recent-outcomes ring the control socket answers from
(`relayd.observe.outcomes.RecentOutcomes`); the daemon composes them with `FanOut`.
With relay.yaml's say, also the JSON log (`relayd.observe.jsonlog.JsonLog`) and
the webhooks (`relayd.observe.webhooks.WebhookSink`).
Untrusted input: addresses, HELO names, logins and upstream replies travel in
these values as received; every sink escapes what it writes (the main log
through `mainlog.sanitize`) and never uses such text as a metric label.
Fails: `FanOut` never lets one sink's exception reach a stage or stop the
other sinks: recording an event must never stop mail from moving.

Every event carries `at`, the wall-clock time it was built.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union

from relayd.values import DeliveryReport, QueueEntry


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageArrived:
    """A message is durable in the queue and its 250 is going out."""

    entry: QueueEntry
    at: float = field(default_factory=_now)

    @property
    def queue_id(self) -> str:
        return self.entry.id

    @property
    def tenant(self) -> str:
        return self.entry.envelope.tenant


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientOutcome:
    """Fields shared by the three per-recipient verdicts of one delivery attempt."""

    queue_id: str
    tenant: str
    sender: str
    message_id: str  # the Message-ID header, "" when the message had none
    report: DeliveryReport  # recipient, rule, transport, host, upstream reply, reason
    attempt: int  # the attempt number for this recipient (1 for the first)
    at: float = field(default_factory=_now)

    @property
    def recipient(self) -> str:
        return self.report.address

    @property
    def transport(self) -> str:
        return self.report.transport


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientDelivered(RecipientOutcome):
    """The upstream accepted the recipient. `first` False: a further recipient of the same transaction."""

    first: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientDeferred(RecipientOutcome):
    """A temporary failure; `next_attempt` is when the queue tries again (None: unknown)."""

    next_attempt: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientFailed(RecipientOutcome):
    """A permanent failure. `bounce_discarded`: the message was itself a bounce, so nobody is told."""

    bounce_discarded: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HostFailed:
    """A transport could not be reached; its recipients go on to the next transport in the chain."""

    queue_id: str
    transport: str
    host: str
    ip: str
    port: int
    reason: str
    reason_label: str  # a small fixed word or an SMTP code, safe as a metric label
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamAttempted:
    """One upstream transaction ended: its duration and whether the transport was reachable."""

    transport: str
    seconds: float
    reachable: bool
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageCompleted:
    """Every recipient reached a final state (or an operator removed the message)."""

    queue_id: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class BounceCreated:
    """A delivery status notification to `sender` was queued as `bounce_id`."""

    queue_id: str
    bounce_id: str
    tenant: str
    sender: str
    size: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class BounceSuppressed:
    """A failure was recorded but no bounce sent (the message was Auto-Submitted)."""

    queue_id: str
    sender: str
    reason: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpRefused:
    """A command was refused on a submission listener.

    `logged` False: counted, but this connection already logged its share of
    rejections (the listener's per-connection log gate).
    """

    client_ip: str
    stage: str  # CONNECT, MAIL, RCPT, DATA...: a fixed word, used as the metric label
    reply: str
    detail: str = ""
    address: str | None = None
    logged: bool = True
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectionsNotLogged:
    """At the end of a connection: how many of its rejections were counted but not logged."""

    client_ip: str
    count: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthFailed:
    """SMTP AUTH with a wrong login or password (the password is never carried)."""

    client_ip: str
    login: str | None
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthThrottled:
    """SMTP AUTH refused before checking, after too many failures."""

    client_ip: str
    login: str
    reason: str
    retry_after: float
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRefused:
    """A connection over a listener's limits; `logged` False when the log gate held the line back."""

    client_ip: str
    reason: str
    suppressed: int = 0  # earlier similar refusals not logged
    logged: bool = True
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOpened:
    """A client SMTP session was admitted."""

    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionClosed:
    """An admitted client SMTP session ended."""

    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionDropped:
    """relayd closed a session with a 421 (protocol errors, idle eviction, deadlines)."""

    client_ip: str
    reason: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorAction:
    """An operator acted through relayctl. `queue_id` "" for a queue-wide action (flush)."""

    action: str  # one of OPERATOR_ACTIONS
    user: str
    queue_id: str = ""
    count: int = 0  # for flush: messages forced
    at: float = field(default_factory=_now)


OPERATOR_ACTIONS = frozenset({"freeze", "thaw", "remove", "giveup", "flush"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolRefusedMessage:
    """The spool could not take a new message; the client got a 452 (full) or 451."""

    full: bool
    error: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolSetAside:
    """A damaged spool file was moved out of the queue."""

    queue_id: str
    error: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolCannotRecord:
    """A delivery outcome is known but could not be written; delivery of the message is held."""

    queue_id: str
    error: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageHeldLong:
    """A message waiting for a transport's limit (not failing) has reached half its maximum age.

    Once per message: past `max_age` it fails with "retry timeout exceeded"
    like any deferred message, so the operator hears of it while there is
    time to raise the limit or add a transport.
    """

    queue_id: str
    tenant: str
    held_for: float  # seconds since the message arrived
    max_age: float
    reason: str  # "gmail_acme daily quota 500 reached, resets 00:00 UTC"
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaAlert:
    """A tenant's usage reached `percent` of a quota window's cap; once per window (and per store)."""

    tenant: str
    window: str  # "day" or "month": a fixed word, used as the metric label
    used: int
    limit: int
    percent: int
    resets: str  # "2026-12-02 00:00 UTC"
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaHeld:
    """A tenant over its quota with `on_quota: hold`: the message is queued, held until `resets`."""

    queue_id: str
    tenant: str
    reason: str  # "daily quota of tenant acme reached (1000 messages), resets 2026-12-02 00:00 UTC"
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageStoreChanged:
    """The shared usage counters could not be reached (`shared` False: this node counts against its
    local share of every cap) or can again (`shared` True)."""

    store: str  # "redis 10.0.0.5:6379/0"
    shared: bool
    detail: str = ""
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolRecovered:
    """A held delivery outcome was written after all."""

    queue_id: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class IncompleteDiscarded:
    """A message whose receiver stopped before it was durable was removed (its client got no 250)."""

    queue_id: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonStarted:
    """The listeners are bound; `listening` names them for the log."""

    listening: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonStopping:
    """The daemon stopped accepting connections."""

    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonStopped:
    """The daemon finished winding down."""

    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigReloaded:
    """A new configuration took effect."""

    source: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthTokenRefreshed:
    """A credential got a new OAuth access token from its provider."""

    credential: str
    account: str
    expires_in: float
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthTokenFailed:
    """A credential could not get an access token; its transports wait (mail is kept).

    `needs_reauthorisation`: only an operator can fix it (consent revoked,
    secret expired), with `command`; otherwise the endpoint is retried.
    """

    credential: str
    reason: str  # one sentence, never a secret
    needs_reauthorisation: bool
    command: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """Any other daemon fact for the operator, at `level` "" (info), "warning" or "error"."""

    text: str
    level: str = ""
    at: float = field(default_factory=_now)


Event = Union[
    MessageArrived, RecipientDelivered, RecipientDeferred, RecipientFailed, HostFailed,
    UpstreamAttempted, MessageCompleted, BounceCreated, BounceSuppressed, SmtpRefused,
    RejectionsNotLogged, AuthFailed, AuthThrottled, ConnectionRefused, SessionOpened,
    SessionClosed, SessionDropped, OperatorAction, SpoolRefusedMessage, SpoolSetAside,
    SpoolCannotRecord, SpoolRecovered, IncompleteDiscarded, DaemonStarted, DaemonStopping,
    DaemonStopped, ConfigReloaded, OAuthTokenRefreshed, OAuthTokenFailed, Notice, MessageHeldLong,
    QuotaAlert, QuotaHeld, UsageStoreChanged,
]


class EventSink(Protocol):
    """Whatever records events: the main log, the metrics, a ring, a JSON log, a webhook outbox."""

    def emit(self, event: Event) -> None:
        """Record `event`. Called on the event loop: must not block for long."""


class FanOut:
    """One sink that hands each event to several, in order; a failing sink does not stop the rest."""

    def __init__(self, sinks: Sequence[EventSink]) -> None:
        self._sinks = tuple(sinks)
        self.sink_errors = 0

    def add(self, sink: EventSink) -> None:
        """Hand every later event to `sink` as well (after the sinks already there)."""
        self._sinks = (*self._sinks, sink)

    def emit(self, event: Event) -> None:
        for sink in self._sinks:
            try:
                sink.emit(event)
            except Exception as exc:  # a sink's bug must not stop mail or the other sinks
                self.sink_errors += 1
                _report_sink_error(sink, event, exc)


class NullSink:
    """Discards every event (tests and tools that record nothing)."""

    def emit(self, event: Event) -> None:
        return None


def _report_sink_error(sink: EventSink, event: Event, exc: Exception) -> None:
    try:
        sys.stderr.write(
            f"relayd: {type(sink).__name__} failed on {type(event).__name__}: {type(exc).__name__}: {exc}\n"
        )
    except (OSError, ValueError):
        pass
