"""The spool's on-disk format: pure functions from values to bytes and back, and the readers of one file.

Takes: `Envelope` and `Recipient` values to encode; bytes (or an open file
descriptor) of one spool file to decode.
Emits: the bytes of a new file and of state records; `SpoolHeader`, the
recipients and frozen flag replayed from the state records, and for a file
that does not read back an `UnreadableSpoolFile` whose text becomes the
set-aside reason.
Untrusted input: every envelope field comes from an SMTP client; it is stored
as one JSON line (ASCII-escaped, so no client byte can break the line
structure) and the body is stored as counted bytes, never parsed. Files read
back are untrusted too: every field is type-checked, and a header line longer
than 16 MiB is refused before it is read whole.
Fails: `UnreadableSpoolFile` with a reason; OSError from the reads.

Layout (``<root>`` is 0700, every directory 0700, every file 0600)::

    <root>/queue/<shard>/<id>     one file per queued message
    <root>/incoming/<id>          a message still being received (see `Spool.receive`)
    <root>/corrupt/<id>           files set aside, with <id>.reason beside them

``<shard>`` is the sixth character of the id (the last digit of its receive
second), as in Exim's split_spool_directory: 62 directories, filled in turn.

File format, version 1 (inspect with ``head -2`` and ``tail``)::

    relayd-spool 1
    {"id": ..., <every Envelope field>, "body_size": N, "body_crc32": "hex8"}
    <exactly N body bytes, stored as received>
    relayd-end <crc32 hex8 of the envelope line (with its newline) + body>
    {"at": ..., "frozen": false, "recipients": [{<every Recipient field>}, ...]}
    ...

Version 2 is written by `Spool.receive`, for a body that arrives in pieces: the
envelope line leaves out ``size``, ``body_size`` and ``body_crc32``, and a
fixed-width third line carries them instead, written as a placeholder
(``body ............ crc32 ........``) and filled in once the body is complete::

    relayd-spool 2
    {"id": ..., <every Envelope field but size>}
    body <N, 12 digits> crc32 <crc32 hex8 of the body>
    <exactly N body bytes>
    relayd-end <crc32 hex8 of the envelope line (with its newline) + body>
    ...state records as in version 1...

Both versions load; `Spool.accept` (whole bodies, e.g. bounces) still writes 1.
The trailer is written right after the body (a newline precedes
``relayd-end``). State records are appended after it, one JSON line each, each
holding the complete recipient list and the frozen flag, so replay takes the
last valid one. No record means every recipient pending and not frozen. A
record torn by a crash can only be the last line; it is ignored, and the next
append first ends it with a newline so it never swallows a good record.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TypeVar

from relayd.values import Envelope, QueueEntry, Recipient, RecipientState

FORMAT_VERSION = 2  # the newest format written; every older one still loads
MAGIC = b"relayd-spool 1\n"  # whole-body writes (`accept`): size and CRC known up front
MAGIC_STREAMED = b"relayd-spool 2\n"  # streamed writes (`receive`): size and CRC filled in at the end
TRAILER_RE = re.compile(rb"\nrelayd-end ([0-9a-f]{8})\n")
_CRC_RE = re.compile(r"[0-9a-f]{8}")
TRAILER_LEN = len(b"\nrelayd-end 00000000\n")
SHARD_INDEX = 5  # last digit of the receive second in TTTTTT-NNNNNN-PP
_FIRST_READ = 4096  # one page covers header and state of a typical message
_MAX_HEADER = 16 * 1024 * 1024  # an envelope line longer than this is not ours
DIR_MODE = 0o700
FILE_MODE = 0o600

_V = TypeVar("_V")


class UnreadableSpoolFile(Exception):
    """Why one file cannot be read back (becomes its set-aside reason)."""


def _is_number(v: object) -> bool:
    return type(v) is float or type(v) is int


def _as_tuple_of_str(v: object) -> tuple[str, ...]:
    if type(v) is list and all(type(x) is str for x in v):
        return tuple(v)
    raise ValueError("not a list of strings")


# How each field type the value classes use is read back from JSON: a check
# that the JSON value has the right type, and a conversion where JSON differs.
_CHECKS: dict[str, Callable[[object], bool]] = {
    "str": lambda v: type(v) is str,
    "int": lambda v: type(v) is int,
    "float": _is_number,
    "bool": lambda v: type(v) is bool,
    "str | None": lambda v: v is None or type(v) is str,
    "float | None": lambda v: v is None or _is_number(v),
}
_CONVERSIONS: dict[str, Callable[[object], object]] = {
    "tuple[str, ...]": _as_tuple_of_str,
    "RecipientState": lambda v: RecipientState(v),
}

# (name, check or None, conversion or None, required) per field.
_FieldSpec = tuple[
    tuple[str, Callable[[object], bool] | None, Callable[[object], object] | None, bool], ...
]


def _field_spec(cls: type) -> _FieldSpec:
    """The fields the spool stores for `cls`; fails at import if one has a type it cannot store."""
    spec = []
    for f in fields(cls):
        kind = str(f.type)
        if kind not in _CHECKS and kind not in _CONVERSIONS:
            raise TypeError(f"spool cannot store {cls.__name__}.{f.name} of type {kind}")
        required = f.default is MISSING and f.default_factory is MISSING
        spec.append((f.name, _CHECKS.get(kind), _CONVERSIONS.get(kind), required))
    return tuple(spec)


# Computed once: dataclasses.fields() is too slow to call per file at load.
_ENVELOPE_FIELDS = _field_spec(Envelope)
_RECIPIENT_FIELDS = _field_spec(Recipient)


def _to_json(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, RecipientState):
        return value.value
    return value


def _decode_fields(spec: _FieldSpec, obj: dict[str, object]) -> dict[str, object]:
    """Keyword arguments for the dataclass described by `spec`; unknown keys are ignored."""
    kwargs: dict[str, object] = {}
    for name, check, convert, required in spec:
        if name not in obj:
            if required:
                raise UnreadableSpoolFile(f"field {name} is missing")
            continue
        value = obj[name]
        if check is not None:
            if not check(value):
                raise UnreadableSpoolFile(f"field {name} has an unexpected value")
        elif convert is not None:
            try:
                value = convert(value)
            except ValueError:
                raise UnreadableSpoolFile(f"field {name} has an unexpected value") from None
        kwargs[name] = value
    return kwargs

def _decode(make: Callable[..., _V], spec: _FieldSpec, obj: dict[str, object]) -> _V:
    """A value built by `make` from the fields `spec` reads out of `obj`."""
    return make(**_decode_fields(spec, obj))


def encode_envelope_line(envelope: Envelope, body: bytes) -> bytes:
    """Line 2 of a spool file, newline included."""
    obj: dict[str, object] = {f[0]: _to_json(getattr(envelope, f[0])) for f in _ENVELOPE_FIELDS}
    obj["body_size"] = len(body)
    obj["body_crc32"] = f"{zlib.crc32(body):08x}"
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def message_parts(envelope: Envelope, body: bytes) -> tuple[bytes, bytes]:
    """The bytes before and after the body: (format line + envelope line, trailer)."""
    line = encode_envelope_line(envelope, body)
    crc = zlib.crc32(body, zlib.crc32(line))
    return MAGIC + line, b"\nrelayd-end %08x\n" % crc


def format_message(envelope: Envelope, body: bytes) -> bytes:
    """A whole new spool file for `envelope` and `body`, with no state records yet."""
    head, trailer = message_parts(envelope, body)
    return head + body + trailer


def format_state_record(recipients: Sequence[Recipient], frozen: bool, at: float) -> bytes:
    """One state record line: the full recipient list and the frozen flag after a change."""
    rcpts = [{f[0]: _to_json(getattr(r, f[0])) for f in _RECIPIENT_FIELDS} for r in recipients]
    obj = {"at": at, "frozen": frozen, "recipients": rcpts}
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class SpoolHeader:
    envelope: Envelope
    body_start: int
    body_size: int
    body_crc32: int
    line_start: int  # the envelope line is data[line_start:line_end]; the trailer CRC covers it
    line_end: int


def parse_header(data: bytes) -> SpoolHeader:
    """Read the header lines at the start of `data`; raises UnreadableSpoolFile."""
    nl1 = data.find(b"\n")
    if nl1 < 0:
        raise UnreadableSpoolFile("file is empty or ends inside its first line")
    if data[: nl1 + 1] == MAGIC_STREAMED:
        return parse_streamed_header(data)
    if data[: nl1 + 1] != MAGIC:
        if data.startswith(b"relayd-spool "):
            raise UnreadableSpoolFile(f"unsupported spool format {data[13:nl1][:20]!r}")
        raise UnreadableSpoolFile("not a relayd spool file")
    nl2 = data.find(b"\n", nl1 + 1)
    if nl2 < 0:
        raise UnreadableSpoolFile("file ends inside the envelope line")
    line = data[nl1 + 1 : nl2 + 1]
    try:
        obj = json.loads(line)
    except ValueError:
        raise UnreadableSpoolFile("envelope line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise UnreadableSpoolFile("envelope line is not a JSON object")
    envelope = _decode(Envelope, _ENVELOPE_FIELDS, obj)
    size, crc = obj.get("body_size"), obj.get("body_crc32")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UnreadableSpoolFile("body_size is missing or invalid")
    if type(crc) is not str or _CRC_RE.fullmatch(crc) is None:
        raise UnreadableSpoolFile("body_crc32 is missing or invalid")
    return SpoolHeader(envelope, nl2 + 1, size, int(crc, 16), nl1 + 1, nl2 + 1)


def parse_trailer(data: bytes) -> int:
    """The CRC recorded in a trailer (the first TRAILER_LEN bytes of `data`)."""
    m = TRAILER_RE.fullmatch(data[:TRAILER_LEN])
    if m is None:
        raise UnreadableSpoolFile("trailer missing or damaged (file truncated?)")
    return int(m.group(1), 16)


# Format 2, for a body that is written as it arrives: the envelope line
# carries every field but `size`; a fixed-width line after it holds the body
# size and CRC, written as a placeholder first and filled in once the body is
# complete, so the reader still finds the trailer without reading the body.
_STREAMED_SLOT = b"body %012d crc32 %08x\n"
STREAMED_PLACEHOLDER = b"body ............ crc32 ........\n"
_STREAMED_SLOT_RE = re.compile(rb"body ([0-9]{12}) crc32 ([0-9a-f]{8})\n")
STREAMED_SLOT_LEN = len(STREAMED_PLACEHOLDER)


def encode_streamed_envelope_line(envelope: Envelope) -> bytes:
    """Line 2 of a format-2 file: every Envelope field but `size` (known only at the end)."""
    obj: dict[str, object] = {
        f[0]: _to_json(getattr(envelope, f[0])) for f in _ENVELOPE_FIELDS if f[0] != "size"
    }
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def streamed_size_line(body_size: int, body_crc32: int) -> bytes:
    """Line 3 of a format-2 file once its body is complete."""
    return _STREAMED_SLOT % (body_size, body_crc32)


def parse_streamed_header(data: bytes) -> SpoolHeader:
    """The header lines of a format-2 file; raises UnreadableSpoolFile."""
    nl1 = len(MAGIC_STREAMED) - 1
    nl2 = data.find(b"\n", nl1 + 1)
    if nl2 < 0:
        raise UnreadableSpoolFile("file ends inside the envelope line")
    slot = data[nl2 + 1 : nl2 + 1 + STREAMED_SLOT_LEN]
    if slot == STREAMED_PLACEHOLDER:
        raise UnreadableSpoolFile("message was still being received and was never acknowledged")
    m = _STREAMED_SLOT_RE.fullmatch(slot)
    if m is None:
        raise UnreadableSpoolFile("body size line is missing or invalid")
    try:
        obj = json.loads(data[nl1 + 1 : nl2 + 1])
    except ValueError:
        raise UnreadableSpoolFile("envelope line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise UnreadableSpoolFile("envelope line is not a JSON object")
    size = int(m.group(1))
    obj["size"] = size
    envelope = _decode(Envelope, _ENVELOPE_FIELDS, obj)
    body_start = nl2 + 1 + STREAMED_SLOT_LEN
    return SpoolHeader(envelope, body_start, size, int(m.group(2), 16), nl1 + 1, nl2 + 1)


def _decode_record(line: bytes) -> tuple[tuple[Recipient, ...], bool]:
    obj = json.loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("frozen"), bool):
        raise ValueError("not a state record")
    rcpts = obj.get("recipients")
    if not isinstance(rcpts, list) or not all(isinstance(r, dict) for r in rcpts):
        raise ValueError("not a state record")
    try:
        recipients = tuple(_decode(Recipient, _RECIPIENT_FIELDS, r) for r in rcpts)
    except UnreadableSpoolFile as exc:
        raise ValueError(str(exc)) from None
    return recipients, obj["frozen"]


def replay_state(
    records: bytes, envelope: Envelope
) -> tuple[tuple[Recipient, ...], bool, list[str]]:
    """Recipients and frozen flag after the last valid record, plus notes on damaged lines.

    A damaged last line is a record torn by a crash and is ignored silently; a
    damaged earlier line is ignored too (every record is complete on its own)
    but reported.
    """
    recipients = tuple(Recipient(a) for a in envelope.recipients)
    frozen = False
    notes: list[str] = []
    if not records:
        return recipients, frozen, notes
    lines = records.split(b"\n")
    last = len(lines) - 1
    while last >= 0 and lines[last] == b"":
        last -= 1
    for i, line in enumerate(lines[: last + 1]):
        if not line:
            continue
        try:
            recipients, frozen = _decode_record(line)
        except ValueError:
            if i != last:
                notes.append(f"damaged state record {i + 1} ignored")
    return recipients, frozen, notes


# ---------------------------------------------------------------------------
# Reading one file from an open descriptor.


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 0) + 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _read_head(fd: int) -> tuple[bytes, bool]:
    """The start of a file, up to at least the end of the envelope line; and whether EOF was hit."""
    size = _FIRST_READ
    while True:
        data = os.pread(fd, size, 0)
        eof = len(data) < size
        nl1 = data.find(b"\n")
        if eof or (nl1 >= 0 and data.find(b"\n", nl1 + 1) >= 0):
            return data, eof
        if size >= _MAX_HEADER:
            raise UnreadableSpoolFile("envelope line is implausibly long")
        size *= 4


def _read_from(fd: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def index_fd(fd: int, expected_id: str) -> tuple[QueueEntry, list[str]]:
    """Envelope and replayed state of an open spool file, reading no body bytes when avoidable."""
    data, eof = _read_head(fd)
    header = parse_header(data)
    if header.envelope.id != expected_id:
        raise UnreadableSpoolFile("id in the envelope does not match the file name")
    trailer_at = header.body_start + header.body_size
    tail = data[trailer_at:] if eof else _read_from(fd, trailer_at)
    parse_trailer(tail)
    recipients, frozen, notes = replay_state(tail[TRAILER_LEN:], header.envelope)
    return QueueEntry(header.envelope, recipients, frozen), notes


def same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not renamed or replaced meanwhile)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def is_incomplete(fd: int) -> bool:
    """True when the file ends before its end marker: a receiver stopped while writing it.

    Such a file was never acknowledged (250 comes only after the marker is
    written and flushed). A file whose marker is there, or whose complete
    header lines do not parse, is damage instead.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return True
    try:
        data, eof = _read_head(fd)
    except UnreadableSpoolFile:
        return False
    nl1 = data.find(b"\n")
    if nl1 < 0:
        return eof and (MAGIC.startswith(data) or MAGIC_STREAMED.startswith(data))
    if data[: nl1 + 1] not in (MAGIC, MAGIC_STREAMED):
        return False
    nl2 = data.find(b"\n", nl1 + 1)
    if nl2 < 0:
        return eof
    if data[: nl1 + 1] == MAGIC_STREAMED:
        slot = data[nl2 + 1 : nl2 + 1 + STREAMED_SLOT_LEN]
        if slot == STREAMED_PLACEHOLDER or (eof and STREAMED_PLACEHOLDER.startswith(slot)):
            return True  # its size line was never filled in: never acknowledged
    try:
        header = parse_header(data)
    except UnreadableSpoolFile:
        return False
    if size >= header.body_start + header.body_size + TRAILER_LEN:
        return False
    return not _has_end_marker(fd, header.body_start)


def _has_end_marker(fd: int, offset: int) -> bool:
    """Whether an end-marker line appears anywhere from `offset` on (then the file is not merely short)."""
    overlap = TRAILER_LEN
    tail = b""
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return False
        window = tail + chunk
        if TRAILER_RE.search(window) is not None:
            return True
        tail = window[-overlap:]
        offset += len(chunk)

