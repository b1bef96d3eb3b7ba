"""The provider reply table, against the texts the providers really send."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.config.loader import load_config
from relayd.config.passwords import hash_password
from relayd.delivery.providerreplies import (
    BASIC_AUTH_DISABLED,
    DAILY_QUOTA,
    LOGIN_THROTTLED,
    REPLY_TABLE,
    ProviderReply,
    SEND_RATE,
    SENDER_NOT_ALLOWED,
    SENDER_NOT_VERIFIED_SES,
    SERVER_BUSY,
    IP_BLOCKED,
    TEMPORARILY_REFUSED,
    BAD_CREDENTIALS_SES,
    AUTH_REQUIRED_SENDGRID,
    HOURLY_QUOTA,
    ReplyClass,
    RetryWhen,
    classify_reply,
    provider_of,
)
from relayd.values import SmtpReply


def r(text: str) -> SmtpReply:
    code, _, rest = text.partition(" ")
    return SmtpReply(int(code), rest)


REAL_REPLIES = [
    # (provider, reply as the provider sends it, class)
    ("gmail", "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits "
              "go to https://support.google.com/a/answer/166852 d9443c01a7336-2a0b - gsmtp", DAILY_QUOTA),
    ("gmail", "550 5.4.5 Daily user sending quota exceeded. z1sm2233512wrh.1 - gsmtp", DAILY_QUOTA),
    ("google_workspace", "550 5.4.5 Daily user sending limit exceeded.", DAILY_QUOTA),
    ("gmail", "421 4.7.0 Try again later, closing connection. (EHLO) 5b1f17b1804b1-47 - gsmtp", TEMPORARILY_REFUSED),
    ("gmail", "454 4.7.0 Too many login attempts, please try again later. "
              "https://support.google.com/mail/answer/7126229 - gsmtp", LOGIN_THROTTLED),
    ("office365", "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. "
                  "[PR0P264CA0049.FRAP264.PROD.OUTLOOK.COM]", BASIC_AUTH_DISABLED),
    ("office365", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
                  "Visit https://aka.ms/smtp_auth_disabled for more information.", BASIC_AUTH_DISABLED),
    ("office365", "550 5.7.30 Basic authentication is not supported for Client Submission.", BASIC_AUTH_DISABLED),
    ("office365", "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
                  "Failed to process message due to a permanent exception with message Cannot submit message. "
                  "0.35250:0E00CE86", SENDER_NOT_ALLOWED),
    ("office365", "451 4.7.500 Server busy. Please try again later from [203.0.113.7]. (S77719) "
                  "[AM6PR02MB4102.eurprd02.prod.outlook.com]", SERVER_BUSY),
    ("office365", "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. "
                  "For more information please go to http://go.microsoft.com/fwlink/?LinkId=526653", IP_BLOCKED),
    ("ses", "454 Throttling failure: Maximum sending rate exceeded.", SEND_RATE),
    ("ses", "454 Throttling failure: Daily message quota exceeded.", DAILY_QUOTA),
    ("ses", "554 Message rejected: Email address is not verified. The following identities failed the check "
            "in region EU-WEST-1: billing@acme.example", SENDER_NOT_VERIFIED_SES),
    ("ses", "535 Authentication Credentials Invalid", BAD_CREDENTIALS_SES),
    ("sendgrid", "550 Unauthenticated senders not allowed", AUTH_REQUIRED_SENDGRID),
    ("sendgrid", "451 4.7.1 Your message has been rate limited. Please try again later.", SEND_RATE),
    ("mailgun", "421 4.7.0 mg.example.com: rate limit exceeded, try again later", SEND_RATE),
    ("mailgun", "421 Domain mg.example.com has exceeded its hourly message limit", HOURLY_QUOTA),
]


@pytest.mark.parametrize(("provider", "reply", "klass"), REAL_REPLIES)
def test_each_real_provider_reply_has_its_class(provider: str, reply: str, klass: ReplyClass) -> None:
    assert classify_reply(provider, r(reply)) is klass


@pytest.mark.parametrize("row", REPLY_TABLE, ids=lambda row: f"{row.provider}:{row.klass.name}")
def test_every_row_of_the_table_matches_its_own_real_example(row: ProviderReply) -> None:
    assert classify_reply(row.provider, r(row.example)) is row.klass


def test_each_class_says_when_to_retry_whether_to_fail_over_and_who_it_concerns() -> None:
    assert (DAILY_QUOTA.retry, DAILY_QUOTA.fail_over, DAILY_QUOTA.closes_transport) == (RetryWhen.DAILY_RESET, True, True)
    assert DAILY_QUOTA.wait() == 3600.0  # rolling 24-hour windows: probe hourly, never hammer
    assert (SEND_RATE.retry, SEND_RATE.fail_over, SEND_RATE.closes_transport) == (RetryWhen.AFTER_MINUTES, False, False)
    assert SEND_RATE.wait() == 120.0
    assert LOGIN_THROTTLED.closes_transport and LOGIN_THROTTLED.wait() == 1800.0
    assert SENDER_NOT_ALLOWED.sender_only and not SENDER_NOT_ALLOWED.closes_transport
    assert SENDER_NOT_VERIFIED_SES.sender_only and SENDER_NOT_VERIFIED_SES.fail_over
    assert BASIC_AUTH_DISABLED.retry is RetryWhen.NOW and not BASIC_AUTH_DISABLED.closes_transport


def test_disabled_basic_auth_points_at_xoauth2_for_that_transport() -> None:
    hint = BASIC_AUTH_DISABLED.hint_for("m365_acme")
    assert hint.startswith("switch this transport to XOAUTH2: relayctl oauth authorize m365_acme")


def test_a_generic_try_again_later_is_only_gmails_throttle_at_gmail() -> None:
    reply = r("421 4.7.0 Try again later, closing connection.")
    assert classify_reply("gmail", reply) is TEMPORARILY_REFUSED
    assert classify_reply(None, reply) is None
    assert classify_reply("sendgrid", reply) is None


def test_a_provider_row_applies_to_an_unknown_provider_but_not_to_another_one() -> None:
    reply = r("550 5.4.5 relay access denied by local policy")
    assert classify_reply(None, reply) is DAILY_QUOTA
    assert classify_reply("sendgrid", reply) is None


@pytest.mark.parametrize("reply", [
    "552 5.2.2 The email account that you tried to reach is over quota.",
    "452 4.2.2 The email account that you tried to reach is over quota.",
    "550 5.1.1 The email account that you tried to reach does not exist.",
    "250 2.0.0 OK",
])
def test_a_full_mailbox_or_an_ordinary_reply_is_not_a_provider_class(reply: str) -> None:
    assert classify_reply("gmail", r(reply)) is None


@pytest.mark.parametrize(("preset", "host", "provider"), [
    ("gmail", "127.0.0.1", "gmail"),
    ("google_workspace", "smtp.gmail.com", "gmail"),
    (None, "smtp.gmail.com", "gmail"),
    (None, "SMTP.Office365.com.", "office365"),
    (None, "email-smtp.eu-west-1.amazonaws.com", "ses"),
    (None, "smtp.sendgrid.net", "sendgrid"),
    (None, "smtp.eu.mailgun.org", "mailgun"),
    (None, "mail.example.net", None),
    (None, "smtp.gmail.com.evil.example", None),
])
def test_which_provider_a_transport_is_comes_from_its_preset_else_its_host(
    preset: str | None, host: str, provider: str | None
) -> None:
    assert provider_of(preset, host) == provider


def test_a_transport_on_a_providers_host_without_a_preset_is_that_provider(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "version: 1\nhostname: relay.example.com\nspool_dir: spool\n"
        "credentials: {store: credentials.enc, master_key_file: master.key}\n"
        "listeners: [{name: submission, tls: none, allow_plaintext_auth: true}]\n"
        "transports:\n"
        "  m365: {host: smtp.office365.com}\n"
        "  ses: {host: email-smtp.eu-west-1.amazonaws.com, port: 2587}\n"
        "  own: {host: mail.internal.example}\n"
        "tenants:\n"
        f"  acme:\n    password_hash: \"{hash_password('x' * 12)}\"\n    senders: ['*@acme.example']\n"
        "    routes: [{domains: ['*'], via: [m365, ses, own]}]\n"
    )
    config = load_config(path, check_files=False)
    providers = {name: getattr(t, "provider") for name, t in config.transports.items()}
    assert providers == {"m365": "office365", "ses": "ses", "own": None}
