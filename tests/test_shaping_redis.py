"""A provider account's transport caps and send rate shared by two relayd nodes through a real redis-server.

Two relayd processes on loopback send through the same transports (the
same fake upstreams, as two web servers send through one Gmail or SES
account): each attempt reserves its place in Redis before the send, so the
two together never pass one cap or one rate; when Redis is away a node keeps
to its local share and loses nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import trustme
import uvloop

from relayd.config.quota import RedisSettings
from relayd.observe.claims import Claim, Pace
from relayd.observe.counters import Span, Window
from relayd.observe.rediscounters import RedisCounters
from relayd.ops.cli import main
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec
from tests.test_shaping_relay import ACME, assert_paced_at_2_per_second, submit_many
from tests.test_usage_redis import RedisServer, redis_server, usage_section  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/install-test-clients)"
)
DAY = Window(Span.DAY)


def write_node(files: RelayFiles, fakes: dict[str, Any], chain: list[str], extra: dict[str, str],
               redis_port: int, timeout: float = 5.0) -> None:
    files.write(
        upstreams=[
            UpstreamSpec(name, fake.port, name, f"{name}@relay.test", "app-password", extra=extra.get(name, ""))
            for name, fake in fakes.items()
        ],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], chain)])],
    )
    # A slow answer counts as "unreachable" (local share): on a busy test machine, be patient.
    files.config.write_text(files.config.read_text() + usage_section(redis_port, timeout))


def fake_upstreams(upstreams: Callable[..., Any], names: list[str]) -> dict[str, Any]:
    return {name: upstreams(users={f"{name}@relay.test": "app-password"}) for name in names}


def submit_on_both(nodes: list[RelayFiles], count: int) -> None:
    threads = [threading.Thread(target=submit_many, args=(files, count, f"n{n}-")) for n, files in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def relayctl_text(files: RelayFiles, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(["--config", str(files.config), *argv], environ={}, stdin=io.StringIO("")) == 0
    return capsys.readouterr().out


def relayctl_json(files: RelayFiles, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    return json.loads(relayctl_text(files, capsys, *argv, "--json"))


def test_reservations_never_pass_the_cap_and_a_given_back_place_is_free_again(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisCounters(RedisSettings(port=redis_server.port, key_prefix="t"))
        now = time.time()
        claims = [Claim("transport:gw", DAY, 10), Claim("transport:gw:rcpt", DAY, 1000)]
        answers = await asyncio.gather(*(store.reserve(claims, None, now) for _ in range(30)))
        assert sum(a.ok for a in answers) == 10
        assert all(a.full for a in answers if not a.ok)
        await store.give_back(claims, 1, now)
        assert await store.count("transport:gw", DAY, now) == 9
        assert (await store.reserve(claims, None, now)).ok
        assert not (await store.reserve(claims, None, now)).ok
        await store.close()

    uvloop.run(scenario())


def test_a_shared_pace_lets_one_send_go_per_interval_whoever_asks(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        nodes = [RedisCounters(RedisSettings(port=redis_server.port, key_prefix="p")) for _ in range(2)]
        pace = Pace("transport:ses:pace", interval=0.5)
        first = await nodes[0].reserve([], pace, time.time())
        second = await nodes[1].reserve([], pace, time.time())
        assert first.ok and not second.ok
        assert 0.3 < second.wait <= 0.5
        await asyncio.sleep(second.wait + 0.02)
        assert (await nodes[1].reserve([], pace, time.time())).ok
        for node in nodes:
            await node.close()

    uvloop.run(scenario())


def test_two_relayd_processes_sharing_redis_never_pass_one_transport_cap_together(
    tmp_path: Path, ca: trustme.CA, upstreams: Callable[..., Any], redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fakes = fake_upstreams(upstreams, ["a", "b"])
    nodes = [RelayFiles(tmp_path / f"node{n}", ca) for n in (1, 2)]
    for files in nodes:
        write_node(files, fakes, ["a", "b"], {"a": "max_per_day: 5"}, redis_server.port)
    with RelaydProcess(nodes[0]), RelaydProcess(nodes[1]):
        submit_on_both(nodes, 6)
        fakes["b"].wait_for_messages(7, timeout=90)
        time.sleep(1.0)  # anything past the cap would arrive now
        status = relayctl_json(nodes[0], capsys, "status")
    # Each node alone would have sent 5 via A: together they sent 5, the other 7 went on to B.
    assert len(fakes["a"].messages) == 5
    assert len(fakes["b"].messages) == 7
    shaping = status["shaping"]["a"]
    assert shaping["shared"].startswith("shared in redis 127.0.0.1")
    day = next(c for c in shaping["caps"] if c["span"] == "day" and c["what"] == "messages")
    assert day["used"] == 5 and day["limit"] == 5


def test_two_relayd_processes_sharing_redis_keep_one_send_rate_together(
    tmp_path: Path, ca: trustme.CA, upstreams: Callable[..., Any], redis_server: RedisServer,
) -> None:
    fakes = fake_upstreams(upstreams, ["ses"])
    nodes = [RelayFiles(tmp_path / f"node{n}", ca) for n in (1, 2)]
    for files in nodes:
        write_node(files, fakes, ["ses"], {"ses": "max_per_second: 2"}, redis_server.port)
    with RelaydProcess(nodes[0]), RelaydProcess(nodes[1]):
        submit_on_both(nodes, 5)
        arrived = fakes["ses"].wait_for_messages(10, timeout=90)
    # Each node alone keeps 2/s; without sharing the two would put 4 or 5 into one second.
    assert_paced_at_2_per_second(sorted(m.at for m in arrived), 10)


def test_redis_down_keeps_each_transport_to_the_local_share_of_its_cap_and_loses_nothing(
    relay_files: RelayFiles, upstreams: Callable[..., Any], redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fakes = fake_upstreams(upstreams, ["a", "b"])
    write_node(relay_files, fakes, ["a", "b"], {"a": "max_per_day: 8"}, redis_server.port, timeout=1.0)
    with RelaydProcess(relay_files) as relay:
        submit_many(relay_files, 2, "up-")
        fakes["a"].wait_for_messages(2, timeout=60)
        redis_server.stop()
        # Half of 8 is this node's own while Redis is away; it already sent 2 of them.
        submit_many(relay_files, 5, "down-")
        fakes["b"].wait_for_messages(3, timeout=60)
        relay_files.wait_for_log("local share")
        status = relayctl_json(relay_files, capsys, "status")
        text = relayctl_text(relay_files, capsys, "status")
        assert relay.proc.poll() is None
        redis_server.start()
        time.sleep(5.5)  # the node tries Redis again every 5 s
        submit_many(relay_files, 1, "back-")
        fakes["a"].wait_for_messages(5, timeout=60)
        relay_files.wait_for_log("reachable again; caps and rates are shared")
    assert len(fakes["a"].messages) == 5 and len(fakes["b"].messages) == 3
    assert "unreachable" in status["shaping"]["a"]["shared"]
    assert "4 (local share of 8)" in (status["shaping"]["a"]["held"] or "")
    assert "Transport caps: redis 127.0.0.1" in text and "keeps to 50% of each cap and rate" in text

    async def shared_count() -> int:
        store = RedisCounters(RedisSettings(port=redis_server.port))
        try:
            return await store.count("transport:a", DAY, time.time())
        finally:
            await store.close()

    # The fresh Redis got what the node sent while it was away (2), then the new message.
    assert uvloop.run(shared_count()) == 3
