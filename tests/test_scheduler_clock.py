"""The scheduler with an injected clock: due times, retry waits, gates and fair picks in milliseconds.

No sockets and no sleeping: the clock is a value the test moves, and each
step is `Scheduler.start_due()` followed by letting the started deliveries
finish. Runs on the test loop (uvloop, the loop production uses; see tests/eventloop.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Callable, Coroutine


from relayd.queue.fairness import Lane
from relayd.delivery.gates import GateSet, GateVerdict, OPEN, AttemptEnd, GateReport, closed_until, earliest_reopening
from relayd.config.retry import parse_retry_schedule
from relayd.queue.scheduler import Scheduler
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.values import Envelope, QueueEntry, Recipient, RecipientState

from tests.eventloop import run_on_test_loop

T0 = 1_800_000_000.0
CHAIN = ("gmail", "sendgrid")
SCHEDULE = parse_retry_schedule("F,1h,15m; G,16h,1h,2")


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ManualGate:
    """A gate the test opens and closes by hand (as a rate-limit or quota gate will)."""

    def __init__(self) -> None:
        self.closed: dict[str, GateVerdict] = {}

    def check(self, transport: str, now: float) -> GateVerdict:
        verdict = self.closed.get(transport, OPEN)
        return OPEN if verdict.until is None or now >= verdict.until else verdict

    def attempt_started(self, transport: str, now: float) -> None:
        pass

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        pass


def queued(message_id: str, tenant: str = "acme", *, received_at: float = T0, next_attempt: float | None = None) -> QueueEntry:
    envelope = Envelope(message_id, tenant, f"app@{tenant}.example", ("r@x.test",), received_at, 100)
    state = RecipientState.PENDING if next_attempt is None else RecipientState.DEFERRED
    return QueueEntry(envelope, (Recipient("r@x.test", state=state, next_attempt=next_attempt),))


def run(scenario: Callable[[], Coroutine[object, object, None]]) -> None:
    started = time.monotonic()
    run_on_test_loop(scenario())
    assert time.monotonic() - started < 2.0  # milliseconds of work, whatever the simulated span


async def step(scheduler: Scheduler) -> list[str]:
    """Start what is due now and let those deliveries finish."""
    started = scheduler.start_due()
    for _ in range(100):
        if not scheduler.in_flight_ids():
            break
        await asyncio.sleep(0)
    assert not scheduler.in_flight_ids()
    return started


def test_a_message_starts_when_its_due_time_comes_and_not_before() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        scheduler = Scheduler(lambda entry: _delivered(entry), max_parallel=5, clock=clock)
        scheduler.add(queued("later", next_attempt=T0 + 900))
        scheduler.add(queued("now"))
        assert await step(scheduler) == ["now"]
        clock.now = T0 + 899
        assert await step(scheduler) == []
        clock.now = T0 + 900
        assert await step(scheduler) == ["later"]
        assert len(scheduler) == 0

    run(scenario)


async def _delivered(entry: QueueEntry) -> QueueEntry | None:
    return None


def test_a_deferred_message_is_tried_again_at_each_retry_time_of_its_schedule() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        attempts: list[float] = []

        async def defer(entry: QueueEntry) -> QueueEntry | None:
            attempts.append(clock.now)
            (recipient,) = entry.recipients
            first = recipient.first_failure if recipient.first_failure is not None else clock.now
            planned = SCHEDULE.next_attempt(first, clock.now, recipient.last_interval)
            if planned is None:
                return None  # the schedule ran out: the message fails and leaves the queue
            next_attempt, interval = planned
            moved = replace(recipient, state=RecipientState.DEFERRED, first_failure=first,
                            next_attempt=next_attempt, last_interval=interval)
            return replace(entry, recipients=(moved,))

        scheduler = Scheduler(defer, max_parallel=5, clock=clock)
        scheduler.add(queued("m"))
        for _ in range(50):
            await step(scheduler)
            due = [e.next_due() for e in scheduler.entries()]
            if not due:
                break
            assert due[0] is not None
            clock.now = due[0] - 1
            assert await step(scheduler) == []  # one second early: nothing starts
            clock.now = due[0]
        offsets = [round(a - T0) for a in attempts]
        # 15 minutes for the first hour, then 1h, 2h, 4h, 8h up to 16 hours; then it fails.
        assert offsets == [0, 900, 1800, 2700, 3600, 7200, 14400, 28800, 57600]
        assert len(scheduler) == 0

    run(scenario)


def test_a_message_whose_every_transport_is_closed_waits_for_the_first_reopening() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        health = UpstreamHealth(clock)
        gates = GateSet([health])
        started: list[str] = []

        async def deliver(entry: QueueEntry) -> QueueEntry | None:
            started.append(entry.id)
            return None

        def hold_until(entry: QueueEntry) -> float | None:
            return earliest_reopening(gates, CHAIN, clock()).until

        scheduler = Scheduler(deliver, max_parallel=5, clock=clock, hold_until=hold_until)
        down = GateReport(AttemptEnd.UNREACHABLE, "connection refused", retry=SCHEDULE)
        gates.attempt_ended("gmail", down, clock.now)  # closed for 15 minutes
        clock.now += 300
        gates.attempt_ended("sendgrid", down, clock.now)  # closed until 20 minutes
        scheduler.add(queued("m", received_at=clock.now))
        assert await step(scheduler) == []
        assert scheduler.waiting() == {"m": T0 + 900}  # gmail reopens first
        clock.now = T0 + 899
        assert await step(scheduler) == []
        clock.now = T0 + 900
        assert await step(scheduler) == ["m"]

    run(scenario)


def test_a_gate_that_opens_early_releases_the_waiting_message_on_wake() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        quota = ManualGate()
        gates = GateSet([UpstreamHealth(clock), quota])
        quota.closed["gmail"] = closed_until(T0 + 86400, "daily quota", gate="quota", forceable=False)
        started: list[str] = []

        async def deliver(entry: QueueEntry) -> QueueEntry | None:
            started.append(entry.id)
            return None

        scheduler = Scheduler(deliver, max_parallel=5, clock=clock,
                              hold_until=lambda entry: earliest_reopening(gates, ("gmail",), clock()).until)
        scheduler.add(queued("m"))
        assert await step(scheduler) == []
        assert scheduler.waiting() == {"m": T0 + 86400}
        clock.now += 60
        del quota.closed["gmail"]  # e.g. the provider's window reset early
        scheduler.gate_opened()
        assert await step(scheduler) == ["m"]

    run(scenario)


def test_a_forced_message_is_not_held_by_a_retry_wait() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        health = UpstreamHealth(clock)
        health.attempt_ended("gmail", GateReport(AttemptEnd.UNREACHABLE, "refused", retry=SCHEDULE), clock.now)
        scheduler = Scheduler(_delivered, max_parallel=5, clock=clock,
                              hold_until=lambda entry: earliest_reopening(health, ("gmail",), clock()).until)
        scheduler.add(queued("m"))
        assert await step(scheduler) == []
        scheduler.force(["m"])
        assert await step(scheduler) == ["m"]

    run(scenario)


def test_the_tenant_with_fewer_deliveries_running_goes_first_and_transport_limits_hold() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        release = asyncio.Event()

        async def slow(entry: QueueEntry) -> QueueEntry | None:
            await release.wait()
            return None

        def lane_of(entry: QueueEntry) -> Lane:
            return Lane(entry.envelope.tenant, ("gmail" if entry.envelope.tenant == "acme" else "sendgrid",))

        scheduler = Scheduler(slow, max_parallel=4, clock=clock, lane_of=lane_of,
                              transport_limit=lambda name: 2 if name == "gmail" else 10)
        for i in range(10):
            scheduler.add(queued(f"acme-{i}", "acme", received_at=T0 - 100 + i))
        scheduler.add(queued("globex-0", "globex", received_at=T0))
        first = scheduler.start_due()
        # acme has the oldest messages, but only two may run on gmail; globex is not held up.
        assert first == ["acme-0", "globex-0", "acme-1"]
        assert scheduler.in_flight_counts() == ({"acme": 2, "globex": 1}, {"gmail": 2, "sendgrid": 1})
        release.set()
        await scheduler.stop(1.0)

    run(scenario)
