"""Tenant quotas end to end with the embedded counters: real relayd, real upstream on loopback, smtplib.

A tenant's `quota:` caps what it submits per day; `refuse` answers MAIL FROM
with 450 4.7.1 naming the reset, `hold` accepts and holds (visible in mailq).
The release at midnight is driven with an injected clock in
tests/test_tenant_quota_clock.py.
"""

from __future__ import annotations

import io
import json
import smtplib
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest

from relayd.ops.cli import main
from tests.relayenv import (
    ROOT, RelaydProcess, RelayFiles, RelayThread, TenantSpec, UpstreamSpec, connect, free_port, make_message,
)

ACME = ("acme", "acme-relay-password")
BETA = ("beta", "beta-relay-password")


def setup(files: RelayFiles, upstreams: Callable[..., Any], quota: str, top: str = "") -> Any:
    fake = upstreams(users={"gw@relay.test": "app-password"})
    files.write(
        upstreams=[UpstreamSpec("gw", fake.port, "gw", "gw@relay.test", "app-password")],
        tenants=[
            TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gw"])], extra=quota),
            TenantSpec("beta", BETA[1], ["*@beta.example"], [(["*"], ["gw"])]),
        ],
    )
    if top:
        files.config.write_text(files.config.read_text() + top)
    return fake


def send(files: RelayFiles, login: tuple[str, str], count: int, tag: str = "m") -> list[Any]:
    """`count` transactions in one session; each one's refusal (at MAIL or at the end of DATA), or 250."""
    sender = f"app@{login[0]}.example"
    replies = []
    with connect(files, login=login) as client:
        for i in range(count):
            code, text = client.mail(sender)
            replies.append((code, text.decode()))
            if code != 250:
                client.rset()
                continue
            rcpt = f"{tag}{i}@customer.test"
            assert client.rcpt(rcpt)[0] == 250
            try:
                code, text = client.data(make_message(sender, [rcpt], subject=f"{tag} {i}"))
            except smtplib.SMTPDataError as refused:
                code, text = refused.smtp_code, refused.smtp_error
            if code != 250:  # another session took the last place meanwhile
                replies[-1] = (code, text.decode())
    return replies


def relayctl(files: RelayFiles, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--config", str(files.config), *argv], environ={}, stdin=io.StringIO(""))
    return code, capsys.readouterr().out


def next_midnight_utc() -> str:
    tomorrow = datetime.now(timezone.utc).date() + timedelta(days=1)
    return f"{tomorrow:%Y-%m-%d} 00:00 UTC"


def test_refuse_answers_450_at_mail_naming_the_reset_and_other_tenants_are_unaffected(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = setup(relay_files, upstreams, "quota:\n  max_per_day: 3\n  on_quota: refuse")
    with RelayThread(relay_files.config):
        acme = send(relay_files, ACME, 5)
        beta = send(relay_files, BETA, 4, tag="b")
        fake.wait_for_messages(7, timeout=30)
        _, table = relayctl(relay_files, capsys, "usage")
        code, out = relayctl(relay_files, capsys, "usage", "--tenant", "acme", "--json")
        capsys.readouterr()
        unknown = main(["--config", str(relay_files.config), "usage", "--tenant", "nobody"], environ={},
                       stdin=io.StringIO(""))
        assert (unknown, capsys.readouterr().err) == (1, "relayctl: no tenant named 'nobody' in the configuration\n")
    assert [c for c, _ in acme] == [250, 250, 250, 450, 450]
    assert acme[3][1] == f"4.7.1 Daily quota of tenant acme reached (3 messages); resets {next_midnight_utc()}"
    assert [c for c, _ in beta] == [250] * 4
    assert len(fake.messages) == 7
    log = relay_files.mainlog()
    assert "rejected DATA" not in log  # refused at MAIL: the listener's own line, labelled as the quota's
    assert log.count(f"rejected MAIL <app@acme.example>: {acme[3][0]} {acme[3][1]}: A=acme quota") == 2
    report = json.loads(out)
    assert code == 0 and [t["tenant"] for t in report["tenants"]] == ["acme"]
    day = report["tenants"][0]["windows"][0]
    assert (day["span"], day["messages"], day["recipients"], day["limit"], day["percent"]) == ("day", 3, 3, 3, 100.0)
    assert report["tenants"][0]["transports"]["gw"]["day"] == {"messages": 3, "recipients": 3}
    rows = [line.split() for line in table.splitlines()]
    assert ["acme", "day", "3", "3", "3", "(refuse)", "100.0%", *next_midnight_utc().split()] in rows
    assert ["beta", "day", "4", "4", "-", "-", *next_midnight_utc().split()] in rows


def test_the_80_percent_alert_fires_once_per_window_even_across_a_restart(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    metrics_port = free_port()
    setup(relay_files, upstreams, "quota:\n  max_per_day: 5", f"metrics:\n  address: 127.0.0.1\n  port: {metrics_port}\n")
    with RelayThread(relay_files.config):
        assert [c for c, _ in send(relay_files, ACME, 3)] == [250] * 3
        assert "quota alert" not in relay_files.mainlog()
        assert [c for c, _ in send(relay_files, ACME, 1)] == [250]
        relay_files.wait_for_log("quota alert A=acme: daily usage 4/5 messages (80% reached)")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    text = relay_files.config.read_text()  # the old metrics socket may linger: a fresh port
    relay_files.config.write_text(text.replace(f"port: {metrics_port}", f"port: {free_port()}"))
    with RelayThread(relay_files.config):
        assert [c for c, _ in send(relay_files, ACME, 3)] == [250, 450, 450]
    log = relay_files.mainlog()
    assert log.count("quota alert A=acme") == 1, log
    assert 'relayd_tenant_quota_alerts_total{tenant="acme",window="day"} 1.0' in metrics
    assert 'relayd_tenant_window_messages{tenant="acme",window="day"} 4.0' in metrics
    assert 'relayd_tenant_quota_messages{tenant="acme",window="day"} 5.0' in metrics


def test_counters_survive_kill_9(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = setup(relay_files, upstreams, "quota:\n  max_per_day: 4\n  max_per_month: 100")
    relay = RelaydProcess(relay_files)
    try:
        assert [c for c, _ in send(relay_files, ACME, 3)] == [250] * 3
        fake.wait_for_messages(3, timeout=30)
    finally:
        relay.kill()
    with RelaydProcess(relay_files):
        assert [c for c, _ in send(relay_files, ACME, 2)] == [250, 450]
        _, out = relayctl(relay_files, capsys, "usage", "--json")
        _, status = relayctl(relay_files, capsys, "status")
    windows = {w["span"]: w for w in json.loads(out)["tenants"][0]["windows"]}
    assert (windows["day"]["messages"], windows["month"]["messages"]) == (4, 4)
    assert "  tenant acme: day 4/4, month 4/100" in status


def test_hold_accepts_past_the_quota_and_mailq_shows_why(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = setup(relay_files, upstreams, "quota:\n  max_per_day: 2\n  on_quota: hold")
    with RelayThread(relay_files.config):
        assert [c for c, _ in send(relay_files, ACME, 4)] == [250] * 4
        fake.wait_for_messages(2, timeout=30)
        _, mailq = relayctl(relay_files, capsys, "queue", "list")
        _, out = relayctl(relay_files, capsys, "usage", "--json")
    assert len(fake.messages) == 2
    reason = f"held: daily quota of tenant acme reached (2 messages), resets {next_midnight_utc()}"
    assert mailq.count(reason) == 2, mailq
    assert json.loads(out)["tenants"][0]["held"] == 2
    assert relay_files.mainlog().count("held A=acme: daily quota of tenant acme reached") == 2
    with RelayThread(relay_files.config):  # a restart keeps holding them
        _, mailq = relayctl(relay_files, capsys, "queue", "list")
    assert mailq.count(reason) == 2 and len(fake.messages) == 2


def test_refuse_at_data_when_another_session_took_the_last_place_after_mail_from(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    fake = setup(relay_files, upstreams, "quota:\n  max_per_day: 1")
    with RelayThread(relay_files.config):
        first, second = connect(relay_files, login=ACME), connect(relay_files, login=ACME)
        with first, second:
            for client in (first, second):  # both pass MAIL FROM: nothing counted yet
                assert client.mail("app@acme.example")[0] == 250
                assert client.rcpt("x@customer.test")[0] == 250
            assert first.data(make_message("app@acme.example", ["x@customer.test"]))[0] == 250
            with pytest.raises(smtplib.SMTPDataError) as refused:
                second.data(make_message("app@acme.example", ["x@customer.test"]))
        fake.wait_for_messages(1, timeout=30)
    assert refused.value.smtp_code == 450 and b"Daily quota of tenant acme" in refused.value.smtp_error
    assert len(fake.messages) == 1


def test_a_damaged_quota_hold_database_stops_the_start_with_its_name(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    setup(relay_files, upstreams, "quota:\n  max_per_day: 2\n  on_quota: hold")
    spool = relay_files.root / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "quota-holds.sqlite").write_bytes(b"this is not a database\n" * 200)
    started = subprocess.run(
        [sys.executable, "-m", "relayd.daemon", "--config", str(relay_files.config)],
        cwd=ROOT, capture_output=True, timeout=60,
    )
    assert started.returncode == 78
    assert f"relayd: {spool / 'quota-holds.sqlite'}: cannot".encode() in started.stderr
    assert b"Traceback" not in started.stderr


def test_a_held_message_past_its_maximum_age_bounces_to_the_sender_and_is_never_sent(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = upstreams(users={"gw@relay.test": "app-password"})
    relay_files.write(  # the chain's only transport gives up after six seconds
        upstreams=[UpstreamSpec("gw", fake.port, "gw", "gw@relay.test", "app-password", retry="F,6s,1s")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gw"])],
                            extra="quota:\n  max_per_day: 1\n  on_quota: hold")],
    )
    with RelayThread(relay_files.config):
        assert [c for c, _ in send(relay_files, ACME, 2)] == [250, 250]
        log = relay_files.wait_for_log(" held A=acme: daily quota of tenant acme reached (1 messages)")
        held = log.split(" held A=acme:")[0].split()[-1]
        relay_files.wait_for_log(f"warning: {held} held for 0.0h, half its maximum age 0.0h: daily quota of "
                                 "tenant acme reached (1 messages), resets", timeout=20)
        relay_files.wait_for_log(f"{held} Completed", timeout=20)
        fake.wait_for_messages(2, timeout=30)
        _, mailq = relayctl(relay_files, capsys, "queue", "list")
        _, usage = relayctl(relay_files, capsys, "usage", "--json")
    log = relay_files.mainlog()
    assert log.count(f"warning: {held} held for") == 1
    failed = [line for line in log.splitlines() if f"{held} ** " in line]
    assert len(failed) == 1
    assert f"{held} ** m1@customer.test: retry timeout exceeded: held by the daily quota of tenant acme " \
        "since " in failed[0], failed
    sent, bounce = fake.messages
    assert sent.rcpt_tos == ["m0@customer.test"]  # the held message itself never went out
    assert (bounce.mail_from, bounce.rcpt_tos) == ("", ["app@acme.example"])
    dsn = bounce.data.decode().replace("\r\n ", " ")
    assert "Status: 4.4.7" in dsn and "retry timeout exceeded: held by the daily quota of tenant acme" in dsn
    assert held not in mailq and json.loads(usage)["tenants"][0]["held"] == 0
