"""Tenant usage as Prometheus metrics: usage against quota per window, held messages, alerts, the shared store.

Takes: a reader returning per tenant its `usage` rows (relayd.queue.tenantquota
`TenantUsage` values as plain tuples, read on the event loop at each scrape
through `relayd.observe.metrics.loop_reader`) and whether the shared store
is in use; the events (`QuotaAlert`, `UsageStoreChanged`) as an `EventSink`.
Emits: `relayd_tenant_window_messages`, `relayd_tenant_window_recipients`,
`relayd_tenant_quota_messages` (the cap; absent without one),
`relayd_tenant_quota_held_messages`, `relayd_tenant_quota_alerts_total`,
`relayd_usage_store_shared` (1 shared, 0 local share in force; absent
without a shared store). Labels: configured tenant names and fixed words.
Untrusted input: none.
Fails: a reader that does not answer yields no samples for that scrape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from relayd.observe import events as ev


@dataclass(frozen=True, slots=True)
class UsageSample:
    tenant: str
    window: str  # day, month
    messages: int
    recipients: int
    limit: int | None
    held: int


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    samples: Sequence[UsageSample]
    shared: bool | None  # None: no shared store configured


UsageReader = Callable[[], "UsageSnapshot | None"]


class UsageMetrics:
    """A collector for the public registry and an `EventSink` for the alert counter."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._reader: UsageReader = lambda: None
        self.alerts = Counter(
            "relayd_tenant_quota_alerts", "Quota alerts sent (once per tenant and window)",
            ["tenant", "window"], registry=registry,
        )
        registry.register(self)

    def read_with(self, reader: UsageReader) -> None:
        self._reader = reader

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, ev.QuotaAlert):
            self.alerts.labels(tenant=event.tenant, window=event.window).inc()

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant", "window"]
        messages = GaugeMetricFamily(
            "relayd_tenant_window_messages", "Messages a tenant submitted in the current day or month",
            labels=labels)
        recipients = GaugeMetricFamily(
            "relayd_tenant_window_recipients", "Recipients of those messages", labels=labels)
        limit = GaugeMetricFamily(
            "relayd_tenant_quota_messages", "The tenant's quota for that window (absent: no quota)",
            labels=labels)
        held = GaugeMetricFamily(
            "relayd_tenant_quota_held_messages", "Messages held until the tenant's quota window opens",
            labels=["tenant"])
        shared = GaugeMetricFamily(
            "relayd_usage_store_shared",
            "1 while the shared usage counters (Redis) answer, 0 while this node uses its local share")
        snapshot = self._reader()
        if snapshot is not None:
            seen: set[str] = set()
            for s in snapshot.samples:
                messages.add_metric([s.tenant, s.window], float(s.messages))
                recipients.add_metric([s.tenant, s.window], float(s.recipients))
                if s.limit is not None:
                    limit.add_metric([s.tenant, s.window], float(s.limit))
                if s.tenant not in seen:
                    seen.add(s.tenant)
                    held.add_metric([s.tenant], float(s.held))
            if snapshot.shared is not None:
                shared.add_metric([], 1.0 if snapshot.shared else 0.0)
        yield from (messages, recipients, limit, held, shared)

    def describe(self) -> Iterator[Metric]:
        return iter(())
