"""Minimal SMTP reply reading and message building shared by the load generator and the sink.

Takes: asyncio streams; sizes. Emits: (code, text) replies; message bytes.
Untrusted input: replies from the server under test (parsed leniently: a
malformed reply becomes an error the caller counts, never a crash).
"""

from __future__ import annotations

import asyncio
import email.utils
import time

_LINE = b"x" * 76 + b"\r\n"


class SmtpError(Exception):
    """An unexpected reply or a protocol break, with the reply text."""


async def read_reply(reader: asyncio.StreamReader, limit_lines: int = 100) -> tuple[int, str]:
    """Read one (possibly multi-line) reply."""
    lines: list[bytes] = []
    for _ in range(limit_lines):
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    first = lines[0]
    try:
        code = int(first[:3])
    except ValueError:
        raise SmtpError(f"bad reply {first[:60]!r}") from None
    return code, b"".join(lines).decode("ascii", "replace").strip()


async def expect(reader: asyncio.StreamReader, wanted: int) -> str:
    code, text = await read_reply(reader)
    if code != wanted:
        raise SmtpError(text[:200])
    return text


def build_message(payload_size: int, sender: str, recipient: str, serial: int = 0) -> bytes:
    """Headers plus `payload_size` bytes of body in 78-octet lines, CRLF, already safe to send
    after DATA (no line starts with a dot) and ending with CRLF.

    Like smtp-source's -l, the size counts the payload, not the headers.
    """
    headers = (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Date: {email.utils.formatdate(time.time())}\r\n"
        f"Message-ID: <bench.{serial}.{time.monotonic_ns()}@bench.example>\r\n"
        f"Subject: relaybench\r\n\r\n"
    ).encode("ascii")
    full, rest = divmod(payload_size, len(_LINE))
    body = _LINE * full + (b"x" * max(0, rest - 2) + b"\r\n" if rest else b"")
    return headers + body
