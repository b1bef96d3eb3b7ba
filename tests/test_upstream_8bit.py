"""8-bit bodies and SMTPUTF8 towards upstreams that lack 8BITMIME or SMTPUTF8 (real relayd process, uvloop)."""

from __future__ import annotations

import email
import email.policy
from typing import Any, Callable

import pytest

from relayd.mime7bit import NeedsSmtpUtf8, to_7bit
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, connect

ACME = ("acme", "acme-relay-password")
TEXT = "Grüße aus Köln — ça va? Ünïcödé.\r\n" * 40 + "A line ending in a space \r\n"
BINARY = (bytes(b for b in range(256) if b not in (0, 10, 13)) + b"\r\n") * 4

def as_submitted(data: bytes) -> bytes:
    """The message minus what relayd adds on arrival: its Received: field (first)
    and the Date: field it appends to a header block that had none."""
    lines = data.split(b"\r\n")
    if lines[0].startswith(b"Received: from "):
        end = 1
        while lines[end][:1] in (b" ", b"\t"):
            end += 1
        if b"(relayd)" in b"\r\n".join(lines[:end]):
            lines = lines[end:]
    blank = lines.index(b"") if b"" in lines else len(lines)
    if blank > 0 and lines[blank - 1].startswith(b"Date: "):
        del lines[blank - 1]
    return b"\r\n".join(lines)



def eight_bit_message(subject: str = "Quarterly report") -> bytes:
    return (
        "From: app@acme.example\r\n"
        "To: reader@customer.test\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <8bit-1@acme.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_b1"\r\n'
        "\r\n"
        "This is a MIME message.\r\n"
        "--=_b1\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{TEXT}"
        "--=_b1\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "A plain 7-bit part stays byte for byte.\r\n"
        "--=_b1\r\n"
        "Content-Type: application/octet-stream; name=table.bin\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    ).encode("utf-8") + BINARY + b"--=_b1--\r\n"


def leaf_payloads(data: bytes) -> list[bytes]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return [part.get_payload(decode=True) for part in message.walk() if not part.is_multipart()]


def headers_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def send(files: RelayFiles, message: bytes, to: str, *, smtputf8: bool = False) -> None:
    with connect(files, login=ACME) as client:
        options = ["SMTPUTF8"] if smtputf8 else []
        refused = client.sendmail("app@acme.example", [to], message, mail_options=options)
        assert refused == {}


def test_an_8bit_body_to_an_upstream_without_8bitmime_arrives_7bit_and_decodes_to_the_same_content(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    legacy = upstreams(users={"acme@legacy.test": "legacy-pw"}, eightbitmime=False, smtputf8=False)
    modern = upstreams(users={"acme@modern.test": "modern-pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("legacy", legacy.port, "legacy", "acme@legacy.test", "legacy-pw"),
                   UpstreamSpec("modern", modern.port, "modern", "acme@modern.test", "modern-pw")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"],
                            [(["old.test"], ["legacy"]), (["*"], ["modern"])])],
    )
    original = eight_bit_message()
    with RelaydProcess(relay_files):
        send(relay_files, original, "reader@old.test")
        send(relay_files, original, "reader@new.test")
        (converted,) = legacy.wait_for_messages(1)
        (untouched,) = modern.wait_for_messages(1)
    assert converted.data.isascii()
    assert not any(o.upper().startswith("BODY=8BITMIME") for o in converted.mail_options)
    assert headers_of(as_submitted(converted.data)) == headers_of(original)  # the message's own header block is untouched
    assert b"A plain 7-bit part stays byte for byte.\r\n" in converted.data
    assert leaf_payloads(converted.data) == leaf_payloads(original)
    assert leaf_payloads(original)[0].decode("utf-8").startswith("Grüße aus Köln")
    # An upstream with 8BITMIME gets the very bytes the application sent.
    assert as_submitted(untouched.data) == original and "BODY=8BITMIME" in untouched.mail_options


def test_a_message_needing_smtputf8_tries_the_chain_and_fails_at_once_when_no_transport_offers_it(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    legacy_a = upstreams(users={"acme@a.test": "a-pw"}, eightbitmime=False, smtputf8=False)
    legacy_b = upstreams(users={"acme@b.test": "b-pw"}, smtputf8=False)
    modern = upstreams(users={"acme@modern.test": "modern-pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("legacy_a", legacy_a.port, "a", "acme@a.test", "a-pw"),
                   UpstreamSpec("legacy_b", legacy_b.port, "b", "acme@b.test", "b-pw"),
                   UpstreamSpec("modern", modern.port, "modern", "acme@modern.test", "modern-pw")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"],
                            [(["old.test"], ["legacy_a", "legacy_b"]), (["*"], ["legacy_a", "modern"])])],
        retry="F,4d,1h",  # a deferral would wait an hour: only an immediate failure passes
    )
    utf8_subject = eight_bit_message(subject="Grüße — Überweisung")
    with RelaydProcess(relay_files):
        send(relay_files, utf8_subject, "reader@old.test", smtputf8=True)
        relay_files.wait_for_log("** reader@old.test", timeout=15)
        send(relay_files, utf8_subject, "reader@new.test", smtputf8=True)
        messages = modern.wait_for_messages(1)
        (bounce,) = legacy_a.wait_for_messages(1)  # the DSN, 8-bit returned headers converted
    (delivered,) = messages
    assert delivered.rcpt_tos == ["reader@new.test"] and "SMTPUTF8" in delivered.mail_options
    assert as_submitted(delivered.data) == utf8_subject
    assert legacy_b.received == []
    log = relay_files.mainlog()
    failed = next(line for line in log.splitlines() if "** reader@old.test" in line)
    assert "SMTPUTF8 required (8-bit header fields) but transport legacy_b" in failed
    assert "SMTP error from remote" not in failed and "== reader@old.test" not in log
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["app@acme.example"] and bounce.data.isascii()
    report = email.message_from_bytes(bounce.data, policy=email.policy.default)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    assert "Status: 5.6.9" in str(status)


def test_to_7bit_refuses_8bit_header_fields_and_leaves_7bit_messages_alone() -> None:
    with pytest.raises(NeedsSmtpUtf8):
        to_7bit("Subject: Grüße\r\n\r\nbody é\r\n".encode())
    with pytest.raises(NeedsSmtpUtf8):
        to_7bit(eight_bit_message().replace(b"name=table.bin", "name=tä.bin".encode()))
    plain = b"Subject: hi\r\n\r\nbody\r\n"
    assert to_7bit(plain) is plain
    single = to_7bit("Subject: hi\r\n\r\nnaïve\r\n".encode())
    assert single.isascii() and b"MIME-Version: 1.0\r\n" in single
    assert leaf_payloads(single) == ["naïve\r\n".encode()]


def test_to_7bit_stops_following_nesting_at_its_bound() -> None:
    inner = "Content-Type: text/plain\r\n\r\nnaïve\r\n".encode()
    for level in range(60):
        inner = (f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n--b{level}\r\n').encode() + inner + f"\r\n--b{level}--\r\n".encode()
    out = to_7bit(b"Subject: deep\r\n" + inner)
    assert out.isascii()


def test_a_raw_utf8_subject_sent_without_smtputf8_is_carried_as_8bit_data_not_bounced(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    """Postfix's rule: only a client that declared SMTPUTF8 makes 8-bit headers need it.

    PHP mail() and many templates write UTF-8 subjects raw without asking for
    SMTPUTF8; every provider takes them as 8-bit data, so relayd must too.
    """
    plain = upstreams(users={"acme@plain.test": "plain-pw"}, smtputf8=False)
    relay_files.write(
        upstreams=[UpstreamSpec("plain", plain.port, "plain", "acme@plain.test", "plain-pw")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["plain"])])],
        retry="F,4d,1h",
    )
    raw_subject = eight_bit_message(subject="Réservation acceptée — à bientôt")
    with RelaydProcess(relay_files):
        send(relay_files, raw_subject, "reader@customer.test")
        (delivered,) = plain.wait_for_messages(1)
    assert "SMTPUTF8" not in delivered.mail_options
    assert headers_of(as_submitted(delivered.data)) == headers_of(raw_subject)
    assert "** reader@customer.test" not in relay_files.mainlog()
