"""Scenario 1 end to end: two organisations, two Gmail accounts, SendGrid on 2525 as fallback.

relayd runs in-process (its own thread and loop); upstreams are real SMTP
servers on loopback requiring STARTTLS + AUTH; the client is smtplib.
"""

from __future__ import annotations

import email
import email.policy
import time
from typing import Any, Callable

import pytest
import trustme

from tests.relayenv import RelayFiles, RelayThread, TenantSpec, UpstreamSpec, make_message, submit

ACME = ("acme", "acme-relay-password")
GLOBEX = ("globex", "globex-relay-password")


def scenario_one(
    files: RelayFiles, upstreams: Callable[..., Any], *, retry: str = "F,1m,2s"
) -> tuple[Any, Any, Any]:
    gmail_acme = upstreams(users={"acme@gmail.com": "acme-app-password"})
    gmail_globex = upstreams(users={"globex@gmail.com": "globex-app-password"})
    sendgrid = upstreams(users={"apikey": "SG.sendgrid-key"})
    files.write(
        upstreams=[
            UpstreamSpec("gmail_acme", gmail_acme.port, "acme-gmail", "acme@gmail.com", "acme-app-password"),
            UpstreamSpec("gmail_globex", gmail_globex.port, "globex-gmail", "globex@gmail.com", "globex-app-password"),
            UpstreamSpec("sendgrid", sendgrid.port, "sendgrid", "apikey", "SG.sendgrid-key"),
        ],
        tenants=[
            TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme", "sendgrid"])]),
            TenantSpec("globex", GLOBEX[1], ["*@globex.example"], [(["*"], ["gmail_globex", "sendgrid"])]),
        ],
        retry=retry,
    )
    return gmail_acme, gmail_globex, sendgrid


def test_each_tenant_reaches_its_own_gmail_with_its_own_login(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    gmail_acme, gmail_globex, sendgrid = scenario_one(relay_files, upstreams)
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        submit(relay_files, GLOBEX, "news@globex.example", ["reader@customer.test"])
        (acme_msg,) = gmail_acme.wait_for_messages(1)
        (globex_msg,) = gmail_globex.wait_for_messages(1)
    assert acme_msg.login == "acme@gmail.com" and acme_msg.tls
    assert acme_msg.mail_from == "billing@acme.example"
    assert acme_msg.rcpt_tos == ["client@customer.test"]
    assert globex_msg.login == "globex@gmail.com"
    assert globex_msg.mail_from == "news@globex.example"
    assert sendgrid.messages == []
    log = relay_files.mainlog()
    assert "=> client@customer.test R=acme-1 T=gmail_acme" in log
    assert "Completed" in log


def test_failover_to_sendgrid_when_gmail_refuses_connection(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    gmail_acme, _, sendgrid = scenario_one(relay_files, upstreams)
    gmail_acme.refuse_connections()
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        (msg,) = sendgrid.wait_for_messages(1)
    assert msg.login == "apikey"
    assert msg.mail_from == "billing@acme.example"
    log = relay_files.mainlog()
    assert "T=gmail_acme" in log and "=> client@customer.test R=acme-1 T=sendgrid" in log


@pytest.mark.parametrize(
    "command, reply",
    [
        ("AUTH", "535 5.7.8 Username and Password not accepted"),
        ("GREETING", "421 4.7.0 Try again later, closing connection"),
        ("MAIL", "451 4.3.0 Mail server temporarily rejected message"),
        ("MAIL", "421 4.7.0 Too many connections"),
    ],
)
def test_failover_to_sendgrid_when_gmail_fails_before_the_message(
    relay_files: RelayFiles, upstreams: Callable[..., Any], command: str, reply: str
) -> None:
    gmail_acme, _, sendgrid = scenario_one(relay_files, upstreams)
    gmail_acme.reply_to(command, reply)
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        (msg,) = sendgrid.wait_for_messages(1)
    assert msg.rcpt_tos == ["client@customer.test"]
    assert gmail_acme.messages == []


def test_upstream_that_failed_to_connect_is_skipped_by_the_next_message(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail_acme, _, sendgrid = scenario_one(relay_files, upstreams, retry="F,1h,10m")
    gmail_acme.reply_to("GREETING", "421 4.7.0 Try again later")
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        sendgrid.wait_for_messages(1)
        connections_after_first = gmail_acme.connections
        submit(relay_files, ACME, "billing@acme.example", ["two@customer.test"])
        sendgrid.wait_for_messages(2)
    assert connections_after_first >= 1
    assert gmail_acme.connections == connections_after_first  # not reconnected within its retry time


def test_message_bytes_arrive_identical(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    gmail_acme, _, _ = scenario_one(relay_files, upstreams)
    body = (
        "From: Billing <billing@acme.example>\r\n"
        "To: client@customer.test\r\n"
        "Subject: =?utf-8?q?Facture_n=C2=B04?=\r\n"
        "Message-ID: <bytes-test@acme.example>\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Bonjour, voici votre facture \u00e0 r\u00e9gler.\r\n"
        ".a line that starts with a dot\r\n"
        ".\r\n"
        "..two dots\r\n"
        "   trailing spaces   \r\n"
        "\r\n"
        "last line\r\n"
    ).encode("utf-8")
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"], body)
        (msg,) = gmail_acme.wait_for_messages(1)
    trace, _, rest = msg.data.partition(b";\r\n\t")  # relayd's Received: field comes first
    assert trace.startswith(b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (relayd)")
    assert rest.split(b"\r\n", 1)[1] == body


def test_permanent_rcpt_failure_bounces_to_the_sender_through_the_tenant_chain(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail_acme, _, _ = scenario_one(relay_files, upstreams)
    gmail_acme.reply_to("RCPT", "550 5.1.1 The email account that you tried to reach does not exist", for_address="nobody@customer.test")
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["nobody@customer.test", "client@customer.test"])
        messages = gmail_acme.wait_for_messages(2)
    delivered = [m for m in messages if m.mail_from == "billing@acme.example"]
    bounces = [m for m in messages if m.mail_from == ""]
    assert [m.rcpt_tos for m in delivered] == [["client@customer.test"]]
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["billing@acme.example"]
    dsn = email.message_from_bytes(bounces[0].data, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    status = bounces[0].data.decode("utf-8", "replace")
    assert "Final-Recipient: rfc822; nobody@customer.test" in status
    assert "Status: 5.1.1" in status
    log = relay_files.mainlog()
    assert "** nobody@customer.test" in log
    assert "=> client@customer.test" in log


def test_temporary_rcpt_failure_defers_then_delivers_on_retry(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail_acme, _, sendgrid = scenario_one(relay_files, upstreams, retry="F,1m,1s")
    gmail_acme.reply_to("RCPT", "451 4.2.1 Mailbox busy, try later", times=1)
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        relay_files.wait_for_log("== client@customer.test")
        (msg,) = gmail_acme.wait_for_messages(1, timeout=15)
    assert msg.rcpt_tos == ["client@customer.test"]
    assert sendgrid.messages == []  # a 4xx on RCPT defers; it does not fail over
    relay_files.wait_for_log("=> client@customer.test")


def test_message_too_old_fails_with_a_bounce(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    gmail_acme, _, sendgrid = scenario_one(relay_files, upstreams, retry="F,3s,1s")
    gmail_acme.reply_to("RCPT", "451 4.2.2 Mailbox full", for_address="full@customer.test")
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["full@customer.test"])
        relay_files.wait_for_log("** full@customer.test", timeout=20)
        (bounce,) = gmail_acme.wait_for_messages(1, timeout=15)
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["billing@acme.example"]
    assert b"retry timeout exceeded" in bounce.data


def test_failed_bounce_is_logged_and_dropped(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    gmail_acme, _, _ = scenario_one(relay_files, upstreams)
    gmail_acme.reply_to("RCPT", "550 5.1.1 no such user", for_address="nobody@customer.test")
    gmail_acme.reply_to("RCPT", "550 5.1.1 no such user", for_address="billing@acme.example")
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["nobody@customer.test"])
        relay_files.wait_for_log("Completed", count=2)
        time.sleep(0.5)
    assert gmail_acme.messages == []
    log = relay_files.mainlog()
    assert log.count("<= <>") == 1  # exactly one bounce, never a bounce of the bounce


def test_no_credential_is_sent_to_an_upstream_whose_certificate_does_not_verify(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    impostor = upstreams(users={"acme@gmail.com": "acme-app-password"}, ca=trustme.CA())
    sendgrid = upstreams(users={"apikey": "SG.sendgrid-key"})
    relay_files.write(
        upstreams=[
            UpstreamSpec("gmail_acme", impostor.port, "acme-gmail", "acme@gmail.com", "acme-app-password"),
            UpstreamSpec("sendgrid", sendgrid.port, "sendgrid", "apikey", "SG.sendgrid-key"),
        ],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme", "sendgrid"])])],
    )
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        sendgrid.wait_for_messages(1)
    assert impostor.logins == []
    assert impostor.messages == []
    assert "acme-app-password" not in relay_files.mainlog()


def test_recipients_matching_different_rules_are_split_per_rule(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = upstreams(users={"acme@gmail.com": "pw-gmail"})
    mailgun = upstreams(users={"postmaster@mg.acme.example": "pw-mailgun"})
    relay_files.write(
        upstreams=[
            UpstreamSpec("gmail_acme", gmail.port, "acme-gmail", "acme@gmail.com", "pw-gmail"),
            UpstreamSpec("mailgun", mailgun.port, "mailgun", "postmaster@mg.acme.example", "pw-mailgun"),
        ],
        tenants=[
            TenantSpec(
                "acme", ACME[1], ["*@acme.example"],
                [(["*.corp.test", "partner.test"], ["mailgun"]), (["*"], ["gmail_acme"])],
            )
        ],
    )
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["a@eu.corp.test", "b@partner.test", "c@customer.test"])
        (via_mailgun,) = mailgun.wait_for_messages(1)
        (via_gmail,) = gmail.wait_for_messages(1)
    assert sorted(via_mailgun.rcpt_tos) == ["a@eu.corp.test", "b@partner.test"]
    assert via_gmail.rcpt_tos == ["c@customer.test"]


def test_sender_refused_by_every_provider_fails_and_bounces(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail_acme, _, sendgrid = scenario_one(relay_files, upstreams)
    gmail_acme.reply_to("MAIL", "550 5.7.1 Sender address rejected", times=1)
    sendgrid.reply_to("MAIL", "550 5.7.1 The from address does not match a verified Sender Identity", times=1)
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        relay_files.wait_for_log("** client@customer.test")
        # SendGrid's refusal concerned this sender only, so it stayed open and
        # takes the bounce at once, while Gmail's bare 550 put it in its retry wait.
        (bounce,) = sendgrid.wait_for_messages(1)
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["billing@acme.example"]
    assert gmail_acme.messages == []
