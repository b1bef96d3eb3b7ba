"""DATA as a stream: the rules of `policy.check_data`, applied chunk by chunk.

Takes: the raw bytes a client sends after 354, in chunks of any size.
Emits: the checked message bytes (dot-unstuffed, line ends normalised to CRLF),
ready to store, in pieces; then, once `<CRLF>.<CRLF>` arrives, the verdict (the
first rule broken, if any) and whatever the client pipelined after the dot.
Untrusted input: all of it. Nothing here does I/O, and memory is bounded by
a few bytes of carry plus one chunk, whatever the message size.

The rules are exactly those of `relayd.smtp.policy` (see its docstring): the end of
data is only <CRLF>.<CRLF>; dot-unstuffing applies to lines that begin after a
real CRLF; NUL bytes are refused; bare CR and bare LF become CRLF; a line longer
than the limit is refused with its number; more checked bytes than the size
limit is refused. What makes streaming safe is where a chunk is cut: the last
four bytes are held back (they may be the start of the end marker), and a cut
never falls between a CR and the byte after it (CR LF is one line end, and a
dot after it is a stuffing dot). Once a rule is broken the rest is only
scanned for the end marker, so the session stays in step with the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd import replies

_END = b"\r\n.\r\n"
_HOLD = len(_END) - 1  # bytes that may be the start of the end marker
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_CR = 0x0D


@dataclass(frozen=True, slots=True)
class DataEnd:
    """The end marker was seen: the refusal (None if every rule held) and pipelined bytes."""

    refusal: str | None
    leftover: bytes
    normalised_line_ends: bool


class DataDecoder:
    """Incremental form of `policy.check_data` with the size limit built in."""

    def __init__(self, *, max_line_length: int, size_limit: int) -> None:
        self._max_line = max_line_length
        self._size_limit = size_limit
        # A virtual line end before the first byte: an immediate ".\r\n" ends
        # an empty message, and a first line starting with a dot is unstuffed.
        self._carry = bytearray(b"\r\n")
        self._virtual = 2
        self._line_start = True  # the last raw bytes processed were a real CRLF
        self._line_len = 0  # octets of the current (unfinished) checked line
        self._lines_done = 0
        self.size = 0  # checked bytes so far
        self.normalised = False
        self._raw_size = 0
        # Past this many raw bytes checking stops: the message is too big
        # whatever else is wrong (room for dot-stuffing and CR as in the limit).
        self._raw_ceiling = size_limit + size_limit // 8 + 65536
        self._over_ceiling = False
        self._nul = False
        self._long_line: int | None = None
        self.end: DataEnd | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Take raw bytes; return the checked bytes that are now final (maybe empty).

        After the end marker `self.end` is set and further input is not accepted.
        """
        if self.end is not None:
            raise ValueError("the end of data was already seen")
        carry = self._carry
        search_from = max(0, len(carry) - _HOLD)
        carry += chunk
        end = carry.find(_END, search_from)
        if end >= 0:
            cut = end + 2  # the CRLF before the dot belongs to the message
            leftover = bytes(carry[end + len(_END):])
        else:
            cut = len(carry) - _HOLD
            if cut > 0 and carry[cut - 1] == _CR:
                cut -= 1
        segment = bytes(carry[self._virtual:cut]) if cut > self._virtual else b""
        if cut > 0:
            del carry[:cut]
            self._virtual = max(0, self._virtual - cut)
        out = self._check(segment) if segment else b""
        if end >= 0:
            self.end = DataEnd(self.refusal, leftover, self.normalised)
            self._carry = bytearray()
        return out

    def _check(self, raw: bytes) -> bytes:
        """Apply the rules to one segment that starts and ends on a safe cut.

        After a rule is broken nothing more is emitted, but the checks go on
        (until the raw ceiling) so the reply is the one `check_data` gives for
        the whole message: NUL before a long line before the size.
        """
        line_start = self._line_start
        self._line_start = raw.endswith(b"\r\n")
        self._raw_size += len(raw)
        if self._raw_size > self._raw_ceiling:
            self._over_ceiling = True
        if self._over_ceiling or self._nul:
            return b""
        body = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:] if line_start else raw.replace(b"\r\n.", b"\r\n")
        if b"\x00" in body:
            self._nul = True
            return b""
        lines = body.split(b"\r\n")
        crlf = len(lines) - 1
        if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
            body = _LINE_ENDS.sub(b"\r\n", body)
            lines = body.split(b"\r\n")
            self.normalised = True
        if self._long_line is None:
            self._long_line = self._first_long_line(lines)
        self.size += len(body)
        if self._long_line is not None or self.size > self._size_limit:
            return b""
        return body

    @property
    def refusal(self) -> str | None:
        """The reply refusing what was seen so far, or None while every rule holds."""
        if self._over_ceiling:
            return replies.message_too_big(self._size_limit)
        if self._nul:
            return replies.NO_NUL
        if self._long_line is not None:
            return replies.line_too_long(self._long_line, self._max_line)
        if self.size > self._size_limit:
            return replies.message_too_big(self._size_limit)
        return None

    def _first_long_line(self, parts: list[bytes]) -> int | None:
        """Number of the first line over the limit, counting across segments; None if none.

        `parts` is the checked segment split at CRLF: the first part continues
        the previous segment's last line, the last part starts the next one.
        """
        limit = self._max_line
        first = self._line_len + len(parts[0])
        if first > limit:
            return self._lines_done + 1
        if len(parts) > 1 and max(map(len, parts)) > limit:
            return self._lines_done + 1 + next(n for n, p in enumerate(parts) if n and len(p) > limit)
        if len(parts) == 1:
            self._line_len = first
        else:
            self._lines_done += len(parts) - 1
            self._line_len = len(parts[-1])
        return None
