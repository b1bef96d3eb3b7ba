"""The outcome of one delivery pass: pure arithmetic from upstream answers to recipient states.

Takes: the reports the chain walk (`relayd.delivery.walk`) collected for a
message's recipients, the message as queued, the time and the config.
Emits: the message's new recipient states (delivered, deferred with the next
attempt from the retry schedule, held for a provider's limit, failed), the
events for those verdicts, the failures to bounce, and what an attempt tells
the gates (`gate_report`).
Untrusted input: none beyond the upstream replies inside the reports, which
are only carried along.
How it fails: it does not; an illegal recipient transition raises
`IllegalTransition` (a bug, never an input).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from relayd.config.model import RelayConfig, SmtpTransportConfig
from relayd.observe import events as ev
from relayd.delivery.gates import AttemptEnd, GateReport, GateVerdict
from relayd.delivery.providerreplies import ReplyClass, RetryWhen, classify_reply, provider_of
from relayd.delivery.upstreamhealth import RETRY_WAIT
from relayd.values import (
    AttemptOutcome,
    AttemptResult,
    DeliveryReport,
    QueueEntry,
    Recipient,
    RecipientResult,
    RecipientState,
    Route,
    SmtpReply,
)

RETRY_TIMEOUT = "retry timeout exceeded"
CANCELLED = "delivery cancelled by administrator"
# A local, permanent decision carries a synthetic 5xx so the DSN reads as a
# failure, not as an expired delivery.
CANCELLED_REPLY = SmtpReply(550, f"5.0.0 {CANCELLED}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """The entry after one pass, and the reports that produced it."""

    entry: QueueEntry
    reports: tuple[DeliveryReport, ...]
    newly_failed: tuple[DeliveryReport, ...]


@dataclass(frozen=True, slots=True)
class Unrecorded:
    """A message whose outcome is known in memory but could not be written to the spool.

    `entry` is the truth (what went out is final there); `on_disk` the last
    state that was written; `unbounced` failures whose bounce is not queued
    yet (their recipients are recorded as failed only after it is).
    """

    entry: QueueEntry
    unbounced: tuple[DeliveryReport, ...]
    on_disk: QueueEntry
    reason: str
    retry_at: float

    @property
    def id(self) -> str:
        return self.entry.id


class Progress:
    """One pass as it goes: the state known so far and the state last made durable."""

    __slots__ = ("known", "recorded", "unbounced", "first_delivered")

    def __init__(self, entry: QueueEntry) -> None:
        self.known = self.recorded = entry
        self.unbounced: list[DeliveryReport] = []
        self.first_delivered = True


def without_unbounced(known: QueueEntry, before: QueueEntry, unbounced: Sequence[DeliveryReport]) -> QueueEntry:
    """`known` with the recipients whose bounce is not queued yet as they were in `before`."""
    if not unbounced:
        return known
    waiting = {r.address for r in unbounced}
    earlier = {r.address: r for r in before.recipients}
    return replace(
        known,
        recipients=tuple(earlier.get(r.address, r) if r.address in waiting else r for r in known.recipients),
    )


def due_recipients(entry: QueueEntry, now: float, *, forced: bool) -> list[str]:
    return [
        r.address
        for r in entry.undelivered
        if forced or r.next_attempt is None or r.next_attempt <= now
    ]


def report_of(route: Route, result: AttemptResult | None, rr: RecipientResult, tried: list[str]) -> DeliveryReport:
    return DeliveryReport(
        address=rr.address,
        outcome=rr.outcome,
        rule=route.rule,
        transport=result.transport if result else "",
        host=result.host if result else "",
        ip=result.ip if result else "",
        port=result.port if result else 0,
        tls=result.tls if result else "",
        reply=rr.reply,
        reason=rr.describe(),
        tried=tuple(tried),
    )


def leftover_report(
    route: Route, address: str, last: DeliveryReport | None, tried: list[str], all_refused_sender: bool,
    closed: Sequence[tuple[str, GateVerdict]] = (),
) -> DeliveryReport:
    """The verdict for a recipient that no transport in its chain took."""
    if last is None:
        reason = closed_reason(closed) if tried else "no transport available"
        return DeliveryReport(address, AttemptOutcome.DEFER, route.rule, reason=reason, tried=tuple(tried))
    outcome = AttemptOutcome.FAIL if all_refused_sender else AttemptOutcome.DEFER
    return replace(last, outcome=outcome, tried=tuple(tried))


def closed_reason(closed: Sequence[tuple[str, GateVerdict]]) -> str:
    """Why no transport was tried: every one was closed by a gate (or is not configured)."""
    if all(verdict.reason == RETRY_WAIT for _name, verdict in closed):
        return "all transports are in their retry wait"
    return "no transport may take it now: " + "; ".join(
        f"{name} {verdict.reason}" for name, verdict in closed
    )


def apply_reports(
    entry: QueueEntry,
    reports: Sequence[DeliveryReport],
    *,
    now: float,
    config: RelayConfig,
) -> Outcome:
    """Pure: the new recipient states after one pass (retry arithmetic included)."""
    by_address = {r.address: r for r in reports}
    recipients: list[Recipient] = []
    final_reports: list[DeliveryReport] = []
    newly_failed: list[DeliveryReport] = []
    for recipient in entry.recipients:
        report = by_address.get(recipient.address)
        if report is None or recipient.state.is_final:
            recipients.append(recipient)
            continue
        attempts = recipient.attempts + 1
        if report.outcome is AttemptOutcome.DELIVERED:
            recipients.append(recipient.moved_to(RecipientState.DELIVERED, attempts=attempts, next_attempt=None))
        elif report.outcome is AttemptOutcome.FAIL:
            recipients.append(recipient.moved_to(RecipientState.FAILED, attempts=attempts, last_error=report.reason, next_attempt=None))
            newly_failed.append(report)
        elif report.hold_until is not None:
            report = _held(recipient, report, entry, now, config, recipients)
            if report.outcome is AttemptOutcome.FAIL:
                newly_failed.append(report)
        else:
            first = recipient.first_failure if recipient.first_failure is not None else now
            schedule = config.retry_for(report.transport or (report.tried[-1] if report.tried else ""))
            planned = schedule.next_attempt(first, now, recipient.last_interval)
            if planned is None:
                report = replace(report, outcome=AttemptOutcome.FAIL, reason=f"{RETRY_TIMEOUT}: {report.reason}")
                recipients.append(recipient.moved_to(RecipientState.FAILED, attempts=attempts, last_error=report.reason, next_attempt=None))
                newly_failed.append(report)
            else:
                next_attempt, interval = planned
                recipients.append(
                    recipient.moved_to(
                        RecipientState.DEFERRED, attempts=attempts, first_failure=first,
                        next_attempt=next_attempt, last_interval=interval, last_error=report.reason,
                    )
                )
        final_reports.append(report)
    return Outcome(replace(entry, recipients=tuple(recipients)), tuple(final_reports), tuple(newly_failed))


def verdict_events(entry: QueueEntry, outcome: Outcome, *, first: bool = True) -> tuple[list[ev.Event], bool]:
    """One event per verdict of a pass, and whether the next delivery is still the first (=> vs ->)."""
    first_delivered = first
    env = entry.envelope
    events: list[ev.Event] = []
    for report in outcome.reports:
        state = next((r for r in outcome.entry.recipients if r.address == report.address), None)
        attempt = state.attempts if state is not None else 0
        if report.outcome is AttemptOutcome.DELIVERED:
            events.append(ev.RecipientDelivered(
                queue_id=entry.id, tenant=env.tenant, sender=env.sender, message_id=env.header_message_id,
                report=report, attempt=attempt, first=first_delivered,
            ))
            first_delivered = False
        elif report.outcome is AttemptOutcome.FAIL:
            events.append(ev.RecipientFailed(
                queue_id=entry.id, tenant=env.tenant, sender=env.sender, message_id=env.header_message_id,
                report=report, attempt=attempt, bounce_discarded=env.is_bounce,
            ))
        else:
            events.append(ev.RecipientDeferred(
                queue_id=entry.id, tenant=env.tenant, sender=env.sender, message_id=env.header_message_id,
                report=report, attempt=attempt, next_attempt=state.next_attempt if state is not None else None,
            ))
    return events, first_delivered


def _held(
    recipient: Recipient, report: DeliveryReport, entry: QueueEntry, now: float, config: RelayConfig,
    recipients: list[Recipient],
) -> DeliveryReport:
    """A deferral the provider imposed: next attempt at `hold_until`, the retry schedule untouched.

    The attempt counts only when an upstream was really tried; the maximum
    age still applies, counted as the schedule counts it.
    """
    assert report.hold_until is not None
    schedule = config.retry_for(report.transport or (report.tried[-1] if report.tried else ""))
    since = recipient.first_failure if recipient.first_failure is not None else entry.envelope.received_at
    attempts = recipient.attempts + (1 if report.transport else 0)
    if now - since >= schedule.max_age:
        report = replace(report, outcome=AttemptOutcome.FAIL, reason=f"{RETRY_TIMEOUT}: {report.reason}")
        recipients.append(recipient.moved_to(
            RecipientState.FAILED, attempts=attempts, last_error=report.reason, next_attempt=None
        ))
        return report
    recipients.append(recipient.moved_to(
        RecipientState.DEFERRED, attempts=attempts, next_attempt=report.hold_until, last_error=report.reason
    ))
    return report


def transport_provider(config: RelayConfig, transport: str) -> str | None:
    """The provider whose replies a configured transport gets (preset, else host); None: unknown."""
    settings = config.transports.get(transport)
    if not isinstance(settings, SmtpTransportConfig):
        return None
    return provider_of(settings.provider, settings.host)


def hint_name(config: RelayConfig, transport: str) -> str:
    """The name an operator hint gives: the transport's credential (what `relayctl oauth
    authorize` takes), else the transport's own name."""
    settings = config.transports.get(transport)
    credential = settings.credential if isinstance(settings, SmtpTransportConfig) else None
    return credential or transport


def attempt_classes(result: AttemptResult, provider: str | None) -> list[tuple[RecipientResult, ReplyClass]]:
    """The failed recipients of an attempt whose reply the provider table knows, with their class."""
    found: list[tuple[RecipientResult, ReplyClass]] = []
    for rr in result.results:
        if rr.outcome is AttemptOutcome.DELIVERED:
            continue
        klass = classify_reply(provider, rr.reply)
        if klass is not None:
            found.append((rr, klass))
    return found


def gate_report(
    transport: str, result: AttemptResult, config: RelayConfig, *, now: float,
    wait: Callable[[ReplyClass], float] = ReplyClass.wait,
) -> GateReport:
    """What an attempt tells the gates: reached, unreachable, or a provider limit, and what was accepted.

    A provider reply whose class closes the transport (quota, throttling)
    is QUOTA_REACHED until `now + wait(class)`; a refusal of one sender, or
    a rate limit that only the message waits out, leaves the transport
    healthy even when it came at MAIL FROM; a class's hint goes along.
    """
    classes = attempt_classes(result, transport_provider(config, transport))
    hint = next((klass.hint_for(hint_name(config, transport)) for _rr, klass in classes if klass.hint), "")
    closing = next(((rr, klass) for rr, klass in classes if klass.closes_transport), None)
    accepted = sum(1 for r in result.results if r.outcome is AttemptOutcome.DELIVERED)
    if closing is not None:
        rr, klass = closing
        return GateReport(
            AttemptEnd.QUOTA_REACHED, closure_reason(klass, rr), retry=config.retry_for(transport),
            reset_at=now + wait(klass), messages=1 if accepted else 0, recipients=accepted, hint=hint,
        )
    failed = sum(1 for r in result.results if r.outcome is not AttemptOutcome.DELIVERED)
    # Every refusal was about this sender, or a rate the message waits out:
    # the upstream itself works, whatever stage it answered at.
    upstream_fine = bool(classes) and len(classes) == failed and all(
        klass.sender_only or klass.retry is not RetryWhen.NOW for _rr, klass in classes
    )
    if result.connection_failed and not upstream_fine:
        return GateReport(
            AttemptEnd.UNREACHABLE, result.detail or "connection failed", retry=config.retry_for(transport),
            hint=hint,
        )
    return GateReport(AttemptEnd.REACHED, messages=1 if accepted else 0, recipients=accepted, hint=hint)


def closure_reason(klass: ReplyClass, rr: RecipientResult) -> str:
    """Why a provider closed a transport, in its own words: "daily sending quota reached (550 5.4.5 ...)"."""
    said = str(rr.reply) if rr.reply is not None else rr.detail
    return f"{klass.name} ({said})" if said else klass.name


def reason_label(report: DeliveryReport) -> str:
    """A small, fixed set of metric label values (never free text)."""
    if report.reply is not None:
        return str(report.reply.code)
    text = report.reason.lower()
    for word in ("refused", "timeout", "certificate", "tls", "auth", "credential"):
        if word in text:
            return word
    return "other"


# A held recipient waits at least this long (a chain that reopened meanwhile
# is simply tried again a second later), and releases after a reopening are
# spread over up to a minute (at most 5 % of the wait) by message id.
_MIN_HOLD = 1.0
_MAX_SPREAD = 60.0


def held_report(report: DeliveryReport, reopening: GateVerdict, now: float, message_id: str) -> DeliveryReport:
    """A recipient that only provider limits kept from its chain: held, not deferred.

    `reopening` is the chain's earliest reopening (open: something reopened
    meanwhile); its reason, the provider's limit in its own words, becomes
    the recipient's reason. The hold is spread a little per message so that
    a quota window opening does not release the whole queue at one instant.
    """
    hold = max(reopening.until if reopening.until is not None else now, now + _MIN_HOLD)
    hold += (zlib.crc32(message_id.encode()) % 1000) / 1000 * min(_MAX_SPREAD, 0.05 * (hold - now))
    why = reopening.reason or report.reason
    return replace(report, outcome=AttemptOutcome.DEFER, hold_until=hold, reason=f"held until {_local(hold)}: {why}")


def limited_by_provider(result: AttemptResult, provider: str | None) -> bool:
    """Whether the provider answered with a class that closes the transport (quota, throttling)."""
    return any(klass.closes_transport for _rr, klass in attempt_classes(result, provider))


def host_failed_reason(name_in_hint: str, result: AttemptResult, provider: str | None, verdict: GateVerdict) -> str:
    """The main log's reason for a transport the chain passed over.

    The upstream's words; for a provider limit, which one and until when the
    transport is closed; for a failure only the operator can fix (basic
    authentication switched off, credentials refused), the hint that fixes it.
    """
    classes = attempt_classes(result, provider)
    reason = result.detail
    closing = next(((rr, klass) for rr, klass in classes if klass.closes_transport), None)
    if closing is not None:
        reason = closure_reason(closing[1], closing[0])
        if verdict.until is not None:
            reason += f"; transport closed until {_local(verdict.until)}"
    hint = next(
        (klass.hint_for(name_in_hint) for _rr, klass in classes
         if klass.hint and klass.retry is RetryWhen.NOW and not klass.sender_only),
        "",
    )
    if hint:
        reason = f"{reason}; {hint}" if reason else hint
    return reason


def _local(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
