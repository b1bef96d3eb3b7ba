"""The outcome of one delivery pass: pure arithmetic from upstream answers to recipient states.

Takes: the reports the chain walk (`relayd.delivery.walk`) collected for a
message's recipients, the message as queued, the time and the config.
Emits: the message's new recipient states (delivered, deferred with the next
attempt from the retry schedule, failed), the reports to log, the failures
to bounce, and what an attempt tells the gates (`gate_report`).
Untrusted input: none beyond the upstream replies inside the reports, which
are only carried along.
How it fails: it does not; an illegal recipient transition raises
`IllegalTransition` (a bug, never an input).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from relayd.config.model import RelayConfig
from relayd.delivery.gates import AttemptEnd, GateReport, GateVerdict
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


def gate_report(transport: str, result: AttemptResult, config: RelayConfig) -> GateReport:
    """What an attempt tells the gates: reached or unreachable, and what the upstream accepted."""
    if result.connection_failed:
        return GateReport(
            AttemptEnd.UNREACHABLE, result.detail or "connection failed", retry=config.retry_for(transport)
        )
    accepted = sum(1 for r in result.results if r.outcome is AttemptOutcome.DELIVERED)
    return GateReport(AttemptEnd.REACHED, messages=1 if accepted else 0, recipients=accepted)


def reason_label(report: DeliveryReport) -> str:
    """A small, fixed set of metric label values (never free text)."""
    if report.reply is not None:
        return str(report.reply.code)
    text = report.reason.lower()
    for word in ("refused", "timeout", "certificate", "tls", "auth", "credential"):
        if word in text:
            return word
    return "other"
