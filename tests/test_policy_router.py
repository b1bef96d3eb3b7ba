"""Pure submission policy, routing and auth throttling."""

from __future__ import annotations

import pytest

from relayd.smtp import policy
from relayd.config.model import RouteRule, TenantConfig
from relayd.delivery.router import domain_matches, group_by_route, route
from relayd.values import Route

ACME = TenantConfig(
    name="acme",
    password_hash=None,
    senders=("*@acme.example", "ceo@acme-corp.example"),
    routes=(
        RouteRule("partners", ("partner.test", "*.corp.test"), ("mailgun",)),
        RouteRule("everything", ("*",), ("gmail", "sendgrid")),
    ),
)


@pytest.mark.parametrize(
    "pattern, domain, expected",
    [("*", "x.test", True), ("corp.test", "CORP.test", True), ("*.corp.test", "eu.corp.test", True),
     ("*.corp.test", "corp.test", False), ("corp.test", "evilcorp.test", False), ("*.corp.test", "evilcorp.test", False)],
)
def test_domain_patterns_match_like_exim(pattern: str, domain: str, expected: bool) -> None:
    assert domain_matches(pattern, domain.lower()) is expected


def test_first_matching_rule_wins_and_recipients_are_split_per_rule() -> None:
    assert route(ACME, "a@eu.corp.test") == Route("partners", ("mailgun",))
    assert route(ACME, "a@customer.test") == Route("everything", ("gmail", "sendgrid"))
    groups, unrouted = group_by_route(ACME, ["a@partner.test", "b@x.test", "c@eu.corp.test"])
    assert groups == {
        Route("partners", ("mailgun",)): ["a@partner.test", "c@eu.corp.test"],
        Route("everything", ("gmail", "sendgrid")): ["b@x.test"],
    }
    assert unrouted == []


def test_tenant_without_a_catch_all_leaves_other_domains_unrouted() -> None:
    only_partners = TenantConfig("p", None, ("*@p.test",), (ACME.routes[0],))
    assert route(only_partners, "x@else.test") is None
    assert group_by_route(only_partners, ["x@else.test"]) == ({}, ["x@else.test"])


@pytest.mark.parametrize(
    "address, allowed",
    [("billing@acme.example", True), ("Billing@ACME.example", True), ("ceo@acme-corp.example", True),
     ("cfo@acme-corp.example", False), ("x@sub.acme.example", False), ("x@acme.example.evil", False), ("", False)],
)
def test_sender_patterns(address: str, allowed: bool) -> None:
    assert policy.sender_allowed(ACME, address) is allowed


def test_header_from_must_be_an_allowed_sender() -> None:
    ok = policy.read_header_facts(b"From: Billing <billing@acme.example>\r\nSubject: x\r\n\r\nbody\r\n")
    assert policy.check_header_from(ACME, ok) is None
    spoof = policy.read_header_facts(b"From: billing@acme.example, boss@globex.example\r\n\r\n")
    assert "boss@globex.example" in (policy.check_header_from(ACME, spoof) or "")
    missing = policy.read_header_facts(b"Subject: no from\r\n\r\n")
    assert (policy.check_header_from(ACME, missing) or "").startswith("550 5.6.0")


@pytest.mark.parametrize(
    "raw, body",
    [
        (b"a\r\n..dot\r\n", b"a\r\n.dot\r\n"),
        (b".first\r\n", b"first\r\n"),
        (b"bare\nlf\n", b"bare\r\nlf\r\n"),
        (b"x\n.\ny\r\n", b"x\r\n.\r\ny\r\n"),  # a smuggled end marker stays content
        (b"x\r.\r\n", b"x\r\n.\r\n"),
        (b"", b""),
    ],
)
def test_data_is_unstuffed_then_normalised_to_crlf(raw: bytes, body: bytes) -> None:
    verdict = policy.check_data(raw, max_line_length=998)
    assert verdict.refusal is None and verdict.body == body


def test_nul_and_long_lines_are_refused() -> None:
    assert (policy.check_data(b"a\x00b\r\n", max_line_length=998).refusal or "").startswith("554 5.6.0")
    refusal = policy.check_data(b"ok\r\n" + b"x" * 999 + b"\r\n", max_line_length=998).refusal
    assert refusal is not None and "Line 2" in refusal


