"""Provider replies end to end: quotas close a transport, throttling waits, sender refusals bounce.

relayd runs in-process (its own thread and loop) with the production
composition (`Relay`); the upstreams are real SMTP servers on loopback that
answer with the providers' real reply texts; clients are smtplib and relayctl.
A provider's window is shortened with `provider_wait` (seconds instead of an
hour), the only thing the tests change.
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable

import pytest

from relayd.delivery.providerreplies import ReplyClass
from relayd.ops.cli import main
from tests.relayenv import RelayFiles, RelayThread, TenantSpec, UpstreamSpec, submit

ACME = ("acme", "acme-relay-password")
GMAIL_DAILY_LIMIT = (
    "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to "
    "https://support.google.com/a/answer/166852 - gsmtp"
)
SES_RATE = "454 Throttling failure: Maximum sending rate exceeded."
SEND_AS_DENIED = (
    "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to "
    "process message due to a permanent exception with message Cannot submit message."
)
SES_NOT_VERIFIED = (
    "554 Message rejected: Email address is not verified. The following identities failed the check in "
    "region EU-WEST-1: billing@acme.example"
)
BASIC_AUTH_OFF = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
# A retry schedule far longer than any test: a message that arrives within
# seconds was released by the provider's window, not by the schedule.
SLOW_RETRY = "F,1h,10m"


def short_window(seconds: float) -> Callable[[ReplyClass], float]:
    return lambda _klass: seconds


def chain_of(
    files: RelayFiles, upstreams: Callable[..., Any], presets: list[tuple[str, str]]
) -> list[Any]:
    """One fake upstream per (transport name, preset line); the tenant's chain in that order."""
    fakes = [upstreams(users={f"{name}@provider.test": "secret"}) for name, _ in presets]
    files.write(
        upstreams=[
            UpstreamSpec(name, fake.port, f"{name}-login", f"{name}@provider.test", "secret", extra=preset)
            for (name, preset), fake in zip(presets, fakes)
        ],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], [name for name, _ in presets])])],
        retry=SLOW_RETRY,
    )
    return fakes


def relayctl(files: RelayFiles, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    code = main(["--config", str(files.config), *argv], environ={}, stdin=io.StringIO(""))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_a_gmail_daily_limit_sends_via_b_and_later_messages_skip_a_until_the_reset(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail, sendgrid = chain_of(relay_files, upstreams, [("gmail_a", "preset: gmail"), ("sendgrid", "")])
    gmail.reply_to("MAIL", GMAIL_DAILY_LIMIT, times=1)
    with RelayThread(relay_files.config, relay_options={"provider_wait": short_window(3.0)}):
        submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        (first,) = sendgrid.wait_for_messages(1)
        connections = gmail.connections
        submit(relay_files, ACME, "billing@acme.example", ["two@customer.test"])
        sendgrid.wait_for_messages(2)
        assert gmail.connections == connections  # closed: not even a connection
        time.sleep(3.2)  # the provider's window moves on
        submit(relay_files, ACME, "billing@acme.example", ["three@customer.test"])
        (third,) = gmail.wait_for_messages(1)
    assert first.rcpt_tos == ["one@customer.test"] and third.rcpt_tos == ["three@customer.test"]
    log = relay_files.mainlog()
    assert "T=gmail_a: daily sending quota reached (550 5.4.5 Daily user sending limit exceeded." in log
    assert "transport closed until" in log
    assert " ** " not in log and "<= <>" not in log  # nothing bounced


def test_chain_a_alone_holds_the_message_with_its_reason_and_releases_it_at_the_reset(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    (gmail,) = chain_of(relay_files, upstreams, [("gmail_a", "preset: gmail")])
    gmail.reply_to("MAIL", GMAIL_DAILY_LIMIT, times=1)
    with RelayThread(relay_files.config, relay_options={"provider_wait": short_window(4.0)}):
        held = submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        relay_files.wait_for_log(f"{held} == one@customer.test")
        waiting = submit(relay_files, ACME, "billing@acme.example", ["two@customer.test"])
        time.sleep(0.5)  # the scheduler puts the second message back at once, without an attempt
        shown_held = relayctl(relay_files, capsys, "queue", "show", held)
        shown_waiting = relayctl(relay_files, capsys, "queue", "show", waiting)
        status = relayctl(relay_files, capsys, "status")
        assert gmail.messages == []
        delivered = gmail.wait_for_messages(2, timeout=15)
    assert sorted(m.rcpt_tos[0] for m in delivered) == ["one@customer.test", "two@customer.test"]
    # The message that met the quota waits with the reply as its reason, the next try at the reset.
    assert "5.4.5 Daily user sending limit exceeded" in shown_held, shown_held
    assert "1 attempt" in shown_held  # the quota reply was one attempt; the schedule did not move
    assert "held: gmail_a daily sending quota reached" in shown_waiting and "released from" in shown_waiting
    assert "closed until" in status and "daily sending quota reached" in status
    log = relay_files.mainlog()
    assert f"{held} == one@customer.test R=acme-1 T=gmail_a defer (-1)" in log and "held until" in log
    assert " ** " not in log and "<= <>" not in log
    assert log.count("=> ") == 2


def test_ses_throttling_is_retried_after_minutes_on_the_same_transport_not_failed_over(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    ses, backup = chain_of(
        # An account out of the SES sandbox: the preset's 1/s would send the second message on.
        relay_files, upstreams, [("ses_a", "preset: ses\nregion: eu-west-1\nmax_per_second: 100"), ("backup", "")]
    )
    ses.reply_to("MAIL", SES_RATE, times=1)
    with RelayThread(relay_files.config, relay_options={"provider_wait": short_window(2.0)}):
        throttled = submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        relay_files.wait_for_log(f"{throttled} == one@customer.test")
        submit(relay_files, ACME, "billing@acme.example", ["two@customer.test"])
        ses.wait_for_messages(1)  # the next message is not kept from the transport
        started = time.monotonic()
        delivered = ses.wait_for_messages(2, timeout=10)
        waited = time.monotonic() - started
    assert sorted(m.rcpt_tos[0] for m in delivered) == ["one@customer.test", "two@customer.test"]
    assert backup.messages == [] and backup.connections == 0  # not failed over
    assert waited < 5  # the provider's minutes (2 s here), not the retry schedule's 10 minutes
    log = relay_files.mainlog()
    assert "Throttling failure: Maximum sending rate exceeded" in log and " ** " not in log


@pytest.mark.parametrize(
    ("preset", "command", "reply"),
    [
        ("preset: office365", "DATA", SEND_AS_DENIED),
        ("preset: ses\nregion: eu-west-1", "MAIL", SES_NOT_VERIFIED),
    ],
    ids=["office365-sendas-after-data", "ses-not-verified-at-mail"],
)
def test_a_sender_refusal_bounces_that_message_and_the_transport_stays_healthy(
    relay_files: RelayFiles, upstreams: Callable[..., Any], preset: str, command: str, reply: str
) -> None:
    (upstream,) = chain_of(relay_files, upstreams, [("provider_a", preset)])
    if command == "MAIL":
        upstream.reply_to("MAIL", reply, for_address="billing@acme.example", times=1)
    else:
        upstream.reply_to("DATA", reply, times=1)
    with RelayThread(relay_files.config):
        refused = submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        relay_files.wait_for_log(f"{refused} ** one@customer.test")
        submit(relay_files, ACME, "news@acme.example", ["two@customer.test"])
        arrived = upstream.wait_for_messages(2, timeout=10)  # the bounce, and the next message
    by_sender = {m.mail_from: m for m in arrived}
    assert by_sender[""].rcpt_tos == ["billing@acme.example"]  # the DSN went back to the sender
    assert by_sender["news@acme.example"].rcpt_tos == ["two@customer.test"]
    assert "retry wait" not in relay_files.mainlog()


def test_basic_auth_switched_off_puts_the_xoauth2_hint_in_the_main_log_and_status(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    m365, sendgrid = chain_of(relay_files, upstreams, [("m365_acme", "preset: office365"), ("sendgrid", "")])
    m365.reply_to("AUTH", BASIC_AUTH_OFF)
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        sendgrid.wait_for_messages(1)
        status = relayctl(relay_files, capsys, "status")
    # The command names the transport's credential, which is what `relayctl oauth authorize` takes.
    hint = "switch this transport to XOAUTH2: relayctl oauth authorize m365_acme-login"
    log = relay_files.mainlog()
    failed_line = next(line for line in log.splitlines() if "T=m365_acme:" in line)
    assert "5.7.139" in failed_line and hint in failed_line
    assert f"hint for m365_acme: {hint}" in status
