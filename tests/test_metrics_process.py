"""Every metric relayd exports moves as it should, scraped over HTTP from the real `relayd` process."""

from __future__ import annotations

import base64
import re
import socket
import time
import urllib.request
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

from relayd.ops.controlclient import ControlClient
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, connect, free_port, submit

LOGIN = ("acme", "acme-pw")
SENDER = "app@acme.example"


def scrape_text(port: int) -> str:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


class Scrape:
    """One scrape, as samples looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        return None

    def queue(self) -> dict[str, float | None]:
        return {state: self.value("relayd_queue_messages", state=state)
                for state in ("queued", "deferred", "held", "frozen")}


def wait_scrape(port: int, condition: Callable[[Scrape], bool], timeout: float = 20.0) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        scraped = Scrape(scrape_text(port))
        if condition(scraped):
            return scraped
        assert time.monotonic() < deadline, scraped.text
        time.sleep(0.1)


def metrics_relay(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> tuple[int, Any, Any]:
    provider = upstreams(users={"relay@provider.test": "pw"})
    dead = upstreams(users={"relay@dead.test": "pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("provider", provider.port, "provider", "relay@provider.test", "pw"),
                   UpstreamSpec("dead", dead.port, "dead", "relay@dead.test", "pw")],
        tenants=[TenantSpec("acme", "acme-pw", ["*@acme.example"],
                            [(["chain.test"], ["dead", "provider"]), (["down.test"], ["dead"]),
                             (["*"], ["provider"])])],
        retry="F,1h,30m",
        listener_extra="max_connections: 3",
    )
    port = free_port()
    with relay_files.config.open("a") as config:
        config.write(f"metrics:\n  address: 127.0.0.1\n  port: {port}\n")
    dead.refuse_connections()
    return port, provider, dead


def test_sessions_gauge_counts_open_starttls_sessions_and_returns_to_zero_and_refusals_are_counted(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    port, _provider, _dead = metrics_relay(relay_files, upstreams)
    with RelaydProcess(relay_files):
        assert Scrape(scrape_text(port)).value("relayd_smtp_sessions") == 0
        held = [connect(relay_files, login=LOGIN) for _ in range(3)]  # STARTTLS, then AUTH
        wait_scrape(port, lambda s: s.value("relayd_smtp_sessions") == 3)
        with socket.create_connection(("127.0.0.1", relay_files.port), timeout=10) as over_limit:
            assert over_limit.recv(200).startswith(b"421 4.7.0")
        for client in held:
            client.quit()
        scraped = wait_scrape(port, lambda s: s.value("relayd_smtp_sessions") == 0)
        assert scraped.value("relayd_smtp_rejections_total", stage="CONNECT", code="4.7.0") == 1

        with connect(relay_files) as client:
            wrong = base64.b64encode(b"\0acme\0wrong-password").decode()
            code, _ = client.docmd("AUTH", f"PLAIN {wrong}")
            assert code == 535
        with connect(relay_files, login=LOGIN) as client:
            code, reply = client.mail("someone@elsewhere.test")
            assert code == 550 and reply.startswith(b"5.7.1"), reply
            client.rset()
            client.mail(SENDER)
            code, _ = client.rcpt("not an address")
            assert code >= 500
        scraped = wait_scrape(port, lambda s: s.value("relayd_smtp_sessions") == 0)
        assert scraped.value("relayd_auth_failures_total") == 1
        assert scraped.value("relayd_smtp_rejections_total", stage="MAIL", code="5.7.1") == 1
        assert sum(s.value for s in scraped.samples
                   if s.name == "relayd_smtp_rejections_total" and s.labels["stage"] == "RCPT") == 1


def test_every_delivery_queue_and_transport_metric_moves_in_a_running_relayd(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    port, provider, _dead = metrics_relay(relay_files, upstreams)
    provider.reply_to("RCPT", "451 4.2.0 try later", for_address="soft@customer.test")
    provider.reply_to("RCPT", "451 4.2.0 try later", for_address="soft2@customer.test")
    provider.reply_to("RCPT", "550 5.1.1 no such user", for_address="hard@customer.test")
    with RelaydProcess(relay_files):
        before = Scrape(scrape_text(port))
        assert "_created" not in before.text
        free, size = before.value("relayd_spool_free_bytes"), before.value("relayd_spool_size_bytes")
        assert free is not None and size is not None and 0 < free <= size
        assert (before.value("relayd_spool_reserve_bytes") or 0) > 0
        assert before.value("relayd_transport_state", transport="dead", state="open") == 1
        assert before.value("relayd_transport_last_success_timestamp_seconds", transport="provider") is None

        # The first transport of the chain is down: the message fails over and is delivered.
        started = time.time()
        submit(relay_files, LOGIN, SENDER, ["a@chain.test"])
        provider.wait_for_messages(1)
        for rcpt in ("ok", "soft", "hard"):
            submit(relay_files, LOGIN, SENDER, [f"{rcpt}@customer.test"])
        provider.wait_for_messages(3)  # ok, then the bounce of hard
        relay_files.wait_for_log("** hard@customer.test")
        relay_files.wait_for_log("== soft@customer.test")
        # `dead` is in its retry wait: a message only it can take is held without an attempt.
        held_id = submit(relay_files, LOGIN, SENDER, ["x@down.test"])
        frozen_id = submit(relay_files, LOGIN, SENDER, ["soft2@customer.test"])
        relay_files.wait_for_log("== soft2@customer.test")
        assert ControlClient(relay_files.root / "spool" / "control.sock").request("freeze", ids=[frozen_id])["ok"]

        provider.reply_to("DATA", "250 2.0.0 OK, slowly", delay=4, times=1)
        slow_id = submit(relay_files, LOGIN, SENDER, ["slow@customer.test"])
        in_flight = wait_scrape(port, lambda s: s.value("relayd_queue_messages", state="queued") == 1)
        assert in_flight.queue() == {"queued": 1, "deferred": 1, "held": 1, "frozen": 1}
        provider.wait_for_messages(4, timeout=20)
        relay_files.wait_for_log("=> slow@customer.test")

        s = wait_scrape(port, lambda s: s.value("relayd_queue_messages", state="queued") == 0)
        assert s.queue() == {"queued": 0, "deferred": 1, "held": 1, "frozen": 1}
        age = s.value("relayd_queue_oldest_message_age_seconds")
        assert age is not None and 0 < age <= time.time() - started + 1
        assert s.value("relayd_messages_received_total", tenant="acme") == 7
        assert (s.value("relayd_received_bytes_total", tenant="acme") or 0) > 7 * 100
        # chain, ok, the bounce and slow delivered; soft and soft2 deferred; hard failed.
        assert s.value("relayd_deliveries_total", tenant="acme", transport="provider", result="delivered") == 4
        assert s.value("relayd_deliveries_total", tenant="acme", transport="provider", result="deferred") == 2
        assert s.value("relayd_deliveries_total", tenant="acme", transport="provider", result="failed") == 1
        assert s.value("relayd_bounces_total", tenant="acme") == 1
        assert s.value("relayd_failovers_total", transport="dead") == 1
        assert s.value("relayd_upstream_attempts_total", transport="dead", result="unreachable") == 1
        assert s.value("relayd_upstream_attempts_total", transport="dead", result="reached") is None
        # One transaction each: chain, ok, soft, hard, the bounce, soft2, slow.
        assert s.value("relayd_upstream_attempts_total", transport="provider", result="reached") == 7
        assert s.value("relayd_delivery_seconds_count", transport="provider") == 7
        slow_bucket = s.value("relayd_delivery_seconds_bucket", transport="provider", le="2.5")
        assert slow_bucket == 6  # the slow transaction took over 4 seconds
        assert s.value("relayd_upstream_up", transport="dead") == 0
        assert s.value("relayd_upstream_up", transport="provider") == 1

        assert s.value("relayd_transport_state", transport="dead", state="down") == 1
        assert s.value("relayd_transport_state", transport="dead", state="open") == 0
        assert s.value("relayd_transport_state", transport="provider", state="open") == 1
        reopens = s.value("relayd_transport_reopen_timestamp_seconds", transport="dead")
        assert reopens is not None and time.time() + 25 * 60 < reopens < time.time() + 31 * 60
        assert s.value("relayd_transport_reopen_timestamp_seconds", transport="provider") is None
        success = s.value("relayd_transport_last_success_timestamp_seconds", transport="provider")
        assert success is not None and started <= success <= time.time()
        assert s.value("relayd_transport_last_success_timestamp_seconds", transport="dead") is None

        # Bounded label sets: no address, queue id or reply text ever becomes a label.
        assert "_created" not in s.text
        labels = {v for sample in s.samples for v in sample.labels.values()}
        assert not [v for v in labels if "@" in v or " " in v], labels
        for queue_id in (held_id, frozen_id, slow_id):
            assert queue_id not in s.text
        assert not re.search(r"customer|chain\.test|down\.test", s.text)
