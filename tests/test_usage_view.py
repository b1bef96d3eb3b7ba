"""What `relayctl status` and `relayctl usage` print from the daemon's usage report; pure."""

from __future__ import annotations

from relayd.jsonwire import JsonObject
from relayd.ops.usageview import usage_rows, usage_status_lines

REPORT: JsonObject = {
    "store": {"store": "redis 10.0.0.5:6379/0", "shared": False, "local_share_since": 1764612000.0},
    "tenants": [
        {"tenant": "acme", "on_quota": "hold", "held": 2, "alert_percent": 80, "transports": {
            "gw": {"day": {"messages": 9, "recipients": 12}, "month": {"messages": 90, "recipients": 120}}},
         "windows": [
             {"span": "day", "messages": 10, "recipients": 13, "limit": 10, "percent": 100.0,
              "resets": "2025-12-02 00:00 UTC"},
             {"span": "month", "messages": 91, "recipients": 121, "limit": None, "percent": None,
              "resets": "2026-01-01 00:00 UTC"}]},
        {"tenant": "beta", "on_quota": None, "held": 0, "alert_percent": 80, "transports": {},
         "windows": [{"span": "day", "messages": 4, "recipients": 4, "limit": None, "percent": None,
                      "resets": "2025-12-02 00:00 UTC"}]},
    ],
}


def test_status_shows_tenants_with_a_quota_and_says_when_the_shared_store_is_away() -> None:
    assert usage_status_lines({"tenant_usage": REPORT}) == [
        "tenant usage (messages):",
        "  tenant acme: day 10/10, month 91, 2 held",
        "usage counters: redis 10.0.0.5:6379/0 unreachable since 18:00:00 UTC: local share of each quota in force",
    ]
    assert usage_status_lines({}) == []


def test_usage_rows_give_each_window_and_each_transport_of_every_tenant() -> None:
    assert usage_rows(REPORT) == [
        ["acme", "day", "10", "13", "10 (hold)", "100.0%, 2 held", "2025-12-02 00:00 UTC"],
        ["acme", "month", "91", "121", "-", "-", "2026-01-01 00:00 UTC"],
        ["  via gw", "", "9/90", "12/120", "", "", ""],
        ["beta", "day", "4", "4", "-", "-", "2025-12-02 00:00 UTC"],
    ]
