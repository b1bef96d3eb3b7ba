"""Shaping gate and hold book: pure verdicts over an injected time, counts in a real store."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

from relayd.config.shaping import Shaping
from relayd.delivery.gates import AttemptEnd, GateReport, GateVerdict, closed_until
from relayd.delivery.holding import MAX_RELEASE_SPREAD, HoldBook, release_share
from relayd.delivery.shaping import QUOTA_GATE, RATE_GATE, ShapingGate
from relayd.observe import events as ev
from relayd.observe.counters import DAY, MemoryCounters, WindowCounters
from relayd.observe.countstore import SqliteCounters
from relayd.values import Envelope, QueueEntry, Recipient
from tests.test_delivery_outcome import CONFIG

EVENING = datetime(2026, 12, 1, 18, 0, tzinfo=timezone.utc).timestamp()
MIDNIGHT = datetime(2026, 12, 2, 0, 0, tzinfo=timezone.utc).timestamp()
SENT = GateReport(AttemptEnd.REACHED, messages=1, recipients=2)
NOTHING = GateReport(AttemptEnd.REACHED, messages=0, recipients=0)


def entry(address: str, number: int = 0, received_at: float = EVENING) -> QueueEntry:
    env = Envelope(f"1abcde-{number:06d}-00", "acme", "billing@acme.example", (address,), received_at, 10)
    return QueueEntry(env, (Recipient(address),))


def gate_with(limits: dict[str, Shaping], counters: WindowCounters | None = None) -> ShapingGate:
    return ShapingGate(lambda name: limits.get(name, Shaping()), counters or MemoryCounters())


def send(gate: ShapingGate, name: str, now: float, report: GateReport = SENT) -> None:
    assert gate.check(name, now).is_open
    gate.attempt_started(name, now)
    gate.attempt_ended(name, report, now)


def test_a_daily_quota_closes_at_the_cap_until_midnight_utc_and_is_not_forceable() -> None:
    async def main() -> None:
        gate = gate_with({"gmail": Shaping(max_per_day=3)})
        for i in range(3):
            send(gate, "gmail", EVENING + i)
        verdict = gate.check("gmail", EVENING + 10)
        assert verdict.until == MIDNIGHT and verdict.gate == QUOTA_GATE and not verdict.forceable
        assert verdict.transport == "gmail"
        assert verdict.reason == "daily quota 3 reached, resets 00:00 UTC"
        assert gate.check("gmail", MIDNIGHT).is_open
        assert gate.check("sendgrid", EVENING).is_open  # unshaped
        await gate.drain()

    asyncio.run(main())


def test_an_attempt_in_progress_holds_its_place_under_a_cap_and_a_refused_one_does_not_count() -> None:
    async def main() -> None:
        gate = gate_with({"a": Shaping(max_per_day=2)})
        gate.attempt_started("a", EVENING)
        gate.attempt_started("a", EVENING)
        assert not gate.check("a", EVENING).is_open  # two in flight fill the cap
        gate.attempt_ended("a", NOTHING, EVENING)  # the upstream took nothing
        gate.attempt_ended("a", GateReport(AttemptEnd.ABANDONED), EVENING)
        assert gate.check("a", EVENING).is_open
        await gate.drain()

    asyncio.run(main())


def test_the_recipient_quota_counts_accepted_recipients() -> None:
    async def main() -> None:
        gate = gate_with({"o365": Shaping(max_recipients_per_day=4)})
        send(gate, "o365", EVENING)
        assert gate.check("o365", EVENING).is_open
        send(gate, "o365", EVENING)
        verdict = gate.check("o365", EVENING)
        assert verdict.reason == "daily recipient quota 4 reached, resets 00:00 UTC"
        await gate.drain()

    asyncio.run(main())


def test_the_token_bucket_spaces_messages_at_the_rate_and_names_the_next_token() -> None:
    async def main() -> None:
        gate = gate_with({"ses": Shaping(max_per_second=2.0)})
        send(gate, "ses", EVENING)
        verdict = gate.check("ses", EVENING + 0.1)
        assert verdict.gate == RATE_GATE and abs((verdict.until or 0) - (EVENING + 0.5)) < 1e-6
        assert verdict.reason == "rate limit 2/s"
        assert gate.check("ses", EVENING + 0.5).is_open
        assert gate.spacing("ses") == 0.5 and gate.spacing("other") == 0.0
        await gate.drain()

    asyncio.run(main())


def test_minute_and_hour_caps_reset_with_their_window() -> None:
    async def main() -> None:
        gate = gate_with({"a": Shaping(max_per_minute=2, max_per_hour=3)})
        send(gate, "a", EVENING)
        send(gate, "a", EVENING + 1)
        minute = gate.check("a", EVENING + 2)
        assert minute.until == EVENING + 60 and minute.reason == "per-minute limit 2 reached, resets 18:01:00 UTC"
        send(gate, "a", EVENING + 60)
        hour = gate.check("a", EVENING + 61)
        assert hour.until == EVENING + 3600 and "hourly limit 3 reached, resets 19:00 UTC" == hour.reason
        await gate.drain()

    asyncio.run(main())


def test_counts_are_written_to_the_store_and_loaded_back_by_a_new_gate(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteCounters.in_directory(tmp_path)
        gate = gate_with({"a": Shaping(max_per_day=3)}, store)
        send(gate, "a", EVENING)
        send(gate, "a", EVENING + 1)
        await gate.drain()
        assert await store.count("transport:a", DAY, EVENING) == 2
        assert await store.count("transport:a:rcpt", DAY, EVENING) == 4
        again = gate_with({"a": Shaping(max_per_day=3)}, store)
        await again.load(["a"], EVENING + 5)
        send(again, "a", EVENING + 5)
        assert not again.check("a", EVENING + 6).is_open
        status = again.status(["a"], EVENING + 6)[0]
        day = status.cap("day")
        assert day is not None and (day.used, day.limit, day.resets_at) == (3, 3, MIDNIGHT)
        assert status.next_release == MIDNIGHT and status.rate > 0
        await again.drain()
        await store.close()

    asyncio.run(main())


# -- the hold book ----------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.seen: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.seen.append(event)


def book(verdict: GateVerdict, now: float, events: Events, spacing: float = 0.0) -> HoldBook:
    return HoldBook(
        hold_until=lambda _e: None, gate_hold=lambda _e: verdict, unrecorded=dict, spacing=lambda _t: spacing,
        config=lambda: CONFIG, events=events, clock=lambda: now,
    )


def test_a_day_backlog_is_released_spread_over_the_first_quarter_hour_not_at_midnight() -> None:
    verdict = closed_until(MIDNIGHT, "daily quota 3 reached, resets 00:00 UTC", gate=QUOTA_GATE,
                           forceable=False, transport="gmail")
    events = Events()
    holds = book(verdict, EVENING, events)
    entries = [entry("a@x.test", n) for n in range(200)]
    releases = [holds.hold_until(e) for e in entries]
    assert all(r is not None and MIDNIGHT <= r < MIDNIGHT + MAX_RELEASE_SPREAD for r in releases)
    assert len({round(r or 0) for r in releases}) > 150  # spread, not a herd
    assert holds.reason(entries[0].id) == "held: gmail daily quota 3 reached, resets 00:00 UTC"
    assert holds.reasons()[entries[0].id].startswith("held: gmail")
    assert 0.0 <= release_share(entries[0].id) < 1.0
    assert events.seen == []  # young messages: no warning


def test_a_rate_hold_releases_the_waiting_messages_one_spacing_apart() -> None:
    verdict = closed_until(EVENING + 0.5, "rate limit 2/s", gate=RATE_GATE, forceable=False, transport="ses")
    holds = book(verdict, EVENING, Events(), spacing=0.5)
    releases = [holds.hold_until(entry("a@x.test", n)) for n in range(4)]
    assert releases == [EVENING + 0.5, EVENING + 1.0, EVENING + 1.5, EVENING + 2.0]


def test_a_message_held_for_half_its_maximum_age_warns_once() -> None:
    verdict = closed_until(MIDNIGHT, "daily quota 3 reached, resets 00:00 UTC", gate=QUOTA_GATE,
                           forceable=False, transport="gmail")
    old = entry("a@x.test", received_at=0.0)
    max_age = CONFIG.retry_for("sendgrid").max_age
    events = Events()
    holds = book(verdict, old.envelope.received_at + max_age / 2 + 1, events)
    holds.hold_until(old)
    holds.hold_until(old)
    warnings = [e for e in events.seen if isinstance(e, ev.MessageHeldLong)]
    assert len(warnings) == 1 and warnings[0].reason.startswith("gmail daily quota")
