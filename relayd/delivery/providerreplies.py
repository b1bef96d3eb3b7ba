"""What a provider's reply means for the transport: one table of real reply texts.

Takes: the provider a transport talks to (its preset, else its host name)
and one SMTP reply the upstream gave.
Emits: a `ReplyClass` that says when to try that transport again (now, after
some minutes, or once the provider's daily window has moved on), whether the
message fails over to the next transport at once, whether the refusal is
permanent for this sender only (the transport stays healthy for everyone
else), and a one-sentence hint for the operator.
Untrusted input: the reply text, written by the upstream; it is only matched
against the fixed patterns below and never interpreted further.
Pure: no I/O, never raises.

Why a table per provider: the first digit of a provider's reply does not say
whether the message or the account is the problem. Gmail answers a used-up
daily quota with `550 5.4.5`, which read literally would bounce every message
of the day; SES answers its rate limit with `454` and drops the message;
Microsoft 365 refuses password logins with `535 5.7.139` once basic
authentication is off, which no retry will ever fix. `failover.classify`
stays the one decision per recipient; this table refines it, and the delivery
walk uses it to close a transport's gate (quota, throttling) until it makes
sense to try again, instead of retrying into the limit.

The daily limits of Gmail, Microsoft 365 and SES are rolling 24-hour
windows, not a reset at midnight: capacity comes back as the sends of the
last day age out. relayd therefore closes the transport for
`ROLLING_DAY_PROBE` and then lets the queue try again; a second refusal
closes it again, so one message per interval is the whole cost of probing.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from relayd.config.presets import provider_for_host
from relayd.values import SmtpReply


class RetryWhen(enum.Enum):
    """When the transport is worth another attempt after this reply."""

    NOW = "now"  # nothing provider-imposed: relayd's own retry schedule applies
    AFTER_MINUTES = "after minutes"  # a rate or a short block: `ReplyClass.minutes`
    DAILY_RESET = "daily reset"  # the account's daily quota: when the provider's window moves on


# A rolling 24-hour window (Gmail, Workspace, Microsoft 365, SES) frees capacity
# gradually: try again after an hour rather than wait a whole day or hammer it.
ROLLING_DAY_PROBE = 3600.0

TRANSPORT_HINT_NAME = "NAME"  # replaced by the transport's credential name where it is known


@dataclass(frozen=True, slots=True)
class ReplyClass:
    """What one kind of provider reply means; see the module docstring."""

    name: str
    retry: RetryWhen
    fail_over: bool  # the message goes to the next transport of its chain at once
    sender_only: bool = False  # permanent for this sender; the transport stays healthy
    minutes: int = 0  # for RetryWhen.AFTER_MINUTES
    hint: str = ""

    @property
    def closes_transport(self) -> bool:
        """Whether every message should stop using the transport for a while.

        A quota or a throttle is a fact about the account, so the transport
        is closed; a rate limit whose class does not fail over waits on the
        message alone (the next message may well pass), and a refusal of one
        sender never closes the transport.
        """
        return self.retry is not RetryWhen.NOW and self.fail_over and not self.sender_only

    def wait(self) -> float:
        """Seconds until the transport (or the message) is worth trying again."""
        if self.retry is RetryWhen.DAILY_RESET:
            return ROLLING_DAY_PROBE
        if self.retry is RetryWhen.AFTER_MINUTES:
            return self.minutes * 60.0
        return 0.0

    def hint_for(self, name: str) -> str:
        """The hint with the name the operator types: the transport's credential, else the transport."""
        return self.hint.replace(TRANSPORT_HINT_NAME, name)


# --- the classes -------------------------------------------------------------------

DAILY_QUOTA = ReplyClass(
    "daily sending quota reached", RetryWhen.DAILY_RESET, fail_over=True,
    hint=(
        "the provider's daily sending quota is used up; mail goes to the next transport of "
        "the chain or waits, and this transport is tried again as the provider's 24-hour "
        "window moves on"
    ),
)
HOURLY_QUOTA = ReplyClass(
    "hourly sending limit reached", RetryWhen.AFTER_MINUTES, fail_over=True, minutes=60,
    hint="the provider's hourly sending limit is reached; this transport is tried again in an hour",
)
SEND_RATE = ReplyClass(
    "sending rate exceeded", RetryWhen.AFTER_MINUTES, fail_over=False, minutes=2,
    hint=(
        "the provider throttles the sending rate; the message is tried again on the same "
        "transport in a few minutes (set a rate limit on the transport to stay under it)"
    ),
)
TEMPORARILY_REFUSED = ReplyClass(
    "temporarily refusing mail", RetryWhen.AFTER_MINUTES, fail_over=True, minutes=15,
    hint=(
        "the provider asks to try again later (load or reputation throttling); mail goes to "
        "the next transport and this one is tried again in 15 minutes"
    ),
)
SERVER_BUSY = ReplyClass(
    "server busy", RetryWhen.AFTER_MINUTES, fail_over=True, minutes=5,
    hint="Microsoft 365 is throttling this server; this transport is tried again in 5 minutes",
)
IP_BLOCKED = ReplyClass(
    "traffic from this IP refused", RetryWhen.AFTER_MINUTES, fail_over=True, minutes=60,
    hint=(
        "Microsoft 365 refuses mail from this server's IP address (a new or low-reputation "
        "tenant); mail goes to the next transport; ask Microsoft support to delist the address"
    ),
)
LOGIN_THROTTLED = ReplyClass(
    "login attempts throttled", RetryWhen.AFTER_MINUTES, fail_over=True, minutes=30,
    hint=(
        "the provider is throttling logins after repeated failures; "
        "back off for 15-30 minutes and check the password before trying again"
    ),
)
BASIC_AUTH_DISABLED = ReplyClass(
    "basic authentication disabled", RetryWhen.NOW, fail_over=True,
    hint=(
        f"switch this transport to XOAUTH2: relayctl oauth authorize {TRANSPORT_HINT_NAME} "
        "(Microsoft 365 refuses password logins; OAuth2 is the way forward, or enable "
        "Authenticated SMTP for the mailbox while Microsoft still allows it)"
    ),
)
BAD_CREDENTIALS_SES = ReplyClass(
    "credentials refused", RetryWhen.NOW, fail_over=True,
    hint=(
        "SES refused the SMTP credentials: check the region in the host name and use "
        "the SMTP user name and password from the SES console, not the IAM access keys"
    ),
)
AUTH_REQUIRED_SENDGRID = ReplyClass(
    "not authenticated", RetryWhen.NOW, fail_over=True,
    hint="SendGrid expects the user name 'apikey' and an API key as the password",
)
SENDER_NOT_ALLOWED = ReplyClass(
    "sender not allowed on this account", RetryWhen.NOW, fail_over=True, sender_only=True,
    hint=(
        "this account may not send as this sender: grant Send As on the mailbox (Microsoft "
        "365) or verify the address or domain with the provider; other senders are unaffected"
    ),
)
SENDER_NOT_VERIFIED_SES = ReplyClass(
    "sender not verified", RetryWhen.NOW, fail_over=True, sender_only=True,
    hint=(
        "verify the sender address or its whole domain in the SES console "
        "(in the SES sandbox, recipients must be verified too)"
    ),
)


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """One row: a reply pattern seen at `provider` (None: at several), its class, a real example."""

    provider: str | None
    pattern: re.Pattern[str]
    klass: ReplyClass
    example: str
    # True: the text is too generic to trust at a transport whose provider is
    # unknown (a "421 4.7.0 try again later" from any server is ordinary).
    strict: bool = False


def _row(provider: str | None, regex: str, klass: ReplyClass, example: str, *, strict: bool = False) -> ProviderReply:
    return ProviderReply(provider, re.compile(regex, re.IGNORECASE), klass, example, strict)


# Matched, in order, against "CODE TEXT" (the text starts with the enhanced
# status code when the upstream sends one). The first row that matches wins.
REPLY_TABLE: tuple[ProviderReply, ...] = (
    # Gmail and Google Workspace
    _row("gmail", r"^550 5\.4\.5\b|daily user sending (limit|quota) exceeded", DAILY_QUOTA,
         "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending "
         "limits go to https://support.google.com/a/answer/166852 - gsmtp"),
    _row("gmail", r"too many login attempts", LOGIN_THROTTLED,
         "454 4.7.0 Too many login attempts, please try again later. - gsmtp"),
    _row("gmail", r"^421 4\.7\.0 .*try again later", TEMPORARILY_REFUSED,
         "421 4.7.0 Try again later, closing connection. (EHLO) - gsmtp", strict=True),
    # Microsoft 365
    _row("office365", r"\b5\.7\.139\b|basic authentication is disabled", BASIC_AUTH_DISABLED,
         "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."),
    _row("office365", r"\b5\.7\.30\b|basic authentication is not supported", BASIC_AUTH_DISABLED,
         "550 5.7.30 Basic authentication is not supported for Client Submission."),
    _row("office365", r"sendasdenied", SENDER_NOT_ALLOWED,
         "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
         "Failed to process message due to a permanent exception with message Cannot submit message."),
    _row("office365", r"\b5\.7\.60\b|permissions to send as this sender", SENDER_NOT_ALLOWED,
         "550 5.7.60 SMTP; Client does not have permissions to send as this sender"),
    _row("office365", r"\b4\.7\.5\d\d\b.*server busy|^451 4\.7\.500\b", SERVER_BUSY,
         "451 4.7.500 Server busy. Please try again later from [203.0.113.7]. (S77719)"),
    _row("office365", r"\b5\.7\.708\b", IP_BLOCKED,
         "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP."),
    # Amazon SES
    _row("ses", r"daily message quota exceeded", DAILY_QUOTA,
         "454 Throttling failure: Daily message quota exceeded."),
    _row("ses", r"maximum sending rate exceeded", SEND_RATE,
         "454 Throttling failure: Maximum sending rate exceeded."),
    _row("ses", r"email address is not verified|identities failed the check", SENDER_NOT_VERIFIED_SES,
         "554 Message rejected: Email address is not verified. The following identities failed "
         "the check in region US-EAST-1: app@example.com"),
    _row("ses", r"^535 authentication credentials invalid", BAD_CREDENTIALS_SES,
         "535 Authentication Credentials Invalid"),
    # SendGrid
    _row("sendgrid", r"unauthenticated senders not allowed", AUTH_REQUIRED_SENDGRID,
         "550 Unauthenticated senders not allowed"),
    _row("sendgrid", r"does not match a verified sender identity", SENDER_NOT_ALLOWED,
         "550 The from address does not match a verified Sender Identity. Mail cannot be sent "
         "until this error is resolved."),
    _row("sendgrid", r"maximum credits exceeded", DAILY_QUOTA,
         "451 Authentication failed: Maximum credits exceeded"),
    _row("sendgrid", r"\brate[- ]limited\b", SEND_RATE,
         "451 4.7.1 Your message has been rate limited. Please try again later."),
    # Mailgun
    _row("mailgun", r"(hourly|daily) (message |sending )?limit", HOURLY_QUOTA,
         "421 Domain mg.example.com has exceeded its hourly message limit"),
    _row("mailgun", r"\brate[- ]limit", SEND_RATE,
         "421 4.7.0 mg.example.com: rate limit exceeded, try again later"),
    # Seen at several providers
    _row(None, r"\b(sending|daily|monthly) (message )?quota (exceeded|reached)|quota exceeded", DAILY_QUOTA,
         "550 5.7.1 Daily sending quota exceeded"),
    _row(None, r"is not allowed to send|sender address rejected: not owned", SENDER_NOT_ALLOWED,
         "553 5.7.1 <app@example.com>: Sender address rejected: not owned by user relay@example.net"),
    _row(None, r"too many (login|auth\w*) attempts", LOGIN_THROTTLED,
         "421 4.7.0 Too many authentication attempts"),
    _row(None, r"\brate[- ]limit|too many (messages|emails|requests)", SEND_RATE,
         "450 4.7.1 Rate limit exceeded, try later"),
)

# A full mailbox is the recipient's state, never the sending account's.
_MAILBOX_FULL = re.compile(r"\b5\.2\.2\b|\b4\.2\.2\b|\bover quota\b|mailbox (is )?full", re.IGNORECASE)


def family(provider: str | None) -> str | None:
    """Presets that share one provider's replies (Workspace is Gmail)."""
    if provider == "google_workspace":
        return "gmail"
    return provider


def provider_of(preset: str | None, host: str = "") -> str | None:
    """Which provider's replies a transport gets: its preset, else its host name; None: unknown."""
    if preset:
        return family(preset)
    return provider_for_host(host)


def classify_reply(provider: str | None, reply: SmtpReply | None) -> ReplyClass | None:
    """The class of `reply` at `provider`, or None for an ordinary reply.

    A provider's row applies to that provider, and to a transport whose
    provider is unknown unless the row is `strict`. Only failures (4xx,
    5xx) are classified, and a full mailbox never is.
    """
    if reply is None or not (reply.is_temporary or reply.is_permanent):
        return None
    if _MAILBOX_FULL.search(reply.text):
        return None
    text = f"{reply.code} {reply.text}"
    known = family(provider)
    for row in REPLY_TABLE:
        if row.provider is not None and known is not None and row.provider != known:
            continue
        if row.strict and known is None:
            continue
        if row.pattern.search(text):
            return row.klass
    return None
