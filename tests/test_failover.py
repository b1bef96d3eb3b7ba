"""The failover policy, one row per rule of relayd/delivery/failover.py's docstring."""

from __future__ import annotations

import pytest

from relayd.delivery.failover import classify, hint_for, is_quota_reply
from relayd.values import AttemptOutcome, SmtpReply, Stage

NEXT = AttemptOutcome.NEXT_TRANSPORT
DEFER = AttemptOutcome.DEFER
FAIL = AttemptOutcome.FAIL
DELIVERED = AttemptOutcome.DELIVERED

BEFORE_DATA = (
    Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.STARTTLS,
    Stage.AUTH, Stage.MAIL, Stage.RCPT, Stage.DATA,
)


def r(text: str) -> SmtpReply:
    code, _, rest = text.partition(" ")
    return SmtpReply(int(code), rest)


@pytest.mark.parametrize("stage", BEFORE_DATA)
def test_no_reply_before_the_data_tries_the_next_transport(stage: Stage) -> None:
    assert classify(stage, None) is NEXT


def test_no_reply_after_the_data_defers_rather_than_risking_a_duplicate() -> None:
    assert classify(Stage.AFTER_DATA, None) is DEFER


@pytest.mark.parametrize("stage", BEFORE_DATA[1:])
def test_421_before_the_data_tries_the_next_transport(stage: Stage) -> None:
    assert classify(stage, r("421 4.7.0 Try again later, closing connection")) is NEXT


CASES = [
    # (stage, reply, provider, outcome)
    (Stage.GREETING, "554 5.7.1 no service for you", None, NEXT),
    (Stage.GREETING, "520 not a 220", None, NEXT),
    (Stage.EHLO, "550 bad hello", None, NEXT),
    (Stage.STARTTLS, "454 4.7.0 TLS not available", None, NEXT),
    (Stage.AUTH, "535 5.7.8 Username and Password not accepted", "gmail", NEXT),
    (Stage.AUTH, "535 Authentication credentials invalid", "ses", NEXT),
    (Stage.AUTH, "454 4.7.0 Temporary authentication failure", None, NEXT),
    (Stage.AUTH, "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled", "office365", NEXT),
    (Stage.MAIL, "451 4.3.0 try later", None, NEXT),
    (Stage.MAIL, "550 5.7.1 sender rejected", None, NEXT),
    (Stage.MAIL, "554 Message rejected: Email address is not verified.", "ses", NEXT),
    (Stage.RCPT, "550 5.1.1 The email account that you tried to reach does not exist", "gmail", FAIL),
    (Stage.RCPT, "553 5.1.3 bad address", None, FAIL),
    (Stage.RCPT, "451 4.2.1 Mailbox busy", None, DEFER),
    (Stage.RCPT, "452 4.2.2 The email account that you tried to reach is over quota", "gmail", DEFER),
    (Stage.RCPT, "552 5.2.2 The email account that you tried to reach is over quota", "gmail", FAIL),
    (Stage.DATA, "451 4.3.0 local error", None, DEFER),
    (Stage.DATA, "554 5.5.1 no valid recipients", None, FAIL),
    (Stage.AFTER_DATA, "451 4.3.0 Temporary failure", None, DEFER),
    (Stage.AFTER_DATA, "421 4.3.0 closing", None, DEFER),
    (Stage.AFTER_DATA, "554 5.7.1 Message rejected as spam", None, FAIL),
    (Stage.AFTER_DATA, "250 2.0.0 OK queued", None, DELIVERED),
    (Stage.AFTER_DATA, "554 Message rejected: Email address is not verified.", "ses", NEXT),
    # quota and rate answers, whatever their first digit
    (Stage.MAIL, "550 5.4.5 Daily user sending limit exceeded.", "gmail", NEXT),
    (Stage.RCPT, "550 5.4.5 Daily user sending quota exceeded.", "gmail", NEXT),
    (Stage.RCPT, "550 5.4.5 Daily user sending limit exceeded.", None, NEXT),
    # a refusal of the data is not a delivery: the next transport cannot duplicate it
    (Stage.AFTER_DATA, "550 5.4.5 Daily user sending limit exceeded.", "gmail", NEXT),
    # a sending rate waits on the same transport: the next second may pass
    (Stage.MAIL, "454 Throttling failure: Maximum sending rate exceeded.", "ses", DEFER),
    (Stage.RCPT, "454 Throttling failure: Daily message quota exceeded.", "ses", NEXT),
    (Stage.AFTER_DATA, "454 Throttling failure: Maximum sending rate exceeded.", "ses", DEFER),
    (Stage.AFTER_DATA, "554 Throttling failure: Daily message quota exceeded.", "ses", NEXT),
    (Stage.RCPT, "550 Maximum credits exceeded", "sendgrid", NEXT),
    (Stage.DATA, "550 5.7.1 Rate limit exceeded, try later", "mailgun", DEFER),
    (Stage.AFTER_DATA, "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
     "Failed to process message due to a permanent exception with message Cannot submit message.", "office365", NEXT),
    (Stage.AUTH, "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.", "office365", NEXT),
    (Stage.MAIL, "550 5.7.30 Basic authentication is not supported for Client Submission.", "office365", NEXT),
    (Stage.RCPT, "421 Domain mg.example.com has exceeded its hourly message limit", "mailgun", NEXT),
    (Stage.AUTH, "454 4.7.0 Too many login attempts, please try again later", "gmail", NEXT),
    (Stage.RCPT, "550 5.7.1 Too many login attempts", None, NEXT),
]


@pytest.mark.parametrize(("stage", "reply", "provider", "outcome"), CASES)
def test_classify(stage: Stage, reply: str, provider: str | None, outcome: AttemptOutcome) -> None:
    assert classify(stage, r(reply), provider=provider) is outcome


def test_gmail_quota_code_means_nothing_at_another_provider() -> None:
    reply = r("550 5.4.5 relay access denied by local policy")
    assert is_quota_reply(reply, "gmail")
    assert not is_quota_reply(reply, "sendgrid")
    assert classify(Stage.RCPT, reply, provider="sendgrid") is FAIL


def test_a_full_mailbox_is_not_a_provider_quota() -> None:
    assert not is_quota_reply(r("552 5.2.2 Mailbox over quota exceeded"), None)


def test_capture_write_failure_defers_and_a_written_message_is_delivered() -> None:
    assert classify(Stage.WRITE, None) is DEFER
    assert classify(Stage.WRITE, r("250 2.0.0 captured as x")) is DELIVERED


HINTS = [
    # (provider, stage, reply, detail, words the hint must contain)
    ("gmail", Stage.AUTH, "535 5.7.8 Username and Password not accepted", "", "2-step verification and a 16-letter app password"),
    (None, Stage.AUTH, "535 5.7.8 Username and Password not accepted. https://support.google.com/mail/?p=BadCredentials", "", "app password"),
    ("google_workspace", Stage.AUTH, "535 5.7.8 Username and Password not accepted", "", "app password"),
    (None, Stage.CONNECT, None, "connect to smtp.gmail.com port 587: connection refused", "try port 2525"),
    (None, Stage.CONNECT, None, "connect to smtp.gmail.com port 465: timed out after 30s", "try port 2525"),
    (None, Stage.CONNECT, None, "connect to 127.0.0.1 port 2525: connection refused", "firewall"),
    (None, Stage.STARTTLS, None, "certificate verify failed: unable to get local issuer certificate", "ca_file"),
    (None, Stage.CONNECT, None, "certificate verify failed: IP address mismatch", "host"),
    ("ses", Stage.AFTER_DATA, "554 Message rejected: Email address is not verified.", "", "verify the sender address or its whole domain in the SES"),
    ("ses", Stage.AUTH, "535 Authentication Credentials Invalid", "", "region"),
    ("ses", Stage.AUTH, "535 Authentication Credentials Invalid", "", "not the IAM access keys"),
    ("office365", Stage.AUTH, "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant", "", "OAuth2"),
    (None, Stage.AUTH, "535 5.7.139 Authentication unsuccessful", "", "enable Authenticated SMTP"),
    ("gmail", Stage.AUTH, "454 4.7.0 Too many login attempts, please try again later", "", "15-30 minutes"),
    (None, Stage.STARTTLS, None, "smtp.example.com does not offer STARTTLS; refusing to go on without TLS", "implicit"),
]


@pytest.mark.parametrize(("provider", "stage", "reply", "detail", "words"), HINTS)
def test_hint_for_well_known_failures(
    provider: str | None, stage: Stage, reply: str | None, detail: str, words: str
) -> None:
    hint = hint_for(provider, stage, r(reply) if reply else None, detail)
    assert hint is not None and words in hint


def test_no_hint_for_an_ordinary_recipient_refusal() -> None:
    assert hint_for("gmail", Stage.RCPT, r("550 5.1.1 no such user"), "") is None
