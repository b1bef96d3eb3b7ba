"""The submission listener: AUTH, policy and DATA rules, driven by real clients over loopback."""

from __future__ import annotations

import base64
import errno
import os
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import aiosmtplib
import pytest

from tests.relayenv import (
    ACME, RelayFiles, RelayThread, capture_files, captured, connect, make_message, submit,
)


@pytest.fixture
def relay(relay_files: RelayFiles) -> Iterator[RelayFiles]:
    capture_files(relay_files)
    with RelayThread(relay_files.config):
        yield relay_files


def test_mail_before_auth_is_refused_with_530(relay: RelayFiles) -> None:
    with connect(relay) as client:
        code, text = client.mail("billing@acme.example")
    assert code == 530 and text.startswith(b"5.7.0")


def test_wrong_password_and_unknown_login_get_the_same_535(relay: RelayFiles) -> None:
    answers = []
    for login in (("acme", "wrong"), ("nosuchtenant", "wrong")):
        with connect(relay) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login(*login)
            answers.append((refused.value.smtp_code, refused.value.smtp_error))
    assert answers[0] == answers[1] == (535, b"5.7.8 Authentication credentials invalid")


def test_auth_is_not_offered_before_starttls(relay: RelayFiles) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("app.test")
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        plain = base64.b64encode(b"\0acme\0" + ACME[1].encode()).decode()
        code, text = client.docmd("AUTH", "PLAIN " + plain)
    assert code == 538 and text.startswith(b"5.7.11")


def test_ehlo_announces_the_extensions_and_size_limit(relay: RelayFiles) -> None:
    with connect(relay) as client:
        client.ehlo("app.test")
        features = client.esmtp_features
    for name in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "auth"):
        assert name in features, name
    assert features["size"] == str(25 * 1024 * 1024)
    assert set(features["auth"].split()) == {"PLAIN", "LOGIN"}


def test_auth_login_mechanism_works(relay: RelayFiles) -> None:
    with connect(relay) as client:
        client.ehlo("app.test")
        client.user, client.password = ACME
        code, _ = client.auth("LOGIN", client.auth_login)
    assert code == 235


def test_sender_not_allowed_for_tenant_is_refused_with_a_sentence(relay: RelayFiles) -> None:
    with connect(relay, login=ACME) as client:
        code, text = client.mail("ceo@globex.example")
    assert code == 550
    assert text == b"5.7.1 Sender <ceo@globex.example> is not an allowed sender for tenant acme"


def test_header_from_not_allowed_for_tenant_is_refused(relay: RelayFiles) -> None:
    message = make_message("ceo@globex.example", ["client@customer.test"])
    with connect(relay, login=ACME) as client:
        client.mail("billing@acme.example")
        client.rcpt("client@customer.test")
        code, text = client.data(message)
    assert code == 550
    assert b"5.7.1 Header From: <ceo@globex.example> is not an allowed sender for tenant acme" == text


def test_recipient_without_a_matching_route_is_refused_at_rcpt(relay: RelayFiles) -> None:
    with connect(relay, login=("globex", "globex-password")) as client:
        client.mail("news@globex.example")
        code, text = client.rcpt("someone@elsewhere.test")
        ok_code, _ = client.rcpt("someone@globex-partner.test")
    assert code == 550 and text.startswith(b"5.7.1 Relaying to <someone@elsewhere.test> is not permitted for tenant globex")
    assert ok_code == 250


def test_declared_size_over_the_limit_is_refused_at_mail(relay: RelayFiles) -> None:
    with connect(relay, login=ACME) as client:
        client.ehlo("app.test")
        code, text = client.mail("billing@acme.example", [f"SIZE={30 * 1024 * 1024}"])
    assert code == 552 and text.startswith(b"5.3.4")


def test_message_over_the_size_limit_is_refused_after_data(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_message_size: 64K")
    with RelayThread(relay_files.config):
        big = make_message("billing@acme.example", ["c@customer.test"], body=("x" * 70 + "\n") * 2000)
        with connect(relay_files, login=ACME) as client:
            client.mail("billing@acme.example")
            client.rcpt("c@customer.test")
            code, text = client.data(big)
            assert code == 552 and text.startswith(b"5.3.4")
            # the session is still usable after the refusal
            assert client.noop()[0] == 250


def test_too_many_recipients_get_452(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_recipients: 3")
    with RelayThread(relay_files.config):
        with connect(relay_files, login=ACME) as client:
            client.mail("billing@acme.example")
            codes = [client.rcpt(f"r{i}@customer.test") for i in range(4)]
    assert [c for c, _ in codes[:3]] == [250, 250, 250]
    assert codes[3][0] == 452 and codes[3][1].startswith(b"4.5.3")


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    try:
        return client.docmd("AUTH", "PLAIN " + blob)
    except smtplib.SMTPServerDisconnected:
        return -1, b""


def test_repeated_auth_failures_slow_then_lock_out_that_login_only(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="auth_failures_before_delay: 1\nauth_failures_before_disconnect: 3")
    with RelayThread(relay_files.config):
        with connect(relay_files) as client:
            first = auth_plain(client, "acme", "guess-1")
            started = time.monotonic()
            second = auth_plain(client, "acme", "guess-2")
            delayed = time.monotonic() - started
            third = auth_plain(client, "acme", "guess-3")
        assert first[0] == 535 and second[0] == 535 and third[0] == 535
        assert delayed >= 0.4  # the second failure is already slowed down
        # the login is now locked out, even with the right password, and the connection closed
        with connect(relay_files) as client:
            code, text = auth_plain(client, *ACME)
        assert code == 421 and text.startswith(b"4.7.0")
        # another tenant on the same address is not affected
        with connect(relay_files) as client:
            code, _ = auth_plain(client, "globex", "globex-password")
        assert code == 235


def test_nul_bytes_are_refused_with_a_clear_error(relay: RelayFiles) -> None:
    message = make_message("billing@acme.example", ["c@customer.test"]).replace(b"Hello.", b"Hel\x00lo.")
    with connect(relay, login=ACME) as client:
        client.mail("billing@acme.example")
        client.rcpt("c@customer.test")
        code, text = client.data(message)
    assert code == 554 and b"NUL" in text and text.startswith(b"5.6.0")


def test_overlong_line_is_refused_with_its_line_number(relay: RelayFiles) -> None:
    message = make_message("billing@acme.example", ["c@customer.test"]) + b"y" * 1200 + b"\r\n"
    with connect(relay, login=ACME) as client:
        client.mail("billing@acme.example")
        client.rcpt("c@customer.test")
        code, text = client.data(message)
    assert code == 554 and text.startswith(b"5.6.0 Line ") and b"998" in text


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"],
    ids=["LF.LF", "LF.CRLF", "CR.CRLF", "CRLF.CR"],
)
def test_smuggling_payload_never_becomes_a_second_message(relay: RelayFiles, smuggle: bytes) -> None:
    head = make_message("billing@acme.example", ["c@customer.test"])
    payload = (
        head + b"first part" + smuggle
        + b"MAIL FROM:<billing@acme.example>\r\nRCPT TO:<victim@customer.test>\r\nDATA\r\n"
        + b"From: billing@acme.example\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
    )
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    context = relay.client_context()
    with raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220")

        def cmd(sock: Any, rd: Any, line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            reply = rd.readline()
            while reply[3:4] == b"-":
                reply = rd.readline()
            return reply

        cmd(raw, reader, b"EHLO app.test")
        assert cmd(raw, reader, b"STARTTLS").startswith(b"220")
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        tr = tls.makefile("rb")
        cmd(tls, tr, b"EHLO app.test")
        auth = base64.b64encode(b"\0acme\0" + ACME[1].encode())
        assert cmd(tls, tr, b"AUTH PLAIN " + auth).startswith(b"235")
        assert cmd(tls, tr, b"MAIL FROM:<billing@acme.example>").startswith(b"250")
        assert cmd(tls, tr, b"RCPT TO:<c@customer.test>").startswith(b"250")
        assert cmd(tls, tr, b"DATA").startswith(b"354")
        final = cmd(tls, tr, payload + b"\r\n.")
        assert final.startswith(b"250")
        tls.sendall(b"QUIT\r\n")
    (stored,) = captured(relay, 1)
    assert b"X-Relayd-Envelope-To: <c@customer.test>" in stored
    assert b"victim@customer.test" in stored  # carried as content, not as a command
    time.sleep(0.5)
    assert len(captured(relay, 1)) == 1


def test_stalled_client_is_timed_out_with_421(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="command_timeout: 1s")
    with RelayThread(relay_files.config):
        with socket.create_connection(("127.0.0.1", relay_files.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            started = time.monotonic()
            line = reader.readline()
            assert line.startswith(b"421 4.4.2")
            assert reader.readline() == b""  # closed
            assert time.monotonic() - started < 5


def test_pipelined_commands_after_data_are_answered_in_order(relay: RelayFiles) -> None:
    async def run() -> list[int]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, tls_context=relay.client_context(), start_tls=True)
        await client.connect()
        await client.login(*ACME)
        codes = []
        for i in range(3):
            msg = make_message("billing@acme.example", [f"r{i}@customer.test"])
            errors, reply = await client.sendmail("billing@acme.example", [f"r{i}@customer.test"], msg)
            assert errors == {}
            codes.append(250 if reply.startswith("2.0.0 OK id=") else 0)
        await client.quit()
        return codes

    import asyncio

    assert asyncio.run(run()) == [250, 250, 250]
    assert len(captured(relay, 3)) == 3


def test_tenant_bound_to_a_loopback_address_needs_no_auth(relay_files: RelayFiles) -> None:
    capture_files(relay_files, bind=("127.0.0.2",))
    with RelayThread(relay_files.config):
        with smtplib.SMTP("127.0.0.1", relay_files.port, timeout=10, source_address=("127.0.0.2", 0)) as client:
            client.ehlo("cron.local")
            errors = client.sendmail("billing@acme.example", ["ops@customer.test"], make_message("billing@acme.example", ["ops@customer.test"]))
        assert errors == {}
        with smtplib.SMTP("127.0.0.1", relay_files.port, timeout=10) as client:
            client.ehlo("cron.local")
            code, _ = client.mail("billing@acme.example")
        assert code == 530
    assert len(captured(relay_files, 1)) == 1


def test_implicit_tls_listener_offers_auth(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="tls: implicit")
    with RelayThread(relay_files.config):
        with smtplib.SMTP_SSL("127.0.0.1", relay_files.port, timeout=10, context=relay_files.client_context()) as client:
            client.ehlo("app.test")
            assert "auth" in client.esmtp_features
            assert "starttls" not in client.esmtp_features
            client.login(*ACME)
            errors = client.sendmail("billing@acme.example", ["c@customer.test"], make_message("billing@acme.example", ["c@customer.test"]))
    assert errors == {}
    assert len(captured(relay_files, 1)) == 1


def test_bare_lf_message_from_smtplib_bytes_is_normalised(relay: RelayFiles) -> None:
    message = b"From: billing@acme.example\nTo: c@customer.test\nSubject: lf\n\nline one\nline two\n"
    with connect(relay, login=ACME) as client:
        errors = client.sendmail("billing@acme.example", ["c@customer.test"], message)
    assert errors == {}
    (stored,) = captured(relay, 1)
    assert b"line one\r\nline two\r\n" in stored
    assert b"\n" not in stored.replace(b"\r\n", b"")


def test_session_state_covers_everything_aiosmtpds_constructor_sets() -> None:
    """relayd sets aiosmtpd's per-connection state itself; an aiosmtpd upgrade must not leave a gap."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    from relayd.smtp.authguard import AuthGuard
    from relayd.config.model import ListenerConfig
    from relayd.observe.events import NullSink
    from relayd.smtp.listener import ListenerServices, SubmissionHandler, SubmissionProtocol

    async def build() -> tuple[set[str], set[str]]:
        reference = SMTP(object(), hostname="relay.test")
        services = ListenerServices(
            config=lambda: None, authenticate=None, accept=None, new_id=None,  # type: ignore[arg-type]
            guard=AuthGuard(), events=NullSink(), route=lambda _tenant, _address: None,
        )
        listener = ListenerConfig()
        ours = SubmissionProtocol(
            listener, services, handler=SubmissionHandler(listener, services), hostname="relay.test",
            tls_context=None, implicit_tls=False, sessions=set(),
        )
        return set(vars(reference)), set(vars(ours))

    reference, ours = asyncio.run(build())
    assert reference - ours == set()


def failing_writes(errno_value: int) -> Any:
    """A spool I/O whose writes fail with one errno, as a full or broken disk would."""
    from relayd.queue.spool import SpoolIO

    class FailingWrites(SpoolIO):
        def write(self, fd: int, data: bytes | memoryview) -> int:
            raise OSError(errno_value, os.strerror(errno_value))

    return FailingWrites()


@pytest.mark.parametrize(
    "errno_value, reply",
    [(errno.ENOSPC, b"4.3.1 Insufficient system storage"), (errno.EIO, b"4.3.0 Temporary local problem")],
    ids=["disk-full", "io-error"],
)
def test_spool_write_failure_is_a_temporary_refusal_never_250(relay_files: RelayFiles, errno_value: int, reply: bytes) -> None:
    capture_files(relay_files)
    with RelayThread(relay_files.config, spool_io=failing_writes(errno_value)):
        with connect(relay_files, login=ACME) as client:
            client.mail("billing@acme.example")
            client.rcpt("c@customer.test")
            code, text = client.data(make_message("billing@acme.example", ["c@customer.test"]))
    assert code == (452 if errno_value == errno.ENOSPC else 451)
    assert text.startswith(reply)
    assert list((relay_files.root / "spool" / "queue").rglob("*-*-*")) == []
