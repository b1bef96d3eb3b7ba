"""Pure helpers for talking to an upstream: reply texts, the body on the wire, TLS labels.

Takes: upstream reply texts, message bodies, deliveries and transport configs.
Emits: printable one-line texts, `SmtpReply` values, the dot-stuffed body.
Untrusted input: the reply texts (flattened and bounded here).
Fails: never; these are functions of their arguments.
"""

from __future__ import annotations

import re
import ssl

from aiosmtplib import SMTPResponseException, SMTPTimeoutError

from relayd.config.model import SmtpTransportConfig, TlsMode
from relayd.delivery import mime7bit
from relayd.values import Delivery, SmtpReply

_MAX_REPLY_TEXT = 500  # characters of an upstream reply kept for logs and DSNs

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def clean_text(text: str) -> str:
    """An upstream's text as one printable line, of bounded length."""
    flat = _CONTROL.sub(" ", text.replace("\r\n", " ").replace("\n", " ")).strip()
    return flat if len(flat) <= _MAX_REPLY_TEXT else flat[: _MAX_REPLY_TEXT - 3] + "..."


def smtp_reply(code: int, message: str) -> SmtpReply:
    return SmtpReply(code, clean_text(message))


def reply_of(exc: SMTPResponseException) -> SmtpReply:
    return smtp_reply(exc.code, exc.message)


def wire_body(body: bytes) -> bytes:
    """The body as sent after DATA: CRLF line ends, dot-stuffed, ending in CRLF.

    Any bare CR or LF becomes CRLF first, so a lone "." can never end the
    message early at the upstream (SMTP smuggling). The terminating ".\\r\\n"
    is not included.
    """
    crlf = body.count(b"\r\n")
    if body.count(b"\n") == crlf and body.count(b"\r") == crlf:
        normalised = body  # the listener already stores CRLF-only bodies
    else:
        normalised = _BARE_LINE_END.sub(b"\r\n", body)
    if not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    if not normalised.startswith(b".") and b"\r\n." not in normalised:
        return normalised
    return _LEADING_DOT.sub(b"..", normalised)


def has_8bit(body: bytes) -> bool:
    return not body.isascii()


def smtputf8_need(delivery: Delivery) -> str | None:
    """Why this delivery can only travel with SMTPUTF8 (RFC 6531/6532), or None.

    As Postfix does (smtputf8_autodetect_classes unset), 8-bit header fields
    need SMTPUTF8 only when the client declared SMTPUTF8: applications that
    write raw UTF-8 subjects without asking for it (PHP mail(), many
    templates) have always been carried as 8-bit data, and bouncing them
    would break mail that every provider accepts.
    """
    if not delivery.sender.isascii() or not all(r.isascii() for r in delivery.recipients):
        return "non-ASCII addresses"
    if delivery.smtputf8 and not mime7bit.header_block(delivery.body).isascii():
        return "8-bit header fields"
    return None


def tls_label(ssl_object: ssl.SSLObject | None) -> str:
    """"TLS1.3" style protocol name for the log's X= field ("" without TLS)."""
    if ssl_object is None:
        return ""
    version = ssl_object.version() or "TLS"
    return version.replace("TLSv", "TLS")


def auth_precondition(config: SmtpTransportConfig) -> str | None:
    """Why this configuration can never send its credential safely, or None."""
    if config.credential is None:
        return None
    if config.tls is TlsMode.NONE:
        return f"refusing to send credential {config.credential} over a connection without TLS"
    if not config.verify_certificate:
        return (
            f"refusing to send credential {config.credential}: the upstream's certificate "
            "is not verified (verify_certificate is off)"
        )
    return None


def no_reply_detail(exc: BaseException, what: str, timeout: float) -> str:
    if isinstance(exc, (SMTPTimeoutError, TimeoutError)):
        return f"timeout after {timeout:g}s waiting for the reply to {what}"
    return f"connection lost after {what}"

