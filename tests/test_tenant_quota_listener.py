"""A tenant's `refuse` quota at the listener: MAIL and RCPT answered with the 450 naming the reset, and the
refusal logged and counted as the quota's. Real relayd, real upstream on loopback, smtplib."""

from __future__ import annotations

import urllib.request
from typing import Any, Callable

from tests.relayenv import RelayFiles, RelayThread, connect, free_port, make_message
from tests.test_tenant_quota_relay import ACME, next_midnight_utc, setup

QUOTA = "quota:\n  max_per_day: 1\n  on_quota: refuse"


def reached() -> str:
    return f"450 4.7.1 Daily quota of tenant acme reached (1 messages); resets {next_midnight_utc()}"


def test_rcpt_gets_the_quota_450_when_another_session_took_the_last_place_after_mail_from(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    fake = setup(relay_files, upstreams, QUOTA)
    with RelayThread(relay_files.config):
        first, second = connect(relay_files, login=ACME), connect(relay_files, login=ACME)
        with first, second:
            assert first.mail("app@acme.example")[0] == 250
            assert second.mail("app@acme.example")[0] == 250  # answered before the first completes
            assert first.rcpt("a@customer.test")[0] == 250
            assert first.data(make_message("app@acme.example", ["a@customer.test"]))[0] == 250
            code, text = second.rcpt("b@customer.test")
        fake.wait_for_messages(1, timeout=30)
    assert f"{code} {text.decode()}" == reached()
    assert len(fake.messages) == 1
    log = relay_files.mainlog()
    assert f"rejected RCPT <b@customer.test>: {reached()}: A=acme quota" in log
    assert "rejected DATA" not in log  # refused before DATA: nothing was received, nothing to drop


def test_a_quota_refusal_at_mail_is_logged_and_counted_as_the_quotas_not_the_spools(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    port = free_port()
    setup(relay_files, upstreams, QUOTA, f"metrics:\n  address: 127.0.0.1\n  port: {port}\n")
    with RelayThread(relay_files.config):
        with connect(relay_files, login=ACME) as client:
            assert client.sendmail("app@acme.example", ["a@customer.test"],
                                   make_message("app@acme.example", ["a@customer.test"])) == {}
            code, text = client.mail("app@acme.example")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    assert f"{code} {text.decode()}" == reached()
    lines = [line for line in relay_files.mainlog().splitlines() if "rejected MAIL" in line]
    assert len(lines) == 1
    assert lines[0].endswith(f"H=[127.0.0.1] rejected MAIL <app@acme.example>: {reached()}: A=acme quota")
    assert "spool" not in lines[0]
    # The metric's stage is the SMTP command; the code tells the quota's 450 from the spool's 452 4.3.1.
    assert 'relayd_smtp_rejections_total{code="4.7.1",stage="MAIL"} 1.0' in metrics
    assert 'code="4.3.1"' not in metrics
