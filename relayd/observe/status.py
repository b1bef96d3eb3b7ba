"""What the relay looks like right now, as frozen values: the metrics' gauges and the status page read these.

Takes: nothing; the composition root builds them on the event loop from the
running stages (`relayd.ops.statussource`), at the moment of a scrape or a
page load.
Emits: nothing itself; `relayd.observe.metrics` turns them into gauges and
`relayd.observe.statuspage` into HTML.
Untrusted input: transport error texts and failure lines carry upstream
replies and addresses as received; the page escapes them and the metrics
never use them as labels.
Fails: never; these are plain values.

Queue states, one word each, so the numbers add up to the whole queue:
``queued`` due now or in delivery; ``deferred`` waiting for a recipient's own
retry time after an attempt; ``held`` due but kept back because every
transport of its route is closed by a gate (retry wait, rate limit, quota,
credential), with no attempt spent; ``frozen`` stopped by an operator.

Transport states, likewise one word: ``open``; ``down`` (the host retry wait
after a connection failure, or a token endpoint that does not answer);
``limited`` (a rate limit, a provider quota or any other gate that closed
it); ``reauthorise`` (its OAuth grant was refused: an operator must run
`relayctl oauth authorize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

QUEUE_STATES = ("queued", "deferred", "held", "frozen")
TRANSPORT_STATES = ("open", "limited", "down", "reauthorise")


@dataclass(frozen=True, slots=True)
class QueueGauges:
    """The queue at one moment: messages by state (`QUEUE_STATES`), and the oldest message's age (None: empty)."""

    by_state: Mapping[str, int]
    oldest_age: float | None

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


@dataclass(frozen=True, slots=True)
class TransportStatus:
    """One transport: its gate state now and its last success and error."""

    name: str
    state: str  # one of TRANSPORT_STATES
    reopens_at: float | None  # when a closed transport may take mail again; None while open
    reason: str  # why it is closed ("" while open)
    last_success: float | None
    last_error: str | None
    last_error_at: float | None
    hint: str | None  # one sentence on what usually fixes last_error


@dataclass(frozen=True, slots=True)
class SpoolSpace:
    """Room on the spool's file system; below `reserve_bytes` free, new mail gets 452 4.3.1."""

    free_bytes: int | None  # None: statvfs failed
    total_bytes: int | None
    reserve_bytes: int


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    name: str
    address: str
    port: int
    tls: str


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """One tenant's use of one quota window; `limit` None: no quota for that window."""

    tenant: str
    window: str
    used: int
    limit: int | None

    @property
    def ratio(self) -> float | None:
        if not self.limit:
            return None
        return self.used / self.limit


@dataclass(frozen=True, slots=True)
class FailureLine:
    """One recent failure: a recipient deferred or failed, or a transport that could not be reached."""

    at: float
    kind: str  # "failed", "deferred" or "unreachable"
    queue_id: str
    transport: str
    recipient: str
    text: str  # the upstream reply or the connection error


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything the status page shows, taken at `taken_at`."""

    taken_at: float
    hostname: str
    listeners: Sequence[ListenerStatus]
    queue: QueueGauges | None  # None until the queue index is loaded
    spool: SpoolSpace
    transports: Sequence[TransportStatus]
    usage: Sequence[TenantUsage]
    failures: Sequence[FailureLine]  # newest first


TransportReader = Callable[[], "Sequence[TransportStatus] | None"]
QueueReader = Callable[[], "QueueGauges | None"]
SpoolReader = Callable[[], "SpoolSpace | None"]
StatusReader = Callable[[], "StatusSnapshot | None"]
# Where tenant usage comes from: the tenant quota stage, when there is one.
UsageSource = Callable[[], Sequence[TenantUsage]]
