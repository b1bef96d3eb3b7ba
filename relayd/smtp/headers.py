"""The message header section: bounded reading for policy, and the trace fields relayd adds.

Takes: the header block of a checked message (CRLF line ends, up to but not
including the empty line), already bounded in size by the listener.
Emits: `HeaderFacts` (From: addresses, Message-ID, Date present, Received:
count) or the reply refusing the block; and the Received:, Date: and
Message-ID: fields to add (RFC 5321 4.4, RFC 5322 3.6).
Untrusted input: the whole block comes from the SMTP client. Nothing does I/O.

Why not `email.parser`: its compat32 policy ignores the obsolete field forms
`From :` and `From<TAB>:` (RFC 5322 4.5, white space before the colon), which
receiving MTAs still honour, so a tenant could put a foreign author past the
check; and it parses a body with no empty line as one giant header. Here a
field is every line that does not start with white space, named by what
precedes its colon with trailing white space removed; continuation lines are
unfolded onto it. Lines without a colon are skipped (and still counted).
Work is linear in the block, whose size the listener bounds; the number of
fields and of From: addresses are bounded here.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from datetime import datetime, timezone

MAX_HEADER_FIELDS = 1000  # real mail has tens; a DKIM-signed newsletter well under 200
MAX_FROM_ADDRESSES = 50  # RFC 5322 allows a list of authors; nobody needs more
MAX_COMMENT_DEPTH = 8  # nested (comments) in From:; real mail has one level at most
MAX_FROM_BYTES = 16 * 1024  # all From: values together; a real one is well under 1K
# Quoted strings and quoted pairs are skipped whole: their parentheses are not comments.
_COMMENT_MARKS = re.compile(r'"(?:[^"\\]|\\.)*"|\\.|[()]', re.DOTALL)


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    """What the policy, the trace fields and the log need from the header block."""

    from_addresses: tuple[str, ...]
    message_id: str
    has_date: bool = False
    has_message_id: bool = False
    received_count: int = 0
    refusal: str | None = None  # the block itself breaks a bound


_WSP = b" \t"
_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # printable ASCII but the colon (RFC 5322 3.6.8)


def header_fields(block: bytes) -> list[tuple[str, bytes]] | None:
    """(lower-case name, unfolded raw value) per field; None past MAX_HEADER_FIELDS."""
    fields: list[tuple[str, bytearray]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].extend(line)
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(_WSP)
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            continue
        if len(fields) >= MAX_HEADER_FIELDS:
            return None
        fields.append((name.decode("ascii").lower(), bytearray(value)))
    return [(name, bytes(value)) for name, value in fields]


def read_header_facts(block: bytes) -> HeaderFacts:
    """From: addresses, Message-ID, Date present, Received: count; or the refusal."""
    fields = header_fields(block)
    if fields is None:
        return HeaderFacts((), "", refusal=(
            f"552 5.3.4 Message header has more than {MAX_HEADER_FIELDS} fields; "
            "this looks like a header without the empty line before the body"))
    raw_from = [value for name, value in fields if name == "from"]
    if sum(map(len, raw_from)) > MAX_FROM_BYTES:
        return HeaderFacts((), "", refusal=f"554 5.6.0 Header From: is longer than {MAX_FROM_BYTES} bytes")
    addresses = from_addresses([value.decode("utf-8", "replace") for value in raw_from])
    if addresses is None:
        return HeaderFacts((), "", refusal=(
            "554 5.6.0 Header From: cannot be parsed (unbalanced or deeply nested comments)"))
    if len(addresses) > MAX_FROM_ADDRESSES:
        return HeaderFacts((), "", refusal=(
            f"554 5.6.0 Header From: lists more than {MAX_FROM_ADDRESSES} addresses"))
    names = [name for name, _ in fields]
    message_id = next((v for n, v in fields if n == "message-id"), b"")
    return HeaderFacts(
        from_addresses=addresses,
        message_id=message_id.decode("utf-8", "replace").strip(),
        has_date="date" in names,
        has_message_id="message-id" in names,
        received_count=names.count("received"),
    )


def from_addresses(values: list[str]) -> tuple[str, ...] | None:
    """The addresses in From: values; None when they cannot be parsed safely.

    email.utils.getaddresses recurses once per nested comment: a value of
    thousands of "(" raises RecursionError. Deeper nesting than any real
    header uses is refused before parsing.
    """
    for value in values:
        depth = 0
        for m in _COMMENT_MARKS.finditer(value):
            mark = m.group()
            if mark == "(":
                depth += 1
                if depth > MAX_COMMENT_DEPTH:
                    return None
            elif mark == ")":
                depth = max(0, depth - 1)
    try:
        return tuple(addr for _, addr in email.utils.getaddresses(values) if addr)
    except (RecursionError, ValueError, IndexError):
        return None


def too_many_hops(facts: HeaderFacts, limit: int) -> str | None:
    """Refusal when the message has passed more relays than `limit` (a mail loop)."""
    if facts.received_count <= limit:
        return None
    return (f"554 5.4.6 Too many Received: headers ({facts.received_count}, "
            f"more than {limit}): routing loop suspected")


# -- trace fields --------------------------------------------------------------

_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?[0-9A-Fa-f:.]{2,45}\]\Z")
_COMMENT_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")  # ctext minus nothing risky


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """What one Received: field says about one submission."""

    helo: str
    client_ip: str
    hostname: str
    protocol: str  # Exim's P= value: esmtp, esmtpa, esmtps, esmtpsa, smtp
    queue_id: str
    recipients: tuple[str, ...]
    received_at: float
    tls: str = ""


def rfc5322_date(at: float) -> str:
    """A Date: value, in UTC, e.g. `Tue, 01 Dec 2026 15:19:11 +0000`."""
    return email.utils.format_datetime(datetime.fromtimestamp(at, tz=timezone.utc))


def with_keyword(protocol: str) -> str:
    """The RFC 3848 `with` keyword: ESMTP, ESMTPA, ESMTPS, ESMTPSA (SMTP after HELO)."""
    upper = protocol.upper()
    return upper if upper.startswith("ESMTP") else "SMTP"


def received_field(info: TraceInfo) -> bytes:
    """The Received: field relayd prepends (RFC 5321 4.4), folded, CRLF-terminated.

    The EHLO name is the client's word: it is used as the From-domain only
    when it is a domain or an address literal, otherwise the address literal
    stands there and the name is shown, sanitised, in a comment.
    """
    ip = f"[{info.client_ip}]" if info.client_ip else "[unknown]"
    if _DOMAIN.match(info.helo) or _ADDRESS_LITERAL.match(info.helo):
        origin = f"from {info.helo} ({ip})"
    else:
        origin = f"from {ip} (helo={_COMMENT_UNSAFE.sub('?', info.helo)[:255]})"
    by = f"by {info.hostname} (relayd) with {with_keyword(info.protocol)}"
    if info.tls:
        by += f" ({_COMMENT_UNSAFE.sub('?', info.tls)})"
    lines = [f"Received: {origin}", f"\t{by}", f"\tid {info.queue_id}"]
    if len(info.recipients) == 1:  # RFC 5321 4.4: never disclose a list of recipients
        lines.append(f"\tfor <{info.recipients[0]}>")
    lines[-1] += ";"
    lines.append(f"\t{rfc5322_date(info.received_at)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def date_field(at: float) -> bytes:
    return f"Date: {rfc5322_date(at)}\r\n".encode("ascii")


def message_id_value(queue_id: str, hostname: str) -> str:
    """The Message-ID relayd gives a message that has none, as Exim does: `<E` id `@host>`."""
    return f"<E{queue_id}@{hostname}>"


def message_id_field(queue_id: str, hostname: str) -> bytes:
    return f"Message-ID: {message_id_value(queue_id, hostname)}\r\n".encode("ascii", "replace")
