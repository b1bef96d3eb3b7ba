"""Delivery and outcome: walk each recipient's transport chain once, then record the result.

Takes: a due `QueueEntry` from the scheduler; the current config; the
transports; the gates (`relayd.delivery.gates`: may a transport take mail now); the spool.
Emits: per recipient a `DeliveryReport` (delivered / deferred / failed), the
matching events (relayd.observe.events: the main log and metrics are sinks), the new recipient states in the spool,
and an RFC 3464 bounce to the sender for every permanent failure.
Untrusted input: upstream replies (only logged, sanitised by the log).
How it fails: a spool file whose body no longer checks out is set aside and
reported, never delivered half; an outcome the spool cannot write (ENOSPC,
EIO) is held in memory (see below); anything else propagates to the
scheduler, which retries the message later.

The failover policy itself (which error means "next transport", "defer" or
"fail") is `relayd.delivery.failover.classify`, applied inside the transports. Here:
* recipients are grouped by matching route rule, one upstream transaction per
  group and transport; each group's verdicts are logged and made durable as
  soon as the group is done, so a later group that hangs (or a kill -9) cannot
  make an earlier recipient go out twice;
* when that write fails, the pass stops and the outcome is kept in memory
  (`unrecorded`): the message is delivered no further, every other delivery
  waits (`hold_until`), new mail is refused (`state_write_failure`), and the
  write is tried again every `state_retry_interval` until it works;
* a transport closed by a gate (its retry wait after a connection failure,
  `relayd.delivery.upstreamhealth`, or any later limit) is skipped without a
  connection attempt; every attempt's start and end are reported to the gates;
* a recipient left over after the whole chain is deferred, except when every
  transport refused the sender permanently (5xx to MAIL FROM), which fails it,
  and when only provider limits (a quota or throttling reply,
  `relayd.delivery.providerreplies`, or a gate no operator may force) kept it
  from every transport, which holds it until the earliest reopening without
  advancing its retry schedule; the arithmetic is `relayd.delivery.outcome`;
* a deferred recipient's next attempt follows the retry schedule of the last
  transport that was tried for it; when the schedule has run out (the maximum
  age), the recipient fails with "retry timeout exceeded";
* a bounce is queued durably before the failures are recorded, so a crash in
  between can only duplicate a bounce, never lose one; a failed bounce (null
  sender) is logged and dropped, never bounced again;
* a forced delivery (operator: deliver now, flush) ignores the transports'
  retry waits (forceable closures), as Exim's -M and -qff ignore host retry data;
* `hold_until` tells the scheduler when a due message has nothing to try
  because every transport of every due recipient is closed by a gate: it is
  put back quietly instead of logging and recording one more deferral;
* `give_up` is the operator's "cancel delivery" (Exim -Mg): every open
  recipient fails with "delivery cancelled by administrator" and the sender
  gets a bounce, exactly as for a permanent failure;
* a message that was itself sent automatically (Auto-Submitted other than
  "no", RFC 3834) gets no bounce, only a log line, so two robots cannot
  answer each other in a loop;
* `lane_of` tells the scheduler which tenant and first transports a message
  competes for (`relayd.queue.fairness`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Awaitable, Callable, Mapping, Sequence

from relayd.observe import events as ev
from relayd.config.model import RelayConfig
from relayd.delivery.dsn import auto_submitted_keyword
from relayd.delivery.outcome import (
    CANCELLED,
    CANCELLED_REPLY,
    Outcome,
    Progress,
    Unrecorded,
    apply_reports,
    due_recipients,
    gate_report,
    held_report,
    hint_name,
    host_failed_reason,
    leftover_report,
    limited_by_provider,
    reason_label,
    report_of,
    transport_provider,
    verdict_events,
    without_unbounced,
)
from relayd.delivery.providerreplies import ReplyClass, RetryWhen, classify_reply
from relayd.queue.fairness import Lane
from relayd.queue.spool import Spool, SpoolCorruptError, SpoolEntryMissing, SpoolError, SpoolFullError
from relayd.delivery.gates import HELD, OPEN, AttemptEnd, GateReport, GateSet, GateVerdict, earliest_reopening
from relayd.delivery.holding import held_back
from relayd.delivery.router import domain_of, group_by_route, route
from relayd.delivery.transport import Transport
from relayd.values import (
    AttemptOutcome,
    AttemptResult,
    Delivery,
    DeliveryReport,
    Envelope,
    QueueEntry,
    RecipientResult,
    Route,
    SmtpReply,
    Stage,
)

# Route chains remembered for lane_of; a queue to more distinct domains than
# this simply starts the cache again (bounded memory, a few routes re-done).
_CHAIN_CACHE_SIZE = 10_000
# Seconds between attempts to record an outcome the spool refused (full or
# failing disk); every delivery waits meanwhile.
STATE_RETRY_INTERVAL = 5.0
_AFTER_RETRY = 0.2  # seconds other deliveries wait past a held message's next try


class DeliveryAgent:
    """Runs one delivery pass for one message; handed to the scheduler as `deliver`."""

    def __init__(
        self,
        *,
        config: Callable[[], RelayConfig],
        spool: Spool,
        transports: Callable[[], Mapping[str, Transport]],
        gates: GateSet,
        events: ev.EventSink,
        enqueue_bounce: Callable[[Envelope, bytes], Awaitable[None]],
        build_dsn: Callable[..., bytes],
        is_forced: Callable[[str], bool] = lambda _id: False,
        clock: Callable[[], float] = time.time,
        state_retry_interval: float = STATE_RETRY_INTERVAL,
        release_room: Callable[[], bool] = lambda: False,
        keep_room: Callable[[], bool] = lambda: False,
        provider_wait: Callable[[ReplyClass], float] = ReplyClass.wait,
    ) -> None:
        self._config = config
        self._spool = spool
        self._transports = transports
        self._gates = gates
        self._events = events
        self._enqueue_bounce = enqueue_bounce
        self._build_dsn = build_dsn
        self._is_forced = is_forced
        self._clock = clock
        self._state_retry_interval = state_retry_interval
        # The spool's emergency reserve file: removed when a full disk refuses
        # an outcome (then it is written at once), put back once recorded.
        self._release_room = release_room
        self._keep_room = keep_room
        # Seconds a provider's quota or throttling reply keeps a transport (or
        # a message) waiting; the provider table's own figures in production.
        self._provider_wait = provider_wait
        self._unrecorded: dict[str, Unrecorded] = {}
        # Route chains per (tenant, domain) for lane_of, valid for one config object.
        self._chains_of: RelayConfig | None = None
        self._chains: dict[tuple[str, str], tuple[str, ...]] = {}

    async def deliver(self, entry: QueueEntry) -> QueueEntry | None:
        """One pass over the message's due recipients. None: the message left the queue.

        Each route group's outcome is made durable as soon as the group is
        done, so a later group that hangs (or a kill -9 meanwhile) cannot make
        the earlier recipients go out twice. When that write fails the pass
        stops: the outcome is kept in memory (`unrecorded`), nothing more of
        the message is delivered, and the write is tried again every
        `state_retry_interval` until the spool can take it.
        """
        held = self._unrecorded.get(entry.id)
        if held is not None:
            try:
                recorded = await self._record_held(held)
            except SpoolEntryMissing:
                self.forget(entry.id)
                return None
            except SpoolCorruptError as error:
                self.forget(entry.id)
                self._spool.set_aside(entry.id, str(error))
                self._events.emit(ev.SpoolSetAside(queue_id=entry.id, error=str(error)))
                return None
            except SpoolError as error:
                return self._hold(self._unrecorded.get(entry.id, held), error)
            if recorded is None:
                return None
            entry = recorded
        try:
            body = self._spool.read_body(entry.id)
        except SpoolEntryMissing:
            return None  # removed by an operator meanwhile
        except SpoolCorruptError as error:
            self._spool.set_aside(entry.id, str(error))
            self._events.emit(ev.SpoolSetAside(queue_id=entry.id, error=str(error)))
            return None
        config = self._config()
        now = self._clock()
        addresses = due_recipients(entry, now, forced=self._is_forced(entry.id))
        if not addresses:
            return entry
        progress = Progress(entry)
        try:
            return await self._pass(progress, body, addresses, config)
        except SpoolEntryMissing:
            return None  # removed by an operator during the attempt
        except SpoolError as error:
            return self._hold(
                Unrecorded(progress.known, tuple(progress.unbounced), progress.recorded, "", 0.0), error
            )

    async def _pass(
        self, progress: "Progress", body: bytes, addresses: list[str], config: RelayConfig
    ) -> QueueEntry | None:
        entry = progress.recorded
        immediate, groups = self._plan(entry, addresses, config)
        if immediate:
            await self._commit(progress, immediate, config)
        for route_, group in groups:
            # A limit may have closed the whole chain since the scheduler looked: wait, no attempt.
            wait = self._chain_wait(route_.transports, self._clock())
            reports, group = held_back(entry, route_, group, wait, config, now=self._clock())
            reports += await self.walk_chain(entry, body, route_, group, config) if group else []
            await self._commit(progress, reports, config)
        if progress.known is entry:
            return entry  # every group was held back by a limit: nothing happened, nothing to write
        if progress.unbounced:
            # The bounce is queued durably before the failures are recorded:
            # a crash in between can only duplicate a bounce, never lose one.
            await self._bounce(entry, body, progress.unbounced, config)
            progress.unbounced.clear()
        return await self._record_final(progress.known)

    async def _commit(self, progress: "Progress", reports: Sequence[DeliveryReport], config: RelayConfig) -> None:
        """Log one route group's verdicts and make them durable at once (failures wait for their bounce)."""
        if not reports:
            return
        outcome = apply_reports(progress.known, reports, now=self._clock(), config=config)
        progress.first_delivered = self._log_outcome(progress.known, outcome, first=progress.first_delivered)
        progress.known = outcome.entry
        progress.unbounced.extend(outcome.newly_failed)
        view = without_unbounced(progress.known, progress.recorded, progress.unbounced)
        if view != progress.recorded and not view.is_complete:
            await self._spool.update(view, durable=True)
            progress.recorded = view

    async def _record_final(self, known: QueueEntry) -> QueueEntry | None:
        if known.is_complete:
            # Unlinking frees the file's blocks, which the kernel does in the
            # caller's time: keep that off the event loop.
            await asyncio.to_thread(self._spool.complete, known.id)
            self._events.emit(ev.MessageCompleted(queue_id=known.id))
            return None
        await self._spool.update(known, durable=True)
        return known

    # -- outcomes the spool could not take ----------------------------------------

    def _hold(self, held: "Unrecorded", error: BaseException) -> QueueEntry:
        """Keep an outcome the spool refused in memory; stop delivering the message."""
        now = self._clock()
        first = held.id not in self._unrecorded
        retry_at = now + self._state_retry_interval
        if isinstance(error, SpoolFullError) and self._release_room():
            retry_at = now  # room was made: write it on the next pick, not in 5 s
        held = replace(held, reason=str(error), retry_at=retry_at)
        self._unrecorded[held.id] = held
        if first:
            self._events.emit(ev.SpoolCannotRecord(queue_id=held.id, error=str(error)))
        view = without_unbounced(held.entry, held.on_disk, held.unbounced)
        # The scheduler forgets a complete entry; this one must stay until recorded.
        return held.on_disk if view.is_complete else view

    async def _record_held(self, held: "Unrecorded") -> QueueEntry | None:
        """Write what a held message's earlier pass found; raises SpoolError if it still cannot."""
        if held.unbounced:
            body = self._spool.read_body(held.id)
            await self._bounce(held.entry, body, held.unbounced, self._config())
            self._unrecorded[held.id] = replace(held, unbounced=())
        recorded = await self._record_final(held.entry)
        self._unrecorded.pop(held.id, None)
        self._events.emit(ev.SpoolRecovered(queue_id=held.id))
        if not self._unrecorded:
            await asyncio.to_thread(self._keep_room)
        return recorded

    async def record_unrecorded(self) -> None:
        """One more try to write every held outcome (at stop: what is not written may go out again)."""
        for held in list(self._unrecorded.values()):
            for _ in range(2):  # the second time into the room the emergency reserve leaves
                try:
                    await self._record_held(self._unrecorded.get(held.id, held))
                    break
                except SpoolError:
                    if not self._release_room():
                        break

    def forget(self, message_id: str) -> None:
        """The message left the queue by other means (operator): drop any held outcome."""
        self._unrecorded.pop(message_id, None)

    def unrecorded(self) -> dict[str, str]:
        """Messages whose outcome is known but not on disk, with the reason."""
        return {mid: held.reason for mid, held in self._unrecorded.items()}

    def state_write_failure(self) -> str | None:
        """Why delivery state cannot be recorded now (None: it can); new mail is refused meanwhile."""
        for held in self._unrecorded.values():
            return held.reason
        return None

    async def give_up(
        self, entry: QueueEntry, *, reason: str = CANCELLED, reply: SmtpReply | None = CANCELLED_REPLY
    ) -> bool:
        """Fail every open recipient now and bounce to the sender (Exim -Mg).

        Also how a message a tenant quota held past its maximum age ends
        (`reason` "retry timeout exceeded: ...", no reply: the DSN says the
        delivery time expired). The caller keeps the message out of delivery meanwhile. A bounce
        message is not bounced again: its recipient is logged as discarded.
        Returns False when the message was no longer queued. Raises
        SpoolCorruptError (after setting the file aside) when its body is damaged.
        """
        try:
            body = self._spool.read_body(entry.id)
        except SpoolEntryMissing:
            return False
        except SpoolCorruptError as error:
            self._spool.set_aside(entry.id, str(error))
            self._events.emit(ev.SpoolSetAside(queue_id=entry.id, error=str(error)))
            raise
        config = self._config()
        reports = [
            DeliveryReport(r.address, AttemptOutcome.FAIL, "", reply=reply, reason=reason)
            for r in entry.undelivered
        ]
        outcome = apply_reports(entry, reports, now=self._clock(), config=config)
        self._log_outcome(entry, outcome)
        if outcome.newly_failed:
            await self._bounce(entry, body, outcome.newly_failed, config)
        await asyncio.to_thread(self._spool.complete, entry.id)
        self.forget(entry.id)
        self._events.emit(ev.MessageCompleted(queue_id=entry.id))
        return True

    def hold_until(self, entry: QueueEntry) -> float | None:
        """When a due message has something to try again; None if it has now.

        Not None only when every transport of every due recipient is closed by
        a gate (then: the earliest reopening of those). A recipient past
        its schedule's maximum age is never held, so it can still time out.
        """
        if self._unrecorded:
            # While the spool cannot record outcomes nothing new goes out: one
            # held message per interval tries the write again.
            now = self._clock()
            held = self._unrecorded.get(entry.id)
            if held is not None:
                return held.retry_at if held.retry_at > now else None
            # Others look again right after the next try (soon, if one runs now).
            next_try = min(h.retry_at for h in self._unrecorded.values())
            return next_try + _AFTER_RETRY if next_try > now else now + _AFTER_RETRY
        return self.gate_hold(entry).until

    def gate_hold(self, entry: QueueEntry) -> GateVerdict:
        """Until when and why the gates hold a due message (OPEN: something is open now).

        Closed only when every transport of every due recipient is closed;
        the verdict is the earliest reopening among them, its reason the one
        `mailq` can show ("retry wait", later a quota and its reset).
        """
        config = self._config()
        tenant = config.tenants.get(entry.envelope.tenant)
        if tenant is None:
            return OPEN
        now = self._clock()
        earliest: GateVerdict | None = None
        for recipient in entry.undelivered:
            if recipient.next_attempt is not None and recipient.next_attempt > now:
                continue
            found = route(tenant, recipient.address)
            if found is None or not found.transports:
                return OPEN
            schedule = config.retry_for(found.transports[-1])
            since = recipient.first_failure if recipient.first_failure is not None else entry.envelope.received_at
            if now - since >= schedule.max_age:
                return OPEN
            wait = self._chain_wait(found.transports, now)
            if wait.until is None:
                return OPEN
            if earliest is None or earliest.until is None or wait.until < earliest.until:
                earliest = wait
        return earliest or OPEN

    def lane_of(self, entry: QueueEntry) -> Lane:
        """The scheduler's lane of a message: its tenant and the transports it will try first.

        For each open recipient, the first transport of its chain that no
        gate closes (the one a delivery would really use), or the chain's
        first when all are closed.
        """
        config = self._config()
        now = self._clock()
        if config is not self._chains_of or len(self._chains) > _CHAIN_CACHE_SIZE:
            self._chains_of, self._chains = config, {}
        tenant = config.tenants.get(entry.envelope.tenant)
        if tenant is None:
            return Lane(entry.envelope.tenant)
        firsts: set[str] = set()
        for recipient in entry.undelivered:
            key = (tenant.name, domain_of(recipient.address))
            chain = self._chains.get(key)
            if chain is None:
                found = route(tenant, recipient.address)
                chain = self._chains[key] = found.transports if found is not None else ()
            if chain:
                usable = (t for t in chain if self._gates.check(t, now).is_open)
                firsts.add(next(usable, chain[0]))
        return Lane(entry.envelope.tenant, tuple(sorted(firsts)))

    def _chain_wait(self, chain: Sequence[str], now: float) -> GateVerdict:
        """The earliest reopening of the chain's gates; OPEN if a transport is usable now."""
        transports = self._transports()
        if any(name not in transports for name in chain):
            return OPEN
        return earliest_reopening(self._gates, chain, now)

    def _plan(
        self, entry: QueueEntry, addresses: list[str], config: RelayConfig
    ) -> tuple[list[DeliveryReport], list[tuple[Route, list[str]]]]:
        """Verdicts known without an attempt, and the route groups to walk (each committed on its own)."""
        tenant = config.tenants.get(entry.envelope.tenant)
        if tenant is None:
            reason = f"tenant {entry.envelope.tenant} is no longer configured"
            return [DeliveryReport(a, AttemptOutcome.DEFER, "", reason=reason) for a in addresses], []
        groups, unrouted = group_by_route(tenant, addresses)
        # A rule removed by a reload after the message was accepted: the address
        # is unroutable now, a permanent local failure (Exim: "Unrouteable address").
        unroutable = SmtpReply(550, f"5.4.4 Unrouteable address: no route of tenant {tenant.name} matches it")
        reports = [
            DeliveryReport(a, AttemptOutcome.FAIL, "", reply=unroutable, reason="Unrouteable address")
            for a in unrouted
        ]
        return reports, list(groups.items())

    async def walk_chain(
        self, entry: QueueEntry, body: bytes, route: Route, addresses: list[str], config: RelayConfig
    ) -> list[DeliveryReport]:
        """Try the route's transports in order until every recipient has a verdict.

        A recipient that only provider limits kept from every transport (a
        quota or throttling reply, or a gate that no operator may force) is
        held until the chain's earliest reopening, not deferred by the retry
        schedule and never bounced for it.
        """
        transports = self._transports()
        remaining = list(addresses)
        reports: list[DeliveryReport] = []
        last: dict[str, DeliveryReport] = {}
        refused_sender = {a: True for a in addresses}
        limited = {a: True for a in addresses}  # only provider limits kept it from every transport
        tried: list[str] = []
        closed: list[tuple[str, GateVerdict]] = []
        forced = self._is_forced(entry.id)
        for name in route.transports:
            if not remaining:
                break
            tried.append(name)
            verdict = self._gates.check(name, self._clock())
            result: AttemptResult | GateVerdict = verdict
            if verdict.admits(forced=forced) and name in transports:
                # The verdict back instead when a shared limit refused the attempt's place.
                result = await self._attempt(entry, body, remaining, transports[name], config)
            if isinstance(result, GateVerdict):
                if not result.is_open:
                    closed.append((name, result))
                for a in remaining:
                    refused_sender[a] = False
                    limited[a] = limited[a] and not result.is_open and not result.forceable
                continue
            provider = transport_provider(config, name)
            still: list[str] = []
            for address in remaining:
                rr = result.for_address(address) or RecipientResult(
                    address, AttemptOutcome.DEFER, Stage.WRITE, detail="transport gave no answer"
                )
                report = report_of(route, result, rr, tried)
                klass = classify_reply(provider, rr.reply) if rr.outcome is not AttemptOutcome.DELIVERED else None
                if rr.outcome is AttemptOutcome.NEXT_TRANSPORT:
                    last[address] = report
                    # A 5xx to MAIL FROM (or a provider refusing the sender after the
                    # data, e.g. SES "Email address is not verified") is a refusal of
                    # this sender by this provider, not a problem of the transport;
                    # a quota or a refused login answered there is neither.
                    permanent_sender = (
                        rr.stage in (Stage.MAIL, Stage.AFTER_DATA)
                        and rr.reply is not None
                        and rr.reply.is_permanent
                        and (klass is None or klass.sender_only)
                    )
                    refused_sender[address] = refused_sender[address] and permanent_sender
                    limited[address] = limited[address] and klass is not None and klass.closes_transport
                    still.append(address)
                elif klass is not None and rr.outcome is AttemptOutcome.DEFER and klass.retry is not RetryWhen.NOW:
                    # A rate the message waits out on this transport (the next second may pass).
                    reports.append(replace(report, hold_until=self._clock() + self._provider_wait(klass)))
                else:
                    reports.append(report)
            if still and (result.connection_failed or limited_by_provider(result, provider)):
                self._events.emit(ev.HostFailed(
                    queue_id=entry.id, transport=name, host=result.host, ip=result.ip, port=result.port,
                    reason=host_failed_reason(hint_name(config, name), result, provider,
                                              self._gates.check(name, self._clock()))
                    or last[still[0]].reason,
                    reason_label=reason_label(last[still[0]]),
                ))
            remaining = still
        for address in remaining:
            report = leftover_report(route, address, last.get(address), tried, refused_sender[address], closed)
            if limited[address] and report.outcome is AttemptOutcome.DEFER:
                now = self._clock()
                report = held_report(report, earliest_reopening(self._gates, route.transports, now), now, entry.id)
            reports.append(report)
        return reports

    async def _attempt(
        self, entry: QueueEntry, body: bytes, addresses: list[str], transport: Transport, config: RelayConfig
    ) -> AttemptResult | GateVerdict:
        """One attempt on one transport; the closed verdict instead when a shared limit refused its place."""
        delivery = Delivery(entry.id, entry.envelope.sender, tuple(addresses), body, entry.envelope.smtputf8)
        started = time.monotonic()
        # No await between the walk's gate check and this: a counting gate
        # takes its token in the same step as it said yes.
        self._gates.attempt_started(transport.name, self._clock())
        reservation = HELD
        try:
            if self._gates.reserves:
                reservation = await self._gates.reserve(transport.name, self._clock())
                if not reservation.verdict.is_open:
                    self._gates.attempt_ended(transport.name, GateReport(AttemptEnd.ABANDONED), self._clock())
                    return reservation.verdict
            result: AttemptResult = await transport.send(delivery)
        except BaseException:
            # Cancelled (shutdown) or a bug: the attempt still ends for the gates.
            abandoned = GateReport(AttemptEnd.ABANDONED)
            self._gates.attempt_ended(transport.name, abandoned, self._clock())
            reservation.settle(abandoned, self._clock())
            raise
        seconds = time.monotonic() - started
        now = self._clock()
        report = gate_report(transport.name, result, config, now=now, wait=self._provider_wait)
        self._gates.attempt_ended(transport.name, report, now)
        reservation.settle(report, now)
        self._events.emit(ev.UpstreamAttempted(
            transport=transport.name, seconds=seconds, reachable=not result.connection_failed
        ))
        return result

    def _log_outcome(self, entry: QueueEntry, outcome: Outcome, *, first: bool = True) -> bool:
        """One event per verdict; returns whether the next delivery is still the first (=> vs ->)."""
        events, first_delivered = verdict_events(entry, outcome, first=first)
        for event in events:
            self._events.emit(event)
        return first_delivered

    async def _bounce(
        self, entry: QueueEntry, body: bytes, failed: Sequence[DeliveryReport], config: RelayConfig
    ) -> None:
        if entry.envelope.is_bounce:
            return  # a bounce is never bounced; already logged as dropped
        if self._bounce_would_loop(entry, body):
            return
        dsn = self._build_dsn(
            original=entry.envelope,
            original_body=body,
            failed=list(failed),
            reporting_mta=config.hostname,
            now=self._clock(),
            message_id_domain=config.hostname,
        )
        await self._enqueue_bounce(entry.envelope, dsn)


    def _bounce_would_loop(self, entry: QueueEntry, body: bytes) -> bool:
        """An automatically sent message (RFC 3834 Auto-Submitted) gets no bounce.

        Its sender is a robot (vacation responder, ticket system, alert
        script) that may answer our bounce with another message: the failure
        stays recorded (the ``**`` line) and the log says why nobody was told.
        """
        keyword = auto_submitted_keyword(body)
        if keyword is None:
            return False
        self._events.emit(ev.BounceSuppressed(
            queue_id=entry.id, sender=entry.envelope.sender,
            reason=f"message is Auto-Submitted: {keyword} (RFC 3834), a bounce could loop",
        ))
        return True
