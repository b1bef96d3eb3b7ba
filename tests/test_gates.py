"""Gates: pure verdicts over an injected time, and the chain walk asking a composed set."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from relayd.delivery.walk import DeliveryAgent
from relayd.delivery.gates import (
    OPEN, AttemptEnd, GateReport, GateSet, GateVerdict, closed_until, combine, earliest_reopening,
)
from relayd.config.retry import parse_retry_schedule
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.values import AttemptOutcome, Delivery, AttemptResult, DeliveryReport, Route, SmtpReply, Stage
from relayd.observe.events import NullSink
from tests.eventloop import run_on_test_loop
from tests.test_delivery_outcome import CONFIG, ScriptedTransport, entry

T0 = 1_800_000_000.0
SCHEDULE = parse_retry_schedule("F,1h,15m; G,16h,1h,2")
REFUSED = GateReport(AttemptEnd.UNREACHABLE, "connect to smtp.gmail.com port 587: connection refused", retry=SCHEDULE)


class ManualGate:
    """A gate closed by hand, as a quota or rate-limit gate will close one; records what it is told."""

    def __init__(self, closed: dict[str, GateVerdict] | None = None) -> None:
        self.closed = closed or {}
        self.told: list[tuple[str, str, AttemptEnd | None, int]] = []

    def check(self, transport: str, now: float) -> GateVerdict:
        return self.closed.get(transport, OPEN)

    def attempt_started(self, transport: str, now: float) -> None:
        self.told.append(("started", transport, None, 0))

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        self.told.append(("ended", transport, report.outcome, report.recipients))


def quota_closed(until: float) -> GateVerdict:
    return closed_until(until, "daily quota, resets 00:00 UTC", gate="quota", forceable=False)


def agent(transports: dict[str, ScriptedTransport], gates: GateSet, *, forced: bool = False) -> DeliveryAgent:
    return DeliveryAgent(
        config=lambda: CONFIG, spool=None, transports=lambda: transports, gates=gates, events=NullSink(),
        enqueue_bounce=None, build_dsn=None,  # type: ignore[arg-type]
        is_forced=lambda _id: forced, clock=lambda: T0,
    )


def walk(transports: dict[str, ScriptedTransport], gates: GateSet, *, forced: bool = False) -> list[DeliveryReport]:
    chain = Route("all", ("gmail", "sendgrid"))
    return run_on_test_loop(agent(transports, gates, forced=forced).walk_chain(entry("a@x.test"), b"body", chain, ["a@x.test"], CONFIG))


def upstreams() -> dict[str, ScriptedTransport]:
    ok = SmtpReply(250, "2.0.0 OK")
    return {n: ScriptedTransport(n, AttemptOutcome.DELIVERED, Stage.AFTER_DATA, ok, False) for n in ("gmail", "sendgrid")}


# -- the host retry state as a gate ---------------------------------------------------


def test_an_unreachable_upstream_is_closed_until_its_retry_time_then_open() -> None:
    health = UpstreamHealth(clock=lambda: T0)
    health.attempt_ended("gmail", REFUSED, T0)
    verdict = health.check("gmail", T0 + 899)
    assert verdict.until == T0 + 900 and verdict.gate == "retry" and verdict.forceable
    assert health.check("gmail", T0 + 900) is OPEN
    assert health.check("sendgrid", T0) is OPEN


def test_the_retry_wait_follows_the_schedule_from_the_first_failure_and_a_success_reopens_at_once() -> None:
    health = UpstreamHealth()
    now = T0
    ends = []
    for _ in range(6):
        health.attempt_ended("gmail", REFUSED, now)
        until = health.check("gmail", now).until
        assert until is not None
        ends.append(round(until - T0))
        now = until
    assert ends == [900, 1800, 2700, 3600, 7200, 14400]
    health.attempt_ended("gmail", GateReport(AttemptEnd.REACHED), now - 1)
    assert health.check("gmail", now - 1) is OPEN


def test_an_abandoned_or_quota_attempt_leaves_the_retry_state_alone() -> None:
    health = UpstreamHealth()
    health.attempt_ended("gmail", REFUSED, T0)
    health.attempt_ended("gmail", GateReport(AttemptEnd.ABANDONED), T0 + 1)
    health.attempt_ended("gmail", GateReport(AttemptEnd.QUOTA_REACHED, reset_at=T0 + 86400), T0 + 2)
    assert health.check("gmail", T0 + 3).until == T0 + 900


# -- composing gates ----------------------------------------------------------------


def test_several_closures_keep_a_transport_closed_until_the_last_one_opens() -> None:
    retry = closed_until(T0 + 900, "retry wait", gate="retry")
    quota = quota_closed(T0 + 86400)
    assert combine([OPEN, OPEN]) is OPEN
    both = combine([retry, OPEN, quota])
    assert both.until == T0 + 86400 and both.gate == "quota" and not both.forceable
    # A later forceable closure over an earlier unforceable one stays unforceable.
    mixed = combine([closed_until(T0 + 10, "x", gate="quota", forceable=False), retry])
    assert mixed.until == T0 + 900 and not mixed.admits(forced=True)
    assert retry.admits(forced=True) and not retry.admits(forced=False)


def test_a_chain_is_open_while_one_transport_is_and_otherwise_waits_for_the_first_reopening() -> None:
    gate = ManualGate({"gmail": quota_closed(T0 + 86400)})
    assert earliest_reopening(gate, ("gmail", "sendgrid"), T0) is OPEN
    gate.closed["sendgrid"] = closed_until(T0 + 900, "retry wait", gate="retry")
    assert earliest_reopening(gate, ("gmail", "sendgrid"), T0).until == T0 + 900
    assert earliest_reopening(gate, (), T0) is OPEN


# -- the chain walk asking the set ----------------------------------------------------


def test_a_transport_closed_by_any_gate_is_skipped_by_the_chain_walk_like_a_down_upstream() -> None:
    transports = upstreams()
    quota = ManualGate({"gmail": quota_closed(T0 + 86400)})
    (report,) = walk(transports, GateSet([UpstreamHealth(), quota]))
    assert report.outcome is AttemptOutcome.DELIVERED and report.transport == "sendgrid"
    assert transports["gmail"].calls == 0 and report.tried == ("gmail", "sendgrid")


def test_when_every_transport_is_closed_the_recipient_is_deferred_with_each_reason() -> None:
    transports = upstreams()
    quota = ManualGate({"gmail": quota_closed(T0 + 86400)})
    health = UpstreamHealth()
    health.attempt_ended("sendgrid", REFUSED, T0)
    (report,) = walk(transports, GateSet([health, quota]))
    assert report.outcome is AttemptOutcome.DEFER
    assert report.reason == "no transport may take it now: gmail daily quota, resets 00:00 UTC; sendgrid retry wait"
    assert transports["gmail"].calls == transports["sendgrid"].calls == 0


def test_retry_waits_alone_keep_the_log_wording_operators_know() -> None:
    health = UpstreamHealth()
    for name in ("gmail", "sendgrid"):
        health.attempt_ended(name, REFUSED, T0)
    (report,) = walk(upstreams(), GateSet([health]))
    assert report.reason == "all transports are in their retry wait"


def test_a_forced_delivery_passes_a_retry_wait_but_not_a_quota() -> None:
    transports = upstreams()
    health = UpstreamHealth()
    health.attempt_ended("gmail", REFUSED, T0)
    health.attempt_ended("sendgrid", REFUSED, T0)
    quota = ManualGate({"gmail": quota_closed(T0 + 86400)})
    (report,) = walk(transports, GateSet([health, quota]), forced=True)
    assert report.transport == "sendgrid" and transports["gmail"].calls == 0


def test_every_attempt_is_told_to_the_gates_as_started_then_ended_with_what_it_reached() -> None:
    down = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.CONNECT, None, True)
    ok = ScriptedTransport("sendgrid", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, SmtpReply(250, "ok"), False)
    recorder = ManualGate()
    health = UpstreamHealth()
    walk({"gmail": down, "sendgrid": ok}, GateSet([health, recorder]))
    assert recorder.told == [
        ("started", "gmail", None, 0), ("ended", "gmail", AttemptEnd.UNREACHABLE, 0),
        ("started", "sendgrid", None, 0), ("ended", "sendgrid", AttemptEnd.REACHED, 1),
    ]
    assert health.check("gmail", T0).until is not None and health.check("sendgrid", T0) is OPEN


class HangingTransport:
    name = "gmail"

    async def send(self, delivery: Delivery) -> AttemptResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        pass


def test_a_cancelled_attempt_still_ends_for_the_gates() -> None:
    recorder = ManualGate()

    async def scenario() -> None:
        a = agent({"gmail": HangingTransport()}, GateSet([recorder]))  # type: ignore[dict-item]
        task = asyncio.create_task(a.walk_chain(entry("a@x.test"), b"body", Route("all", ("gmail",)), ["a@x.test"], CONFIG))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_on_test_loop(scenario())
    assert recorder.told == [("started", "gmail", None, 0), ("ended", "gmail", AttemptEnd.ABANDONED, 0)]


def test_a_message_whose_every_transport_is_closed_is_held_until_the_first_reopening_with_its_reason() -> None:
    health = UpstreamHealth()
    health.attempt_ended("sendgrid", REFUSED, T0 - 600)  # reopens at T0 + 300
    quota = ManualGate({"gmail": quota_closed(T0 + 86400)})
    a = agent(upstreams(), GateSet([health, quota]))
    fresh = entry("a@x.test")
    fresh = replace(fresh, envelope=replace(fresh.envelope, received_at=T0 - 60))  # far from its maximum age
    held = a.gate_hold(fresh)
    assert held.until == T0 + 300 and held.reason == "retry wait"
    assert a.hold_until(fresh) == T0 + 300
    del quota.closed["gmail"]
    assert a.gate_hold(fresh) is OPEN and a.hold_until(fresh) is None
