"""Bounces: RFC 3464 structure, Exim's wording, and robustness against odd originals."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

from relayd.delivery.dsn import auto_submitted_keyword, build_dsn, describe_failure, is_auto_submitted, original_headers
from relayd.values import AttemptOutcome, DeliveryReport, Envelope, SmtpReply

NOW = 1767400000.0  # 2026-01-03 00:26:40 UTC
ARRIVED = 1767225600.0  # 2026-01-01 00:00:00 UTC

ORIGINAL = (
    b"From: App <app@acme.test>\r\n"
    b"To: someone@gmail.com\r\n"
    b"Subject: Your booking\r\n"
    b"Message-ID: <booking-42@acme.test>\r\n"
    b"\r\n"
    b"Body line that must never come back in a bounce.\r\n"
)


def envelope(sender: str = "app@acme.test") -> Envelope:
    return Envelope(
        id="1abc-000001",
        tenant="acme",
        sender=sender,
        recipients=("someone@gmail.com", "other@example.test"),
        received_at=ARRIVED,
        size=len(ORIGINAL),
    )


def rejected_by_gmail() -> DeliveryReport:
    reply = SmtpReply(550, "5.1.1 The email account that you tried to reach does not exist")
    return DeliveryReport(
        address="someone@gmail.com",
        outcome=AttemptOutcome.FAIL,
        rule="acme",
        transport="gmail",
        host="smtp.gmail.com",
        ip="192.0.2.10",
        port=587,
        reply=reply,
        reason=f"SMTP error from remote mail server after RCPT TO:<someone@gmail.com>: {reply}",
    )


def expired(reply: SmtpReply | None = None) -> DeliveryReport:
    return DeliveryReport(
        address="other@example.test",
        outcome=AttemptOutcome.FAIL,
        rule="acme",
        transport="sendgrid",
        reply=reply,
        reason="Connection refused",
    )


def build(
    failed: list[DeliveryReport], body: bytes = ORIGINAL, sender: str = "app@acme.test"
) -> bytes:
    return build_dsn(
        original=envelope(sender),
        original_body=body,
        failed=failed,
        reporting_mta="relay.acme.test",
        now=NOW,
        message_id_domain="relay.acme.test",
    )


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    return list(msg.iter_parts())  # type: ignore[arg-type]


def status_blocks(msg: EmailMessage) -> list[Message]:
    payload = parts(msg)[1].get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def test_bounce_is_a_multipart_report_with_text_status_and_headers_parts() -> None:
    msg = parse(build([rejected_by_gmail()]))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects
    assert all(not p.defects for p in parts(msg))


def test_bounce_uses_crlf_line_endings_only() -> None:
    raw = build([rejected_by_gmail()])
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_bounce_headers_come_from_mailer_daemon_and_go_to_the_original_sender() -> None:
    raw = build([rejected_by_gmail()])
    msg = parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.acme.test>"
    assert b"\r\nTo: <app@acme.test>\r\n" in raw
    assert msg["To"].addresses[0].addr_spec == "app@acme.test"
    assert msg["Subject"] == "Mail delivery failed: returning message to sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Sat, 03 Jan 2026 00:26:40 +0000"
    assert msg["In-Reply-To"] == "<booking-42@acme.test>"
    assert msg["References"] == "<booking-42@acme.test>"
    assert msg["MIME-Version"] == "1.0"
    assert str(msg["Message-ID"]).endswith("@relay.acme.test>")


def test_each_bounce_gets_a_fresh_message_id() -> None:
    first = parse(build([rejected_by_gmail()]))["Message-ID"]
    second = parse(build([rejected_by_gmail()]))["Message-ID"]
    assert first != second


def test_status_and_diagnostic_code_come_from_the_upstream_reply() -> None:
    msg = parse(build([rejected_by_gmail()]))
    per_message, recipient = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; relay.acme.test"
    assert per_message["X-Relayd-Queue-ID"] == "1abc-000001"
    assert per_message["Arrival-Date"] == "Thu, 01 Jan 2026 00:00:00 +0000"
    assert recipient["Final-Recipient"] == "rfc822; someone@gmail.com"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; smtp.gmail.com"
    assert recipient["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 The email account that you tried to reach does not exist"
    )
    assert recipient["Last-Attempt-Date"] == "Sat, 03 Jan 2026 00:26:40 +0000"


def test_status_without_enhanced_code_is_derived_from_the_reply_code() -> None:
    report = DeliveryReport(
        address="x@example.test",
        outcome=AttemptOutcome.FAIL,
        rule="acme",
        reply=SmtpReply(554, "Transaction failed"),
    )
    assert describe_failure(report).status == "5.0.0"


def test_friendly_text_names_each_address_host_and_reason_in_exim_words() -> None:
    msg = parse(build([rejected_by_gmail()]))
    text = parts(msg)[0].get_content()
    assert "This message was created automatically by mail delivery software." in text
    assert "This is a permanent error. The following address(es) failed:" in text
    assert "  someone@gmail.com\r\n    host smtp.gmail.com [192.0.2.10]\r\n" in text
    assert (
        "SMTP error from remote mail server after RCPT TO:<someone@gmail.com>: "
        "550 5.1.1 The email account" in text
    )


def test_original_headers_are_returned_but_never_the_body() -> None:
    raw = build([rejected_by_gmail()])
    returned = parts(parse(raw))[2].get_content()
    assert "Subject: Your booking" in returned
    assert "Message-ID: <booking-42@acme.test>" in returned
    assert b"must never come back" not in raw


def test_retry_timeout_reads_as_delivery_time_expired() -> None:
    msg = parse(build([expired()]))
    (recipient,) = status_blocks(msg)[1:]
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "4.4.7"
    assert recipient["Diagnostic-Code"] is None
    assert "retry timeout exceeded" in parts(msg)[0].get_content()


def test_retry_timeout_after_temporary_replies_keeps_the_last_reply_as_diagnostic() -> None:
    last = SmtpReply(451, "4.7.1 Greylisted, try again later")
    msg = parse(build([expired(last)]))
    (recipient,) = status_blocks(msg)[1:]
    assert recipient["Status"] == "4.4.7"
    assert recipient["Diagnostic-Code"] == "smtp; 451 4.7.1 Greylisted, try again later"


def test_several_failed_recipients_get_one_block_each() -> None:
    msg = parse(build([rejected_by_gmail(), expired()]))
    recipients = status_blocks(msg)[1:]
    assert [r["Final-Recipient"] for r in recipients] == [
        "rfc822; someone@gmail.com",
        "rfc822; other@example.test",
    ]
    assert msg["X-Failed-Recipients"] == "someone@gmail.com, other@example.test"


def test_utf8_header_in_the_original_does_not_break_the_bounce() -> None:
    body = "Subject: Réservation confirmée ✓\r\nFrom: app@acme.test\r\n\r\nx\r\n".encode()
    raw = build([rejected_by_gmail()], body=body)
    msg = parse(raw)
    headers_part = parts(msg)[2]
    assert headers_part["Content-Transfer-Encoding"] == "8bit"
    assert "Réservation confirmée ✓" in headers_part.get_content()


def test_undecodable_bytes_in_original_headers_do_not_break_the_bounce() -> None:
    body = b"Subject: caf\xe9 \xff\xfe\r\nFrom: app@acme.test\r\n\r\nx\r\n"
    msg = parse(build([rejected_by_gmail()], body=body))
    assert [p.get_content_type() for p in parts(msg)][2] == "text/rfc822-headers"


def test_upstream_reply_cannot_inject_headers_or_end_the_status_part() -> None:
    hostile = SmtpReply(550, "5.7.1 no\r\nX-Injected: yes\r\n\r\n--fake-boundary--")
    report = DeliveryReport(
        address="someone@gmail.com",
        outcome=AttemptOutcome.FAIL,
        rule="acme",
        host="smtp.gmail.com",
        reply=hostile,
    )
    msg = parse(build([report]))
    (recipient,) = status_blocks(msg)[1:]
    assert recipient["X-Injected"] is None
    assert "X-Injected: yes" in str(recipient["Diagnostic-Code"])
    assert msg["X-Injected"] is None
    assert len(parts(msg)) == 3


def test_header_block_without_a_blank_line_is_returned_whole_with_crlf() -> None:
    assert original_headers(b"From: a@b\nSubject: x") == b"From: a@b\r\nSubject: x\r\n"


def test_returned_headers_are_capped_at_a_line_boundary() -> None:
    line = b"X-Filler: " + b"a" * 88 + b"\r\n"  # 100 bytes with CRLF
    block = original_headers(line * 2000 + b"\r\nbody")
    assert len(block) <= 64 * 1024
    assert block.endswith(b"\r\n")
    assert block == line * (len(block) // len(line))


def test_non_ascii_recipient_is_reported_with_utf8_address_type() -> None:
    report = DeliveryReport(
        address="josé@example.test", outcome=AttemptOutcome.FAIL, rule="acme",
        reply=SmtpReply(550, "5.1.1 no such user"),
    )
    msg = parse(build([report]))
    (recipient,) = status_blocks(msg)[1:]
    assert recipient["Final-Recipient"] == "utf-8; jos\\x{E9}@example.test"


def test_bounce_reveals_no_rule_or_transport_names() -> None:
    raw = build([rejected_by_gmail()])
    assert b"acme\r\n" not in raw
    assert b"R=" not in raw
    assert b"T=gmail" not in raw


def test_auto_submitted_other_than_no_is_detected() -> None:
    assert is_auto_submitted(b"From: a@b\r\nAuto-Submitted: auto-replied\r\n\r\nbody")
    assert is_auto_submitted(b"auto-submitted: auto-generated; comment\r\n")
    assert not is_auto_submitted(b"From: a@b\r\nAuto-Submitted: no\r\n")
    assert not is_auto_submitted(b"From: a@b\r\n\r\nAuto-Submitted: auto-replied\r\n")
    assert not is_auto_submitted(b"From: a@b\r\n")


def test_enhanced_code_of_the_wrong_class_is_not_trusted() -> None:
    report = DeliveryReport(
        address="x@example.test",
        outcome=AttemptOutcome.FAIL,
        rule="acme",
        reply=SmtpReply(550, "2.1.5 nonsense from a confused server"),
    )
    assert describe_failure(report).status == "5.0.0"


def test_auto_submitted_keyword_ignores_comments_around_it() -> None:
    def keyword(value: bytes) -> str | None:
        return auto_submitted_keyword(b"From: a@b\r\nAuto-Submitted: " + value + b"\r\n\r\nbody")

    assert keyword(b"No (a person wrote this)") is None
    assert keyword(b"(typed by hand) no") is None
    assert keyword(b"(outer (nested)) NO ; reason=x") is None
    assert keyword(b"auto-replied (vacation)") == "auto-replied"
    assert keyword(b"(robot) auto-generated") == "auto-generated"
    assert keyword(b"(unclosed comment") == "yes"
