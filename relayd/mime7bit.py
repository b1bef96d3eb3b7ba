"""8-bit to 7-bit MIME conversion for upstreams that do not announce 8BITMIME (RFC 6152).

Takes: a stored message (CRLF line ends, as the listener keeps it).
Emits: the same message with every 8-bit MIME leaf part re-encoded as
quoted-printable (text/*) or base64 (anything else) and its
Content-Transfer-Encoding header changed to say so; every other byte,
headers included, is left as it was. Multipart structure is walked
(boundaries, nested multiparts, message/rfc822), so a 7-bit part is never
touched.
Untrusted input: the whole message (it comes from an application).
Nesting is bounded (`MAX_DEPTH`); beyond it the rest is base64'd as one part.
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

CRLF = b"\r\n"
MAX_DEPTH = 20  # MIME nesting followed; deeper structure is encoded whole

_NON_ASCII = re.compile(rb"[\x80-\xff]")
_BLANK_LINE = re.compile(rb"\r\n\r\n")
_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:", re.IGNORECASE)
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
    out: list[Chunk] = []
    # Parts are memoryview slices of the one message and the result is joined
    # once: the only large copies are the encoded parts and the result.
    _entity(memoryview(message), out, depth=0, top=True)
    return b"".join(out)


Chunk = bytes | memoryview


def _is_ascii(data: Chunk) -> bool:
    return _NON_ASCII.search(data) is None


def _split(entity: memoryview) -> tuple[bytes, bytes, memoryview]:
    """(header block incl. its last CRLF, the empty line, body); no empty line: all header."""
    if entity[:2] == CRLF:
        return b"", CRLF, entity[2:]
    found = _BLANK_LINE.search(entity)
    if found is None:
        return bytes(entity), b"", entity[len(entity) :]
    end = found.start()
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


def _entity(entity: memoryview, out: list[Chunk], *, depth: int, top: bool = False) -> None:
    """Append the converted entity (header block, empty line, body) to `out`."""
    head, blank, body = _split(entity)
    if not head.isascii():
        raise NeedsSmtpUtf8("8-bit bytes in a header block")
    if _is_ascii(body):
        out.append(entity)
        return
    fields = _fields(head)
    kind, params = _content_type(fields, top)
    if depth < MAX_DEPTH:
        boundary = params.get(b"boundary")
        if kind.startswith(b"multipart/") and boundary:
            out += (head, blank)
            _multipart(body, boundary, out, depth)
            return
        if kind in (b"message/rfc822", b"message/global"):
            out += (head, blank)
            _entity(body, out, depth=depth + 1)
            return
    _leaf(head, body, kind, out, top=top, has_mime_version=b"mime-version" in fields)


def _leaf(head: bytes, body: memoryview, kind: bytes, out: list[Chunk], *, top: bool, has_mime_version: bool) -> None:
    if kind.startswith(b"text/"):
        encoded, name = _quoted_printable(body), b"quoted-printable"
    else:
        encoded, name = _base64(body), b"base64"
    out += (_without_cte(head), b"Content-Transfer-Encoding: ", name, CRLF)
    if top and not has_mime_version:
        out.append(b"MIME-Version: 1.0" + CRLF)  # without it the encoding would not be read
    out += (CRLF, encoded)


def _without_cte(head: bytes) -> bytes:
    """The header block minus any Content-Transfer-Encoding field (with its folded lines)."""
    kept: list[bytes] = []
    dropping = False
    for line in head.split(CRLF)[:-1] if head.endswith(CRLF) else head.split(CRLF):
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = bool(_CTE_FIELD.match(line))
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


def _multipart(body: memoryview, boundary: bytes, out: list[Chunk], depth: int) -> None:
    """Convert each body part between the boundary lines; preamble and epilogue go 7-bit as text.

    Delimiters are found with one regular-expression scan, so a 25 MB part is
    sliced once rather than split into lines.
    """
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    pos = 0
    inside = False  # False: the preamble (before the first delimiter) or the epilogue (after the last)
    for found in delimiter.finditer(body):
        _segment(body[pos : found.start()], inside, out, depth)
        out.append(found.group(0))
        pos = found.end()
        inside = found.group(1) is None
        if not inside:
            break
    _segment(body[pos:], inside, out, depth)  # the epilogue, or a last part never closed


def _segment(segment: memoryview, inside: bool, out: list[Chunk], depth: int) -> None:
    """One stretch between delimiter lines; the CRLFs next to a delimiter belong to it (RFC 2046 5.1.1)."""
    if not inside:
        out.append(_ascii_only(segment))
        return
    lead = 2 if segment[:2] == CRLF else 0
    trail = 2 if segment[-2:] == CRLF and len(segment) >= lead + 2 else 0
    out.append(segment[:lead])
    _entity(segment[lead : len(segment) - trail], out, depth=depth + 1)
    out.append(segment[len(segment) - trail :])


def _ascii_only(text: memoryview) -> Chunk:
    """Preamble and epilogue are not shown by mail readers; 8-bit bytes there become '?'."""
    return text if _is_ascii(text) else _NON_ASCII.sub(b"?", text)
