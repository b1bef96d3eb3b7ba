"""Hold-and-release over a day window with an injected clock: the real scheduler, delivery walk,
shaping gate and hold book, a transport double and an in-memory spool; simulated hours in milliseconds."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import uvloop

from relayd.config.model import (
    CredentialsConfig, ListenerConfig, RelayConfig, RouteRule, SmtpTransportConfig, TenantConfig,
)
from relayd.config.shaping import Shaping
from relayd.delivery.gates import GateSet
from relayd.delivery.holding import MAX_RELEASE_SPREAD, HoldBook
from relayd.delivery.shaping import ShapingGate
from relayd.delivery.walk import DeliveryAgent
from relayd.observe import events as ev
from relayd.observe.counters import MemoryCounters
from relayd.queue.scheduler import Scheduler
from relayd.values import AttemptOutcome, Envelope, QueueEntry, Recipient, RecipientState, SmtpReply, Stage
from tests.test_delivery_outcome import ScriptedTransport
from tests.test_scheduler_clock import FakeClock

EVENING = datetime(2026, 12, 1, 18, 0, tzinfo=timezone.utc).timestamp()
MIDNIGHT = datetime(2026, 12, 2, 0, 0, tzinfo=timezone.utc).timestamp()
TENANT = TenantConfig("acme", None, ("*@acme.example",), (RouteRule("all", ("*",), ("gmail",)),))
CONFIG = RelayConfig(
    source=Path("relay.yaml"), hostname="relay.test", spool_dir=Path("/nonexistent"), log_file=None,
    credentials=CredentialsConfig(Path("/nonexistent/c")), listeners=(ListenerConfig(),),
    transports=MappingProxyType({"gmail": SmtpTransportConfig(
        name="gmail", host="127.0.0.1", port=1, shaping=Shaping(max_per_day=3),
    )}),
    tenants=MappingProxyType({"acme": TENANT}),
)


class MemorySpool:
    """The spool calls the walk makes, kept in memory; counts the state writes."""

    def __init__(self) -> None:
        self.writes: list[QueueEntry] = []
        self.completed: list[str] = []

    def read_body(self, message_id: str) -> bytes:
        return b"Subject: hi\r\n\r\nhello\r\n"

    async def update(self, entry: QueueEntry, *, durable: bool) -> None:
        self.writes.append(entry)

    def complete(self, message_id: str) -> None:
        self.completed.append(message_id)


class Recorder:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)


async def step(scheduler: Scheduler) -> None:
    """Start what is due now and let those deliveries finish (a bounce's file work runs in a thread)."""
    scheduler.start_due()
    for _ in range(5000):
        if not scheduler.in_flight_ids():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"deliveries still running: {scheduler.in_flight_ids()}")


def queued(number: int, received_at: float) -> QueueEntry:
    env = Envelope(f"1abcde-{number:06d}-00", "acme", "app@acme.example", ("r@x.test",), received_at, 100)
    return QueueEntry(env, (Recipient("r@x.test"),))


def relay(clock: FakeClock) -> tuple[Scheduler, HoldBook, MemorySpool, Recorder, list[Any], ScriptedTransport]:
    spool, events, bounces = MemorySpool(), Recorder(), []
    gmail = ScriptedTransport("gmail", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, SmtpReply(250, "2.0.0 OK"), False)
    shaping = ShapingGate(CONFIG.transport_shaping, MemoryCounters())

    async def enqueue_bounce(original: Envelope, dsn: bytes) -> None:
        bounces.append(original.id)

    agent = DeliveryAgent(
        config=lambda: CONFIG, spool=spool, transports=lambda: {"gmail": gmail}, gates=GateSet([shaping]),
        events=events, enqueue_bounce=enqueue_bounce, build_dsn=lambda **_kw: b"dsn", clock=clock,
    )
    holds = HoldBook(
        hold_until=agent.hold_until, gate_hold=agent.gate_hold, unrecorded=agent.unrecorded,
        spacing=shaping.spacing, config=lambda: CONFIG, events=events, clock=clock,
    )
    scheduler = Scheduler(agent.deliver, max_parallel=10, clock=clock, hold_until=holds.hold_until,
                          lane_of=agent.lane_of)
    return scheduler, holds, spool, events, bounces, gmail


def test_a_chain_at_its_daily_quota_holds_without_attempts_and_releases_after_midnight_spread() -> None:
    async def scenario() -> None:
        clock = FakeClock(EVENING)
        scheduler, holds, spool, events, bounces, gmail = relay(clock)
        scheduler.add_all(queued(n, EVENING) for n in range(8))
        for _ in range(3):
            await step(scheduler)
        assert gmail.calls == 3 and len(spool.completed) == 3
        waiting = scheduler.waiting()
        assert len(waiting) == 5
        assert all(MIDNIGHT <= until < MIDNIGHT + MAX_RELEASE_SPREAD for until in waiting.values())
        assert len(set(waiting.values())) == 5  # spread, not one instant
        held = next(iter(waiting))
        assert holds.reason(held) == "held: gmail daily quota 3 reached, resets 00:00 UTC"
        # Waiting is no attempt: nothing written, no attempt counted, no deferral logged.
        assert spool.writes == []
        entry = scheduler.get(held)
        assert entry is not None and entry.recipients[0].attempts == 0
        assert not any(isinstance(e, ev.RecipientDeferred) for e in events.events)
        # An hour of waiting in simulated time: nothing moves.
        clock.now = MIDNIGHT - 1
        await step(scheduler)
        assert gmail.calls == 3
        # Past midnight each is released at its own time; the new day's quota takes three.
        clock.now = MIDNIGHT + MAX_RELEASE_SPREAD
        for _ in range(3):
            await step(scheduler)
        assert gmail.calls == 6 and len(spool.completed) == 6
        assert len(scheduler) == 2 and bounces == []
        assert all(until >= MIDNIGHT + 86400 for until in scheduler.waiting().values())

    uvloop.run(scenario())


def test_a_held_message_warns_at_half_its_maximum_age_and_fails_with_retry_timeout_past_it() -> None:
    async def scenario() -> None:
        max_age = CONFIG.retry_for("gmail").max_age
        clock = FakeClock(EVENING)
        scheduler, holds, spool, events, bounces, gmail = relay(clock)
        scheduler.add_all(queued(n, EVENING) for n in range(3))
        await step(scheduler)
        assert gmail.calls == 3
        aging = queued(98, EVENING - max_age * 0.6)
        expired = queued(99, EVENING - max_age - 1)
        scheduler.add_all([aging, expired])
        for _ in range(2):
            await step(scheduler)
        warned = [e for e in events.events if isinstance(e, ev.MessageHeldLong)]
        assert [w.queue_id for w in warned] == [aging.id]
        assert scheduler.waiting().keys() == {aging.id}
        failed = [e for e in events.events if isinstance(e, ev.RecipientFailed)]
        assert len(failed) == 1 and failed[0].queue_id == expired.id
        assert failed[0].report.reason.startswith("retry timeout exceeded: held: gmail daily quota 3 reached")
        assert bounces == [expired.id] and gmail.calls == 3
        assert scheduler.get(expired.id) is None
        await step(scheduler)
        assert len([e for e in events.events if isinstance(e, ev.MessageHeldLong)]) == 1  # once

    uvloop.run(scenario())
