"""Metrics: counting, help text, reset, isolation between instances, the HTTP endpoint."""

from __future__ import annotations

import time
import urllib.request
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry

from relayd.ops.controlclient import ControlClient
from relayd.observe.metrics import RelayMetrics
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, free_port, submit


def sample(metrics: RelayMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_counters_count_per_label() -> None:
    m = RelayMetrics()
    m.messages_received.labels("acme").inc()
    m.messages_received.labels("acme").inc()
    m.bytes_received.labels("acme").inc(2048)
    m.count_delivery(tenant="acme", transport="gmail", result="delivered")
    m.count_delivery(tenant="acme", transport="sendgrid", result="deferred")
    m.failovers.labels("gmail", "connection refused").inc()
    m.auth_failures.inc()
    assert sample(m, "relayd_messages_received_total", {"tenant": "acme"}) == 2
    assert sample(m, "relayd_received_bytes_total", {"tenant": "acme"}) == 2048
    assert sample(
        m, "relayd_deliveries_total",
        {"tenant": "acme", "transport": "gmail", "result": "delivered"},
    ) == 1
    assert sample(
        m, "relayd_failovers_total", {"transport": "gmail", "reason": "connection refused"}
    ) == 1
    assert sample(m, "relayd_auth_failures_total") == 1


def test_gauges_and_histogram_record_values() -> None:
    m = RelayMetrics()
    m.set_queue_size("deferred", 7)
    m.upstream_up.labels("gmail").set(0)
    m.sessions.inc()
    m.delivery_seconds.labels("gmail").observe(0.3)
    assert sample(m, "relayd_queue_messages", {"state": "deferred"}) == 7
    assert sample(m, "relayd_upstream_up", {"transport": "gmail"}) == 0
    assert sample(m, "relayd_smtp_sessions") == 1
    assert sample(m, "relayd_delivery_seconds_count", {"transport": "gmail"}) == 1
    assert sample(m, "relayd_delivery_seconds_bucket", {"transport": "gmail", "le": "0.5"}) == 1


def test_unknown_delivery_result_or_queue_state_is_refused() -> None:
    m = RelayMetrics()
    with pytest.raises(ValueError):
        m.count_delivery(tenant="acme", transport="gmail", result="bounced")
    with pytest.raises(ValueError):
        m.set_queue_size("stuck", 1)


def test_render_shows_help_text_for_every_metric() -> None:
    text = RelayMetrics().render().decode()
    for name in (
        "relayd_messages_received_total",
        "relayd_received_bytes_total",
        "relayd_smtp_rejections_total",
        "relayd_auth_failures_total",
        "relayd_deliveries_total",
        "relayd_failovers_total",
        "relayd_bounces_total",
        "relayd_queue_messages",
        "relayd_upstream_up",
        "relayd_delivery_seconds",
        "relayd_smtp_sessions",
    ):
        assert f"# HELP {name} " in text
    assert "# HELP relayd_smtp_sessions Client SMTP sessions open right now." in text


def test_reset_clears_counters_and_histogram_but_keeps_present_state() -> None:
    m = RelayMetrics()
    m.bounces.labels("acme").inc()
    m.delivery_seconds.labels("gmail").observe(1.0)
    m.sessions.inc()
    m.set_queue_size("queued", 3)
    m.reset()
    assert sample(m, "relayd_bounces_total", {"tenant": "acme"}) is None
    assert sample(m, "relayd_delivery_seconds_count", {"transport": "gmail"}) is None
    assert sample(m, "relayd_smtp_sessions") == 1
    assert sample(m, "relayd_queue_messages", {"state": "queued"}) == 3
    m.bounces.labels("acme").inc()
    assert sample(m, "relayd_bounces_total", {"tenant": "acme"}) == 1


def test_two_instances_do_not_share_values() -> None:
    a, b = RelayMetrics(), RelayMetrics()
    a.smtp_rejections.labels("RCPT", "5.7.1").inc()
    assert sample(a, "relayd_smtp_rejections_total", {"stage": "RCPT", "code": "5.7.1"}) == 1
    assert sample(b, "relayd_smtp_rejections_total", {"stage": "RCPT", "code": "5.7.1"}) is None


def test_two_instances_on_one_registry_are_refused() -> None:
    shared = CollectorRegistry()
    RelayMetrics(shared)
    with pytest.raises(ValueError):
        RelayMetrics(shared)


def test_http_endpoint_serves_current_values_across_a_reset() -> None:
    m = RelayMetrics()
    server, thread = m.start_http_server("127.0.0.1", 0)
    try:
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/metrics"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        m.messages_received.labels("acme").inc()
        with direct.open(url, timeout=5) as resp:
            before = resp.read().decode()
        m.reset()
        with direct.open(url, timeout=5) as resp:
            after = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert 'relayd_messages_received_total{tenant="acme"} 1.0' in before
    assert 'relayd_messages_received_total{tenant="acme"}' not in after
    assert "# HELP relayd_messages_received_total" in after


# ------------------------------------------------------ queue gauges of a running relayd


def _scrape(port: int) -> dict[str, float]:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("relayd_queue_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_a_running_relayd_exports_its_queue_by_state_and_the_oldest_messages_age(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    provider = upstreams(users={"relay@provider.test": "pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("provider", provider.port, "provider", "relay@provider.test", "pw")],
        tenants=[TenantSpec("acme", "acme-pw", ["*@acme.example"], [(["*"], ["provider"])])],
        retry="F,1h,30m",
    )
    metrics_port = free_port()
    with relay_files.config.open("a") as config:
        config.write(f"metrics:\n  address: 127.0.0.1\n  port: {metrics_port}\n")
    provider.refuse_connections()
    with RelaydProcess(relay_files):
        first_submitted = time.time()
        ids = [submit(relay_files, ("acme", "acme-pw"), "app@acme.example", [f"r{n}@customer.test"])
               for n in range(3)]
        relay_files.wait_for_log("== r0@customer.test")
        control = ControlClient(relay_files.root / "spool" / "control.sock")
        assert control.request("freeze", ids=[ids[0]])["ok"]
        # r1 and r2 wait for the provider's retry time (it refused r0's connection): deferred
        # after an attempt of their own, held by the transport's retry wait without one.
        def waiting(scraped: dict[str, float]) -> float:
            return scraped.get('relayd_queue_messages{state="deferred"}', 0) + scraped.get(
                'relayd_queue_messages{state="held"}', 0)

        deadline = time.monotonic() + 15
        while waiting(_scrape(metrics_port)) != 2:
            assert time.monotonic() < deadline, _scrape(metrics_port)
            time.sleep(0.1)
        time.sleep(1.0)
        scraped = _scrape(metrics_port)
        assert waiting(scraped) == 2
        assert scraped['relayd_queue_messages{state="frozen"}'] == 1
        assert scraped['relayd_queue_messages{state="queued"}'] == 0
        age = scraped["relayd_queue_oldest_message_age_seconds"]
        assert 1.0 <= age <= time.time() - first_submitted + 1

        provider.accept_connections()
        assert control.request("flush")["ok"]
        relay_files.wait_for_log("Completed", count=3, timeout=30)
        deadline = time.monotonic() + 10
        while waiting(_scrape(metrics_port)) and time.monotonic() < deadline:
            time.sleep(0.1)
        scraped = _scrape(metrics_port)
        states = ("queued", "deferred", "held", "frozen")
        assert [scraped[f'relayd_queue_messages{{state="{s}"}}'] for s in states] == [0, 0, 0, 0]
        assert scraped["relayd_queue_oldest_message_age_seconds"] == 0
