"""The status page's parts on their own: queue states, gate words, the page's HTML, the failure ring, the listener's bounds."""

from __future__ import annotations

import socket
import time
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from relayd.delivery.gates import OPEN, closed_until
from relayd.observe import events as ev
from relayd.observe.failures import MAX_TEXT, RecentFailures
from relayd.observe.httpserve import ObserveApp, start_observe_server
from relayd.observe.status import (
    FailureLine,
    ListenerStatus,
    QueueGauges,
    SpoolSpace,
    StatusSnapshot,
    TenantUsage,
    TransportStatus,
)
from relayd.observe.statuspage import render_page
from relayd.ops.statussource import queue_gauges, state_word
from relayd.values import (
    AttemptOutcome,
    DeliveryReport,
    Envelope,
    QueueEntry,
    Recipient,
    RecipientState,
    SmtpReply,
)

NOW = 1_800_000_000.0
HOSTILE = "<img src=x onerror=alert(1)>&\"'"


def entry(message_id: str, *, frozen: bool = False, next_attempt: float | None = None,
          received: float = NOW - 60) -> QueueEntry:
    envelope = Envelope(id=message_id, tenant="acme", sender="a@acme.example", recipients=("r@x.test",),
                        received_at=received, size=100)
    recipient = Recipient("r@x.test", RecipientState.PENDING if next_attempt is None else RecipientState.DEFERRED,
                          next_attempt=next_attempt)
    return QueueEntry(envelope=envelope, recipients=(recipient,), frozen=frozen)


def test_queue_states_tell_due_in_delivery_retry_waits_gate_holds_and_frozen_apart() -> None:
    entries = [
        entry("due"), entry("flying"), entry("retry", next_attempt=NOW + 600),
        entry("gated"), entry("gate-opened"), entry("frozen", frozen=True, received=NOW - 3600),
        entry("both", next_attempt=NOW + 60),
    ]
    waiting = {"gated": NOW + 300, "gate-opened": NOW - 1, "both": NOW + 900}
    gauges = queue_gauges(entries, {"flying"}, waiting, NOW)
    assert dict(gauges.by_state) == {"queued": 3, "deferred": 2, "held": 1, "frozen": 1}
    assert gauges.oldest_age == 3600
    assert gauges.total == len(entries)
    empty = queue_gauges([], set(), {}, NOW)
    assert empty.total == 0 and empty.oldest_age is None


def test_each_closing_gate_has_its_transport_state_word() -> None:
    assert state_word(OPEN) == "open"
    assert state_word(closed_until(NOW, "retry wait", gate="retry")) == "down"
    assert state_word(closed_until(NOW, "credential g needs re-authorisation: relayctl oauth authorize g",
                                   gate="oauth")) == "reauthorise"
    assert state_word(closed_until(NOW, "credential g: token endpoint did not answer", gate="oauth")) == "down"
    assert state_word(closed_until(NOW, "rate limit 5/s", gate="rate")) == "limited"
    assert state_word(closed_until(NOW, "daily quota", gate="quota", forceable=False)) == "limited"
    assert state_word(closed_until(NOW, "something new", gate="newgate")) == "limited"


BASE = StatusSnapshot(
    taken_at=NOW, hostname="relay.test",
    listeners=[ListenerStatus("submission", "::1", 587, "starttls"), ListenerStatus("local", "/run/r.sock", 0, "none")],
    queue=QueueGauges({"queued": 2, "deferred": 5, "held": 0, "frozen": 1}, 7200.0),
    spool=SpoolSpace(3 * 1024**3, 10 * 1024**3, 512 * 1024**2),
    transports=[TransportStatus(HOSTILE, "down", NOW + 90, HOSTILE, None, HOSTILE, NOW - 30, HOSTILE)],
    usage=[TenantUsage(HOSTILE, "day", 850, 1000), TenantUsage("beta", "month", 12, None),
           TenantUsage("gamma", "day", 1500, 1000)],
    failures=[FailureLine(NOW - 5, "failed", "1abc-000001-XY", "gmail", HOSTILE, HOSTILE)],
)


def snapshot() -> StatusSnapshot:
    return BASE


def test_every_value_on_the_page_is_escaped() -> None:
    page = render_page(snapshot())
    assert "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in page
    assert "<script" not in page


def test_the_page_shows_queue_counts_transport_closure_listeners_and_usage_bars() -> None:
    page = render_page(snapshot())
    assert 'id="queue-deferred">5<' in page and 'id="queue-total">8<' in page
    assert 'id="queue-oldest">2h 0m<' in page
    assert "3.0 GiB free</span>; new mail is refused below 512.0 MiB" in page
    assert "[::1]:587" in page and "/run/r.sock" in page
    assert 'class="state down"' in page and "(in 1m)" in page and "(30s ago)" in page
    assert "850 of 1000 (85%)" in page and 'class="high" style="width:85.0%"' in page
    assert 'style="width:100.0%"' in page  # over quota: the bar is full, not wider
    assert "<td>beta</td><td>month</td><td class=\"n\">12</td><td></td>" in page  # no quota: no bar


def test_the_page_says_what_is_missing_in_words() -> None:
    page = render_page(replace(BASE, queue=None, usage=[], failures=[], transports=[]))
    assert "The queue index is still loading." in page
    assert "No tenant has a quota to show." in page
    assert "No failure since relayd started." in page


def outcome(cls: type, n: int, reply: str) -> ev.RecipientOutcome:
    report = DeliveryReport(f"r{n}@x.test", AttemptOutcome.DEFER, "acme-1", transport="gmail",
                            reply=SmtpReply(451, reply))
    result: ev.RecipientOutcome = cls(queue_id=f"q{n}", tenant="acme", sender="a@acme.example", message_id="",
                                      report=report, attempt=1)
    return result


def test_the_failure_ring_keeps_only_the_newest_and_cuts_long_replies() -> None:
    ring = RecentFailures(size=3)
    for n in range(5):
        ring.emit(outcome(ev.RecipientDeferred, n, "x" * 5000))
    ring.emit(ev.RecipientDelivered(queue_id="ok", tenant="acme", sender="", message_id="", attempt=1,
                                    report=DeliveryReport("ok@x.test", AttemptOutcome.DELIVERED, "r")))
    ring.emit(ev.HostFailed(queue_id="q9", transport="gmail", host="h", ip="", port=587,
                            reason="connection refused", reason_label="refused"))
    latest = ring.latest()
    assert [(f.kind, f.queue_id) for f in latest] == [("unreachable", "q9"), ("deferred", "q4"), ("deferred", "q3")]
    assert len(latest[1].text) == MAX_TEXT and latest[1].text.startswith("451 xxx")


def _app() -> ObserveApp:
    return ObserveApp(CollectorRegistry(), lambda: snapshot(), lambda: "relay.test")


def test_the_listener_closes_connections_past_its_limit_and_reads_with_a_deadline() -> None:
    server, thread = start_observe_server("127.0.0.1", 0, _app(), max_connections=2, read_timeout=1.0)
    port = server.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            assert extra.recv(100) == b""  # closed unanswered: both slots are taken
        started = time.monotonic()
        assert idle[0].recv(100) == b""  # an idle client is dropped after the read deadline
        assert time.monotonic() - started < 3
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.status == 200  # the slots came back
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_page_while_the_loop_does_not_answer_says_it_is_busy() -> None:
    app = ObserveApp(CollectorRegistry(), lambda: None, lambda: "relay.test")
    server, thread = start_observe_server("127.0.0.1", 0, app)
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"http://127.0.0.1:{server.server_address[1]}/status", timeout=5) as resp:
            assert b"relay.test is busy" in resp.read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_the_listener_serves_on_the_ipv6_loopback() -> None:
    server, thread = start_observe_server("::1", 0, _app())
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"http://[::1]:{server.server_address[1]}/", timeout=5) as resp:
            assert b"relayd on relay.test" in resp.read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_page_loads_within_a_second_reuse_one_snapshot() -> None:
    asked: list[float] = []
    now = [100.0]

    def status() -> StatusSnapshot:
        asked.append(now[0])
        return BASE

    app = ObserveApp(CollectorRegistry(), status, lambda: "relay.test", clock=lambda: now[0])
    server, thread = start_observe_server("127.0.0.1", 0, app)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        for step in (0.0, 0.3, 0.5, 0.1, 0.5):  # at 100.0, 100.3, 100.8, 100.9, 101.4
            now[0] += step
            with direct.open(f"http://127.0.0.1:{server.server_address[1]}/", timeout=5) as resp:
                assert resp.status == 200
        assert asked == pytest.approx([100.0, 101.4])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
