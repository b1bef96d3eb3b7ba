"""Delivery status notifications (bounces), RFC 3464, in Exim's words.

Takes: the original `Envelope`, the original message bytes, and the
`DeliveryReport` of every recipient that failed for good.
Emits: one complete RFC 5322 message (CRLF line endings) of type
multipart/report; report-type=delivery-status with three parts: a friendly
text/plain explanation, a message/delivery-status block, and the original
header block as text/rfc822-headers. The original body is never included.
Untrusted input: the original headers (any bytes, possibly 8-bit), the sender
and recipient addresses, and upstream reply texts. They are kept on their own
lines, stripped of control characters where they land in a header, and never
allowed to end a MIME part early.
Fails: never on odd input; only on programming errors (no failed reports).

Whether a bounce is sent at all (null sender, a bounce of a bounce) is the
caller's decision. Nothing from the configuration appears in a bounce beyond
the upstream host that answered: no rule or transport names, no credentials.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Sequence

from relayd.values import DeliveryReport, Envelope, SmtpReply

CRLF = b"\r\n"

# RFC 3462 does not bound the headers part, but a bounce that carries megabytes
# of headers back to a sender helps no one; Exim caps returned text similarly.
MAX_RETURNED_HEADERS = 64 * 1024

# RFC 5322 2.1.1 allows 998 octets per line; leave room for the field name.
MAX_FIELD_TEXT = 900

SUBJECT = "Mail delivery failed: returning message to sender"
EXPIRED_TEXT = "retry timeout exceeded"
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_MESSAGE_ID_TOKEN = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """What the bounce says about one recipient; pure data for tests and callers."""

    address: str
    status: str
    expired: bool
    remote_mta: str
    diagnostic: str
    explanation: tuple[str, ...]


def build_dsn(
    *,
    original: Envelope,
    original_body: bytes,
    failed: Sequence[DeliveryReport],
    reporting_mta: str,
    now: float,
    message_id_domain: str,
) -> bytes:
    """Build the bounce for `original`, reporting every report in `failed`.

    `now` stamps Date, Last-Attempt-Date and the new Message-ID; the caller
    decides whether the message should be bounced at all.
    """
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    mta = _header_safe(reporting_mta)
    recipients = [describe_failure(r) for r in failed]
    returned = original_headers(original_body)
    parts = [
        _text_part(recipients),
        _status_part(original, recipients, mta, now),
        _headers_part(returned),
    ]
    boundary = _boundary(original.id, parts)
    head = _top_headers(original, returned, recipients, mta, now, message_id_domain, boundary)
    if not all(p.isascii() for p in parts):
        head += b"Content-Transfer-Encoding: 8bit" + CRLF
    body = b"This is a MIME-formatted message delivery status report." + CRLF
    for part in parts:
        body += CRLF + b"--" + boundary.encode("ascii") + CRLF + part
    body += CRLF + b"--" + boundary.encode("ascii") + b"--" + CRLF
    return head + CRLF + body


def is_auto_submitted(headers: bytes) -> bool:
    """True when the header block carries Auto-Submitted with any value but "no".

    RFC 3834 section 5: such messages must not be answered automatically, so
    callers use this to avoid bouncing auto-replies in a loop.
    """
    return auto_submitted_keyword(headers) is not None


def auto_submitted_keyword(message: bytes) -> str | None:
    """The Auto-Submitted keyword ("auto-replied", ...) of a message; None if absent or "no".

    Only the header block is looked at (up to the first empty line), so a
    25 MB body costs a search, not a copy.
    """
    end = message.find(b"\r\n\r\n")
    block = _BLANK_LINE.split(message if end < 0 else message[: end + 2], maxsplit=1)[0]
    for name, value in _fields(block):
        if name.lower() == b"auto-submitted":
            keyword = _without_comments(value).split(b";", 1)[0].strip().lower()
            if keyword == b"no":
                return None
            return _printable(keyword.decode("ascii", "replace"))[:64] or "yes"
    return None


def _without_comments(value: bytes) -> bytes:
    """A header value with its RFC 5322 comments removed: `No (typed by hand)` reads as `no`.

    Nested parentheses and quoted pairs are followed; an unclosed comment
    swallows the rest of the value.
    """
    kept = bytearray()
    depth = 0
    escaped = False
    for byte in value:
        if escaped:
            escaped = False
        elif depth and byte == 0x5C:  # backslash: quoted pair inside a comment
            escaped = True
        elif byte == 0x28:  # (
            depth += 1
        elif byte == 0x29 and depth:  # )
            depth -= 1
        elif not depth:
            kept.append(byte)
    return bytes(kept)


def describe_failure(report: DeliveryReport) -> FailedRecipient:
    """Decide Status, Remote-MTA, Diagnostic-Code and the friendly text for one report.

    A failure with no reply, or with only a temporary (4xx) reply, can only
    have come from running out of retries, so it reads as "delivery time
    expired" (4.4.7). A permanent failure decided locally should therefore
    carry a synthetic 5xx `SmtpReply`.
    """
    reply = report.reply
    expired = reply is None or reply.is_temporary
    status = _status(reply, expired)
    diagnostic = _field_text(f"{reply.code} {reply.text}") if reply is not None else ""
    return FailedRecipient(
        address=report.address,
        status=status,
        expired=expired,
        remote_mta=_header_safe(report.host or report.ip),
        diagnostic=diagnostic,
        explanation=_explanation(report, expired),
    )


def original_headers(message: bytes) -> bytes:
    """The original's header block with CRLF line endings, capped at 64 KiB.

    The cap cuts at a line boundary so a field is never split mid-line.
    """
    block = _BLANK_LINE.split(message, maxsplit=1)[0]
    out = bytearray()
    for line in _LINE_BREAK.split(block):
        if len(out) + len(line) + 2 > MAX_RETURNED_HEADERS:
            break
        out += line + CRLF
    return bytes(out)


def _status(reply: SmtpReply | None, expired: bool) -> str:
    if expired:
        return EXPIRED_STATUS
    assert reply is not None
    found = _ENHANCED.match(reply.text.lstrip())
    # RFC 3463: the enhanced code's class must agree with the reply code's.
    if found is not None and found.group(1) == str(reply.code)[:1]:
        return ".".join(found.groups())
    return "5.0.0"


def _explanation(report: DeliveryReport, expired: bool) -> tuple[str, ...]:
    """Exim's indented lines under the address: host, reason, timeout note."""
    lines: list[str] = []
    if report.host and report.ip:
        lines.append(f"host {report.host} [{report.ip}]")
    elif report.host or report.ip:
        lines.append(f"host {report.host}" if report.host else f"host [{report.ip}]")
    reason = report.reason
    if not reason and report.reply is not None:
        reason = f"SMTP error from remote mail server: {report.reply}"
    for raw in reason.splitlines():
        text = _printable(raw).strip()
        if text:
            lines.append(text[:MAX_FIELD_TEXT])
    if expired and not any(EXPIRED_TEXT in ln for ln in lines):
        lines.append(EXPIRED_TEXT)
    return tuple(lines)


def _text_part(recipients: Sequence[FailedRecipient]) -> bytes:
    lines = [
        "This message was created automatically by mail delivery software.",
        "",
        "A message that you sent could not be delivered to one or more of its",
        "recipients. This is a permanent error. The following address(es) failed:",
        "",
    ]
    for r in recipients:
        lines.append("  " + _printable(r.address))
        lines.extend("    " + ln for ln in r.explanation)
    lines.append("")
    text = "\r\n".join(lines).encode("utf-8", "replace")
    cte = "7bit" if text.isascii() else "8bit"
    head = f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n"
    return head.encode("ascii") + CRLF + text


def _status_part(
    original: Envelope, recipients: Sequence[FailedRecipient], mta: str, now: float
) -> bytes:
    per_message = [
        f"Reporting-MTA: dns; {_xtext(mta)}",
        f"X-Relayd-Queue-ID: {_xtext(_header_safe(original.id))}",
        f"Arrival-Date: {_date(original.received_at)}",
    ]
    blocks = ["\r\n".join(per_message)]
    for r in recipients:
        fields = [_final_recipient(r.address), "Action: failed", f"Status: {r.status}"]
        if r.remote_mta:
            fields.append(f"Remote-MTA: dns; {_xtext(r.remote_mta)}")
        if r.diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {_xtext(r.diagnostic)}")
        fields.append(f"Last-Attempt-Date: {_date(now)}")
        blocks.append("\r\n".join(fields))
    body = "\r\n\r\n".join(blocks) + "\r\n"
    head = "Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: 7bit\r\n"
    return head.encode("ascii") + CRLF + body.encode("ascii")


def _headers_part(returned: bytes) -> bytes:
    if returned.isascii():
        head = "Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n"
    else:  # RFC 6532 headers are UTF-8; say so, so readers decode them as such
        head = (
            "Content-Type: text/rfc822-headers; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
        )
    return head.encode("ascii") + CRLF + returned


def _top_headers(
    original: Envelope,
    returned: bytes,
    recipients: Sequence[FailedRecipient],
    mta: str,
    now: float,
    domain: str,
    boundary: str,
) -> bytes:
    failed_list = ", ".join(_header_safe(r.address) for r in recipients)
    fields = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{_header_safe(original.sender)}>",
        f"Subject: {SUBJECT}",
        f"Date: {_date(now)}",
        f"Message-ID: <{secrets.token_hex(12)}.{int(now)}@{_header_safe(domain)}>",
        "Auto-Submitted: auto-replied",
        f"X-Failed-Recipients: {failed_list[:MAX_FIELD_TEXT]}",
    ]
    parent = _original_message_id(returned) or _message_id_token(original.header_message_id)
    if parent:
        fields += [f"In-Reply-To: {parent}", f"References: {parent}"]
    fields += [
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    return ("\r\n".join(fields) + "\r\n").encode("utf-8", "replace")


def _boundary(queue_id: str, parts: Sequence[bytes]) -> str:
    """A boundary that occurs in none of the parts (tried a bounded number of times)."""
    safe_id = re.sub(r"[^A-Za-z0-9-]", "", queue_id)[:40]
    for _ in range(8):
        candidate = f"=_{safe_id}_{secrets.token_hex(12)}"
        marker = candidate.encode("ascii")
        if not any(marker in p for p in parts):
            return candidate
    raise RuntimeError("could not find a MIME boundary absent from the bounce parts")


def _fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """Unfolded (name, value) pairs of a header block."""
    out: list[tuple[bytes, bytes]] = []
    for line in _LINE_BREAK.split(block):
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + b" " + line.strip())
        elif b":" in line:
            name, _, value = line.partition(b":")
            out.append((name.strip(), value.strip()))
    return out


def _original_message_id(returned: bytes) -> str:
    for name, value in _fields(returned):
        if name.lower() == b"message-id":
            return _message_id_token(value.decode("ascii", "replace"))
    return ""


def _message_id_token(text: str) -> str:
    """The first well-formed <id@host> in `text`, or "" (never raw header text)."""
    found = _MESSAGE_ID_TOKEN.search(text)
    if found is not None:
        return found.group(0)
    bare = text.strip()
    if bare and _MESSAGE_ID_TOKEN.fullmatch(f"<{bare}>"):
        return f"<{bare}>"
    return ""


def _final_recipient(address: str) -> str:
    if address.isascii():
        return f"Final-Recipient: rfc822; {_header_safe(address)}"
    return f"Final-Recipient: utf-8; {_xtext(_header_safe(address))}"


def _xtext(text: str) -> str:
    """Keep the delivery-status part 7-bit: non-ASCII as RFC 6533 \\x{HEX} escapes."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _field_text(text: str) -> str:
    """One line of header-safe text: line breaks folded to spaces, controls dropped."""
    return _header_safe(" ".join(text.split()))[:MAX_FIELD_TEXT]


def _header_safe(text: str) -> str:
    return _CONTROL.sub(" ", _printable(text)).strip()[:MAX_FIELD_TEXT]


def _printable(text: str) -> str:
    """Drop lone surrogates (undecodable bytes) and tabs/controls inside a line."""
    cleaned = text.encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub(" ", cleaned.replace("\r", "").replace("\n", " "))


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))
