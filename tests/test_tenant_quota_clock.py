"""A tenant's `hold` quota over a day and a month with an injected clock: the real quota book, the
real embedded counters and hold store on disk, the real scheduler; simulated days in milliseconds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import uvloop

from relayd.config.model import CredentialsConfig, ListenerConfig, RelayConfig, RouteRule, TenantConfig
from relayd.config.quota import QuotaAction, TenantQuota, UsageConfig
from relayd.observe import events as ev
from relayd.observe.claims import LocalClaims
from relayd.observe.countstore import SqliteCounters
from relayd.queue.quotaholds import HoldStore
from relayd.queue.scheduler import Scheduler
from relayd.queue.tenantquota import TenantQuotas
from relayd.values import Envelope, QueueEntry, Recipient
from tests.test_scheduler_clock import FakeClock
from tests.test_shaping_clock import Recorder

EVENING = datetime(2026, 12, 1, 18, 0, tzinfo=timezone.utc).timestamp()
MIDNIGHT = datetime(2026, 12, 2, 0, 0, tzinfo=timezone.utc).timestamp()


def config(spool: Path, quota: TenantQuota, zone: str = "UTC") -> RelayConfig:
    tenant = TenantConfig("acme", None, ("*@acme.example",), (RouteRule("all", ("*",), ("gmail",)),), quota=quota)
    return RelayConfig(
        source=Path("relay.yaml"), hostname="relay.test", spool_dir=spool, log_file=None,
        credentials=CredentialsConfig(spool / "c"), listeners=(ListenerConfig(),), transports=MappingProxyType({}),
        tenants=MappingProxyType({"acme": tenant}), usage=UsageConfig(time_zone=zone),
    )


def entry(number: int, at: float) -> QueueEntry:
    env = Envelope(f"1abcde-{number:06d}-00", "acme", "app@acme.example", ("r@x.test",), at, 100)
    return QueueEntry(env, (Recipient("r@x.test"),))


class Book:
    """The quota book with its stores in `spool`, a scheduler asking it, and what was delivered."""

    def __init__(self, spool: Path, relay_config: RelayConfig, clock: FakeClock) -> None:
        self.counters = SqliteCounters.in_directory(spool)
        self.holds = HoldStore.in_directory(spool)
        self.events = Recorder()
        self.delivered: list[str] = []
        self.scheduler = Scheduler(self.deliver, max_parallel=10, clock=clock,
                                   hold_until=lambda e: self.quotas.held_until(e.id))
        self.quotas = TenantQuotas(
            config=lambda: relay_config, local=LocalClaims(self.counters), shared=None, shared_name="sqlite",
            holds=self.holds, events=self.events, clock=clock, on_release=self.scheduler.gate_opened,
            exists=lambda queue_id: self.scheduler.get(queue_id) is not None,
        )

    async def deliver(self, e: QueueEntry) -> QueueEntry | None:
        self.delivered.append(e.id)
        return None

    async def submit(self, number: int, at: float) -> str | None:
        e = entry(number, at)
        reply = await self.quotas.charge(e.id, "acme", 1)
        if reply is None:
            self.scheduler.add(e)
        return reply

    async def step(self) -> None:
        self.scheduler.start_due()
        for _ in range(2000):
            if not self.scheduler.in_flight_ids():
                return
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        await self.counters.close()
        self.holds.close()


def test_hold_keeps_the_messages_past_the_cap_until_midnight_then_releases_as_many_as_the_new_day_allows(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        clock = FakeClock(EVENING)
        book = Book(tmp_path, config(tmp_path, TenantQuota(max_per_day=3, on_quota=QuotaAction.HOLD)), clock)
        await book.quotas.load()
        assert [await book.submit(n, EVENING) for n in range(8)] == [None] * 8  # hold never refuses
        await book.step()
        assert len(book.delivered) == 3
        reasons = book.quotas.hold_reasons()
        assert len(reasons) == 5
        assert set(reasons.values()) == {
            "held: daily quota of tenant acme reached (3 messages), resets 2026-12-02 00:00 UTC"}
        assert sum(isinstance(e, ev.QuotaHeld) for e in book.events.events) == 5
        clock.now = MIDNIGHT - 1
        assert await book.quotas.release_due() == []
        await book.step()
        assert len(book.delivered) == 3
        clock.now = MIDNIGHT + 1
        released = await book.quotas.release_due()
        assert released == sorted(reasons)[:3]  # oldest first, as many as the new day has room for
        await book.step()
        assert len(book.delivered) == 6 and set(book.delivered[3:]) == set(released)
        assert len(book.quotas.hold_reasons()) == 2
        usage = book.quotas.usage([config(tmp_path, TenantQuota()).tenants["acme"]])[0]
        assert usage.windows[0].messages == 3 and usage.held == 2
        # The next midnight releases the rest; nothing was ever refused or lost.
        clock.now = MIDNIGHT + 86400 + 1
        assert len(await book.quotas.release_due()) == 2
        await book.step()
        assert len(book.delivered) == 8 and book.quotas.hold_reasons() == {}
        await book.close()

    uvloop.run(scenario())


def test_holds_survive_a_restart_and_a_removed_held_message_is_dropped_at_release(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(EVENING)
        relay_config = config(tmp_path, TenantQuota(max_per_day=2, on_quota=QuotaAction.HOLD))
        first = Book(tmp_path, relay_config, clock)
        await first.quotas.load()
        for n in range(3):
            await first.submit(n, EVENING)
        await first.close()
        second = Book(tmp_path, relay_config, clock)
        await second.quotas.load()
        second.scheduler.add(entry(2, EVENING))
        assert list(second.quotas.hold_reasons()) == [entry(2, EVENING).id]
        assert await second.submit(9, EVENING) is None and len(second.quotas.hold_reasons()) == 2
        second.scheduler.forget(entry(9, EVENING).id)  # removed by the operator while held
        clock.now = MIDNIGHT + 1
        assert await second.quotas.release_due() == [entry(2, EVENING).id]
        assert second.quotas.hold_reasons() == {}
        assert HoldStore.in_directory(tmp_path).load() == []
        await second.close()

    uvloop.run(scenario())


def test_the_day_window_follows_the_configured_time_zone(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(EVENING)  # 18:00 UTC is 19:00 in Paris; midnight there is 23:00 UTC
        relay_config = config(tmp_path, TenantQuota(max_per_day=1), zone="Europe/Paris")
        book = Book(tmp_path, relay_config, clock)
        await book.quotas.load()
        assert await book.submit(1, EVENING) is None
        reply = await book.submit(2, EVENING)
        assert reply == "450 4.7.1 Daily quota of tenant acme reached (1 messages); resets 2026-12-02 00:00 CET"
        assert book.quotas.refusal("acme") == reply
        clock.now = MIDNIGHT - 3600  # 00:00 in Paris
        assert book.quotas.refusal("acme") is None
        assert await book.submit(3, clock.now) is None
        await book.close()

    uvloop.run(scenario())


def test_the_alert_fires_once_per_window_and_again_in_the_next_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(EVENING)
        quota = TenantQuota(max_per_day=10, max_per_month=1000, alert_percent=50)
        book = Book(tmp_path, config(tmp_path, quota), clock)
        await book.quotas.load()
        for n in range(10):
            await book.submit(n, EVENING)
        await asyncio.sleep(0.05)
        alerts = [e for e in book.events.events if isinstance(e, ev.QuotaAlert)]
        assert [(a.window, a.used, a.limit) for a in alerts] == [("day", 5, 10)]
        clock.now = MIDNIGHT + 1
        for n in range(10, 16):
            await book.submit(n, clock.now)
        await asyncio.sleep(0.05)
        alerts = [e for e in book.events.events if isinstance(e, ev.QuotaAlert)]
        assert [(a.window, a.used, a.resets) for a in alerts][1:] == [("day", 5, "2026-12-03 00:00 UTC")]
        await book.close()

    uvloop.run(scenario())


def test_a_tenant_without_quota_is_counted_and_never_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(EVENING)
        relay_config = config(tmp_path, TenantQuota())
        book = Book(tmp_path, relay_config, clock)
        await book.quotas.load()
        for n in range(20):
            assert await book.submit(n, EVENING) is None
        usage = book.quotas.usage([relay_config.tenants["acme"]])[0]
        assert [(w.span, w.messages, w.recipients, w.limit) for w in usage.windows] == [
            ("day", 20, 20, None), ("month", 20, 20, None)]
        assert replace(usage, windows=()).on_quota == ""
        await book.close()

    uvloop.run(scenario())
