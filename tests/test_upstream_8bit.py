"""8-bit bodies and SMTPUTF8 towards upstreams that lack 8BITMIME or SMTPUTF8 (real relayd process, uvloop)."""

from __future__ import annotations

import email
import email.policy
from typing import Any, Callable

import pytest

from relayd.delivery.mime7bit import NeedsSmtpUtf8, to_7bit
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, as_submitted, connect

ACME = ("acme", "acme-relay-password")
TEXT = "Grüße aus Köln — ça va? Ünïcödé.\r\n" * 40 + "A line ending in a space \r\n"
BINARY = (bytes(b for b in range(256) if b not in (0, 10, 13)) + b"\r\n") * 4


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
    assert headers_of(as_submitted(converted.data, original)) == headers_of(original)  # the message's own header block is untouched
    assert b"A plain 7-bit part stays byte for byte.\r\n" in converted.data
    assert leaf_payloads(as_submitted(converted.data, original)) == leaf_payloads(original)
    assert leaf_payloads(original)[0].decode("utf-8").startswith("Grüße aus Köln")
    # An upstream with 8BITMIME gets the very bytes the application sent.
    assert as_submitted(untouched.data, original) == original and "BODY=8BITMIME" in untouched.mail_options


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
    assert as_submitted(delivered.data, utf8_subject) == utf8_subject
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
    assert as_submitted(delivered.data, raw_subject) == raw_subject
    assert "** reader@customer.test" not in relay_files.mainlog()


def _decoded_leaves(data: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded payload) of each leaf; fails on any parser defect."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    leaves: list[tuple[str, bytes]] = []
    for part in message.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
        if not part.is_multipart() and part.get_content_type() != "message/rfc822":
            leaves.append((part.get_content_type(), part.get_payload(decode=True)))
    return leaves


def test_to_7bit_takes_a_body_part_without_headers_or_blank_line_as_body_not_as_8bit_headers() -> None:
    broken = (
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\nsecond line\r\n--b--\r\n"
    )
    out = to_7bit(broken)
    assert out.isascii()
    assert [payload for _, payload in _decoded_leaves(out)] == ["Grüße aus Köln\r\nsecond line".encode()]


def test_to_7bit_gives_parts_it_cannot_walk_a_type_that_may_be_base64() -> None:
    """A multipart without a boundary, or message/rfc822 past the nesting bound, goes as an attachment."""
    no_boundary = "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\nnaïve\r\n".encode()
    assert _decoded_leaves(to_7bit(no_boundary)) == [("application/octet-stream", "naïve\r\n".encode())]
    inner = "Subject: in\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnaïve\r\n".encode()
    for _ in range(30):
        inner = b"Subject: wrapped\r\nContent-Type: message/rfc822\r\n\r\n" + inner
    leaves = _decoded_leaves(to_7bit(b"From: a@b\r\nMIME-Version: 1.0\r\n" + inner))
    assert [kind for kind, _ in leaves] == ["application/octet-stream"]
    assert leaves[0][1].endswith("naïve\r\n".encode())


def test_to_7bit_relabels_a_converted_multipart_that_said_8bit() -> None:
    message = (
        "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnaïve\r\n--b--\r\n"
    ).encode()
    out = to_7bit(message)
    assert b"Content-Transfer-Encoding: 8bit" not in out
    assert headers_of(out).endswith(b"Content-Transfer-Encoding: 7bit")
    assert [payload for _, payload in _decoded_leaves(out)] == ["naïve".encode()]


def _peak_memory_of_to_7bit(message: bytes) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        to_7bit(message)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_to_7bit_memory_stays_a_few_times_the_message_for_many_tiny_parts_and_8bit_preambles() -> None:
    size = 4 * 1024 * 1024
    head = b"From: a@b\r\nSubject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    tiny_parts = head + b"--b\r\nContent-Type: text/plain\r\n\r\n\xc3\xa9\r\n" * (size // 40) + b"--b--\r\n"
    eight_bit_preamble = head + b"\xc3\xa9" * (size // 2) + b"\r\n--b\r\n\r\nx\r\n--b--\r\n"
    for message in (tiny_parts, eight_bit_preamble):
        assert _peak_memory_of_to_7bit(message) < 6 * len(message)


def test_to_7bit_walks_at_most_max_parts_and_encodes_a_bigger_multipart_whole() -> None:
    from relayd.delivery.mime7bit import MAX_PARTS

    parts = b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9\r\n" * (MAX_PARTS + 1)
    message = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    leaves = _decoded_leaves(to_7bit(message))
    assert leaves == [("application/octet-stream", parts + b"--b--\r\n")]
    fits = message.replace(parts, parts[: len(parts) // (MAX_PARTS + 1) * MAX_PARTS])
    assert len(_decoded_leaves(to_7bit(fits))) == MAX_PARTS
