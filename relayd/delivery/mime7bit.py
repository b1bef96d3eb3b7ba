"""8-bit to 7-bit MIME conversion for upstreams that do not announce 8BITMIME (RFC 6152).

Takes: a stored message (CRLF line ends, as the listener keeps it).
Emits: the same message with every 8-bit MIME leaf part re-encoded as
quoted-printable (text/*) or base64 (anything else) and its
Content-Transfer-Encoding header changed to say so; every other byte,
headers included, is left as it was. Multipart structure is walked
(boundaries, nested multiparts, message/rfc822), so a 7-bit part is never
touched.
Untrusted input: the whole message (it comes from an application).
Nesting is bounded (`MAX_DEPTH`) and so is the number of body parts walked
(`MAX_PARTS`); what lies beyond either, like a multipart without a boundary,
is base64'd as one application/octet-stream part (a composite type may not
be base64'd, RFC 2045 6.4). A body part written without its empty line
starts its body at the first line that is not a header field, as mail
readers parse it. Memory: the message, the result and one encoded part.
How it fails: `NeedsSmtpUtf8` when a header block that would have to go out
as is holds 8-bit bytes: such a message can only travel with SMTPUTF8
(RFC 6532), which no conversion gives.

Pure and synchronous: it is CPU work on up to the listener's size limit
(25 MB by default), so the transport runs it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Iterator

CRLF = b"\r\n"
MAX_DEPTH = 20  # MIME nesting followed; deeper structure is encoded whole
# Body parts walked one by one in a whole message; a multipart that would
# pass this is encoded whole. Each part costs Python work (tens of µs) in a
# thread that shares the GIL with the event loop.
MAX_PARTS = 5000
_TO_QUESTION_MARK = bytes(range(128)) + b"?" * 128

_NON_ASCII = re.compile(rb"[\x80-\xff]")
_BLANK_LINE = re.compile(rb"\r\n\r\n")
_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:", re.IGNORECASE)
_CONTENT_TYPE_FIELD = re.compile(rb"^content-type[ \t]*:", re.IGNORECASE)
# A line in header position that is neither "name:" nor a continuation.
_NOT_A_FIELD = re.compile(rb"(?m)^(?![!-9;-~]+[ \t]*:|[ \t])")
_PARAM = re.compile(rb';\s*([A-Za-z0-9_.*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))')


class NeedsSmtpUtf8(ValueError):
    """A header block holds 8-bit bytes: only SMTPUTF8 can carry this message."""


def header_block(message: bytes) -> bytes:
    """The top-level header block (up to the empty line), without copying the body."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def needs_conversion(message: bytes) -> bool:
    return not message.isascii()


def to_7bit(message: bytes) -> bytes:
    """The message with its 8-bit parts encoded; raises NeedsSmtpUtf8 (see the module doc)."""
    if message.isascii():
        return message
    # Parts are memoryview slices of the one message, copied straight into
    # one growing buffer: no list of small chunks (a message of 600,000 tiny
    # parts must not cost a gigabyte of chunk objects).
    out = _Output()
    _entity(memoryview(message), out, depth=0, top=True)
    return bytes(out.data)


class _Output:
    """The converted message as it grows, and how many more body parts may be walked."""

    __slots__ = ("data", "parts_left")

    def __init__(self) -> None:
        self.data = bytearray()
        self.parts_left = MAX_PARTS

    def add(self, *chunks: Chunk) -> None:
        for chunk in chunks:
            self.data += chunk

    def claim_parts(self, delimiter: re.Pattern[bytes], body: memoryview) -> bool:
        """Count a multipart's delimiters against the budget; False (nothing claimed) when over it."""
        found = 0
        for line in _delimiters(delimiter, body):
            if line.group(1) is not None:
                break  # the close-delimiter: the parts end here
            found += 1
            if found > self.parts_left:
                return False
        self.parts_left -= found
        return True


Chunk = bytes | memoryview


def _is_ascii(data: Chunk) -> bool:
    return _NON_ASCII.search(data) is None


def _split(entity: memoryview) -> tuple[bytes, bytes, memoryview]:
    """(header block incl. its last CRLF, the empty line, body).

    As mail readers parse it: the header block also ends at the first line
    that is neither a header field nor a continuation (a body part written
    without its empty line), and that line starts the body.
    """
    if entity[:2] == CRLF:
        return b"", CRLF, entity[2:]
    found = _BLANK_LINE.search(entity)
    end = len(entity) if found is None else found.start()
    stray = _NOT_A_FIELD.search(entity, 0, end)
    if stray is not None:
        return bytes(entity[: stray.start()]), b"", entity[stray.start() :]
    if found is None:
        return bytes(entity), b"", entity[len(entity) :]
    return bytes(entity[: end + 2]), CRLF, entity[end + 4 :]


def _fields(head: bytes) -> dict[bytes, bytes]:
    """Unfolded header fields, lower-cased names, first occurrence wins."""
    fields: dict[bytes, bytes] = {}
    last: bytes | None = None
    for line in head.split(CRLF):
        if line[:1] in (b" ", b"\t") and last is not None:
            fields[last] += b" " + line.strip()
        elif b":" in line:
            name, _, value = line.partition(b":")
            last = name.strip().lower()
            if last in fields:
                last = None  # a repeated field: the first one counts
            else:
                fields[last] = value.strip()
    return fields


def _content_type(fields: dict[bytes, bytes], top: bool) -> tuple[bytes, dict[bytes, bytes]]:
    value = fields.get(b"content-type", b"")
    kind = value.split(b";", 1)[0].strip().lower()
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(value)}
    if not kind or b"/" not in kind:
        kind = b"text/plain"  # RFC 2045 5.2 default (also inside digests: close enough)
    return kind, params


def _entity(entity: memoryview, out: "_Output", *, depth: int, top: bool = False) -> None:
    """Append the converted entity (header block, empty line, body) to `out`."""
    head, blank, body = _split(entity)
    if not head.isascii():
        raise NeedsSmtpUtf8("8-bit bytes in a header block")
    if _is_ascii(body):
        out.add(entity)
        return
    fields = _fields(head)
    kind, params = _content_type(fields, top)
    if depth < MAX_DEPTH:
        boundary = params.get(b"boundary")
        if kind.startswith(b"multipart/") and boundary and out.claim_parts(_delimiter(boundary), body):
            out.add(_as_7bit_composite(head, fields), blank)
            _multipart(body, boundary, out, depth)
            return
        if kind in (b"message/rfc822", b"message/global"):
            out.add(_as_7bit_composite(head, fields), blank)
            _entity(body, out, depth=depth + 1)
            return
    if kind.startswith((b"multipart/", b"message/")):
        # RFC 2045 6.4: a composite type may not be base64'd; what cannot be
        # walked (no boundary, past the nesting or part bound) goes as an attachment.
        head = _without(head, _CONTENT_TYPE_FIELD) + b"Content-Type: application/octet-stream" + CRLF
        kind = b"application/octet-stream"
    _leaf(head, body, kind, out, top=top, has_mime_version=b"mime-version" in fields)


def _as_7bit_composite(head: bytes, fields: dict[bytes, bytes]) -> bytes:
    """A walked multipart or message's header: its parts all go 7-bit, so an 8bit/binary label becomes 7bit."""
    if fields.get(b"content-transfer-encoding", b"7bit").lower() == b"7bit":
        return head
    return _without_cte(head) + b"Content-Transfer-Encoding: 7bit" + CRLF


def _leaf(head: bytes, body: memoryview, kind: bytes, out: "_Output", *, top: bool, has_mime_version: bool) -> None:
    if kind.startswith(b"text/"):
        encoded, name = _quoted_printable(body), b"quoted-printable"
    else:
        encoded, name = _base64(body), b"base64"
    out.add(_without_cte(head), b"Content-Transfer-Encoding: ", name, CRLF)
    if top and not has_mime_version:
        out.add(b"MIME-Version: 1.0" + CRLF)  # without it the encoding would not be read
    out.add(CRLF, encoded)


def _without_cte(head: bytes) -> bytes:
    """The header block minus any Content-Transfer-Encoding field (with its folded lines)."""
    return _without(head, _CTE_FIELD)


def _without(head: bytes, field: re.Pattern[bytes]) -> bytes:
    """The header block minus every field whose first line matches `field` (with its folded lines)."""
    if not head:
        return head
    kept: list[bytes] = []
    dropping = False
    for line in head.split(CRLF)[:-1] if head.endswith(CRLF) else head.split(CRLF):
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = bool(field.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(line + CRLF for line in kept)


def _quoted_printable(body: memoryview) -> bytes:
    """RFC 2045 6.7 with CRLF hard line breaks and soft breaks at 76 characters."""
    return binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)


def _base64(body: memoryview) -> bytes:
    """RFC 2045 6.8: 76-character lines, CRLF; no line end after the last, as the body had none."""
    encoded = base64.encodebytes(body).replace(b"\n", CRLF)
    return encoded if body[-2:] == CRLF else encoded[:-2]


def _delimiter(boundary: bytes) -> re.Pattern[bytes]:
    """A delimiter or close-delimiter of `boundary` (group 1: the closing `--`); see `_delimiters`.

    No `^` in the pattern: a leading literal lets the engine skip ahead at
    memory speed, where `(?m)^` tests every byte (0.5 s per 50 MB).
    """
    return re.compile(b"--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")


def _delimiters(delimiter: re.Pattern[bytes], body: memoryview) -> Iterator[re.Match[bytes]]:
    """The matches of `delimiter` that start a line."""
    for found in delimiter.finditer(body):
        start = found.start()
        if start == 0 or body[start - 1] == 0x0A:
            yield found


def _multipart(body: memoryview, boundary: bytes, out: "_Output", depth: int) -> None:
    """Convert each body part between the boundary lines; preamble and epilogue go 7-bit as text.

    Delimiters are found with one regular-expression scan, so a 25 MB part is
    sliced once rather than split into lines.
    """
    delimiter = _delimiter(boundary)
    pos = 0
    inside = False  # False: the preamble (before the first delimiter) or the epilogue (after the last)
    for found in _delimiters(delimiter, body):
        _segment(body[pos : found.start()], inside, out, depth)
        out.add(found.group(0))
        pos = found.end()
        inside = found.group(1) is None
        if not inside:
            break
    _segment(body[pos:], inside, out, depth)  # the epilogue, or a last part never closed


def _segment(segment: memoryview, inside: bool, out: "_Output", depth: int) -> None:
    """One stretch between delimiter lines; the CRLFs next to a delimiter belong to it (RFC 2046 5.1.1)."""
    if not inside:
        out.add(_ascii_only(segment))
        return
    lead = 2 if segment[:2] == CRLF else 0
    trail = 2 if segment[-2:] == CRLF and len(segment) >= lead + 2 else 0
    out.add(segment[:lead])
    _entity(segment[lead : len(segment) - trail], out, depth=depth + 1)
    out.add(segment[len(segment) - trail :])


def _ascii_only(text: memoryview) -> Chunk:
    """Preamble and epilogue are not shown by mail readers; 8-bit bytes there become '?'."""
    return text if _is_ascii(text) else bytes(text).translate(_TO_QUESTION_MARK)
