"""Fair scheduling: the pure choice of the next delivery, and the scheduler applying it (uvloop)."""

from __future__ import annotations

import asyncio
import time


from relayd.queue.fairness import DueLane, DueMessage, Lane, pick_lane, plan_starts
from relayd.queue.scheduler import Scheduler
from relayd.values import Envelope, QueueEntry, Recipient

from tests.eventloop import run_on_test_loop

ACME_SLOW = Lane("acme", ("slow",))
ACME_FAST = Lane("acme", ("fast",))
GLOBEX_FAST = Lane("globex", ("fast",))


def limit_of(limits: dict[str, int]):  # type: ignore[no-untyped-def]
    return lambda name: limits.get(name, 100)


def backlog(lane: Lane, count: int, *, first_due: float = 0.0) -> list[DueMessage]:
    return [DueMessage(f"{lane.tenant}-{i}", lane, first_due + i) for i in range(count)]


def test_a_tenant_with_one_message_starts_before_another_tenants_long_backlog() -> None:
    due = backlog(ACME_FAST, 150) + [DueMessage("globex-0", GLOBEX_FAST, 500.0)]
    picks = plan_starts(due, free_slots=1, tenant_in_flight={"acme": 5}, transport_in_flight={"fast": 5},
                        transport_limit=limit_of({}))
    assert picks == ["globex-0"]


def test_tenants_with_as_many_deliveries_running_take_turns_oldest_first() -> None:
    due = backlog(ACME_FAST, 3) + [DueMessage(f"globex-{i}", GLOBEX_FAST, 10.0 + i) for i in range(3)]
    picks = plan_starts(due, free_slots=5, tenant_in_flight={}, transport_in_flight={},
                        transport_limit=limit_of({}))
    assert picks == ["acme-0", "globex-0", "acme-1", "globex-1", "acme-2"]


def test_a_transport_at_its_limit_waits_while_other_transports_keep_starting() -> None:
    due = backlog(ACME_SLOW, 150) + [DueMessage("acme-fast", ACME_FAST, 400.0),
                                     DueMessage("globex-0", GLOBEX_FAST, 500.0)]
    picks = plan_starts(due, free_slots=20, tenant_in_flight={"acme": 10}, transport_in_flight={"slow": 10},
                        transport_limit=limit_of({"slow": 10}))
    assert picks == ["globex-0", "acme-fast"]


def test_the_limit_fills_up_and_then_stops_a_lane() -> None:
    picks = plan_starts(backlog(ACME_SLOW, 150), free_slots=20, tenant_in_flight={}, transport_in_flight={},
                        transport_limit=limit_of({"slow": 4}))
    assert picks == [f"acme-{i}" for i in range(4)]


def test_a_message_for_two_transports_needs_a_free_slot_on_both() -> None:
    both = Lane("acme", ("fast", "slow"))
    blocked = pick_lane([DueLane(both, 0.0)], tenant_in_flight={}, transport_in_flight={"slow": 2},
                        transport_limit=limit_of({"slow": 2}))
    assert blocked is None
    picks = plan_starts([DueMessage("a", both, 0.0), DueMessage("b", GLOBEX_FAST, 1.0)], free_slots=3,
                        tenant_in_flight={}, transport_in_flight={}, transport_limit=limit_of({"fast": 1}))
    assert picks == ["a"]  # "a" took fast's only slot


def test_nothing_starts_without_a_free_slot() -> None:
    assert plan_starts(backlog(ACME_FAST, 3), free_slots=0, tenant_in_flight={}, transport_in_flight={},
                       transport_limit=limit_of({})) == []


# -- the scheduler, on the production event loop ------------------------------------------


def queued(message_id: str, tenant: str, domain: str, received_at: float) -> QueueEntry:
    envelope = Envelope(message_id, tenant, f"app@{tenant}.example", (f"r@{domain}",), received_at, 100)
    return QueueEntry(envelope, (Recipient(f"r@{domain}"),))


def lane_by_domain(entry: QueueEntry) -> Lane:
    domain = entry.recipients[0].address.rpartition("@")[2]
    return Lane(entry.envelope.tenant, ("slow" if domain == "slow.test" else "fast",))


def test_scheduler_starts_another_tenants_message_while_a_slow_backlog_holds_its_transport() -> None:
    async def scenario() -> tuple[float, dict[str, int], dict[str, int]]:
        started: dict[str, float] = {}
        release = asyncio.Event()

        async def deliver(entry: QueueEntry) -> QueueEntry | None:
            started[entry.id] = time.monotonic()
            if entry.recipients[0].address.endswith("@slow.test"):
                await release.wait()  # the slow upstream never answers during the test
            return None

        scheduler = Scheduler(deliver, max_parallel=20, lane_of=lane_by_domain,
                              transport_limit=lambda name: 10 if name == "slow" else 20)
        runner = asyncio.get_running_loop().create_task(scheduler.run())
        now = time.time()
        scheduler.add_all(queued(f"acme-{i:03d}", "acme", "slow.test", now - 100 + i / 10) for i in range(150))
        await asyncio.sleep(0.05)
        queued_at = time.monotonic()
        scheduler.add(queued("globex-000", "globex", "fast.test", now))
        scheduler.add(queued("acme-fast", "acme", "fast.test", now))
        for _ in range(100):
            if "globex-000" in started and "acme-fast" in started:
                break
            await asyncio.sleep(0.01)
        waited = max(started.get("globex-000", 1e9), started.get("acme-fast", 1e9)) - queued_at
        counts = scheduler.in_flight_counts()
        release.set()
        await scheduler.stop(1.0)
        runner.cancel()
        return waited, counts[0], counts[1]

    waited, by_tenant, by_transport = run_on_test_loop(scenario())
    assert waited < 0.5
    assert by_transport == {"slow": 10}  # the slow upstream holds only its own share
    assert by_tenant == {"acme": 10}


def test_messages_behind_a_down_upstream_are_put_back_without_holding_up_another_lane() -> None:
    async def scenario() -> tuple[list[str], int]:
        started: list[str] = []
        now = time.time()

        async def deliver(entry: QueueEntry) -> QueueEntry | None:
            started.append(entry.id)
            return None

        def hold_until(entry: QueueEntry) -> float | None:
            return now + 3600 if entry.recipients[0].address.endswith("@slow.test") else None

        scheduler = Scheduler(deliver, max_parallel=20, lane_of=lane_by_domain, hold_until=hold_until,
                              transport_limit=lambda name: 10)
        # 3,000 held messages: more than one put-back batch, so the sweep must resume by itself.
        scheduler.add_all(queued(f"acme-{i:04d}", "acme", "slow.test", now - 100) for i in range(3000))
        scheduler.add(queued("globex-000", "globex", "fast.test", now))
        runner = asyncio.get_running_loop().create_task(scheduler.run())
        for _ in range(200):
            if started and len(scheduler.waiting()) == 3000:
                break
            await asyncio.sleep(0.01)
        waiting = len(scheduler.waiting())
        await scheduler.stop(1.0)
        runner.cancel()
        return started, waiting

    started, waiting = run_on_test_loop(scenario())
    assert started == ["globex-000"]
    assert waiting == 3000
