"""SmtpTransport and CaptureTransport against real servers and a real disk.

Every upstream here is a `FakeUpstream` (aiosmtpd on 127.0.0.1:0) scripted to
fail the way providers do; the transport runs in a fresh event loop per test.
"""

from __future__ import annotations

import asyncio
import stat
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

from relayd.config.model import CaptureTransportConfig, SmtpTransportConfig, TlsMode, TransportConfig
from relayd.config.credentials import Secret, UpstreamCredential
from relayd.delivery.transport import (
    CaptureTransport,
    SmtpTransport,
    build_transports,
    verify_transport,
    wire_body,
)
from relayd.values import AttemptOutcome, AttemptResult, Delivery, Stage
from tests.fakeupstream import FakeUpstream, make_ca, write_ca_file

T = TypeVar("T")

USER = "acme@gmail.com"
PASSWORD = "wxyz abcd efgh ijkl"
CREDENTIAL = "acme-gmail"
HELO = "relay.test"

BODY = (
    b"From: Billing <billing@acme.example>\r\n"
    b"To: client@customer.test\r\n"
    b"Subject: Invoice\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9e\r\n"
    b"last line\r\n"
)


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def store(name: str) -> UpstreamCredential | None:
    """The credential store as the transport sees it: one Gmail login."""
    if name == CREDENTIAL:
        return UpstreamCredential(name=CREDENTIAL, user=USER, password=Secret(PASSWORD))
    return None


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(**kwargs: Any) -> FakeUpstream:
        kwargs.setdefault("users", {USER: PASSWORD})
        fake = FakeUpstream(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def gmail(fakes: Callable[..., FakeUpstream]) -> FakeUpstream:
    return fakes()


def config_for(fake: FakeUpstream, **changes: Any) -> SmtpTransportConfig:
    settings: dict[str, Any] = dict(
        name="gmail_acme",
        host=fake.host,
        port=fake.port,
        tls=TlsMode(fake.tls_mode),
        credential=CREDENTIAL,
        ca_file=fake.ca_file,
        connect_timeout=5.0,
        command_timeout=5.0,
        provider="gmail",
    )
    settings.update(changes)
    return SmtpTransportConfig(**settings)


def delivery(*recipients: str, body: bytes = BODY, sender: str = "billing@acme.example", smtputf8: bool = False) -> Delivery:
    return Delivery(
        message_id="1rAbCd-000001-XY",
        sender=sender,
        recipients=recipients or ("client@customer.test",),
        body=body,
        smtputf8=smtputf8,
    )


def send_all(config: SmtpTransportConfig, *deliveries: Delivery, between: float = 0.0) -> list[AttemptResult]:
    """Send the deliveries one after another on one transport, then close it."""

    async def go() -> list[AttemptResult]:
        transport = SmtpTransport(config, credentials=store, helo_name=HELO)
        results = []
        try:
            for d in deliveries:
                results.append(await transport.send(d))
                await asyncio.sleep(between)
        finally:
            await transport.close()
        return results

    return run(go())


def send_one(config: SmtpTransportConfig, d: Delivery | None = None) -> AttemptResult:
    return send_all(config, d or delivery())[0]


def outcomes(result: AttemptResult) -> dict[str, AttemptOutcome]:
    return {r.address: r.outcome for r in result.results}


# --- delivering ---------------------------------------------------------------------


def test_delivers_over_starttls_with_auth_and_the_bytes_arrive_identical(gmail: FakeUpstream) -> None:
    result = send_one(config_for(gmail), delivery("client@customer.test", "boss@customer.test"))

    assert outcomes(result) == {
        "client@customer.test": AttemptOutcome.DELIVERED,
        "boss@customer.test": AttemptOutcome.DELIVERED,
    }
    (msg,) = gmail.wait_for_messages(1)
    assert msg.data == BODY
    assert msg.login == USER and msg.tls
    assert msg.mail_from == "billing@acme.example"
    assert msg.rcpt_tos == ["client@customer.test", "boss@customer.test"]
    assert "BODY=8BITMIME" in msg.mail_options
    assert result.ip == "127.0.0.1" and result.port == gmail.port and result.host == gmail.host
    assert result.tls.startswith("TLS1.")
    assert not result.connection_failed


def test_delivers_over_implicit_tls(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(tls="implicit")
    result = send_one(config_for(fake))
    assert outcomes(result) == {"client@customer.test": AttemptOutcome.DELIVERED}
    (msg,) = fake.wait_for_messages(1)
    assert msg.tls and msg.login == USER and msg.data == BODY


def test_seven_bit_body_is_sent_without_body_8bitmime(gmail: FakeUpstream) -> None:
    send_one(config_for(gmail), delivery(body=b"Subject: plain\r\n\r\nascii only\r\n"))
    (msg,) = gmail.wait_for_messages(1)
    assert not any(o.startswith("BODY=") for o in msg.mail_options)


def test_null_sender_is_sent_as_empty_reverse_path(gmail: FakeUpstream) -> None:
    result = send_one(config_for(gmail), delivery(sender=""))
    assert outcomes(result) == {"client@customer.test": AttemptOutcome.DELIVERED}
    assert gmail.wait_for_messages(1)[0].mail_from == ""


def test_smtputf8_message_is_sent_with_the_smtputf8_option(gmail: FakeUpstream) -> None:
    result = send_one(config_for(gmail), delivery("josé@exemple.test", smtputf8=True))
    assert outcomes(result) == {"josé@exemple.test": AttemptOutcome.DELIVERED}
    (msg,) = gmail.wait_for_messages(1)
    assert "SMTPUTF8" in msg.mail_options and msg.rcpt_tos == ["josé@exemple.test"]


def test_smtputf8_message_moves_on_when_the_upstream_lacks_smtputf8(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(smtputf8=False)
    result = send_one(config_for(fake), delivery("josé@exemple.test", smtputf8=True))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT
    assert r.detail == "SMTPUTF8 required (non-ASCII addresses) but transport gmail_acme (127.0.0.1) does not offer it"
    assert r.reply is not None and str(r.reply) == "553 5.6.7 SMTPUTF8 required" and r.local
    assert fake.received == []


# --- failing before the message ---------------------------------------------------------


def test_refused_connection_moves_on_and_marks_the_transport_failed(gmail: FakeUpstream) -> None:
    gmail.refuse_connections()
    result = send_one(config_for(gmail))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT and r.stage is Stage.CONNECT
    assert "connection refused" in r.detail and f"port {gmail.port}" in r.detail
    assert result.connection_failed


def test_rejected_login_moves_on_to_the_next_transport(gmail: FakeUpstream) -> None:
    gmail.reply_to("AUTH", "535 5.7.8 Username and Password not accepted")
    result = send_one(config_for(gmail))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT and r.stage is Stage.AUTH
    assert r.reply is not None and r.reply.code == 535
    assert result.connection_failed
    assert gmail.received == []


def test_wrong_stored_password_is_refused_by_the_upstream_and_moves_on(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(users={USER: "a different password"})
    result = send_one(config_for(fake))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT
    assert r.reply is not None and r.reply.code == 535
    assert PASSWORD not in repr(result)


def test_greeting_421_moves_on(gmail: FakeUpstream) -> None:
    gmail.reply_to("GREETING", "421 4.7.0 Try again later, closing connection")
    result = send_one(config_for(gmail))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT and r.stage is Stage.GREETING
    assert r.reply is not None and r.reply.code == 421
    assert result.connection_failed


def test_temporary_refusal_of_mail_from_moves_on(gmail: FakeUpstream) -> None:
    gmail.reply_to("MAIL", "451 4.3.0 try later")
    result = send_one(config_for(gmail))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT and r.stage is Stage.MAIL
    assert result.connection_failed
    assert gmail.received == []


def test_gmail_daily_limit_on_mail_from_moves_on(gmail: FakeUpstream) -> None:
    gmail.reply_to("MAIL", "550 5.4.5 Daily user sending limit exceeded.")
    (r,) = send_one(config_for(gmail)).results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT


def test_missing_credential_moves_on_without_connecting(gmail: FakeUpstream) -> None:
    result = send_one(config_for(gmail, credential="nobody"))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT
    assert r.detail == "credential nobody not found in the store"
    assert gmail.connections == 0


def test_server_without_starttls_gets_no_login(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(no_starttls=True)
    result = send_one(config_for(fake))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT and r.stage is Stage.STARTTLS
    assert "does not offer STARTTLS" in r.detail
    assert result.connection_failed
    assert fake.auth_attempts == 0 and fake.auth_passwords_seen == 0 and fake.logins == []


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_certificate_that_does_not_verify_gets_no_password(
    fakes: Callable[..., FakeUpstream], tmp_path: Path, tls: str
) -> None:
    impostor = fakes(tls=tls, ca=make_ca())
    trusted_ca = write_ca_file(make_ca(), tmp_path)
    result = send_one(config_for(impostor, ca_file=trusted_ca))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT
    assert "certificate verify failed" in r.detail
    assert result.connection_failed
    assert impostor.auth_attempts == 0 and impostor.auth_passwords_seen == 0
    assert impostor.received == []


def test_plaintext_transport_never_sends_a_credential(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(tls="none")
    result = send_one(config_for(fake, ca_file=None))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT
    assert "without TLS" in r.detail
    assert fake.auth_attempts == 0 and fake.auth_passwords_seen == 0


def test_plaintext_transport_without_credential_delivers_on_loopback(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(tls="none", require_auth=False)
    result = send_one(config_for(fake, credential=None, ca_file=None))
    assert outcomes(result) == {"client@customer.test": AttemptOutcome.DELIVERED}
    assert result.tls == ""
    assert fake.wait_for_messages(1)[0].data == BODY


# --- per-recipient answers and the end of data ---------------------------------------------


def test_one_refused_recipient_fails_while_the_others_are_delivered(gmail: FakeUpstream) -> None:
    gmail.reply_to("RCPT", "550 5.1.1 no such user", for_address="nobody@customer.test")
    result = send_one(config_for(gmail), delivery("client@customer.test", "nobody@customer.test", "boss@customer.test"))
    assert outcomes(result) == {
        "client@customer.test": AttemptOutcome.DELIVERED,
        "nobody@customer.test": AttemptOutcome.FAIL,
        "boss@customer.test": AttemptOutcome.DELIVERED,
    }
    refused = result.for_address("nobody@customer.test")
    assert refused is not None and refused.stage is Stage.RCPT
    assert refused.describe() == "SMTP error from remote mail server after RCPT TO: 550 5.1.1 no such user"
    assert gmail.wait_for_messages(1)[0].rcpt_tos == ["client@customer.test", "boss@customer.test"]
    assert not result.connection_failed


def test_temporary_recipient_refusal_defers(gmail: FakeUpstream) -> None:
    gmail.reply_to("RCPT", "451 4.2.1 Mailbox busy, try later")
    (r,) = send_one(config_for(gmail)).results
    assert r.outcome is AttemptOutcome.DEFER and r.stage is Stage.RCPT


def test_every_recipient_refused_sends_no_data_and_keeps_the_connection(gmail: FakeUpstream) -> None:
    gmail.reply_to("RCPT", "550 5.1.1 no such user", times=2)
    first, second = send_all(config_for(gmail), delivery("a@customer.test", "b@customer.test"), delivery())
    assert set(outcomes(first).values()) == {AttemptOutcome.FAIL}
    assert outcomes(second) == {"client@customer.test": AttemptOutcome.DELIVERED}
    assert len(gmail.received) == 1 and gmail.connections == 1


def test_temporary_refusal_after_data_defers(gmail: FakeUpstream) -> None:
    gmail.reply_to("DATA", "451 4.3.0 Temporary failure, try again")
    (r,) = send_one(config_for(gmail)).results
    assert r.outcome is AttemptOutcome.DEFER and r.stage is Stage.AFTER_DATA
    assert r.reply is not None and r.reply.code == 451


def test_permanent_refusal_after_data_fails(gmail: FakeUpstream) -> None:
    gmail.reply_to("DATA", "554 5.7.1 Message rejected as spam")
    (r,) = send_one(config_for(gmail)).results
    assert r.outcome is AttemptOutcome.FAIL and r.stage is Stage.AFTER_DATA


def test_connection_dropped_after_data_defers_instead_of_failing_over(gmail: FakeUpstream) -> None:
    gmail.drop_after_data()
    result = send_one(config_for(gmail))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.DEFER and r.stage is Stage.AFTER_DATA and r.reply is None
    assert len(gmail.received) == 1  # the upstream had the whole message
    assert not result.connection_failed


def test_no_reply_after_data_within_the_command_timeout_defers(gmail: FakeUpstream) -> None:
    gmail.reply_to("DATA", "250 2.0.0 OK, finally", delay=3.0)
    (r,) = send_one(config_for(gmail, command_timeout=0.5)).results
    assert r.outcome is AttemptOutcome.DEFER and r.stage is Stage.AFTER_DATA
    assert "timeout" in r.detail and "end of data" in r.detail


def test_smuggling_sequences_are_neutralised_on_the_wire() -> None:
    assert wire_body(b"a\n.\nb") == b"a\r\n..\r\nb\r\n"
    assert wire_body(b"a\r.\r\nb\r\n") == b"a\r\n..\r\nb\r\n"
    assert wire_body(b".start\r\n") == b"..start\r\n"
    assert wire_body(BODY).count(b"\r\n.\r\n") == 0


# --- connection reuse ----------------------------------------------------------------------


def test_two_deliveries_in_a_row_share_one_connection(gmail: FakeUpstream) -> None:
    results = send_all(config_for(gmail), delivery(), delivery("second@customer.test"))
    assert [outcomes(r) for r in results] == [
        {"client@customer.test": AttemptOutcome.DELIVERED},
        {"second@customer.test": AttemptOutcome.DELIVERED},
    ]
    assert gmail.connections == 1 and gmail.logins == [USER]


def test_a_pooled_connection_killed_by_the_server_is_replaced(gmail: FakeUpstream) -> None:
    async def go() -> list[AttemptResult]:
        transport = SmtpTransport(config_for(gmail), credentials=store, helo_name=HELO)
        try:
            first = await transport.send(delivery())
            await asyncio.to_thread(gmail.kill_connections)
            second = await transport.send(delivery("second@customer.test"))
            return [first, second]
        finally:
            await transport.close()

    first, second = run(go())
    assert outcomes(second) == {"second@customer.test": AttemptOutcome.DELIVERED}
    assert gmail.connections == 2 and len(gmail.wait_for_messages(2)) == 2


def test_a_reused_connection_dead_at_mail_from_is_retried_once_on_a_fresh_one(gmail: FakeUpstream) -> None:
    async def go() -> AttemptResult:
        transport = SmtpTransport(config_for(gmail), credentials=store, helo_name=HELO)
        try:
            await transport.send(delivery())
            gmail.drop_at("MAIL", times=1)
            return await transport.send(delivery("second@customer.test"))
        finally:
            await transport.close()

    second = run(go())
    assert outcomes(second) == {"second@customer.test": AttemptOutcome.DELIVERED}
    assert gmail.connections == 2


def test_a_fresh_connection_dead_at_mail_from_is_not_retried(gmail: FakeUpstream) -> None:
    gmail.drop_at("MAIL", times=1)
    result = send_one(config_for(gmail))
    (r,) = result.results
    assert r.outcome is AttemptOutcome.NEXT_TRANSPORT and r.stage is Stage.MAIL
    assert gmail.connections == 1


def test_an_idle_connection_is_closed_after_the_idle_timeout(gmail: FakeUpstream) -> None:
    send_all(config_for(gmail, idle_timeout=0.2), delivery(), delivery(), between=0.6)
    assert gmail.connections == 2


def test_a_connection_carries_at_most_max_messages_per_connection(gmail: FakeUpstream) -> None:
    send_all(config_for(gmail, max_messages_per_connection=2), delivery(), delivery(), delivery())
    assert gmail.connections == 2 and len(gmail.wait_for_messages(3)) == 3


def test_concurrent_sends_share_at_most_max_connections(gmail: FakeUpstream) -> None:
    async def go() -> list[AttemptResult]:
        transport = SmtpTransport(config_for(gmail, max_connections=2), credentials=store, helo_name=HELO)
        try:
            return list(await asyncio.gather(*(transport.send(delivery(f"r{i}@customer.test")) for i in range(6))))
        finally:
            await transport.close()

    results = run(go())
    assert all(r.results[0].outcome is AttemptOutcome.DELIVERED for r in results)
    assert gmail.connections <= 2 and len(gmail.wait_for_messages(6)) == 6


def test_close_quits_pooled_connections(gmail: FakeUpstream) -> None:
    send_all(config_for(gmail), delivery())
    deadline = time.monotonic() + 5
    while gmail.live_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gmail.live_connections == 0


# --- capture -------------------------------------------------------------------------------


def test_capture_transport_writes_a_maildir_file_with_the_envelope(tmp_path: Path) -> None:
    maildir = tmp_path / "captured"
    transport = CaptureTransport(CaptureTransportConfig(name="capture", maildir=maildir))
    result = run(transport.send(delivery("a@customer.test", "b@customer.test")))

    assert outcomes(result) == {"a@customer.test": AttemptOutcome.DELIVERED, "b@customer.test": AttemptOutcome.DELIVERED}
    (path,) = (maildir / "new").iterdir()
    reply = result.results[0].reply
    assert reply is not None and str(reply) == f"250 2.0.0 captured as {path.name}"
    assert path.read_bytes() == (
        b"Return-Path: <billing@acme.example>\r\n"
        b"X-Relayd-Envelope-To: <a@customer.test>\r\n"
        b"X-Relayd-Envelope-To: <b@customer.test>\r\n" + BODY
    )
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((maildir / sub).stat().st_mode) == 0o700
    assert list((maildir / "tmp").iterdir()) == []


def test_capture_transport_defers_when_the_disk_refuses(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    transport = CaptureTransport(CaptureTransportConfig(name="capture", maildir=blocker / "maildir"))
    (r,) = run(transport.send(delivery())).results
    assert r.outcome is AttemptOutcome.DEFER and r.stage is Stage.WRITE
    assert "cannot write to maildir" in r.detail


def test_build_transports_makes_one_transport_per_config(gmail: FakeUpstream, tmp_path: Path) -> None:
    configs: dict[str, TransportConfig] = {
        "gmail_acme": config_for(gmail),
        "capture": CaptureTransportConfig(name="capture", maildir=tmp_path / "m"),
    }
    transports = build_transports(configs, credentials=store, helo_name=HELO)
    assert isinstance(transports["gmail_acme"], SmtpTransport)
    assert isinstance(transports["capture"], CaptureTransport)
    assert {t.name for t in transports.values()} == {"gmail_acme", "capture"}


# --- verify -----------------------------------------------------------------------------------


def test_verify_walks_every_step_without_sending_mail(gmail: FakeUpstream) -> None:
    steps = run(verify_transport(config_for(gmail), credentials=store, helo_name=HELO))
    assert [(s.name, s.ok) for s in steps] == [
        ("connect", True),
        ("greeting", True),
        ("EHLO", True),
        ("STARTTLS", True),
        ("certificate", True),
        ("AUTH", True),
    ]
    assert gmail.logins == [USER] and gmail.received == []


def test_verify_reports_the_failing_login_with_the_gmail_hint(gmail: FakeUpstream) -> None:
    gmail.reply_to("AUTH", "535 5.7.8 Username and Password not accepted")
    steps = run(verify_transport(config_for(gmail), credentials=store, helo_name=HELO))
    failing = steps[-1]
    assert failing.name == "AUTH" and not failing.ok
    assert "535 5.7.8" in failing.detail
    assert failing.hint is not None and "2-step verification" in failing.hint and "app password" in failing.hint
    assert all(s.ok for s in steps[:-1])


def test_verify_reports_a_certificate_failure_with_a_ca_file_hint(fakes: Callable[..., FakeUpstream], tmp_path: Path) -> None:
    impostor = fakes(ca=make_ca())
    steps = run(verify_transport(config_for(impostor, ca_file=write_ca_file(make_ca(), tmp_path)),
                                 credentials=store, helo_name=HELO))
    failing = steps[-1]
    assert failing.name == "certificate" and not failing.ok
    assert failing.hint is not None and "ca_file" in failing.hint
    assert impostor.auth_attempts == 0


def test_verify_reports_a_missing_credential_at_the_auth_step(gmail: FakeUpstream) -> None:
    steps = run(verify_transport(config_for(gmail, credential="nobody"), credentials=store, helo_name=HELO))
    assert steps[-1].name == "AUTH" and not steps[-1].ok
    assert steps[-1].detail == "credential nobody not found in the store"
