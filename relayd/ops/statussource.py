"""The relay's present state, read from the running stages for the metrics and the status page, and the listener serving both.

Takes: the queue index (entries, messages in delivery, messages held back by
the gates), the gate set and the upstream health records, the bound
listeners, the recent failures and, when there is a tenant quota stage, its
usage; all read on the event loop that owns them (through
`relayd.observe.metrics.loop_reader` when asked from the exporter's thread).
Emits: `relayd.observe.status` values: `QueueGauges`, `TransportStatus`,
`StatusSnapshot`.
Untrusted input: error texts in the health records (kept as they are; the
page escapes them).
Fails: never for a transport a gate does not know (it is open);
`status_login` raises CredentialError for a `metrics: status_auth:` login
missing from the credential store (relayd does not start, a reload is refused).

Tenant usage is a seam: `RelayPresent.usage` returns nothing until a tenant
quota stage hands the daemon a reader of `TenantUsage` values (tenant, window,
used, limit); the page then draws one bar per tenant and window.

Which word a closed gate maps to (see `relayd.observe.status`): the host
retry state (`retry`) is ``down``; the OAuth gate (`oauth`) is
``reauthorise`` when its reason says the grant needs re-authorising and
``down`` when the token endpoint did not answer; every other gate (rate
limits, provider quotas) is ``limited``. A new gate is ``limited`` until it
is given a word here.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from relayd.config.credentials import CredentialError, CredentialStore, UpstreamCredential
from relayd.config.model import RelayConfig
from relayd.delivery.failover import hint_for
from relayd.delivery.gates import Gate, GateVerdict
from relayd.delivery.upstreamhealth import UpstreamHealth, UpstreamRecord, UpstreamState
from relayd.observe.failures import RecentFailures
from relayd.observe.httpserve import BasicAuth, ObserveApp, start_observe_server
from relayd.observe.metrics import RelayMetrics, loop_reader
from relayd.queue.scheduler import Scheduler
from relayd.queue.spoolroom import SpoolRoom
from relayd.observe.status import (
    FailureLine,
    ListenerStatus,
    QueueGauges,
    SpoolSpace,
    StatusSnapshot,
    TenantUsage,
    TransportStatus,
    UsageSource,
)
from relayd.values import QueueEntry, RecipientState, SmtpReply, Stage

_REPLY = re.compile(r"\b([2-5][0-9][0-9])[ -](.+)")
_STAGE_WORDS = (("STARTTLS", Stage.STARTTLS), ("TLS", Stage.STARTTLS), ("AUTH", Stage.AUTH),
                ("certificate", Stage.CONNECT), ("greeting", Stage.GREETING), ("EHLO", Stage.EHLO))


def queue_gauges(
    entries: Iterable[QueueEntry], in_flight: Collection[str], waiting: Mapping[str, float], now: float
) -> QueueGauges:
    """The queue by state (queued, deferred, held, frozen) and the oldest message's age.

    A message in delivery is queued. One whose recipients wait for their own
    retry time is deferred, even when a gate would hold it as well: that
    time comes first. One that is due but put back by the gates is held.
    One plain loop: it runs on the event loop over the whole queue.
    """
    queued = deferred = held = frozen = 0
    oldest: float | None = None
    final = (RecipientState.DELIVERED, RecipientState.FAILED)
    for entry in entries:
        env = entry.envelope
        if oldest is None or env.received_at < oldest:
            oldest = env.received_at
        if entry.frozen:
            frozen += 1
            continue
        if env.id in in_flight:
            queued += 1
            continue
        due: float | None = None
        for r in entry.recipients:
            if r.state in final:
                continue
            t = env.received_at if r.next_attempt is None else r.next_attempt
            if due is None or t < due:
                due = t
        if due is not None and due > now:
            deferred += 1
        elif waiting.get(env.id, 0.0) > now:
            held += 1
        else:
            queued += 1
    by_state = {"queued": queued, "deferred": deferred, "held": held, "frozen": frozen}
    return QueueGauges(by_state, None if oldest is None else max(0.0, now - oldest))


def state_word(verdict: GateVerdict) -> str:
    """The transport state a gate verdict stands for (see the module docstring)."""
    if verdict.is_open:
        return "open"
    if verdict.gate == "retry":
        return "down"
    if verdict.gate == "oauth":
        return "reauthorise" if "re-authoris" in verdict.reason else "down"
    return "limited"


def error_hint(provider: str | None, error: str) -> str | None:
    """What usually fixes a transport's last error, from the error text alone."""
    match = _REPLY.search(error)
    reply = SmtpReply(int(match.group(1)), match.group(2)) if match else None
    stage = next((s for word, s in _STAGE_WORDS if word in error), Stage.CONNECT if reply is None else Stage.MAIL)
    return hint_for(provider, stage, reply, error)


def transport_statuses(
    config: RelayConfig,
    gates: Gate,
    health: Mapping[str, tuple[UpstreamRecord, UpstreamState | None]],
    now: float,
) -> list[TransportStatus]:
    """Every configured transport's gate state and its last success and error, by name."""
    statuses = []
    for name in sorted(config.transports):
        verdict = gates.check(name, now)
        record = health.get(name, (UpstreamRecord(), None))[0]
        provider = getattr(config.transports[name], "provider", None)
        statuses.append(TransportStatus(
            name=name,
            state=state_word(verdict),
            reopens_at=verdict.until,
            reason=verdict.reason,
            last_success=record.last_success,
            last_error=record.last_error,
            last_error_at=record.last_error_at,
            hint=error_hint(provider, record.last_error) if record.last_error else None,
        ))
    return statuses


@dataclass(frozen=True, slots=True)
class RelayPresent:
    """The running stages the present is read from; every method runs on the daemon's event loop."""

    config: Callable[[], RelayConfig]
    listeners: Callable[[], Sequence[tuple[str, str, int]]]  # (name, address, port) as bound
    scheduler: Scheduler
    gates: Gate
    health: UpstreamHealth
    room: SpoolRoom
    failures: RecentFailures
    index_ready: Callable[[], bool]
    usage: UsageSource = lambda: ()  # the tenant quota stage's usage, where there is one

    def queue(self) -> QueueGauges | None:
        """None until the queue index is loaded: a partial count would be a wrong number, not a smaller one."""
        if not self.index_ready():
            return None
        s = self.scheduler
        return queue_gauges(s.entries(), s.in_flight_ids(), s.waiting(), time.time())

    def spool(self) -> SpoolSpace:
        room = self.room.disk()
        return SpoolSpace(room.free_bytes if room else None, room.total_bytes if room else None, self.room.reserve())

    def transports(self) -> list[TransportStatus]:
        return transport_statuses(self.config(), self.gates, self.health.snapshot(), time.time())

    def snapshot(self) -> StatusSnapshot:
        config = self.config()
        tls = {listener.name: listener.tls.value for listener in config.listeners}
        return StatusSnapshot(
            taken_at=time.time(),
            hostname=config.hostname,
            listeners=[ListenerStatus(name, address, port, tls.get(name, ""))
                       for name, address, port in self.listeners()],
            queue=self.queue(),
            spool=self.spool(),
            transports=self.transports(),
            usage=self.usage(),
            failures=self.failures.latest(),
        )


@dataclass(frozen=True, slots=True)
class ObserveListener:
    """The running metrics listener: its app (whose `auth` a reload replaces) and its server thread."""

    app: ObserveApp
    server: WSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_observe_listener(
    present: RelayPresent, metrics: RelayMetrics, loop: asyncio.AbstractEventLoop, auth: BasicAuth | None
) -> ObserveListener:
    """/metrics and the status page on the configured metrics address; both read `present` on `loop`."""
    metrics.read_queue_with(loop_reader(loop, present.queue))
    metrics.read_spool_with(loop_reader(loop, present.spool))
    metrics.read_transports_with(loop_reader(loop, present.transports))
    app = ObserveApp(metrics.registry, loop_reader(loop, present.snapshot), lambda: present.config().hostname, auth)
    config = present.config().metrics
    server, thread = start_observe_server(config.address, config.port or 0, app)
    return ObserveListener(app, server, thread)


def status_login(config: RelayConfig, store: CredentialStore | None) -> BasicAuth | None:
    """The basic auth login of the metrics listener (`metrics: status_auth:`), from the store.

    Raises CredentialError when the named credential is not in the store:
    relayd does not start (or a reload keeps the old configuration) rather
    than serve an unprotected page the operator asked to protect.
    """
    name = config.metrics.status_auth
    if name is None:
        return None
    credential = store.get(name) if store is not None else None
    if not isinstance(credential, UpstreamCredential):
        what = "not in" if credential is None else "an OAuth entry, not a user and password, in"
        raise CredentialError(
            f"{config.source}: metrics: status_auth names credential '{name}', which is {what} the "
            f"credential store {config.credentials.store}; add it with `relayctl secret set {name} --user USER`"
        )
    return BasicAuth(credential.user, credential.password)
