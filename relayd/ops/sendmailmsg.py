"""relayd-sendmail's message: what came on stdin turned into an envelope and CRLF bytes.

Takes: the bytes read from stdin (bounded by relayd's message size limit while
reading), the `Options` of the command line, the local user and relay.yaml's
hostname.
Emits: a `Submission` (envelope sender, recipients, message) with Date:,
Message-ID: and From: added when missing and Bcc: removed.
Untrusted input: the whole message and the addresses in its header.
Pure apart from `read_message`, which reads the stream it is handed.
Fails: `Failure(Exit.DATAERR)` for a message over the limit, a usage error
when no recipient is left.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from relayd.ops.sendmailargs import Exit, Failure, Options, usage_error

# ----------------------------------------------------------------- the message (pure)


@dataclass(frozen=True)
class Submission:
    """What goes to relayd: envelope and message bytes with CRLF line ends."""

    sender: str
    recipients: tuple[str, ...]
    message: bytes


def cut_at_lone_dot(data: bytes) -> bytes:
    """The input up to (not including) a line that is a single dot (sendmail without -i)."""
    if data in (b".", b".\n", b".\r\n") or data.startswith((b".\n", b".\r\n")):
        return b""
    found = re.search(rb"\n\.(?:\r?\n|\Z)", data)
    return data if found is None else data[: found.start() + 1]


def normalise_line_ends(data: bytes) -> bytes:
    """Bare LF and bare CR become CRLF; the message ends with CRLF."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its folded lines) and the body, from CRLF text.

    The header ends at the first empty line, or at the first line that is not
    a field (`echo hi | sendmail x` has no header at all). A leading mbox
    `From ` line is dropped, as sendmail does.
    """
    if message.startswith(b"From "):
        end = message.find(b"\r\n")
        message = b"" if end < 0 else message[end + 2:]
    fields: list[bytes] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\r\n", pos)
        stop = len(message) if end < 0 else end + 2
        line = message[pos:stop]
        if line == b"\r\n":
            return fields, message[stop:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            break
        pos = stop
    return fields, message[pos:]


def field_name(field_bytes: bytes) -> str:
    return field_bytes.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field_bytes: bytes) -> str:
    """The unfolded value, as text (UTF-8 where it is, never failing)."""
    raw = field_bytes.split(b":", 1)[1]
    return re.sub(r"\r\n(?=[ \t])", "", raw.decode("utf-8", "replace")).strip()


def addresses_in(values: Sequence[str]) -> list[str]:
    """Mailbox addresses from header values or arguments (`a@x, "B" <b@y>`)."""
    return [addr for _name, addr in email.utils.getaddresses(list(values)) if addr]


def qualify(address: str, hostname: str) -> str:
    return address if "@" in address or not address else f"{address}@{hostname}"


def _unique(addresses: Sequence[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    kept: list[str] = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            kept.append(address)
    return tuple(kept)


def envelope_sender(options: Options, header_from: Sequence[str], local_sender: str, hostname: str) -> str:
    """-f, else the message's From: address, else user@hostname. `-f <>` is the null sender."""
    if options.sender is not None:
        text = options.sender.strip()
        if text in ("<>", ""):
            return ""
        found = addresses_in([text])
        return qualify(found[0] if found else text, hostname)
    if header_from:
        return qualify(header_from[0], hostname)
    return local_sender


def build_submission(
    raw: bytes, options: Options, *, local_sender: str, hostname: str, now: float, message_id: str
) -> Submission:
    """Turn what came on stdin into the envelope and message relayd will see.

    Adds Date:, Message-ID: and From: when missing, drops Bcc:, and collects
    the recipients (arguments, plus To/Cc/Bcc with -t). No recipient at all is
    a usage error, as in sendmail.
    """
    text = cut_at_lone_dot(raw) if options.dot_ends_input else raw
    fields, body = split_header(normalise_line_ends(text))
    names = [field_name(f) for f in fields]
    header_from = addresses_in([field_value(f) for f, n in zip(fields, names) if n == "from"])
    wanted = addresses_in(list(options.recipients))
    if options.extract_recipients:
        wanted += addresses_in([field_value(f) for f, n in zip(fields, names) if n in ("to", "cc", "bcc")])
    recipients = _unique([qualify(a, hostname) for a in wanted])
    if not recipients:
        raise usage_error("no recipients: give them as arguments, or use -t to take them from To:/Cc:/Bcc:")
    sender = envelope_sender(options, header_from, local_sender, hostname)
    kept = [f for f, n in zip(fields, names) if n != "bcc"]
    if "from" not in names:
        from_address = sender or local_sender
        kept.append(_header("From", email.utils.formataddr((options.full_name or "", from_address), "utf-8")))
    if "date" not in names:
        kept.append(_header("Date", email.utils.formatdate(now, localtime=True)))
    if "message-id" not in names:
        kept.append(_header("Message-ID", message_id))
    return Submission(sender, recipients, b"".join(kept) + b"\r\n" + body)


def _header(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8")


def read_message(stream: BinaryIO, *, dot_ends_input: bool, limit: int) -> bytes:
    """stdin, up to EOF (or the lone dot line); more than `limit` bytes is a data error.

    Without -i the input is read line by line, so a person typing a message
    can end it with "." and does not have to send EOF.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.readline(limit + 2) if dot_ends_input else stream.read(1 << 16)
        if not chunk:
            break
        if dot_ends_input and chunk.rstrip(b"\r\n") == b"." and chunk.endswith(b"\n"):
            chunks.append(chunk)  # cut_at_lone_dot removes it; nothing after it is read
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise Failure(Exit.DATAERR, f"the message is larger than relayd accepts ({limit} bytes); nothing was sent")
    return b"".join(chunks)
