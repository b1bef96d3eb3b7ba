"""Tenant usage for people: the lines `relayctl status` and `relayctl usage` print; pure.

Takes: the daemon's usage report (relayd.queue.usagereport), as JSON values.
Emits: text lines and table rows. Untrusted input: the daemon's answer,
printed as text. Fails: a field of the wrong JSON type raises TypeError
(relayctl reports it as a broken answer, never a traceback).
"""

from __future__ import annotations

from datetime import datetime, timezone

from relayd.jsonwire import JsonObject, JsonValue, as_float, as_object, as_objects


def _text(value: JsonValue) -> str:
    return "" if value is None else str(value)


def usage_rows(report: JsonObject) -> list[list[str]]:
    """TENANT, WINDOW, MESSAGES, RECIPIENTS, QUOTA, USED, RESETS; each transport below its tenant."""
    rows = []
    for tenant in as_objects(report.get("tenants")):
        for w in as_objects(tenant.get("windows")):
            rows.append(_window_row(tenant, w))
        for name, spans in sorted(as_object(tenant.get("transports")).items()):
            day, month = as_object(as_object(spans).get("day")), as_object(as_object(spans).get("month"))
            rows.append([f"  via {name}", "", f"{_text(day.get('messages'))}/{_text(month.get('messages'))}",
                         f"{_text(day.get('recipients'))}/{_text(month.get('recipients'))}", "", "", ""])
    return rows


def _window_row(tenant: JsonObject, w: JsonObject) -> list[str]:
    limit = w.get("limit")
    quota = f"{limit} ({_text(tenant.get('on_quota'))})" if limit is not None else "-"
    used = f"{w.get('percent')}%" if w.get("percent") is not None else "-"
    if w.get("span") == "day" and tenant.get("held"):
        used += f", {tenant['held']} held"
    return [_text(tenant.get("tenant")), _text(w.get("span")), _text(w.get("messages")), _text(w.get("recipients")),
            quota, used, _text(w.get("resets"))]


def usage_store_lines(report: JsonObject) -> list[str]:
    """Where the counts are, when that is a shared store, and whether it answers."""
    store = as_object(report.get("store"))
    if store.get("store") in (None, "sqlite"):
        return []
    if store.get("shared"):
        return [f"usage counters: shared in {_text(store.get('store'))}"]
    since = store.get("local_share_since")
    when = datetime.fromtimestamp(as_float(since), timezone.utc).strftime("%H:%M:%S UTC") if since else "?"
    return [f"usage counters: {_text(store.get('store'))} unreachable since {when}: "
            "local share of each quota in force"]


def usage_status_lines(status: JsonObject) -> list[str]:
    """Lines `relayctl status` adds: per tenant with a quota (or held messages), today's and this
    month's usage against it; `relayctl usage` shows every tenant."""
    report = status.get("tenant_usage")
    if not isinstance(report, dict):
        return []
    if report.get("error"):
        return [f"tenant usage: {_text(report.get('error'))}"]
    lines = []
    for tenant in as_objects(report.get("tenants")):
        windows = as_objects(tenant.get("windows"))
        if all(w.get("limit") is None for w in windows) and not tenant.get("held"):
            continue
        parts = []
        for w in windows:
            limit = w.get("limit")
            parts.append(f"{_text(w.get('span'))} {_text(w.get('messages'))}"
                         + (f"/{limit}" if limit is not None else ""))
        held = f", {tenant['held']} held" if tenant.get("held") else ""
        lines.append(f"  tenant {_text(tenant.get('tenant'))}: " + ", ".join(parts) + held)
    if lines:
        lines.insert(0, "tenant usage (messages):")
    return lines + usage_store_lines(report)
