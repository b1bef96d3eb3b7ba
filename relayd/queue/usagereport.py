"""Tenant usage as plain JSON values: what `relayctl usage`, `relayctl status` and the metrics read.

Takes: the tenant quotas (relayd.queue.tenantquota), the per-transport
delivery counts (relayd.observe.transportusage) and the live config.
Emits: `{"store": {...}, "tenants": [...]}`: per tenant, today and this
month, messages and recipients against its quota (with the percentage and
the reset time), messages held for the quota, and per transport of its
routes the messages and recipients delivered.
Untrusted input: none.
How it fails: a store that cannot be read raises CounterError.
"""

from __future__ import annotations


from relayd.jsonwire import JsonObject, JsonValue

from relayd.config.model import RelayConfig, TenantConfig
from relayd.observe.transportusage import TransportUsage
from relayd.queue.tenantquota import TenantQuotas


def transports_of(tenant: TenantConfig) -> list[str]:
    """The transports a tenant's routes name, in route order, each once."""
    names: dict[str, None] = {}
    for rule in tenant.routes:
        for name in rule.transports:
            names[name] = None
    return list(names)


async def usage_report(
    quotas: TenantQuotas, deliveries: TransportUsage, config: RelayConfig, now: float, tenant: str | None = None,
    *, per_transport: bool = True,
) -> JsonObject:
    """See the module docstring; `tenant` limits it to one (an unknown name: an empty list).

    Without `per_transport` (status, asked often) only the quota side is
    given, from memory: no store is read.
    """
    chosen = [config.tenants[n] for n in sorted(config.tenants) if tenant is None or n == tenant]
    pairs = [(t.name, x) for t in chosen for x in transports_of(t)] if per_transport else []
    via = await deliveries.counts(pairs, now)
    rows: list[JsonValue] = []
    for usage, tenant_config in zip(quotas.usage(chosen), chosen):
        windows: list[JsonValue] = []
        for w in usage.windows:
            windows.append({
                "span": w.span, "messages": w.messages, "recipients": w.recipients, "limit": w.limit,
                "percent": round(100 * w.messages / w.limit, 1) if w.limit else None,
                "resets_at": w.resets_at, "resets": w.resets,
            })
        transports: dict[str, JsonValue] = {
            name: {span: {"messages": m, "recipients": r} for span, (m, r) in via[(usage.tenant, name)].items()}
            for name in transports_of(tenant_config) if (usage.tenant, name) in via
        }
        rows.append({
            "tenant": usage.tenant, "on_quota": usage.on_quota or None, "alert_percent": usage.alert_percent,
            "held": usage.held, "windows": windows, "transports": transports,
        })
    store: dict[str, JsonValue] = dict(quotas.store_status())
    return {"store": store, "time_zone": config.usage.time_zone, "tenants": rows}
