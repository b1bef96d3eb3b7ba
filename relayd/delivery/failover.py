"""The failover policy: what one upstream answer means for one recipient.

Takes: the stage of the SMTP conversation where an attempt stopped, the reply
the upstream gave there (or None when there was no reply at all), and the
transport's provider preset name. Emits: an `AttemptOutcome`, and for the
operator a one-sentence hint about well-known provider errors.
Untrusted input: the reply text, written by the upstream; it is only matched
against fixed patterns, never interpreted further. Pure: no I/O, never raises.

The policy, in prose
--------------------
An attempt that stops before the message body has been sent has delivered
nothing, so trying the next transport in the chain is always safe. Once the
body has been sent, sending it again elsewhere risks a duplicate, so only the
upstream's own final answer decides.

* No reply at all (connection refused, timeout, host name lookup failure, TLS
  handshake or certificate failure, STARTTLS missing when it is required,
  connection lost) before the end of the data means this transport is unusable
  now: try the next transport.
* The connection lost, or a timeout, after the whole body was sent but before
  the final reply means the upstream may or may not have taken the message.
  Defer and retry later on the same chain (at-least-once); never hand it to
  another provider right away.
* 421 anywhere before the end of the data (the upstream is closing), any
  failure at the greeting, EHLO, STARTTLS or AUTH, and any refusal of MAIL FROM
  mean the transport cannot take mail now: try the next transport. A 5xx on
  MAIL FROM is usually a refusal by this provider only (an unverified sender on
  SES, a sender the account does not own); the caller fails the recipient only
  if every transport in the chain refused permanently.
* RCPT TO refusals belong to that recipient: 5xx fails it, 4xx defers it.
* A 4xx to DATA or after the data defers; a 5xx there fails.
* Quota and rate answers are facts about the provider, not about the message,
  whatever their first digit (Gmail answers 550 5.4.5 when the daily limit is
  used up, SES 454 when throttling). Which reply is which, per provider, is
  the table in `relayd.delivery.providerreplies`. They send the message to the
  next transport at any stage: a 4xx or 5xx reply, even to the data, means the
  upstream did not take the message, so another provider cannot cause a
  duplicate. A rate limit whose class says not to fail over (SES's maximum
  sending rate: the next second may pass) defers instead, and the delivery
  walk retries it on the same transport after the class's minutes.
* A provider's refusal of the sender identity (SES "Email address is not
  verified", Microsoft 365 SendAsDenied) is provider-specific at any stage:
  try the next transport; when every transport refused it, the recipient
  fails (the walk decides). A 5xx after the data means the upstream did not
  take the message, so another provider cannot cause a duplicate.
* A mailbox that is over quota (5.2.2) is the recipient's state, not the
  provider's: it follows the ordinary rules.
* Writing to a local Maildir (the capture transport) that fails defers.
"""

from __future__ import annotations

import re

from relayd.delivery.providerreplies import RetryWhen, classify_reply, family
from relayd.values import AttemptOutcome, SmtpReply, Stage

# Stages at or after which the body has left relayd (or, for WRITE, the message
# has been committed locally); the upstream may already hold the message.
_BODY_SENT = frozenset({Stage.AFTER_DATA, Stage.WRITE})


def is_quota_reply(reply: SmtpReply | None, provider: str | None = None) -> bool:
    """True when the reply says the provider's quota, rate or login limit is reached.

    The provider table (`relayd.delivery.providerreplies`) decides: a
    provider's row applies to that provider, and to any transport whose
    provider is unknown (None). A full mailbox is never a quota reply.
    """
    klass = classify_reply(provider, reply)
    return klass is not None and klass.retry is not RetryWhen.NOW and not klass.sender_only


def is_sender_identity_refusal(reply: SmtpReply | None, provider: str | None = None) -> bool:
    """True when the provider refuses this sender identity (not the recipient)."""
    if reply is None or not reply.is_permanent:
        return False
    klass = classify_reply(provider, reply)
    return klass is not None and klass.sender_only


def classify(stage: Stage, reply: SmtpReply | None, *, provider: str | None = None) -> AttemptOutcome:
    """The outcome for a recipient whose attempt stopped at `stage` with `reply`.

    `reply` is None when the upstream gave no answer (see the module docstring).
    A positive reply at AFTER_DATA or WRITE means DELIVERED. A reply that is
    neither 4xx nor 5xx where a failure was reported (a malformed reply, an
    unexpected code) is a confused upstream: next transport before the data,
    defer after it.
    """
    body_sent = stage in _BODY_SENT
    if reply is None:
        return AttemptOutcome.DEFER if body_sent else AttemptOutcome.NEXT_TRANSPORT
    if is_sender_identity_refusal(reply, provider):
        return AttemptOutcome.NEXT_TRANSPORT
    if is_quota_reply(reply, provider):
        # A 4xx or 5xx, even after the data, means the upstream did not take
        # the message: handing it on cannot make a duplicate.
        klass = classify_reply(provider, reply)
        if klass is not None and not klass.fail_over:
            return AttemptOutcome.DEFER
        return AttemptOutcome.NEXT_TRANSPORT
    if body_sent:
        return _after_data(reply)
    if reply.code == 421 or stage not in (Stage.RCPT, Stage.DATA):
        return AttemptOutcome.NEXT_TRANSPORT
    if reply.is_permanent:
        return AttemptOutcome.FAIL
    if reply.is_temporary:
        return AttemptOutcome.DEFER
    return AttemptOutcome.NEXT_TRANSPORT


def _after_data(reply: SmtpReply) -> AttemptOutcome:
    if 200 <= reply.code < 300:
        return AttemptOutcome.DELIVERED
    if reply.is_permanent:
        return AttemptOutcome.FAIL
    return AttemptOutcome.DEFER


# --- hints for operators -----------------------------------------------------

_BLOCKED_PORTS = frozenset({25, 465, 587})
_PORT_IN_DETAIL = re.compile(r"\bport (\d{1,5})\b")
_NO_ANSWER = re.compile(r"refused|timed out|timeout|unreachable", re.IGNORECASE)


def hint_for(
    provider: str | None, stage: Stage, reply: SmtpReply | None, detail: str
) -> str | None:
    """One sentence telling the operator what usually fixes a well-known failure.

    `detail` is the transport's own description of a failure without a reply;
    a connect failure's detail names the port as "port N".
    """
    known = family(provider)
    text = f"{reply.code} {reply.text}" if reply is not None else ""
    for rule in _HINT_RULES:
        hint = rule(known, stage, reply, text, detail)
        if hint is not None:
            return hint
    return None


def _hint_provider_reply(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    """The provider table's hint for a well-known reply (quota, disabled basic auth, ...)."""
    klass = classify_reply(family, reply)
    return klass.hint if klass is not None and klass.hint else None


def _hint_login_throttled(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if re.search(r"too many (login|auth\w*) attempts", text + " " + detail, re.IGNORECASE):
        return (
            "the provider is throttling logins after repeated failures; "
            "back off for 15-30 minutes and check the password before trying again"
        )
    return None


def _hint_auth(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if reply is None or stage is not Stage.AUTH:
        return None
    if re.search(r"5\.7\.139|SmtpClientAuthentication is disabled", text, re.IGNORECASE):
        return (
            "SMTP AUTH is disabled for this Microsoft 365 mailbox or tenant; "
            "enable Authenticated SMTP for it in the admin centre, or use OAuth2 (XOAUTH2)"
        )
    if reply.code != 535:
        return None
    if family == "gmail" or (family is None and "google.com" in text):
        return (
            "Gmail needs 2-step verification and a 16-letter app password "
            "(Google account > Security > App passwords); the normal password is refused"
        )
    if family == "ses":
        return (
            "SES refused the SMTP credentials: check the region in the host name and use "
            "the SMTP user name and password from the SES console, not the IAM access keys"
        )
    if family == "office365":
        return (
            "Microsoft 365 refused the login: check the password, and that SMTP AUTH "
            "is enabled for the mailbox (or use OAuth2)"
        )
    if family == "sendgrid":
        return "SendGrid expects the user name 'apikey' and an API key as the password"
    return "the upstream refused the user name or password stored in the credential"


def _hint_sender(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if reply is not None and re.search(r"not verified|identities failed", text, re.IGNORECASE):
        return (
            "verify the sender address or its whole domain in the SES console "
            "(in the SES sandbox, recipients must be verified too)"
        )
    return None


def _hint_quota(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if reply is not None and is_quota_reply(reply, family):
        return (
            "the provider's sending quota or rate limit is reached; mail goes to the next "
            "transport in the chain, and the limit resets on the provider's schedule"
        )
    return None


def _hint_certificate(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if re.search(r"certificate verify failed|certificate verification failed|hostname mismatch|"
                 r"doesn't match|does not match", detail, re.IGNORECASE):
        return (
            "the upstream's certificate did not verify: check that the transport's host is "
            "the name on the certificate, or name the CA that signed it in ca_file"
        )
    return None


def _hint_starttls(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if stage is Stage.STARTTLS and reply is None and "does not offer STARTTLS" in detail:
        return (
            "this port does not offer STARTTLS; use tls: implicit with port 465, "
            "or check the host and port"
        )
    return None


def _hint_connect(
    family: str | None, stage: Stage, reply: SmtpReply | None, text: str, detail: str
) -> str | None:
    if stage is not Stage.CONNECT or reply is not None or not _NO_ANSWER.search(detail):
        return None
    port_match = _PORT_IN_DETAIL.search(detail)
    if port_match is not None and int(port_match.group(1)) in _BLOCKED_PORTS:
        return (
            "the hosting provider may block this port; try port 2525 (SendGrid, Mailgun) "
            "or 2587 (SES) as the next transport, or ask the host to open it"
        )
    return "check the host name, the port and any firewall between relayd and the upstream"


_HINT_RULES = (
    _hint_provider_reply,
    _hint_login_throttled,
    _hint_auth,
    _hint_sender,
    _hint_quota,
    _hint_certificate,
    _hint_starttls,
    _hint_connect,
)
