"""A message a tenant's `hold` quota keeps, against the maximum age of its retry schedule, with an
injected clock: the real quota book and hold store on disk, the real scheduler, delivery agent, DSN
builder and main-log formatting, a transport double; simulated days in milliseconds."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import uvloop

from relayd.config.model import (
    CredentialsConfig, ListenerConfig, RelayConfig, RouteRule, SmtpTransportConfig, TenantConfig,
)
from relayd.config.quota import QuotaAction, TenantQuota
from relayd.config.retry import parse_retry_schedule
from relayd.delivery.dsn import build_dsn
from relayd.delivery.gates import GateSet
from relayd.delivery.quotaexpiry import QuotaHeldQueue, held_max_age
from relayd.delivery.walk import DeliveryAgent
from relayd.observe import events as ev
from relayd.observe.claims import LocalClaims
from relayd.observe.countstore import SqliteCounters
from relayd.observe.logline import format_event
from relayd.queue.quotaholds import HoldStore
from relayd.queue.scheduler import Scheduler
from relayd.queue.tenantquota import TenantQuotas
from relayd.values import AttemptOutcome, Envelope, QueueEntry, Recipient, SmtpReply, Stage
from tests.test_delivery_outcome import ScriptedTransport
from tests.test_scheduler_clock import FakeClock
from tests.test_shaping_clock import MemorySpool, Recorder, step

DAY = 86400.0
SECOND_OF_MONTH = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc).timestamp()


def transport(name: str, retry: str) -> SmtpTransportConfig:
    return SmtpTransportConfig(name=name, host="127.0.0.1", port=1, retry=parse_retry_schedule(retry))


def config(spool: Path, rules: tuple[RouteRule, ...] = (RouteRule("all", ("*",), ("primary", "backup")),)) -> RelayConfig:
    tenant = TenantConfig(
        "acme", None, ("*@acme.example",), rules, quota=TenantQuota(max_per_month=2, on_quota=QuotaAction.HOLD),
    )
    return RelayConfig(
        source=Path("relay.yaml"), hostname="relay.test", spool_dir=spool, log_file=None,
        credentials=CredentialsConfig(spool / "c"), listeners=(ListenerConfig(),),
        transports=MappingProxyType({
            "primary": transport("primary", "F,2h,15m; F,1d,1h"),  # the chain's first: one day
            "backup": transport("backup", "F,2h,15m; F,4d,6h"),  # its last: four days, the walk's schedule
            "other": transport("other", "F,6d,6h"),
        }),
        tenants=MappingProxyType({"acme": tenant}),
    )


def queued(number: int, at: float, *recipients: str) -> QueueEntry:
    addresses = recipients or ("r@customer.test",)
    env = Envelope(f"1abcde-{number:06d}-00", "acme", "app@acme.example", addresses, at, 100)
    return QueueEntry(env, tuple(Recipient(a) for a in addresses))


class Relay:
    """The quota book, scheduler and delivery agent wired as the daemon wires them."""

    def __init__(self, spool_dir: Path, clock: FakeClock, busy_wait: float = 5.0) -> None:
        relay_config = config(spool_dir)
        self.counters = SqliteCounters.in_directory(spool_dir)
        self.events = Recorder()
        self.spool = MemorySpool()
        self.upstream = ScriptedTransport(
            "primary", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, SmtpReply(250, "2.0.0 OK"), False)
        self.bounces: list[tuple[Envelope, bytes]] = []
        self.agent = DeliveryAgent(
            config=lambda: relay_config, spool=self.spool,
            transports=lambda: {"primary": self.upstream}, gates=GateSet([]), events=self.events,
            enqueue_bounce=self.enqueue_bounce, build_dsn=build_dsn, clock=clock,
        )
        self.scheduler = Scheduler(self.agent.deliver, max_parallel=10, clock=clock,
                                   hold_until=lambda e: self.quotas.held_until(e.id))
        self.quotas = TenantQuotas(
            config=lambda: relay_config, local=LocalClaims(self.counters), shared=None, shared_name="sqlite",
            holds=HoldStore.in_directory(spool_dir), events=self.events, clock=clock,
            aging=QuotaHeldQueue(lambda: self.scheduler, lambda: self.agent, lambda: relay_config, busy_wait=busy_wait),
        )

    async def enqueue_bounce(self, original: Envelope, dsn: bytes) -> None:
        self.bounces.append((original, dsn))

    async def submit(self, entry: QueueEntry) -> None:
        assert await self.quotas.charge(entry.id, "acme", len(entry.recipients)) is None  # hold never refuses
        self.scheduler.add(entry)

    def log(self, kind: type) -> list[str]:
        """The main-log lines of the events of one kind."""
        return [line for e in self.events.events if isinstance(e, kind) for line in [format_event(e, utc=True)] if line]


def test_a_quota_held_message_warns_once_at_half_its_maximum_age_and_bounces_past_it_unsent(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(SECOND_OF_MONTH)
        relay = Relay(tmp_path, clock)
        await relay.quotas.load()
        for number in range(3):
            await relay.submit(queued(number, SECOND_OF_MONTH))
        held = queued(2, SECOND_OF_MONTH)
        await step(relay.scheduler)
        assert relay.upstream.calls == 2 and list(relay.quotas.hold_reasons()) == [held.id]
        # The chain [primary, backup] waits as the walk would make it wait: backup's four days.
        clock.now = SECOND_OF_MONTH + 2 * DAY - 1
        assert relay.quotas.next_age_look() == SECOND_OF_MONTH + 2 * DAY
        assert await relay.quotas.expire_old() == [] and relay.log(ev.MessageHeldLong) == []
        clock.now = SECOND_OF_MONTH + 2 * DAY
        assert await relay.quotas.expire_old() == []
        clock.now = SECOND_OF_MONTH + 3 * DAY
        assert await relay.quotas.expire_old() == []
        assert relay.log(ev.MessageHeldLong) == [
            f"warning: {held.id} held for 48.0h, half its maximum age 96.0h: monthly quota of tenant acme "
            "reached (2 messages), resets 2027-01-01 00:00 UTC"
        ]
        assert relay.quotas.next_age_look() == SECOND_OF_MONTH + 4 * DAY
        await step(relay.scheduler)
        assert relay.upstream.calls == 2 and relay.bounces == []
        # Past the maximum age: not sent (the tenant is over its quota), failed and bounced.
        clock.now = SECOND_OF_MONTH + 4 * DAY
        assert await relay.quotas.expire_old() == [held.id]
        reason = "retry timeout exceeded: held by the monthly quota of tenant acme since 2026-12-02 09:00 UTC"
        assert relay.log(ev.RecipientFailed) == [f"{held.id} ** r@customer.test: {reason}"]
        assert relay.log(ev.MessageCompleted)[-1] == f"{held.id} Completed"
        ((original, dsn),) = relay.bounces
        assert original.id == held.id and original.sender == "app@acme.example"
        text = dsn.decode()
        assert "Status: 4.4.7" in text and "Action: failed" in text and reason in text.replace("\r\n ", " ")
        assert relay.spool.completed[-1] == held.id and relay.scheduler.get(held.id) is None
        assert relay.quotas.hold_reasons() == {} and HoldStore.in_directory(tmp_path).load() == []
        await step(relay.scheduler)
        assert relay.upstream.calls == 2
        assert len(relay.log(ev.MessageHeldLong)) == 1
        await relay.counters.close()

    uvloop.run(scenario())


def test_a_message_busy_in_an_operators_hands_stays_held_and_is_failed_on_a_later_look(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(SECOND_OF_MONTH)
        relay = Relay(tmp_path, clock, busy_wait=0.05)
        await relay.quotas.load()
        for number in range(3):
            await relay.submit(queued(number, SECOND_OF_MONTH))
        held = queued(2, SECOND_OF_MONTH)
        clock.now = SECOND_OF_MONTH + 5 * DAY
        async with relay.scheduler.exclusive(held.id, 1.0):
            assert await relay.quotas.expire_old() == []  # busy: left held, no bounce
        assert relay.bounces == [] and list(relay.quotas.hold_reasons()) == [held.id]
        assert relay.quotas.next_age_look() == clock.now + 30
        assert await relay.quotas.expire_old() == []  # not before its retry
        clock.now += 30
        assert await relay.quotas.expire_old() == [held.id] and len(relay.bounces) == 1
        await relay.counters.close()

    uvloop.run(scenario())


def test_the_maximum_age_is_the_longest_of_the_route_groups_each_by_its_chains_last_transport(
    tmp_path: Path,
) -> None:
    rules = (RouteRule("far", ("far.test",), ("other",)), RouteRule("all", ("*",), ("primary", "backup")))
    relay_config = config(tmp_path, rules)
    assert held_max_age(queued(1, 0.0, "a@customer.test"), relay_config) == 4 * DAY
    assert held_max_age(queued(1, 0.0, "a@customer.test", "b@far.test"), relay_config) == 6 * DAY
    gone = config(tmp_path, ())  # no rule matches any more: the top-level schedule
    assert held_max_age(queued(1, 0.0, "a@customer.test"), gone) == relay_config.retry.max_age
