"""Bounce-loop guard: a failed Auto-Submitted message is recorded but never bounced (real relayd process)."""

from __future__ import annotations

import time
from typing import Any, Callable

from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, submit

ACME = ("acme", "acme-relay-password")


def auto_reply(subject: str, auto_submitted: str) -> bytes:
    return (
        "From: robot@acme.example\r\n"
        "To: nobody@customer.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@acme.example>\r\n"
        f"Auto-Submitted: {auto_submitted}\r\n"
        "\r\n"
        "I am out of the office.\r\n"
    ).encode("ascii")


def upstream_refusing_nobody(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> Any:
    """acme's only transport, whose upstream refuses nobody@customer.test with a 550 (and takes bounces)."""
    gmail = upstreams(users={"acme@gmail.com": "acme-app-password"})
    gmail.reply_to("RCPT", "550 5.1.1 no such user", for_address="nobody@customer.test")
    relay_files.write(
        upstreams=[UpstreamSpec("gmail_acme", gmail.port, "acme-gmail", "acme@gmail.com", "acme-app-password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme"])])],
    )
    return gmail


def test_a_failed_auto_submitted_message_is_logged_but_gets_no_bounce(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = upstream_refusing_nobody(relay_files, upstreams)
    with RelaydProcess(relay_files):
        robot = submit(relay_files, ACME, "robot@acme.example", ["nobody@customer.test"],
                       auto_reply("Out of office", "auto-replied"))
        relay_files.wait_for_log(f"{robot} Completed")
        # The control: "Auto-Submitted: no" is a person's message and is bounced.
        person = submit(relay_files, ACME, "robot@acme.example", ["nobody@customer.test"],
                        auto_reply("Re: hello", "no"))
        (bounce,) = gmail.wait_for_messages(1, timeout=15)
        relay_files.wait_for_log(f"{person} Completed")
    log = relay_files.mainlog()
    assert f"{robot} ** nobody@customer.test" in log  # the failure itself is recorded
    assert (
        f"{robot} no bounce sent to robot@acme.example: message is Auto-Submitted: auto-replied "
        "(RFC 3834), a bounce could loop"
    ) in log
    assert f"R={robot}" not in log  # no bounce message was created for it
    assert f"<= <> R={person}" in log
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["robot@acme.example"]
    assert b"Re: hello" in bounce.data and b"Out of office" not in bounce.data


def test_auto_submitted_no_with_comments_is_a_persons_message_and_gets_its_bounce(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = upstream_refusing_nobody(relay_files, upstreams)
    with RelaydProcess(relay_files):
        person = submit(relay_files, ACME, "clerk@acme.example", ["nobody@customer.test"],
                        auto_reply("Re: invoice", "No (a person wrote this)"))
        (bounce,) = gmail.wait_for_messages(1, timeout=15)
        relay_files.wait_for_log(f"{person} Completed")
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["clerk@acme.example"]
    assert "no bounce sent" not in relay_files.mainlog()
