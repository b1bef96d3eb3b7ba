"""The outcome stage as pure logic: retry arithmetic over days in milliseconds, chain walking."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import MappingProxyType

from relayd.config.model import CredentialsConfig, ListenerConfig, RelayConfig, RouteRule, TenantConfig
from relayd.delivery.outcome import RETRY_TIMEOUT, apply_reports
from relayd.delivery.walk import DeliveryAgent
from relayd.observe.events import NullSink
from relayd.delivery.gates import GateSet
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.values import (
    AttemptOutcome, AttemptResult, Delivery, DeliveryReport, Envelope, QueueEntry, Recipient,
    RecipientResult, RecipientState, Route, SmtpReply, Stage,
)

TENANT = TenantConfig("acme", None, ("*@acme.example",), (RouteRule("all", ("*",), ("gmail", "sendgrid")),))
CONFIG = RelayConfig(
    source=Path("relay.yaml"), hostname="relay.test", spool_dir=Path("/nonexistent"), log_file=None,
    credentials=CredentialsConfig(Path("/nonexistent/c")), listeners=(ListenerConfig(),),
    transports=MappingProxyType({}), tenants=MappingProxyType({"acme": TENANT}),
)


def entry(*addresses: str) -> QueueEntry:
    env = Envelope("1abcde-000001-00", "acme", "billing@acme.example", tuple(addresses), 0.0, 10)
    return QueueEntry(env, tuple(Recipient(a) for a in addresses))


def deferral(address: str) -> DeliveryReport:
    return DeliveryReport(address, AttemptOutcome.DEFER, "all", "gmail", reply=SmtpReply(451, "4.3.0 later"), reason="451 4.3.0 later")


def test_default_schedule_defers_for_four_days_then_fails_with_retry_timeout() -> None:
    current = entry("a@x.test")
    now = 0.0
    attempts = 0
    while True:
        outcome = apply_reports(current, [deferral("a@x.test")], now=now, config=CONFIG)
        current = outcome.entry
        attempts += 1
        (recipient,) = current.recipients
        if recipient.state is RecipientState.FAILED:
            break
        assert recipient.state is RecipientState.DEFERRED and recipient.first_failure == 0.0
        assert recipient.next_attempt is not None and recipient.next_attempt > now
        now = recipient.next_attempt
    assert 4 * 86400 <= now < 4 * 86400 + 6 * 3600
    assert attempts == 28
    assert outcome.newly_failed and outcome.newly_failed[0].reason.startswith(RETRY_TIMEOUT)


def test_delivered_and_failed_recipients_are_final_and_others_keep_their_state() -> None:
    e = entry("ok@x.test", "bad@x.test", "later@x.test")
    reports = [
        DeliveryReport("ok@x.test", AttemptOutcome.DELIVERED, "all", "gmail", reply=SmtpReply(250, "2.0.0 OK")),
        DeliveryReport("bad@x.test", AttemptOutcome.FAIL, "all", "gmail", reply=SmtpReply(550, "5.1.1 no")),
    ]
    outcome = apply_reports(e, reports, now=5.0, config=CONFIG)
    states = [r.state for r in outcome.entry.recipients]
    assert states == [RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.PENDING]
    assert [r.address for r in outcome.newly_failed] == ["bad@x.test"]


class ScriptedTransport:
    """A Transport double that answers every recipient the same way."""

    def __init__(self, name: str, outcome: AttemptOutcome, stage: Stage, reply: SmtpReply | None, connection_failed: bool) -> None:
        self.name, self.outcome, self.stage, self.reply, self.connection_failed = name, outcome, stage, reply, connection_failed
        self.calls = 0

    async def send(self, delivery: Delivery) -> AttemptResult:
        self.calls += 1
        results = tuple(RecipientResult(a, self.outcome, self.stage, self.reply) for a in delivery.recipients)
        return AttemptResult(self.name, results, host="127.0.0.1", connection_failed=self.connection_failed)

    async def close(self) -> None:
        pass


def walk(transports: dict[str, ScriptedTransport], health: UpstreamHealth) -> list[DeliveryReport]:
    agent = DeliveryAgent(
        config=lambda: CONFIG, spool=None, transports=lambda: transports, gates=GateSet([health]), events=NullSink(),
        enqueue_bounce=None, build_dsn=None,  # type: ignore[arg-type]
    )
    return asyncio.run(agent.walk_chain(entry("a@x.test"), b"body", Route("all", ("gmail", "sendgrid")), ["a@x.test"], CONFIG))


def test_connection_failure_fails_over_and_marks_the_upstream_skipped() -> None:
    health = UpstreamHealth()
    gmail = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.CONNECT, None, True)
    sendgrid = ScriptedTransport("sendgrid", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, SmtpReply(250, "ok"), False)
    (report,) = walk({"gmail": gmail, "sendgrid": sendgrid}, health)
    assert report.outcome is AttemptOutcome.DELIVERED and report.transport == "sendgrid"
    assert health.is_skipped("gmail") is not None and health.is_skipped("sendgrid") is None
    (again,) = walk({"gmail": gmail, "sendgrid": sendgrid}, health)
    assert gmail.calls == 1 and again.transport == "sendgrid"  # skipped, not reconnected


def test_every_transport_refusing_the_sender_permanently_fails_the_recipient() -> None:
    refusal = SmtpReply(554, "5.7.1 Email address is not verified")
    both = {n: ScriptedTransport(n, AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, refusal, True) for n in ("gmail", "sendgrid")}
    (report,) = walk(both, UpstreamHealth())
    assert report.outcome is AttemptOutcome.FAIL and report.tried == ("gmail", "sendgrid")


def test_temporary_failures_everywhere_defer() -> None:
    busy = {n: ScriptedTransport(n, AttemptOutcome.NEXT_TRANSPORT, Stage.GREETING, SmtpReply(421, "4.7.0 busy"), True) for n in ("gmail", "sendgrid")}
    (report,) = walk(busy, UpstreamHealth())
    assert report.outcome is AttemptOutcome.DEFER and report.reply == SmtpReply(421, "4.7.0 busy")
