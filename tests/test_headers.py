"""Header block reading for policy and the trace fields, as pure functions."""

from __future__ import annotations

import time

import pytest

from relayd.smtp import headers
from relayd.smtp import policy
from relayd.config.model import TenantConfig


def acme() -> TenantConfig:
    return TenantConfig(name="acme", password_hash="x", senders=("*@acme.example",), routes=())


@pytest.mark.parametrize("field", [b"From :", b"From\t:", b"FROM \t :", b"from:"])
def test_obsolete_from_forms_are_fields_the_check_sees(field: bytes) -> None:
    block = b"From: billing@acme.example\r\n" + field + b" Boss <ceo@globex.example>\r\nSubject: x\r\n"
    facts = headers.read_header_facts(block)
    assert facts.from_addresses == ("billing@acme.example", "ceo@globex.example")
    refusal = policy.check_header_from(acme(), facts)
    assert refusal == "550 5.7.1 Header From: <ceo@globex.example> is not an allowed sender for tenant acme"


def test_a_folded_from_is_unfolded_and_every_address_is_checked() -> None:
    facts = headers.read_header_facts(b"From: Billing <billing@acme.example>,\r\n\tBoss <ceo@globex.example>\r\n")
    assert facts.from_addresses == ("billing@acme.example", "ceo@globex.example")


def test_more_fields_than_the_bound_is_refused_without_parsing_further() -> None:
    block = b"From: billing@acme.example\r\n" + b"X-A: b\r\n" * headers.MAX_HEADER_FIELDS
    facts = headers.read_header_facts(block)
    assert facts.refusal is not None and facts.refusal.startswith("552 5.3.4 Message header has more than 1000")
    assert policy.check_header_from(acme(), facts) == facts.refusal


def test_more_from_addresses_than_the_bound_is_refused() -> None:
    many = b", ".join(b"u%d@acme.example" % i for i in range(headers.MAX_FROM_ADDRESSES + 1))
    facts = headers.read_header_facts(b"From: " + many + b"\r\n")
    assert facts.refusal == "554 5.6.0 Header From: lists more than 50 addresses"


def test_a_hundred_kib_header_is_read_in_milliseconds() -> None:
    block = b"From: billing@acme.example\r\n" + b"X-Filler: " + b"y" * 100_000 + b"\r\n"
    started = time.perf_counter()
    facts = headers.read_header_facts(block)
    assert time.perf_counter() - started < 0.05
    assert facts.from_addresses == ("billing@acme.example",)


def test_body_lines_after_the_empty_line_are_not_headers() -> None:
    facts = policy.read_header_facts(b"Subject: x\r\n\r\nFrom: ceo@globex.example\r\n")
    assert facts.from_addresses == ()
    assert policy.read_header_facts(b"\r\nFrom: ceo@globex.example\r\n").from_addresses == ()


def test_date_message_id_and_received_count_are_reported() -> None:
    facts = headers.read_header_facts(
        b"Received: from a by b; Tue, 1 Dec 2026 10:00:00 +0000\r\nReceived : x\r\n"
        b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <a@b>\r\n")
    assert (facts.has_date, facts.has_message_id, facts.message_id, facts.received_count) == (True, True, "<a@b>", 2)
    assert headers.too_many_hops(facts, 2) is None
    assert headers.too_many_hops(facts, 1) == "554 5.4.6 Too many Received: headers (2, more than 1): routing loop suspected"


def info(**changes: object) -> headers.TraceInfo:
    values: dict[str, object] = dict(helo="app.test", client_ip="127.0.0.1", hostname="relay.test",
                                     protocol="esmtpsa", queue_id="1xYPi4-0001It-VJ",
                                     recipients=("c@customer.test",), received_at=1_796_138_351.0, tls="TLSv1.3")
    values.update(changes)
    return headers.TraceInfo(**values)  # type: ignore[arg-type]


def test_received_field_names_client_relay_protocol_id_recipient_and_date() -> None:
    assert headers.received_field(info()) == (
        b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (relayd) with ESMTPSA (TLSv1.3)\r\n"
        b"\tid 1xYPi4-0001It-VJ\r\n\tfor <c@customer.test>;\r\n\tTue, 01 Dec 2026 15:19:11 +0000\r\n")


def test_received_field_discloses_no_recipient_list_and_names_plain_esmtp() -> None:
    field = headers.received_field(info(recipients=("a@x.test", "b@x.test"), protocol="esmtp", tls=""))
    assert field == (b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (relayd) with ESMTP\r\n"
                     b"\tid 1xYPi4-0001It-VJ;\r\n\tTue, 01 Dec 2026 15:19:11 +0000\r\n")


@pytest.mark.parametrize("helo", ["bad name (x)\r\nX-Injected: 1", "caf\u00e9.test", "a\\b", ""])
def test_a_helo_that_is_not_a_domain_is_shown_sanitised_in_a_comment(helo: str) -> None:
    field = headers.received_field(info(helo=helo))
    first = field.split(b"\r\n", 1)[0]
    assert first.startswith(b"Received: from [127.0.0.1] (helo=")
    assert first.count(b"(") == 1 and first.count(b")") == 1 and b"\\" not in first
    assert field.count(b"\r\n") == 5 and b"X-Injected: 1\r\n" not in field


def test_added_fields_are_in_exims_shape() -> None:
    assert headers.message_id_field("1xYPi4-0001It-VJ", "relay.test") == b"Message-ID: <E1xYPi4-0001It-VJ@relay.test>\r\n"
    assert headers.date_field(1_796_138_351.0) == b"Date: Tue, 01 Dec 2026 15:19:11 +0000\r\n"


def test_deeply_nested_comments_in_from_are_refused_not_a_recursion_error() -> None:
    facts = headers.read_header_facts(b"From: " + b"(" * 10_000 + b" <billing@acme.example>\r\n")
    assert facts.refusal == "554 5.6.0 Header From: cannot be parsed (unbalanced or deeply nested comments)"


def test_parentheses_inside_a_quoted_display_name_are_not_comments() -> None:
    facts = headers.read_header_facts(b'From: "Billing ((((((((((((" <billing@acme.example>\r\n')
    assert facts.refusal is None and facts.from_addresses == ("billing@acme.example",)


def test_a_from_longer_than_its_bound_is_refused_before_parsing() -> None:
    facts = headers.read_header_facts(b"From: " + b"@" * (headers.MAX_FROM_BYTES + 1) + b"\r\n")
    assert facts.refusal == "554 5.6.0 Header From: is longer than 16384 bytes"
