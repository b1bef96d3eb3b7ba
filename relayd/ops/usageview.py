"""Tenant usage for people: the lines `relayctl status` and `relayctl usage` print under their tables; pure.

Takes: the daemon's usage report (relayd.queue.usagereport), as JSON values.
Emits: text lines. Untrusted input: none beyond the daemon's answer, printed as text.
Fails: never; a missing field prints as "?" or is left out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def usage_store_lines(report: dict[str, Any]) -> list[str]:
    store = report.get("store") or {}
    if store.get("store") in (None, "sqlite"):
        return []
    if store.get("shared"):
        return [f"usage counters: shared in {store['store']}"]
    since = store.get("local_share_since")
    when = datetime.fromtimestamp(since, timezone.utc).strftime("%H:%M:%S UTC") if since else "?"
    return [f"usage counters: {store['store']} unreachable since {when}: local share of each quota in force"]


def usage_status_lines(status: dict[str, Any]) -> list[str]:
    """Lines `relayctl status` adds: per tenant with a quota, today's and this month's usage against it."""
    report = status.get("tenant_usage")
    if not isinstance(report, dict):
        return []
    if report.get("error"):
        return [f"tenant usage: {report['error']}"]
    lines = []
    for tenant in report.get("tenants") or ():
        parts = []
        for w in tenant.get("windows") or ():
            limit = w.get("limit")
            parts.append(f"{w.get('span')} {w.get('messages')}" + (f"/{limit}" if limit is not None else ""))
        held = f", {tenant['held']} held" if tenant.get("held") else ""
        lines.append(f"  tenant {tenant.get('tenant')}: " + ", ".join(parts) + held)
    if lines:
        lines.insert(0, "tenant usage (messages):")
    return lines + usage_store_lines(report)
