"""Per-transport shaping end to end: real relayd, real upstreams on loopback, real time.

Each test writes a relay.yaml with `max_per_*` keys on a transport, submits
over STARTTLS + AUTH with smtplib and watches what the fake upstreams
receive and when. The day window's release at midnight is driven with an
injected clock in tests/test_shaping_clock.py; here a minute window opens
for real.
"""

from __future__ import annotations

import io
import json
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from relayd.ops.cli import main
from tests.relayenv import (
    RelaydProcess, RelayFiles, RelayThread, TenantSpec, UpstreamSpec, connect, make_message,
)

ACME = ("acme", "acme-relay-password")
SENDER = "billing@acme.example"


def setup(files: RelayFiles, upstreams: Callable[..., Any], chain: list[str], extra: dict[str, str]) -> dict[str, Any]:
    fakes = {name: upstreams(users={f"{name}@relay.test": "app-password"}) for name in chain}
    files.write(
        upstreams=[
            UpstreamSpec(name, fake.port, name, f"{name}@relay.test", "app-password", extra=extra.get(name, ""))
            for name, fake in fakes.items()
        ],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], chain)])],
    )
    return fakes


def submit_many(files: RelayFiles, count: int, tag: str = "m") -> None:
    """`count` messages in one SMTP session, one transaction each."""
    with connect(files, login=ACME) as client:
        for i in range(count):
            rcpt = f"{tag}{i}@customer.test"
            assert client.sendmail(SENDER, [rcpt], make_message(SENDER, [rcpt], subject=f"{tag} {i}")) == {}


def relayctl(files: RelayFiles, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--config", str(files.config), *argv], environ={}, stdin=io.StringIO(""))
    return code, capsys.readouterr().out


def assert_paced_at_2_per_second(times: list[float], count: int) -> None:
    """Every message arrived, never more than 2 (+1 at a second's edge) in any one second, paced not merely slow."""
    assert len(times) == count
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 3, times
    assert times[-1] - times[0] >= (count / 2) - 1


def test_max_per_second_2_never_puts_more_than_3_in_any_second_and_every_message_arrives(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    fakes = setup(relay_files, upstreams, ["ses"], {"ses": "max_per_second: 2"})
    with RelayThread(relay_files.config):
        submit_many(relay_files, 10)
        arrived = fakes["ses"].wait_for_messages(10, timeout=60)
    assert_paced_at_2_per_second(sorted(m.at for m in arrived), 10)


def test_a_daily_cap_of_3_on_a_sends_exactly_3_via_a_and_the_rest_via_b_before_a_refuses_anything(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fakes = setup(relay_files, upstreams, ["a", "b"], {"a": "max_per_day: 3"})
    with RelayThread(relay_files.config) as relay:
        submit_many(relay_files, 7)
        fakes["b"].wait_for_messages(4, timeout=60)
        status = json.loads(relayctl(relay_files, capsys, "status", "--json")[1])
        _, text = relayctl(relay_files, capsys, "status")
        metrics = relay.relay.metrics.render().decode()
    assert len(fakes["a"].messages) == 3
    assert len(fakes["a"].received) == 3  # A never had to refuse one
    assert len(fakes["b"].messages) == 4
    day = next(c for c in status["shaping"]["a"]["caps"] if c["span"] == "day" and c["what"] == "messages")
    assert (day["used"], day["limit"]) == (3, 3)
    assert status["shaping"]["a"]["held"] == "daily quota 3 reached, resets 00:00 UTC"
    assert status["shaping"]["a"]["next_release"] is not None
    assert "3/3" in text and "held: daily quota 3 reached, resets 00:00 UTC; next release 00:00:00 UTC" in text
    assert 'relayd_transport_window_sent{transport="a",unit="messages",window="day"} 3.0' in metrics
    assert 'relayd_transport_window_limit{transport="a",unit="messages",window="day"} 3.0' in metrics
    assert 'relayd_transport_held{transport="a"} 1.0' in metrics
    assert 'relayd_transport_held{transport="b"} 0.0' in metrics
    assert 'relayd_transport_next_release_timestamp_seconds{transport="a"}' in metrics
    assert 'relayd_transport_send_rate{transport="a"}' in metrics


def test_chain_of_one_holds_the_rest_shows_why_and_releases_them_when_the_minute_opens(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fakes = setup(relay_files, upstreams, ["a"], {"a": "max_per_minute: 3"})
    if time.time() % 60 > 50:  # keep the first three and the holding in one minute
        time.sleep(61 - time.time() % 60)
    with RelayThread(relay_files.config) as relay:
        submit_many(relay_files, 5)
        fakes["a"].wait_for_messages(3, timeout=30)
        deadline = time.monotonic() + 10
        while len(relay.call(_held(relay))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        _, listing = relayctl(relay_files, capsys, "queue", "list")
        held_ids = [line.split()[2] for line in listing.splitlines() if " A=acme" in line]
        _, shown = relayctl(relay_files, capsys, "queue", "show", held_ids[0])
        fakes["a"].wait_for_messages(5, timeout=80)
        relay_files.wait_for_log("Completed", count=5)
    assert len(held_ids) == 2
    assert listing.count("(held: a per-minute limit 3 reached, resets ") == 2
    assert "state:      held: a per-minute limit 3 reached, resets " in shown
    assert "released from" in shown
    log = relay_files.mainlog()
    assert " == " not in log and " ** " not in log  # waiting was no deferral, nothing bounced
    assert len(fakes["a"].received) == 5


async def _held(relay: RelayThread) -> dict[str, str]:
    reasons: dict[str, str] = relay.relay.holds.reasons()
    return reasons


def test_max_connections_1_is_never_exceeded_under_10_concurrent_submissions(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    fakes = setup(relay_files, upstreams, ["a"], {"a": "max_connections: 1"})
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            submit_many(relay_files, 1, tag=f"c{i}-")
        except (smtplib.SMTPException, OSError) as error:
            errors.append(error)

    with RelayThread(relay_files.config):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        fakes["a"].wait_for_messages(10, timeout=60)
    assert errors == []
    assert fakes["a"].peak_connections == 1


def test_daily_counts_survive_a_kill_9_of_the_relayd_process(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    fakes = setup(relay_files, upstreams, ["a", "b"], {"a": "max_per_day: 3"})
    with RelaydProcess(relay_files) as first:
        submit_many(relay_files, 2, tag="before")
        fakes["a"].wait_for_messages(2, timeout=30)
        relay_files.wait_for_log("Completed", count=2)
        first.kill()
    with RelaydProcess(relay_files):
        submit_many(relay_files, 3, tag="after")
        fakes["b"].wait_for_messages(2, timeout=30)
        relay_files.wait_for_log("Completed", count=5)
    assert len(fakes["a"].messages) == 3  # 2 before the kill, 1 after: the count outlived the process
    assert len(fakes["b"].messages) == 2


def test_config_check_shows_the_effective_limits_of_presets_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        "version: 1\nhostname: relay.test\nspool_dir: spool\ncredentials: {store: credentials.enc}\n"
        "listeners:\n  - {name: local, port: 2525, tls: none}\n"
        "transports:\n"
        "  ses: {preset: ses, region: eu-west-1, max_per_day: 50000}\n"
        "  local: {host: 127.0.0.1, port: 2526, tls: none, max_per_second: 0.5}\n"
        "  dev: {host: 127.0.0.1, port: 2527, tls: none}\n"
        "tenants: {}\n"
    )
    capsys.readouterr()
    code = main(["--config", str(config), "config", "check", "--no-files"], environ={}, stdin=io.StringIO(""))
    out = capsys.readouterr().out
    assert code == 0
    assert ("  transport ses: max_per_second 1, max_per_day 50000; max_connections 10, "
            "max_messages_per_connection 100; preset ses") in out
    assert "  transport local: max_per_second 0.5; max_connections 10" in out
    assert "transport dev" not in out  # unshaped: nothing to show


def test_a_damaged_counter_database_stops_the_start_with_its_name_and_no_traceback(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    setup(relay_files, upstreams, ["a"], {"a": "max_per_day: 3"})
    spool = relay_files.root / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "counters.sqlite").write_bytes(b"not a database " * 200)
    done = subprocess.run([sys.executable, "-m", "relayd.daemon", "--config", str(relay_files.config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert "counters.sqlite: cannot open the counter database" in done.stderr
    assert "move the file aside" in done.stderr and "Traceback" not in done.stderr
