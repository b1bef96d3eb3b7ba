"""Tenant usage and quotas, composed: the stores, the quota book, the delivery counts, the metrics.

Takes: the live config, the embedded window counters the daemon opened
(`relayd.observe.countstore.SqliteCounters`), the event fan-out, and the
queue's view of a held message (`relayd.queue.quotaage.HeldQueue`: release
held messages, is one still queued, its maximum age, fail it past that age).
Emits: a `TenantQuotas` (`quotas`) for the listener and the scheduler, a
`TransportUsage` sink (`deliveries`) for the fan-out, a `UsageMetrics`
collector, and the usage report (`report`).
Untrusted input: none.
How it fails: `start` raises CounterError or HoldStoreError when the local
stores cannot be read (the daemon does not start); a shared store that is
down at start only puts the node on its local share.

With `usage.store: redis` the quota counts live in Redis
(relayd.observe.rediscounters): several relayd nodes sending through one
provider account share one cap. redis-py is the client: it speaks the
protocol with asyncio, reconnects by itself and is the client the Redis
project maintains.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from prometheus_client import CollectorRegistry

from relayd.config.model import RelayConfig
from relayd.jsonwire import JsonObject
from relayd.config.quota import CounterStore
from relayd.observe import events as ev
from relayd.observe.claims import ClaimCounters, LocalClaims
from relayd.observe.counters import WindowCounters
from relayd.observe.rediscounters import RedisCounters
from relayd.observe.transportusage import TransportUsage
from relayd.observe.status import TenantUsage
from relayd.observe.usagemetrics import UsageMetrics, UsageSample, UsageSnapshot
from relayd.queue.quotaage import HeldQueue
from relayd.queue.quotaholds import HoldStore
from relayd.queue.tenantquota import TenantQuotas
from relayd.queue.usagereport import usage_report


class TenantUsageService:
    """See the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], RelayConfig],
        counters: WindowCounters,
        events: ev.EventSink,
        registry: CollectorRegistry,
        queue: HeldQueue,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._clock = clock
        first = config()
        redis = first.usage.redis if first.usage.store is CounterStore.REDIS else None
        self.shared: RedisCounters | None = RedisCounters(redis) if redis is not None else None
        self.holds = HoldStore.in_directory(first.spool_dir)
        local: ClaimCounters = LocalClaims(counters)
        self.quotas = TenantQuotas(
            config=config, local=local, shared=self.shared,
            shared_name=self.shared.where if self.shared is not None else "sqlite",
            holds=self.holds, events=events, clock=clock, on_release=queue.released, exists=queue.exists,
            aging=queue,
        )
        self.deliveries = TransportUsage(
            counters, lambda: self._config().usage.zone,
            on_error=lambda text: events.emit(ev.Notice(text=text, level="warning")),
        )
        self.metrics = UsageMetrics(registry)
        self._releases: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the holds and counts; raises CounterError / HoldStoreError for a broken local store."""
        await self.quotas.load()

    def start_releases(self) -> None:
        """Begin releasing held messages (once the queue index is loaded)."""
        self._releases = asyncio.get_running_loop().create_task(self.quotas.run_releases())

    async def stop(self) -> None:
        if self._releases is not None:
            self._releases.cancel()
            await asyncio.gather(self._releases, return_exceptions=True)
        await self.deliveries.drain()
        if self.shared is not None:
            await self.shared.close()
        await asyncio.to_thread(self.holds.close)

    async def report(self, tenant: str | None, per_transport: bool = True) -> JsonObject:
        return await usage_report(
            self.quotas, self.deliveries, self._config(), self._clock(), tenant, per_transport=per_transport
        )

    async def status(self) -> JsonObject:
        """The quota side of every tenant, from memory (for `relayctl status`)."""
        return await self.report(None, per_transport=False)

    def page_usage(self) -> list[TenantUsage]:
        """The status page's usage bars: per tenant and window with a quota, messages against it."""
        return [TenantUsage(s.tenant, s.window, s.messages, s.limit) for s in self.snapshot().samples
                if s.limit is not None]

    def snapshot(self) -> UsageSnapshot:
        """The metrics' view (on the event loop): per tenant and window, usage against quota."""
        config = self._config()
        tenants = [config.tenants[name] for name in sorted(config.tenants)]
        samples = [
            UsageSample(u.tenant, w.span, w.messages, w.recipients, w.limit, u.held)
            for u in self.quotas.usage(tenants) for w in u.windows
        ]
        store = self.quotas.store_status()
        return UsageSnapshot(samples, bool(store["shared"]) if self.shared is not None else None)
