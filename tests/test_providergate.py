"""The provider-limit gate and the walk's holds, with an injected clock and scripted transports."""

from __future__ import annotations

from dataclasses import replace

import uvloop

from relayd.delivery.gates import OPEN, AttemptEnd, GateReport, GateSet
from relayd.delivery.outcome import apply_reports, gate_report
from relayd.delivery.providergate import ProviderLimits
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.delivery.walk import DeliveryAgent
from relayd.observe.events import NullSink
from relayd.values import AttemptOutcome, AttemptResult, DeliveryReport, RecipientResult, RecipientState, Route, SmtpReply, Stage
from tests.test_delivery_outcome import CONFIG, ScriptedTransport, entry

T0 = 1_800_000_000.0
DAILY = SmtpReply(550, "5.4.5 Daily user sending limit exceeded. - gsmtp")
SES_RATE = SmtpReply(454, "Throttling failure: Maximum sending rate exceeded.")
NOT_VERIFIED = SmtpReply(554, "Message rejected: Email address is not verified.")
BASIC_AUTH_OFF = SmtpReply(535, "5.7.139 Authentication unsuccessful, basic authentication is disabled.")
OK = SmtpReply(250, "2.0.0 OK")


def quota_report(until: float, reason: str = "daily sending quota reached") -> GateReport:
    return GateReport(AttemptEnd.QUOTA_REACHED, reason, reset_at=until)


def test_a_quota_report_closes_the_transport_until_its_reset_and_no_operator_can_force_it() -> None:
    gate = ProviderLimits()
    gate.attempt_ended("gmail", quota_report(T0 + 3600), T0)
    verdict = gate.check("gmail", T0 + 3599)
    assert verdict.until == T0 + 3600 and verdict.gate == "provider" and not verdict.admits(forced=True)
    assert verdict.reason == "daily sending quota reached"
    assert gate.check("gmail", T0 + 3600) is OPEN and gate.check("sendgrid", T0) is OPEN


def test_a_shorter_closure_never_shortens_a_longer_one_and_other_reports_leave_it() -> None:
    gate = ProviderLimits()
    gate.attempt_ended("gmail", quota_report(T0 + 3600), T0)
    gate.attempt_ended("gmail", quota_report(T0 + 60, "sending rate exceeded"), T0 + 1)
    gate.attempt_ended("gmail", GateReport(AttemptEnd.REACHED, messages=1), T0 + 2)
    gate.attempt_ended("gmail", GateReport(AttemptEnd.UNREACHABLE, "refused"), T0 + 3)
    assert gate.check("gmail", T0 + 100).until == T0 + 3600


def test_the_last_hint_is_kept_for_status_until_the_transport_delivers_again() -> None:
    gate = ProviderLimits()
    gate.attempt_ended("m365", GateReport(AttemptEnd.UNREACHABLE, "535", hint="switch this transport to XOAUTH2"), T0)
    gate.attempt_ended("gmail", quota_report(T0 + 60), T0)
    assert gate.snapshot(T0) == {
        "m365": {"hint": "switch this transport to XOAUTH2"},
        "gmail": {"closed_until": T0 + 60, "closed_reason": "daily sending quota reached"},
    }
    gate.attempt_ended("m365", GateReport(AttemptEnd.REACHED, messages=1, recipients=1), T0 + 1)
    assert gate.snapshot(T0 + 61) == {}


def result(reply: SmtpReply | None, stage: Stage, outcome: AttemptOutcome, *, connection_failed: bool) -> AttemptResult:
    return AttemptResult("gmail", (RecipientResult("a@x.test", outcome, stage, reply),), connection_failed=connection_failed)


def test_what_an_attempt_tells_the_gates_follows_the_provider_class() -> None:
    quota = gate_report("gmail", result(DAILY, Stage.MAIL, AttemptOutcome.NEXT_TRANSPORT, connection_failed=True),
                        CONFIG, now=T0)
    assert quota.outcome is AttemptEnd.QUOTA_REACHED and quota.reset_at == T0 + 3600
    assert quota.detail.startswith("daily sending quota reached (550 5.4.5 Daily user sending limit exceeded")
    # A refusal of one sender, even at MAIL FROM, leaves the transport healthy.
    sender = gate_report("ses", result(NOT_VERIFIED, Stage.MAIL, AttemptOutcome.NEXT_TRANSPORT, connection_failed=True),
                         CONFIG, now=T0)
    assert sender.outcome is AttemptEnd.REACHED
    # A rate the message waits out does not take the transport down either.
    rate = gate_report("ses", result(SES_RATE, Stage.MAIL, AttemptOutcome.DEFER, connection_failed=True), CONFIG, now=T0)
    assert rate.outcome is AttemptEnd.REACHED
    # Disabled basic auth is a real login failure, with the fix for the operator.
    auth = gate_report("m365", result(BASIC_AUTH_OFF, Stage.AUTH, AttemptOutcome.NEXT_TRANSPORT, connection_failed=True),
                       CONFIG, now=T0)
    assert auth.outcome is AttemptEnd.UNREACHABLE
    assert auth.hint.startswith("switch this transport to XOAUTH2: relayctl oauth authorize m365")


def agent(transports: dict[str, ScriptedTransport], gates: GateSet, wait: float = 600.0) -> DeliveryAgent:
    return DeliveryAgent(
        config=lambda: CONFIG, spool=None, transports=lambda: transports, gates=gates, events=NullSink(),
        enqueue_bounce=None, build_dsn=None,  # type: ignore[arg-type]
        clock=lambda: T0, provider_wait=lambda _klass: wait,
    )


def walk(transports: dict[str, ScriptedTransport], gates: GateSet, chain: tuple[str, ...]) -> list[DeliveryReport]:
    return uvloop.run(agent(transports, gates).walk_chain(
        entry("a@x.test"), b"body", Route("all", chain), ["a@x.test"], CONFIG
    ))


def test_a_daily_quota_sends_the_message_down_the_chain_and_closes_the_transport_for_the_next() -> None:
    gmail = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, DAILY, True)
    sendgrid = ScriptedTransport("sendgrid", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, OK, False)
    health, limits = UpstreamHealth(), ProviderLimits()
    gates = GateSet([health, limits])
    (report,) = walk({"gmail": gmail, "sendgrid": sendgrid}, gates, ("gmail", "sendgrid"))
    assert report.outcome is AttemptOutcome.DELIVERED and report.transport == "sendgrid"
    assert limits.check("gmail", T0).until == T0 + 600 and health.check("gmail", T0) is OPEN
    (again,) = walk({"gmail": gmail, "sendgrid": sendgrid}, gates, ("gmail", "sendgrid"))
    assert again.transport == "sendgrid" and gmail.calls == 1


def test_a_quota_on_a_chain_alone_holds_the_recipient_without_moving_its_retry_schedule() -> None:
    gmail = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, DAILY, True)
    (report,) = walk({"gmail": gmail}, GateSet([UpstreamHealth(), ProviderLimits()]), ("gmail",))
    assert report.outcome is AttemptOutcome.DEFER and report.hold_until is not None
    assert T0 + 600 <= report.hold_until <= T0 + 630  # the reset, spread by at most 5 %
    assert "held until" in report.reason and "daily sending quota reached" in report.reason
    queued = replace(entry("a@x.test"), envelope=replace(entry("a@x.test").envelope, received_at=T0))
    (recipient,) = apply_reports(queued, [report], now=T0, config=CONFIG).entry.recipients
    assert recipient.state is RecipientState.DEFERRED and recipient.next_attempt == report.hold_until
    assert recipient.first_failure is None and recipient.last_interval is None and recipient.attempts == 1


def test_a_held_recipient_still_times_out_at_the_schedules_maximum_age() -> None:
    held = DeliveryReport("a@x.test", AttemptOutcome.DEFER, "all", "gmail", reply=DAILY, reason="held", hold_until=T0 + 60)
    old = replace(entry("a@x.test"), envelope=replace(entry("a@x.test").envelope, received_at=T0 - 5 * 86400))
    outcome = apply_reports(old, [held], now=T0, config=CONFIG)
    (recipient,) = outcome.entry.recipients
    assert recipient.state is RecipientState.FAILED and outcome.newly_failed[0].reason.startswith("retry timeout exceeded")


def test_a_sending_rate_waits_on_the_same_transport_and_does_not_close_it() -> None:
    ses = ScriptedTransport("ses", AttemptOutcome.DEFER, Stage.MAIL, SES_RATE, True)
    backup = ScriptedTransport("backup", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, OK, False)
    limits, health = ProviderLimits(), UpstreamHealth()
    (report,) = walk({"ses": ses, "backup": backup}, GateSet([health, limits]), ("ses", "backup"))
    assert report.outcome is AttemptOutcome.DEFER and report.hold_until == T0 + 600 and backup.calls == 0
    assert limits.check("ses", T0) is OPEN and health.check("ses", T0) is OPEN


def test_every_transport_refusing_the_sender_fails_it_and_no_transport_is_marked_down() -> None:
    ses = ScriptedTransport("ses", AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, NOT_VERIFIED, True)
    health = UpstreamHealth()
    (report,) = walk({"ses": ses}, GateSet([health, ProviderLimits()]), ("ses",))
    assert report.outcome is AttemptOutcome.FAIL and report.hold_until is None
    assert health.check("ses", T0) is OPEN


def test_a_quota_answered_at_mail_from_is_never_taken_for_a_refused_sender() -> None:
    gmail = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, DAILY, True)
    ses = ScriptedTransport("ses", AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, NOT_VERIFIED, True)
    (report,) = walk({"gmail": gmail, "ses": ses}, GateSet([UpstreamHealth(), ProviderLimits()]), ("gmail", "ses"))
    assert report.outcome is AttemptOutcome.DEFER  # gmail may take it once its quota resets: no bounce
    assert report.hold_until is None  # ses's refusal was not a provider limit: the ordinary schedule


def test_the_default_wait_is_the_classes_own() -> None:
    gmail = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, DAILY, True)
    limits = ProviderLimits()
    a = DeliveryAgent(
        config=lambda: CONFIG, spool=None, transports=lambda: {"gmail": gmail}, gates=GateSet([limits]),
        events=NullSink(), enqueue_bounce=None, build_dsn=None,  # type: ignore[arg-type]
        clock=lambda: T0,
    )
    uvloop.run(a.walk_chain(entry("a@x.test"), b"body", Route("all", ("gmail",)), ["a@x.test"], CONFIG))
    assert limits.check("gmail", T0).until == T0 + 3600  # Gmail's rolling day: try again in an hour
