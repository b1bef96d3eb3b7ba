"""The shaping gate with caps shared between nodes: reservations, give-backs and the local share, on a fake clock.

The store here is an in-memory `SharedClaims` that can be switched off, so
each rule is pinned on its own; tests/test_shaping_redis.py drives the same
path with two relayd processes and a real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from relayd.config.shaping import Shaping
from relayd.delivery.gates import AttemptEnd, GateReport, GateSet
from relayd.delivery.shaping import QUOTA_GATE, ShapingGate, status_wire
from relayd.delivery.sharedcaps import SharedCaps
from relayd.observe.claims import Claim, Pace, Reserved, Taken
from relayd.observe.counters import DAY, CounterError, MemoryCounters, Window
from relayd.observe.shapingmetrics import ShapingCollector
from tests.test_shaping_gate import EVENING, NOTHING, SENT


class SwitchableStore:
    """A shared store in memory whose every call fails while `down` is set."""

    def __init__(self) -> None:
        self.counts = MemoryCounters()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise CounterError("redis 127.0.0.1:6379/0: ConnectionError")

    async def add(self, key: str, window: Window, n: int, now: float) -> int:
        self._check()
        return await self.counts.add(key, window, n, now)

    async def count(self, key: str, window: Window, now: float) -> int:
        self._check()
        return await self.counts.count(key, window, now)

    async def close(self) -> None:
        await self.counts.close()

    async def take(self, claims: Sequence[Claim], n: int, now: float) -> Taken:
        answer = await self.reserve(claims, None, now)
        return Taken(answer.ok, answer.counts)

    async def reserve(self, claims: Sequence[Claim], pace: Pace | None, now: float) -> Reserved:
        self._check()
        counts = [await self.counts.count(c.key, c.window, now) for c in claims]
        if any(c.cap is not None and n + 1 > c.cap for c, n in zip(claims, counts)):
            return Reserved(False, tuple(counts))
        return Reserved(True, tuple([await self.counts.add(c.key, c.window, 1, now) for c in claims]))

    async def give_back(self, claims: Sequence[Claim], n: int, at: float) -> None:
        self._check()
        for c in claims:
            slot = (c.key, c.window.slot(at))
            self.counts._counts[slot] = max(0, self.counts._counts.get(slot, 0) - n)  # noqa: SLF001 (test double)


def shared_gate(store: SwitchableStore, limits: Shaping, notes: list[str]) -> tuple[ShapingGate, GateSet]:
    caps = SharedCaps(store, "redis 127.0.0.1:6379/0", local_share=lambda: 0.5, on_change=notes.append,
                      clock=lambda: EVENING)
    gate = ShapingGate(lambda _name: limits, MemoryCounters(), shared=caps)
    return gate, GateSet([gate], reserving=[gate])


async def attempt(gates: GateSet, report: GateReport, now: float = EVENING) -> bool:
    """One attempt as the delivery walk makes it; whether its place was held (and the send made)."""
    if not gates.check("gw", now).is_open:
        return False
    gates.attempt_started("gw", now)
    reservation = await gates.reserve("gw", now)
    if not reservation.verdict.is_open:
        gates.attempt_ended("gw", GateReport(AttemptEnd.ABANDONED), now)
        return False
    gates.attempt_ended("gw", report, now)
    reservation.settle(report, now)
    return True


def test_another_node_s_sends_close_the_transport_here_at_the_shared_cap() -> None:
    async def main() -> None:
        store, notes = SwitchableStore(), []
        gate, gates = shared_gate(store, Shaping(max_per_day=4), notes)
        await store.add("transport:gw", DAY, 3, EVENING)  # the other node's sends today
        assert await attempt(gates, SENT)
        assert not await attempt(gates, SENT)
        verdict = gate.check("gw", EVENING + 1)
        assert verdict.gate == QUOTA_GATE and verdict.reason.startswith("daily quota 4 reached")
        await gate.drain()

    asyncio.run(main())


def test_a_send_the_upstream_did_not_take_gives_its_place_back() -> None:
    async def main() -> None:
        store, notes = SwitchableStore(), []
        gate, gates = shared_gate(store, Shaping(max_per_day=2), notes)
        await store.add("transport:gw", DAY, 1, EVENING)  # another node's send
        assert await attempt(gates, NOTHING)  # took the last place, then the upstream took nothing
        await gate.drain()
        assert await store.count("transport:gw", DAY, EVENING) == 1
        assert gate.check("gw", EVENING).is_open  # the place is free here too, not only in the store
        store.counts._counts.clear()  # noqa: SLF001 (a new day in the store)
        assert await attempt(gates, SENT) and await attempt(gates, SENT)
        assert not await attempt(gates, SENT)
        await gate.drain()

    asyncio.run(main())


def test_recipients_past_the_first_are_added_once_the_upstream_took_them() -> None:
    async def main() -> None:
        store, notes = SwitchableStore(), []
        gate, gates = shared_gate(store, Shaping(max_recipients_per_day=100), notes)
        assert await attempt(gates, GateReport(AttemptEnd.REACHED, messages=1, recipients=7))
        await gate.drain()
        assert await store.count("transport:gw:rcpt", DAY, EVENING) == 7

    asyncio.run(main())


def test_a_store_that_goes_away_mid_reservation_holds_the_node_to_its_local_share_and_says_so() -> None:
    async def main() -> None:
        store, notes = SwitchableStore(), []
        gate, gates = shared_gate(store, Shaping(max_per_day=10), notes)
        assert await attempt(gates, SENT)
        store.down = True
        # Started together while the store fails: half of 10 is this node's, one already used.
        gates.attempt_started("gw", EVENING)
        results = [await attempt(gates, SENT) for _ in range(8)]
        gates.attempt_ended("gw", SENT, EVENING)
        assert results == [True, True, True, False, False, False, False, False]
        verdict = gate.check("gw", EVENING)
        assert verdict.reason.startswith("daily quota 5 (local share of 10) reached")
        assert len(notes) == 1 and "local share (50%)" in notes[0]
        await gate.drain()

    asyncio.run(main())


def test_a_store_that_answers_again_gets_what_the_node_sent_meanwhile_and_is_shared_again() -> None:
    async def main() -> None:
        store, notes = SwitchableStore(), []
        caps = SharedCaps(store, "redis 127.0.0.1:6379/0", local_share=lambda: 0.5, on_change=notes.append,
                          probe_every=0.01, clock=lambda: EVENING)
        gate = ShapingGate(lambda _name: Shaping(max_per_day=10), MemoryCounters(), shared=caps)
        gates = GateSet([gate], reserving=[gate])
        store.down = True
        assert await attempt(gates, SENT) and await attempt(gates, SENT)
        store.down = False
        for _ in range(100):
            if not caps.away:
                break
            await asyncio.sleep(0.01)
        assert not caps.away and "reachable again" in notes[-1]
        assert await store.count("transport:gw", DAY, EVENING) == 2
        assert await attempt(gates, SENT)
        assert await store.count("transport:gw", DAY, EVENING) == 3
        await gate.drain()

    asyncio.run(main())


def test_status_and_metrics_say_whether_the_caps_are_shared_or_the_local_share_applies() -> None:
    async def main() -> None:
        store, notes = SwitchableStore(), []
        gate, gates = shared_gate(store, Shaping(max_per_day=10), notes)

        def shared_sample() -> tuple[str, float]:
            wire = {s.transport: status_wire(s) for s in gate.status(["gw"], EVENING)}
            family = next(m for m in ShapingCollector(lambda: wire).collect() if m.name == "relayd_transport_caps_shared")
            return str(wire["gw"]["shared"]), family.samples[0].value

        assert await attempt(gates, SENT)
        assert shared_sample() == ("shared in redis 127.0.0.1:6379/0", 1.0)
        store.down = True
        assert await attempt(gates, SENT)
        text, value = shared_sample()
        assert value == 0.0 and text.startswith("redis 127.0.0.1:6379/0 unreachable: this node keeps to 50%")
        await gate.drain()

    asyncio.run(main())
