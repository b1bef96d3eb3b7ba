"""Shared usage counters in a real redis-server on loopback (no persistence), started and stopped by PID.

Several relayd nodes sending through one provider account share one cap;
when Redis cannot be reached a node keeps to its local share, says so, and
goes back to the shared counts by itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trustme
import uvloop

from relayd.config.quota import RedisSettings
from relayd.observe.claims import Claim
from relayd.observe.counters import CounterError, Span, Window
from relayd.observe.rediscounters import RedisCounters
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, free_port
from tests.test_tenant_quota_relay import ACME, relayctl, send

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/install-test-clients)"
)
DAY = Window(Span.DAY)
NOW = time.time()  # Redis expires a window's keys by the real clock


class RedisServer:
    """A redis-server on 127.0.0.1:`port` with nothing saved to disk; stopped by its PID."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def usage_section(port: int, timeout: float) -> str:
    return ("usage:\n  store: redis\n  redis:\n    host: 127.0.0.1\n"
            f"    port: {port}\n    timeout: {timeout}\n    local_share: 0.5\n")


def write_node(files: RelayFiles, upstream_port: int, quota: str, redis_port: int, timeout: float = 5.0) -> None:
    files.write(
        upstreams=[UpstreamSpec("gw", upstream_port, "gw", "gw@relay.test", "app-password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gw"])], extra=quota)],
    )
    # A slow answer counts as "unreachable" (local share): on a busy test machine, be patient.
    files.config.write_text(files.config.read_text() + usage_section(redis_port, timeout))


def test_redis_claims_never_pass_the_cap_under_concurrent_takes(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        counters = RedisCounters(RedisSettings(port=redis_server.port, key_prefix="t"))
        claims = [Claim("tenant:acme", DAY, 15), Claim("tenant:acme", Window(Span.MONTH), 100)]
        results = await asyncio.gather(*(counters.take(claims, 1, NOW) for _ in range(40)))
        assert sum(r.ok for r in results) == 15
        assert sorted(r.counts[0] for r in results if r.ok) == list(range(1, 16))
        assert await counters.count("tenant:acme", DAY, NOW) == 15
        assert await counters.count("tenant:acme", Window(Span.MONTH), NOW) == 15
        assert await counters.add("tenant:acme:rcpt", DAY, 3, NOW) == 3
        assert await counters.count("tenant:acme", DAY, NOW + 86400) == 0  # the next day's key space
        await counters.close()

    uvloop.run(scenario())


def test_redis_that_cannot_be_reached_raises_counter_error_quickly() -> None:
    async def scenario() -> None:
        counters = RedisCounters(RedisSettings(port=free_port(), timeout=0.2))
        started = time.monotonic()
        with pytest.raises(CounterError, match="redis 127.0.0.1"):
            await counters.take([Claim("k", DAY, 1)], 1, NOW)
        assert time.monotonic() - started < 2
        await counters.close()

    uvloop.run(scenario())


def test_two_relayd_processes_sharing_redis_never_exceed_one_shared_cap_together(
    tmp_path: Path, ca: trustme.CA, upstreams: Callable[..., Any], redis_server: RedisServer
) -> None:
    fake = upstreams(users={"gw@relay.test": "app-password"})
    nodes = [RelayFiles(tmp_path / f"node{n}", ca) for n in (1, 2)]
    for files in nodes:
        write_node(files, fake.port, "quota:\n  max_per_day: 7", redis_server.port)
    results: dict[int, list[Any]] = {}
    with RelaydProcess(nodes[0]), RelaydProcess(nodes[1]):
        threads = [
            threading.Thread(target=lambda n=n: results.__setitem__(n, send(nodes[n], ACME, 6, tag=f"n{n}-")))
            for n in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        fake.wait_for_messages(7, timeout=60)
        time.sleep(1.0)  # anything past the cap would arrive now
    accepted = sum(code == 250 for n in (0, 1) for code, _ in results[n])
    assert accepted == 7, results
    assert len(fake.messages) == 7
    refused = [text for n in (0, 1) for code, text in results[n] if code != 250]
    assert len(refused) == 5 and all(t.startswith("4.7.1 Daily quota of tenant acme reached (7 messages)")
                                     for t in refused)


def test_redis_down_keeps_the_node_to_its_local_share_without_crash_or_loss_and_it_reconnects(
    relay_files: RelayFiles, upstreams: Callable[..., Any], redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = upstreams(users={"gw@relay.test": "app-password"})
    write_node(relay_files, fake.port, "quota:\n  max_per_day: 10", redis_server.port, timeout=1.0)
    with RelaydProcess(relay_files) as relay:
        assert [c for c, _ in send(relay_files, ACME, 2)] == [250, 250]
        redis_server.stop()
        # Local share: half of 10; this node already sent 2 of its 5.
        assert [c for c, _ in send(relay_files, ACME, 5, tag="down")] == [250, 250, 250, 450, 450]
        relay_files.wait_for_log("unreachable")
        _, status = relayctl(relay_files, capsys, "status", "--json")
        _, text = relayctl(relay_files, capsys, "status")
        fake.wait_for_messages(5, timeout=60)
        assert relay.proc.poll() is None
        redis_server.start()
        time.sleep(5.5)  # the node tries the shared store again every 5 s
        assert [c for c, _ in send(relay_files, ACME, 1, tag="back")] == [250]
        relay_files.wait_for_log("reachable again")
        _, back = relayctl(relay_files, capsys, "usage", "--json")
        fake.wait_for_messages(6, timeout=60)
    log = relay_files.mainlog()
    assert "this node counts against its local share of every quota" in log
    assert json.loads(status)["tenant_usage"]["store"]["shared"] is False
    assert "unreachable since" in text and "local share of each quota in force" in text
    report = json.loads(back)
    assert report["store"]["shared"] is True
    # The fresh Redis got what the node counted while it was away, plus the new message.
    assert report["tenants"][0]["windows"][0]["messages"] == 4
    assert len(fake.messages) == 6
