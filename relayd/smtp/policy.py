"""Submission policy: the listener's decisions, as pure functions.

Takes: a tenant's configuration, client-supplied addresses, the raw DATA bytes.
Emits: yes/no answers, or a named SMTP reply line (see relayd.replies) to send.
Untrusted input: everything here comes from the SMTP client. Nothing does I/O.

The DATA rules, and why:
* The end of data is only <CRLF>.<CRLF>. Any other "dot line" shape
  (<LF>.<LF>, <LF>.<CRLF>, <CR>.<CRLF>, <CRLF>.<CR>) is message content.
* Dot-unstuffing applies to lines that start after a real CRLF.
* Bare CR and bare LF are then normalised to CRLF (as Postfix's default does).
  The stored body therefore has only CRLF line ends, and the upstream client
  dot-stuffs every line that starts with a dot, so no content can ever end the
  message early at the upstream (no SMTP smuggling).
* NUL bytes are refused: SMTP cannot carry them and many MTAs truncate at them.
* Lines longer than the listener's limit are refused with the line number,
  rather than being silently split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd import replies
from relayd.config.model import TenantConfig
from relayd.smtp.headers import HeaderFacts
from relayd.smtp.headers import read_header_facts as read_header_block_facts


def address_matches(pattern: str, address: str) -> bool:
    """Sender patterns: an exact address, `*@domain`, or `*` (any; development only)."""
    pattern = pattern.lower()
    if pattern == "*":
        return True
    address = address.lower()
    if pattern.startswith("*@"):
        return address.rpartition("@")[2] == pattern[2:]
    return address == pattern


def sender_allowed(tenant: TenantConfig, address: str) -> bool:
    return bool(address) and any(address_matches(p, address) for p in tenant.senders)


_LOCAL_ATOM = re.compile(r"^[^\s<>()\[\],;:\\\"@]+(\.[^\s<>()\[\],;:\\\"@]+)*$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9\u0080-\uffff]([A-Za-z0-9\u0080-\uffff-]{0,61}[A-Za-z0-9\u0080-\uffff])?\.)*[A-Za-z0-9\u0080-\uffff]([A-Za-z0-9\u0080-\uffff-]{0,61}[A-Za-z0-9\u0080-\uffff])?$|^\[[0-9A-Fa-f:.]+\]$")


def address_is_valid(address: str) -> bool:
    """A usable mailbox: local@domain with no spaces or control characters."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 254 or len(local) > 64:
        return False
    if any(ord(c) < 33 or ord(c) == 127 for c in address):
        return False
    quoted = local.startswith('"') and local.endswith('"') and len(local) >= 2
    return (quoted or bool(_LOCAL_ATOM.match(local))) and bool(_DOMAIN.match(domain))


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


@dataclass(frozen=True, slots=True)
class DataVerdict:
    """The checked message body, or the reply line that refuses it."""

    body: bytes
    refusal: str | None = None
    normalised_line_ends: bool = False


def unstuff(raw: bytes) -> bytes:
    """Remove the transparency dot from lines that begin with one (RFC 5321 4.5.2)."""
    if b"\r\n." not in raw and not raw.startswith(b"."):
        return raw
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]


def normalise_line_ends(body: bytes) -> tuple[bytes, bool]:
    """Turn bare CR and bare LF into CRLF; report whether anything changed."""
    crlf = body.count(b"\r\n")
    if body.count(b"\n") == crlf and body.count(b"\r") == crlf:
        return body, False
    return re.sub(rb"\r\n|\r|\n", b"\r\n", body), True


def first_long_line(body: bytes, limit: int) -> int | None:
    """1-based number of the first line longer than `limit` octets, or None.

    Splitting is done in C; only a message that really has a long line pays
    for finding its number.
    """
    if len(body) <= limit:
        return None
    lines = body.split(b"\r\n")
    if max(map(len, lines)) <= limit:
        return None
    return next(n for n, line in enumerate(lines, 1) if len(line) > limit)


def check_data(raw: bytes, *, max_line_length: int) -> DataVerdict:
    """Unstuff, normalise and vet a message exactly as received between 354 and the final dot.

    `raw` ends with the CRLF that preceded the terminating dot (or is empty).
    """
    body = unstuff(raw)
    if b"\x00" in body:
        return DataVerdict(b"", replies.NO_NUL)
    body, changed = normalise_line_ends(body)
    long_line = first_long_line(body, max_line_length)
    if long_line is not None:
        return DataVerdict(b"", replies.line_too_long(long_line, max_line_length))
    return DataVerdict(body, None, changed)


def header_block(body: bytes) -> bytes:
    """The header lines up to the first empty line (all of `body` if there is none)."""
    if body.startswith(b"\r\n"):
        return b""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def read_header_facts(body: bytes) -> HeaderFacts:
    """The From: addresses and Message-ID the policy and the log care about (header block only)."""
    return read_header_block_facts(header_block(body))


def check_header_from(tenant: TenantConfig, facts: HeaderFacts) -> str | None:
    """Refusal line when a header From: address is not allowed for the tenant."""
    if facts.refusal is not None:
        return facts.refusal
    if not facts.from_addresses:
        return "550 5.6.0 Message has no From: header; add one with an allowed sender address"
    for address in facts.from_addresses:
        if not sender_allowed(tenant, address):
            return replies.sender_not_allowed(address, tenant.name, "Header From:")
    return None


def effective_limit(listener_limit: int, tenant_limit: int | None) -> int:
    return listener_limit if tenant_limit is None else min(listener_limit, tenant_limit)
