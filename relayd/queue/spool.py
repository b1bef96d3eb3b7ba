"""The spool: the durable queue on disk, the one place a message lives between 250 and delivery.

Takes: an `Envelope` and the body bytes from the listener (`accept`), new
recipient states from the delivery side (`update`), and "done" (`complete`).
Emits: `QueueEntry` values; at start `load()` rebuilds the in-memory index of
the queue from disk and reports anything it had to set aside.
Untrusted input: every envelope field comes from an SMTP client; it is stored
as one JSON line (ASCII-escaped, so no client byte can break the line
structure) and the body is stored as counted bytes, never parsed. Files on
disk are treated as untrusted at load: a file a stopped receiver left
without its end marker was never acknowledged and is removed (reported in
`SpoolLoad.discarded`); anything else that does not read back exactly is
moved to ``corrupt/`` with a reason, never deleted. The scan never touches a
file this process is still receiving, nor one whose writer holds its lock.
Fails: ENOSPC/EDQUOT -> `SpoolFullError` (452 4.3.1); any other OS error ->
`SpoolWriteError` (451 4.3.0). A message that could not be made durable is
removed again, so a restart never delivers mail that was not acknowledged.
`SpoolCorruptError` when a file does not read back (set it aside);
`SpoolEntryMissing` when a message is no longer queued. `complete`,
`set_aside` and the readers are plain blocking calls: cheap, but a caller
doing many of them on the event loop may prefer `asyncio.to_thread`.

Layout (``<root>`` is 0700, every directory 0700, every file 0600)::

    <root>/queue/<shard>/<id>     one file per queued message
    <root>/incoming/<id>          a message still being received (see `receive`)
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

Version 2 is written by `receive`, for a body that arrives in pieces: the
envelope line leaves out ``size``, ``body_size`` and ``body_crc32``, and a
fixed-width third line carries them instead, written as a placeholder
(``body ............ crc32 ........``) and filled in once the body is complete::

    relayd-spool 2
    {"id": ..., <every Envelope field but size>}
    body <N, 12 digits> crc32 <crc32 hex8 of the body>
    <exactly N body bytes>
    relayd-end <crc32 hex8 of the envelope line (with its newline) + body>
    ...state records as in version 1...

Both versions load; `accept` (whole bodies, e.g. bounces) still writes 1.
The trailer is written right after the body (a newline precedes
``relayd-end``). State records are appended after it, one JSON line each, each
holding the complete recipient list and the frozen flag, so replay takes the
last valid one. No record means every recipient pending and not frozen. A
record torn by a crash can only be the last line; it is ignored, and the next
append first ends it with a newline so it never swallows a good record.

Durability (group commit): `accept` writes the file on one of a few writer
threads (creating a file waits for the file system journal while a flush
commits, and that must not stall the event loop; measured here, writing on
the loop shrank batches to about one message each), then hands it to one
committer thread and waits. The committer takes every
request waiting at that moment and makes them durable with one ``syncfs(2)``
on the spool's file system; requests that arrive during a flush wait for the
next one. If syncfs is missing or fails, the batch falls back to fsync of each
file plus fsync of each directory whose entries changed; that also tells
exactly which requests failed. `accept` returns only after its batch is
durable.

Locking (for later operator tools and a delivery side in another process;
nothing in memory is shared, only files and these locks): a new file is
created with O_EXCL and held under an exclusive ``flock`` until its trailer is
written; state appends, removal and setting aside take an exclusive flock on
the message file and re-check that the name still points at the locked file;
readers take a shared flock. Locks are released before the disk flush, so no
lock is held while waiting for the disk.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import gc
import json
import os
import re
import stat
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from relayd.queue.msgid import ALPHABET, is_message_id, new_message_id
from relayd.values import Envelope, QueueEntry, Recipient, RecipientState

FORMAT_VERSION = 2  # the newest format written; every older one still loads
MAGIC = b"relayd-spool 1\n"  # whole-body writes (`accept`): size and CRC known up front
MAGIC_STREAMED = b"relayd-spool 2\n"  # streamed writes (`receive`): size and CRC filled in at the end
_TRAILER_RE = re.compile(rb"\nrelayd-end ([0-9a-f]{8})\n")
_CRC_RE = re.compile(r"[0-9a-f]{8}")
TRAILER_LEN = len(b"\nrelayd-end 00000000\n")
_SHARD_INDEX = 5  # last digit of the receive second in TTTTTT-NNNNNN-PP
_FIRST_READ = 4096  # one page covers header and state of a typical message
_MAX_HEADER = 16 * 1024 * 1024  # an envelope line longer than this is not ours
_ID_ATTEMPTS = 10  # O_EXCL collisions are rare; ten in a row means something else is wrong
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_FLUSH_MODES = ("syncfs", "fsync")
_WRITER_THREADS = 8  # enough to keep creating files while the journal commits
_SYNCFS_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


_T = TypeVar("_T")
_A = TypeVar("_A")
_B = TypeVar("_B")


class SpoolError(Exception):
    """Base of every error the spool raises."""


class SpoolFullError(SpoolError):
    """No room on the spool's disk (ENOSPC/EDQUOT); the client should retry later."""

    smtp_code = 452
    enhanced_code = "4.3.1"


class SpoolWriteError(SpoolError):
    """The message could not be made durable for another OS reason."""

    smtp_code = 451
    enhanced_code = "4.3.0"


class SpoolCorruptError(SpoolError):
    """A spool file does not read back as written; the caller should set it aside."""


class SpoolEntryMissing(SpoolError):
    """No queue file for this id (already completed, removed or set aside)."""


class _Unreadable(Exception):
    """Internal: why one file cannot be indexed (becomes a set-aside reason)."""


# ---------------------------------------------------------------------------
# OS calls that can fail in interesting ways, behind one small seam.


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages; does not wait, promises nothing


class SpoolIO:
    """The OS calls the spool's writes go through; tests subclass it to inject faults."""

    def __init__(self) -> None:
        self._syncfs = _load_syncfs()
        self._sync_file_range = _load_sync_file_range()

    def open(self, path: Path, flags: int, mode: int = _FILE_MODE) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def syncfs(self, fd: int) -> None:
        """Flush the whole file system holding `fd` (Linux); OSError(ENOSYS) elsewhere."""
        if self._syncfs is None:
            raise OSError(errno.ENOSYS, "syncfs is not available")
        if self._syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing a range out now (Linux), so a big message
        being received does not pile up dirty pages that the next group commit
        (syncfs) would have to wait for. Not a durability step: errors are ignored."""
        if self._sync_file_range is not None:
            self._sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def link(self, src: Path, dst: Path) -> None:
        """A second name for `src`; FileExistsError if `dst` exists (never replaces)."""
        os.link(src, dst)


# ---------------------------------------------------------------------------
# The file format: pure functions from values to bytes and back.

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


def _decode_fields(spec: _FieldSpec, obj: dict[str, Any]) -> dict[str, object]:
    """Keyword arguments for the dataclass described by `spec`; unknown keys are ignored."""
    kwargs: dict[str, object] = {}
    for name, check, convert, required in spec:
        if name not in obj:
            if required:
                raise _Unreadable(f"field {name} is missing")
            continue
        value = obj[name]
        if check is not None:
            if not check(value):
                raise _Unreadable(f"field {name} has an unexpected value")
        elif convert is not None:
            try:
                value = convert(value)
            except ValueError:
                raise _Unreadable(f"field {name} has an unexpected value") from None
        kwargs[name] = value
    return kwargs


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
class _Header:
    envelope: Envelope
    body_start: int
    body_size: int
    body_crc32: int
    line_start: int  # the envelope line is data[line_start:line_end]; the trailer CRC covers it
    line_end: int


def parse_header(data: bytes) -> _Header:
    """Read the header lines at the start of `data`; raises _Unreadable."""
    nl1 = data.find(b"\n")
    if nl1 < 0:
        raise _Unreadable("file is empty or ends inside its first line")
    if data[: nl1 + 1] == MAGIC_STREAMED:
        return parse_streamed_header(data)
    if data[: nl1 + 1] != MAGIC:
        if data.startswith(b"relayd-spool "):
            raise _Unreadable(f"unsupported spool format {data[13:nl1][:20]!r}")
        raise _Unreadable("not a relayd spool file")
    nl2 = data.find(b"\n", nl1 + 1)
    if nl2 < 0:
        raise _Unreadable("file ends inside the envelope line")
    line = data[nl1 + 1 : nl2 + 1]
    try:
        obj = json.loads(line)
    except ValueError:
        raise _Unreadable("envelope line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _Unreadable("envelope line is not a JSON object")
    envelope = Envelope(**_decode_fields(_ENVELOPE_FIELDS, obj))  # type: ignore[arg-type]
    size, crc = obj.get("body_size"), obj.get("body_crc32")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _Unreadable("body_size is missing or invalid")
    if type(crc) is not str or _CRC_RE.fullmatch(crc) is None:
        raise _Unreadable("body_crc32 is missing or invalid")
    return _Header(envelope, nl2 + 1, size, int(crc, 16), nl1 + 1, nl2 + 1)


def parse_trailer(data: bytes) -> int:
    """The CRC recorded in a trailer (the first TRAILER_LEN bytes of `data`)."""
    m = _TRAILER_RE.fullmatch(data[:TRAILER_LEN])
    if m is None:
        raise _Unreadable("trailer missing or damaged (file truncated?)")
    return int(m.group(1), 16)


# Format 2, for a body that is written as it arrives: the envelope line
# carries every field but `size`; a fixed-width line after it holds the body
# size and CRC, written as a placeholder first and filled in once the body is
# complete, so the reader still finds the trailer without reading the body.
_STREAMED_SLOT = b"body %012d crc32 %08x\n"
_STREAMED_PLACEHOLDER = b"body ............ crc32 ........\n"
_STREAMED_SLOT_RE = re.compile(rb"body ([0-9]{12}) crc32 ([0-9a-f]{8})\n")
_STREAMED_SLOT_LEN = len(_STREAMED_PLACEHOLDER)


def encode_streamed_envelope_line(envelope: Envelope) -> bytes:
    """Line 2 of a format-2 file: every Envelope field but `size` (known only at the end)."""
    obj: dict[str, object] = {
        f[0]: _to_json(getattr(envelope, f[0])) for f in _ENVELOPE_FIELDS if f[0] != "size"
    }
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def streamed_size_line(body_size: int, body_crc32: int) -> bytes:
    """Line 3 of a format-2 file once its body is complete."""
    return _STREAMED_SLOT % (body_size, body_crc32)


def parse_streamed_header(data: bytes) -> _Header:
    """The header lines of a format-2 file; raises _Unreadable."""
    nl1 = len(MAGIC_STREAMED) - 1
    nl2 = data.find(b"\n", nl1 + 1)
    if nl2 < 0:
        raise _Unreadable("file ends inside the envelope line")
    slot = data[nl2 + 1 : nl2 + 1 + _STREAMED_SLOT_LEN]
    if slot == _STREAMED_PLACEHOLDER:
        raise _Unreadable("message was still being received and was never acknowledged")
    m = _STREAMED_SLOT_RE.fullmatch(slot)
    if m is None:
        raise _Unreadable("body size line is missing or invalid")
    try:
        obj = json.loads(data[nl1 + 1 : nl2 + 1])
    except ValueError:
        raise _Unreadable("envelope line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _Unreadable("envelope line is not a JSON object")
    size = int(m.group(1))
    obj["size"] = size
    envelope = Envelope(**_decode_fields(_ENVELOPE_FIELDS, obj))  # type: ignore[arg-type]
    body_start = nl2 + 1 + _STREAMED_SLOT_LEN
    return _Header(envelope, body_start, size, int(m.group(2), 16), nl1 + 1, nl2 + 1)


def _decode_record(line: bytes) -> tuple[tuple[Recipient, ...], bool]:
    obj = json.loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("frozen"), bool):
        raise ValueError("not a state record")
    rcpts = obj.get("recipients")
    if not isinstance(rcpts, list) or not all(isinstance(r, dict) for r in rcpts):
        raise ValueError("not a state record")
    try:
        recipients = tuple(Recipient(**_decode_fields(_RECIPIENT_FIELDS, r)) for r in rcpts)  # type: ignore[arg-type]
    except _Unreadable as exc:
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
# The spool itself.


@dataclass(frozen=True, slots=True)
class SpoolLoad:
    """What `Spool.load` found: live entries, problems for the log, ids completed during load."""

    entries: list[QueueEntry]
    problems: list[str]
    completed: list[str] = field(default_factory=list)
    corrupt_files: int = 0  # files in corrupt/ after the load, old and new
    discarded: list[str] = field(default_factory=list)  # incomplete files of stopped receivers, removed


@dataclass(slots=True)
class _FlushRequest:
    fd: int | None  # a file to fsync in fallback mode; the committer closes it
    directories: tuple[Path, ...]  # directories whose entries changed
    future: asyncio.Future[None] | None = None


class Spool:
    """The durable queue under `root`; see the module docstring for format and guarantees."""

    def __init__(
        self,
        root: Path,
        *,
        flush_mode: str = "syncfs",
        io: SpoolIO | None = None,
        clock: Callable[[], float] = time.time,
        on_removed: Callable[[str], None] | None = None,
    ) -> None:
        if flush_mode not in _FLUSH_MODES:
            raise ValueError(f"flush_mode must be one of {', '.join(_FLUSH_MODES)}")
        self._root = Path(root)
        self._queue = self._root / "queue"
        self._corrupt = self._root / "corrupt"
        self._io = io if io is not None else SpoolIO()
        self._clock = clock
        self._use_syncfs = flush_mode == "syncfs"
        self._layout_ready = False
        self._cond = threading.Condition()
        self._pending: list[_FlushRequest] = []
        self._accepting = False  # committer running and taking requests
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._root_fd: int | None = None
        self._writers: ThreadPoolExecutor | None = None
        self.flush_failures = 0  # fire-and-forget flushes that failed (for metrics)
        self._on_removed = on_removed  # told the id of every message that leaves queue/
        # Ids whose file this process is creating and has not yet acknowledged
        # or given up: the scan leaves them to their writer.
        self._receiving: set[str] = set()
        self._receiving_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._discarded: list[str] = []

    # -- names ---------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def corrupt_dir(self) -> Path:
        return self._corrupt

    def new_id(self) -> str:
        return new_message_id(self._clock())

    def path_for(self, id: str) -> Path:
        """Where the message `id` lives; ValueError if `id` is not an id (keeps paths safe)."""
        if not is_message_id(id):
            raise ValueError("not a message id")
        return self._queue / id[_SHARD_INDEX] / id

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Create the layout if needed and start the committer, bound to the running loop."""
        if self._thread is not None:
            return
        self._ensure_layout()
        self._loop = asyncio.get_running_loop()
        self._root_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with self._cond:
            self._accepting, self._stopping = True, False
        self._thread = threading.Thread(
            target=self._run_committer, name="relayd-spool-commit", daemon=True
        )
        self._thread.start()
        self._writers = ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="relayd-spool-write")

    async def stop(self) -> None:
        """Flush everything still pending, then stop the committer."""
        thread = self._thread
        if thread is None:
            return
        writers, self._writers = self._writers, None
        if writers is not None:
            await asyncio.to_thread(writers.shutdown, wait=True)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(thread.join)
        self._thread = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    # -- writing -------------------------------------------------------------

    async def accept(self, envelope: Envelope, body: bytes) -> QueueEntry:
        """Store a new message; returns only once it is durable.

        On an id collision the message gets a fresh id: use the returned
        entry's id, not the one passed in. On failure nothing is left behind.
        """
        self._ensure_layout()
        envelope, path, fd = await self._off_loop(
            self._write_new, (envelope, body), self._abandon_new
        )
        await self._commit_new(_FlushRequest(fd, (path.parent,)), path, envelope.id)
        return QueueEntry(envelope, tuple(Recipient(a) for a in envelope.recipients))

    async def _commit_new(self, request: _FlushRequest, path: Path, message_id: str) -> None:
        """Make a new message's file durable, or remove it: it was never acknowledged.

        Either way the message stops being "received", so scans judge its file again.
        """
        try:
            await self._make_durable(request)
        except BaseException as exc:
            self._discard(path)
            if isinstance(exc, OSError):
                raise _spool_error(exc, "flushing the message to disk") from exc
            raise
        finally:
            self._stop_receiving(message_id)

    async def receive(self, envelope: Envelope) -> "IncomingMessage":
        """Start a message whose body arrives in pieces (SMTP DATA, streamed).

        The file is created in ``incoming/`` under an exclusive flock held
        until it is complete, so no queue scan or other process ever sees it
        half written; `IncomingMessage.commit` links it into the queue and
        returns once it is durable, `abort` removes it. The id may differ
        from `envelope.id` (a name already taken): use the returned one.
        """
        self._ensure_layout()
        loop = asyncio.get_running_loop()
        if self._writers is None:
            return self._create_incoming(envelope)
        return await loop.run_in_executor(self._writers, self._create_incoming, envelope)

    def _create_incoming(self, envelope: Envelope) -> "IncomingMessage":
        incoming = self._incoming_dir()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_ID_ATTEMPTS):
            if not os.path.lexists(self.path_for(envelope.id)):
                path = incoming / envelope.id
                try:
                    fd = self._io.open(path, flags, _FILE_MODE)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _spool_error(exc, "creating the message file") from exc
                else:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    except OSError as exc:
                        self._close_quietly(fd)
                        self._discard(path)
                        raise _spool_error(exc, "locking the message file") from exc
                    return IncomingMessage(self, envelope, path, fd)
            envelope = replace(envelope, id=self.new_id())
        raise SpoolWriteError(f"no free message id after {_ID_ATTEMPTS} attempts")

    def _incoming_dir(self) -> Path:
        """``<root>/incoming`` (0700): messages still being received."""
        path = self._root / "incoming"
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _spool_error(exc, "creating the incoming directory") from exc
        return path

    def sweep_incoming(self) -> list[str]:
        """Remove what interrupted receptions left in ``incoming/``; the ids removed.

        Nothing there was ever acknowledged: a message is linked into the
        queue before its 250. A file still locked is being received by a live
        session and is left alone.
        """
        directory = self._root / "incoming"
        notes: list[str] = []
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return notes
        for name in names:
            path = directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._io.unlink(path)
            except OSError:
                continue
            finally:
                os.close(fd)
            notes.append(name)
        return notes

    async def update(self, entry: QueueEntry, *, durable: bool = False) -> None:
        """Append `entry`'s recipients and frozen flag as the message's new state.

        With durable=False the record is flushed with the next batch but the
        caller does not wait: a crash may lose it, and the recipients are then
        tried again (at-least-once). Raises SpoolEntryMissing if the message is gone.
        """
        record = format_state_record(entry.recipients, entry.frozen, self._clock())
        fd = await self._off_loop(
            self._append_record, (entry.id, record), self._abandon_append
        )
        request = _FlushRequest(fd, ())
        if not durable:
            self._request_flush(request)
            return
        try:
            await self._make_durable(request)
        except OSError as exc:
            raise _spool_error(exc, "flushing delivery state") from exc

    def complete(self, id: str) -> bool:
        """Remove a message whose recipients are all final; False if it was already gone."""
        path = self.path_for(id)
        try:
            fd = self._open_locked(path, os.O_RDONLY, fcntl.LOCK_EX, os.open)
        except OSError as exc:
            raise _spool_error(exc, "opening the message for removal") from exc
        if fd is None:
            return False
        try:
            self._io.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _spool_error(exc, "removing the message") from exc
        finally:
            os.close(fd)
        self._request_flush(_FlushRequest(None, (path.parent,)))
        if self._on_removed is not None:
            self._on_removed(id)
        return True

    def remove(self, id: str) -> bool:
        """Operator removal: the same operation as `complete`."""
        return self.complete(id)

    def set_aside(self, id: str, reason: str) -> Path | None:
        """Move a message to corrupt/ with a .reason file; returns its new path (None if gone)."""
        path = self.path_for(id)
        fd = self._open_locked(path, os.O_RDONLY, fcntl.LOCK_EX, os.open)
        if fd is None:
            return None
        try:
            moved = self._move_to_corrupt(path, reason)
        finally:
            os.close(fd)
        if self._on_removed is not None:
            self._on_removed(id)
        return moved

    # -- reading -------------------------------------------------------------

    def read_body(self, id: str) -> bytes:
        """The body exactly as accepted; SpoolCorruptError if its CRCs do not match."""
        fd = self._open_locked(self.path_for(id), os.O_RDONLY, fcntl.LOCK_SH, os.open)
        if fd is None:
            raise SpoolEntryMissing(f"message {id} is no longer in the queue")
        try:
            data = _read_all(fd)
        finally:
            os.close(fd)
        try:
            header = parse_header(data)
            end = header.body_start + header.body_size
            recorded = parse_trailer(data[end : end + TRAILER_LEN])
        except _Unreadable as exc:
            raise SpoolCorruptError(f"message {id}: {exc}") from None
        body = data[header.body_start : end]
        line_crc = zlib.crc32(data[header.line_start : header.line_end])
        if zlib.crc32(body, line_crc) != recorded or zlib.crc32(body) != header.body_crc32:
            raise SpoolCorruptError(f"message {id}: checksum mismatch, spool file damaged")
        return body

    def read_entry(self, id: str) -> QueueEntry | None:
        """One message's envelope and replayed state; None if it is not queued."""
        fd = self._open_locked(self.path_for(id), os.O_RDONLY, fcntl.LOCK_SH, os.open)
        if fd is None:
            return None
        try:
            entry, _notes = _index_fd(fd, id)
        except _Unreadable as exc:
            raise SpoolCorruptError(f"message {id}: {exc}") from None
        finally:
            os.close(fd)
        return entry

    def load(self) -> SpoolLoad:
        """Rebuild the index from disk: headers and state records only, never bodies.

        Unreadable files go to corrupt/ and are reported; messages whose
        recipients are all final are completed (removed).
        """
        with self._load_lock:
            return self._load_all()

    def _load_all(self) -> SpoolLoad:
        self._ensure_layout()
        entries: list[QueueEntry] = []
        problems: list[str] = []
        completed: list[str] = []
        self._discarded = []
        for name in sorted(os.listdir(self._queue)):
            if len(name) != 1 or name not in ALPHABET:
                problems.append(f"queue/{name}: unexpected entry in queue directory, left alone")
        was_enabled = gc.isenabled()
        gc.disable()  # 100,000 new objects would trigger many full collections for nothing
        try:
            for shard in ALPHABET:
                self._load_shard(shard, entries, problems, completed)
        finally:
            if was_enabled:
                gc.enable()
        entries.sort(key=lambda e: e.id)
        return SpoolLoad(
            entries, problems, completed, self._count(self._corrupt, ".reason"), self._discarded
        )

    def count_files(self) -> int:
        """How many message files are queued (cheap: directory listings only)."""
        return sum(self._count(self._queue / shard, "") for shard in ALPHABET)

    # -- internals: load -----------------------------------------------------

    def _load_shard(
        self, shard: str, entries: list[QueueEntry], problems: list[str], completed: list[str]
    ) -> None:
        directory = self._queue / shard
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(dir_fd) as it:
                found = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
            for name, is_file in found:
                if not is_file:
                    problems.append(f"queue/{shard}/{name}: not a regular file, left alone")
                    continue
                entry = self._load_one(dir_fd, directory, name, problems)
                if entry is None:
                    continue
                if entry.is_complete:
                    if self.complete(entry.id):
                        completed.append(entry.id)
                else:
                    entries.append(entry)
        finally:
            os.close(dir_fd)

    def _load_one(
        self, dir_fd: int, directory: Path, name: str, problems: list[str]
    ) -> QueueEntry | None:
        """Index one file; discard it if a stopped receiver left it incomplete; set it aside if damaged.

        Opens relative to the shard directory's fd, which keeps start-up fast.
        A file removed by another process right after it was opened is still
        indexed; the delivery side then finds it missing and drops it. A file
        this process is still receiving is not touched: its writer indexes it
        once it is acknowledged. Every other writer is gone (the daemon lock
        keeps a second relayd out), so what they left is judged: a file that
        ends before its end marker was never acknowledged and is removed; one
        with its end marker that does not read back is damaged and set aside.
        """
        if not is_message_id(name):
            self._report_aside(directory / name, "file name is not a message id", problems)
            return None
        if name[_SHARD_INDEX] != directory.name:
            return self._rehome(directory / name, problems)
        if self.is_receiving(name):
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            return None  # removed meanwhile by another process
        except OSError as exc:
            problems.append(f"{name}: cannot open ({exc.strerror}); left in place")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            entry, notes = _index_fd(fd, name)
        except _Unreadable as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"read error ({exc.strerror})"
        else:
            problems.extend(f"{name}: {n}" for n in notes)
            return entry
        finally:
            os.close(fd)
        self._judge_unreadable(directory / name, reason, problems)
        return None

    def _judge_unreadable(self, path: Path, reason: str, problems: list[str]) -> None:
        """Remove an incomplete file of a stopped receiver; set a damaged one aside."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        except OSError as exc:
            problems.append(f"{path.name}: cannot open ({exc.strerror}); left in place")
            return
        try:
            try:
                # Not blocking: a receiver that holds its file's lock is alive.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            if self.is_receiving(path.name) or not _same_file(path, fd):
                return
            try:
                incomplete = _is_incomplete(fd)
            except OSError:
                incomplete = False
            if not incomplete:
                self._report_aside(path, reason, problems)
                return
            try:
                self._io.unlink(path)
            except FileNotFoundError:
                return
            except OSError as exc:
                problems.append(f"{path.name}: incomplete and cannot be removed ({exc.strerror}); left in place")
                return
            self._discarded.append(path.name)
            self._request_flush(_FlushRequest(None, (path.parent,)))
        finally:
            os.close(fd)

    # -- ids being received ----------------------------------------------------

    def is_receiving(self, id: str) -> bool:
        """True while this process creates `id`'s file and has not acknowledged or dropped it."""
        with self._receiving_lock:
            return id in self._receiving

    def _start_receiving(self, id: str) -> None:
        with self._receiving_lock:
            self._receiving.add(id)

    def _stop_receiving(self, id: str) -> None:
        with self._receiving_lock:
            self._receiving.discard(id)

    def _report_aside(self, path: Path, reason: str, problems: list[str]) -> None:
        where = f"queue/{path.parent.name}/{path.name}"
        try:
            self._move_to_corrupt(path, reason)
        except SpoolError as exc:
            problems.append(f"{where}: {reason}; could not be moved to corrupt/ ({exc})")
            return
        problems.append(f"{where}: {reason}; moved to corrupt/")

    def _rehome(self, path: Path, problems: list[str]) -> QueueEntry | None:
        """Move a message found in the wrong shard directory to where path_for looks."""
        target = self.path_for(path.name)
        try:
            if target.exists():
                if os.path.samefile(path, target):  # case-insensitive file system
                    return self._load_path(target, problems)
                self._report_aside(path, "duplicate of a message in its proper shard", problems)
                return None
            self._io.rename(path, target)
        except OSError as exc:
            problems.append(f"{path.name}: in the wrong shard and cannot be moved ({exc.strerror})")
            return None
        problems.append(f"{path.name}: was in shard {path.parent.name}, moved to {target.parent.name}")
        self._request_flush(_FlushRequest(None, (path.parent, target.parent)))
        return self._load_path(target, problems)

    def _load_path(self, path: Path, problems: list[str]) -> QueueEntry | None:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return self._load_one(dir_fd, path.parent, path.name, problems)
        finally:
            os.close(dir_fd)

    def _move_to_corrupt(self, path: Path, reason: str) -> Path:
        target = self._corrupt / path.name
        n = 0
        while target.exists() or target.with_name(target.name + ".reason").exists():
            n += 1
            target = self._corrupt / f"{path.name}.{n}"
        try:
            self._io.rename(path, target)
            note = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self._clock()))} UTC {reason}\n"
            fd = self._io.open(
                target.with_name(target.name + ".reason"),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                _FILE_MODE,
            )
            try:
                self._write_all(fd, note.encode("utf-8", "backslashreplace"))
            finally:
                self._io.close(fd)
        except OSError as exc:
            raise _spool_error(exc, "setting a damaged message aside") from exc
        self._request_flush(_FlushRequest(None, (path.parent, self._corrupt)))
        return target

    @staticmethod
    def _count(directory: Path, skip_suffix: str) -> int:
        with os.scandir(directory) as it:
            return sum(
                1
                for e in it
                if e.is_file(follow_symlinks=False)
                and not (skip_suffix and e.name.endswith(skip_suffix))
            )

    # -- internals: files ----------------------------------------------------

    def _ensure_layout(self) -> None:
        """Create root, queue/, corrupt/ and the 62 shards (0700); tighten modes if needed."""
        if self._layout_ready:
            return
        dirs = [self._root, self._queue, self._corrupt] + [self._queue / s for s in ALPHABET]
        created = False
        try:
            self._root.parent.mkdir(parents=True, exist_ok=True)
            for d in dirs:
                try:
                    os.mkdir(d, _DIR_MODE)
                    created = True
                except FileExistsError:
                    pass
                st = os.stat(d, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise SpoolWriteError(f"spool path {d} is not a directory")
                if stat.S_IMODE(st.st_mode) != _DIR_MODE:
                    os.chmod(d, _DIR_MODE)
            if created:
                for d in [self._root.parent, self._root, self._queue]:
                    _fsync_dir_plain(d)
        except OSError as exc:
            raise _spool_error(exc, "preparing the spool directory") from exc
        self._layout_ready = True

    async def _off_loop(
        self,
        work: Callable[[_A, _B], _T],
        args: tuple[_A, _B],
        abandon: Callable[[_T], None],
    ) -> _T:
        """Run blocking file work on the writer threads, off the event loop.

        Creating a file waits for the file system journal while a flush is
        committing; doing that on the event loop would stall every session
        and defeat the batching. If the caller is cancelled meanwhile, the
        work still finishes and `abandon` undoes it.
        """
        writers = self._writers
        if writers is None:
            return work(*args)
        job = asyncio.get_running_loop().run_in_executor(writers, work, *args)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(
                lambda f: abandon(f.result()) if not f.cancelled() and f.exception() is None else None
            )
            raise

    def _write_new(self, envelope: Envelope, body: bytes) -> tuple[Envelope, Path, int]:
        """Create and fill a new message file; its fd stays open for the flush."""
        envelope, path, fd = self._create(envelope)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            head, trailer = message_parts(envelope, body)
            for part in (head, body, trailer):
                self._write_all(fd, part)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException as exc:
            self._close_quietly(fd)
            self._discard(path)
            self._stop_receiving(envelope.id)
            if isinstance(exc, OSError):
                raise _spool_error(exc, "writing the message") from exc
            raise
        return envelope, path, fd

    def _abandon_new(self, written: tuple[Envelope, Path, int]) -> None:
        envelope, path, fd = written
        self._close_quietly(fd)
        self._discard(path)
        self._stop_receiving(envelope.id)

    def _append_record(self, id: str, record: bytes) -> int:
        """Append one state record under an exclusive lock; the fd stays open for the flush."""
        path = self.path_for(id)
        try:
            fd = self._open_locked(path, os.O_RDWR | os.O_APPEND, fcntl.LOCK_EX, self._io.open)
        except OSError as exc:
            raise _spool_error(exc, "opening the message for a state change") from exc
        if fd is None:
            raise SpoolEntryMissing(f"message {id} is no longer in the queue")
        try:
            self._end_torn_line(fd)
            self._write_all(fd, record)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            self._close_quietly(fd)
            raise _spool_error(exc, "recording delivery state") from exc
        return fd

    def _abandon_append(self, fd: int) -> None:
        self._request_flush(_FlushRequest(fd, ()))

    def _create(self, envelope: Envelope) -> tuple[Envelope, Path, int]:
        """Create the message file with O_EXCL, taking a new id on collision."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_ID_ATTEMPTS):
            path = self.path_for(envelope.id)
            # Marked before the file exists, so a scan never sees it unmarked
            # while it is being written; the caller unmarks it once the
            # message is acknowledged or dropped.
            self._start_receiving(envelope.id)
            try:
                return envelope, path, self._io.open(path, flags, _FILE_MODE)
            except FileExistsError:
                self._stop_receiving(envelope.id)
                envelope = replace(envelope, id=self.new_id())
            except OSError as exc:
                self._stop_receiving(envelope.id)
                raise _spool_error(exc, "creating the message file") from exc
        raise SpoolWriteError(f"no free message id after {_ID_ATTEMPTS} attempts")

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._io.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view = view[n:]

    def _end_torn_line(self, fd: int) -> None:
        """Before appending, end a record torn by an earlier crash with a newline."""
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            self._write_all(fd, b"\n")

    def _discard(self, path: Path) -> None:
        """Remove a message that was not acknowledged; an empty file if unlink fails.

        An empty file is set aside at load, never delivered.
        """
        try:
            self._io.unlink(path)
        except FileNotFoundError:
            return
        except OSError:
            try:
                os.truncate(path, 0)
            except OSError:
                pass
            return
        self._request_flush(_FlushRequest(None, (path.parent,)))

    @staticmethod
    def _open_locked(
        path: Path, flags: int, lock: int, opener: Callable[[Path, int, int], int]
    ) -> int | None:
        """Open and flock `path`; None if it no longer exists once the lock is held."""
        for _ in range(3):
            try:
                fd = opener(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, lock)
                now = os.stat(path, follow_symlinks=False)
                held = os.fstat(fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError:
                os.close(fd)
                raise
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # replaced while we waited for the lock; look again
        return None

    # -- internals: group commit ---------------------------------------------

    async def _make_durable(self, request: _FlushRequest) -> None:
        """Wait until `request` has been flushed; raises the flush's OSError."""
        future: asyncio.Future[None] | None = None
        with self._cond:
            if self._accepting and self._loop is not None:
                future = self._loop.create_future()
                request.future = future
                self._pending.append(request)
                self._cond.notify()
        if future is None:
            error = self._flush_inline(request)
            if error is not None:
                raise error
            return
        await future

    def _request_flush(self, request: _FlushRequest) -> None:
        """Flush with the next batch without waiting (inline when no committer runs)."""
        with self._cond:
            if self._accepting:
                self._pending.append(request)
                self._cond.notify()
                return
        if self._flush_inline(request) is not None:
            self.flush_failures += 1

    def _flush_inline(self, request: _FlushRequest) -> OSError | None:
        try:
            return self._flush_batch([request], None)[0]
        finally:
            self._close_quietly(request.fd)

    def _run_committer(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    self._accepting = False
                    return
                batch, self._pending = self._pending, []
            try:
                errors = self._flush_batch(batch, self._root_fd)
            except Exception as exc:  # a bug here must not leave sessions waiting forever
                errors = [OSError(errno.EIO, f"spool flush failed: {exc!r}")] * len(batch)
            for request, error in zip(batch, errors):
                self._close_quietly(request.fd)
                self._settle(request, error)

    def _settle(self, request: _FlushRequest, error: OSError | None) -> None:
        if request.future is None:
            if error is not None:
                self.flush_failures += 1
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, request.future, error)
        except RuntimeError:
            pass  # the loop is closed; nobody is waiting any more

    def _flush_batch(self, batch: list[_FlushRequest], root_fd: int | None) -> list[OSError | None]:
        """Make every request in `batch` durable; one error slot per request."""
        if self._use_syncfs and root_fd is not None:
            try:
                self._io.syncfs(root_fd)
                return [None] * len(batch)
            except OSError as exc:
                if exc.errno in _SYNCFS_UNSUPPORTED:
                    self._use_syncfs = False
                # Otherwise fall through: fsync per file tells which requests failed.
        return self._fsync_each(batch)

    def _fsync_each(self, batch: list[_FlushRequest]) -> list[OSError | None]:
        errors: list[OSError | None] = [None] * len(batch)
        by_dir: dict[Path, list[int]] = {}
        for i, request in enumerate(batch):
            if request.fd is not None:
                try:
                    self._io.fsync(request.fd)
                except OSError as exc:
                    errors[i] = exc
            for d in request.directories:
                by_dir.setdefault(d, []).append(i)
        for d, members in by_dir.items():
            try:
                fd = self._io.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0)
                try:
                    self._io.fsync(fd)
                finally:
                    self._io.close(fd)
            except OSError as exc:
                for i in members:
                    errors[i] = errors[i] or exc
        return errors

    def _close_quietly(self, fd: int | None) -> None:
        if fd is not None:
            try:
                self._io.close(fd)
            except OSError:
                pass


def _resolve(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():
        return  # the waiting session was cancelled
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _spool_error(exc: OSError, doing: str) -> SpoolError:
    name = errno.errorcode.get(exc.errno or 0, "error")
    text = f"spool: {doing} failed ({name}: {exc.strerror or exc})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(text)
    return SpoolWriteError(text)


def _fsync_dir_plain(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
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
            raise _Unreadable("envelope line is implausibly long")
        size *= 4


def _read_from(fd: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _index_fd(fd: int, expected_id: str) -> tuple[QueueEntry, list[str]]:
    """Envelope and replayed state of an open spool file, reading no body bytes when avoidable."""
    data, eof = _read_head(fd)
    header = parse_header(data)
    if header.envelope.id != expected_id:
        raise _Unreadable("id in the envelope does not match the file name")
    trailer_at = header.body_start + header.body_size
    tail = data[trailer_at:] if eof else _read_from(fd, trailer_at)
    parse_trailer(tail)
    recipients, frozen, notes = replay_state(tail[TRAILER_LEN:], header.envelope)
    return QueueEntry(header.envelope, recipients, frozen), notes


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not renamed or replaced meanwhile)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _is_incomplete(fd: int) -> bool:
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
    except _Unreadable:
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
        slot = data[nl2 + 1 : nl2 + 1 + _STREAMED_SLOT_LEN]
        if slot == _STREAMED_PLACEHOLDER or (eof and _STREAMED_PLACEHOLDER.startswith(slot)):
            return True  # its size line was never filled in: never acknowledged
    try:
        header = parse_header(data)
    except _Unreadable:
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
        if _TRAILER_RE.search(window) is not None:
            return True
        tail = window[-overlap:]
        offset += len(chunk)


_WRITE_BATCH = 128 * 1024  # body bytes gathered before one write on a writer thread


class IncomingMessage:
    """A message file being filled as DATA arrives (format 2); see `Spool.receive`.

    Memory stays bounded: `write` gathers at most `_WRITE_BATCH` bytes, then
    hands them to a writer thread (the disk may block; the event loop must
    not) and waits, which also paces the client. The CRCs are computed on
    that thread too. Nothing is flushed before `commit`, which shares the
    spool's group commit like `accept`.
    """

    def __init__(self, spool: Spool, envelope: Envelope, path: Path, fd: int) -> None:
        self._spool = spool
        self.envelope = envelope
        self._path = path
        self._fd: int | None = fd
        self._pending = bytearray()
        self._slot_at = 0
        self._size = 0
        self._crc = 0  # envelope line + body: the trailer's CRC
        self._body_crc = 0
        self._job: asyncio.Future[None] | None = None
        self._closed = False
        self._linked: Path | None = None  # the queue name, once linked and until committed

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def size(self) -> int:
        """Body bytes taken so far."""
        return self._size + len(self._pending)

    async def begin(self, envelope: Envelope) -> None:
        """Write the format line, `envelope` (same id) and the size placeholder."""
        if envelope.id != self.envelope.id:
            raise ValueError("begin() must keep the id the spool gave")
        self.envelope = envelope
        line = encode_streamed_envelope_line(envelope)
        self._crc = zlib.crc32(line)
        self._slot_at = len(MAGIC_STREAMED) + len(line)
        await self._in_thread(self._write_raw, MAGIC_STREAMED + line + _STREAMED_PLACEHOLDER)

    async def write(self, data: bytes) -> None:
        """Add body bytes; written to disk in batches."""
        self._pending += data
        if len(self._pending) >= _WRITE_BATCH:
            await self._write_pending()

    async def commit(self) -> QueueEntry:
        """Finish the file, link it into the queue, return once durable.

        Raises SpoolFullError / SpoolWriteError; the message is then removed.
        """
        await self._write_pending()
        spool = self._spool
        final = spool.path_for(self.id)
        # From the link into the queue until it is durable, the file is in the
        # queue but not yet acknowledged: a scan must leave it alone.
        spool._start_receiving(self.id)
        try:
            fd = await self._in_thread(self._finish, final)
        except BaseException:
            spool._stop_receiving(self.id)
            raise
        self._fd, self._linked, self._closed = None, None, True  # the flush owns fd and file now
        await spool._commit_new(_FlushRequest(fd, (self._path.parent, final.parent)), final, self.id)
        envelope = replace(self.envelope, size=self._size)
        return QueueEntry(envelope, tuple(Recipient(a) for a in envelope.recipients))

    def abort(self) -> None:
        """Remove the unfinished file (the session ended, or the message was refused)."""
        if self._closed:
            return
        self._closed = True
        job = self._job
        if job is not None and not job.done():
            job.add_done_callback(lambda _f: self._remove())
        else:
            self._remove()

    # -- internals -----------------------------------------------------------

    def _remove(self) -> None:
        fd, self._fd = self._fd, None
        self._spool._close_quietly(fd)
        try:
            self._spool._io.unlink(self._path)
        except OSError:
            pass  # swept at the next start; it was never acknowledged
        linked, self._linked = self._linked, None
        if linked is not None:  # cancelled while being linked into the queue: never acknowledged
            self._spool._discard(linked)

    async def _write_pending(self) -> None:
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            await self._in_thread(self._write_body, data)

    async def _in_thread(self, work: Callable[[_A], _T], arg: _A) -> _T:
        if self._closed:
            raise SpoolWriteError("spool: the message was abandoned")
        writers = self._spool._writers
        if writers is None:
            return work(arg)
        job = asyncio.get_running_loop().run_in_executor(writers, work, arg)
        self._job = job  # type: ignore[assignment]
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            self.abort()
            raise

    def _write_raw(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            self._spool._write_all(self._fd, data)
        except OSError as exc:
            raise _spool_error(exc, "writing the message") from exc

    def _write_body(self, data: bytes) -> None:
        self._write_raw(data)
        assert self._fd is not None
        self._spool._io.start_writeback(self._fd, self._slot_at + _STREAMED_SLOT_LEN + self._size, len(data))
        self._crc = zlib.crc32(data, self._crc)
        self._body_crc = zlib.crc32(data, self._body_crc)
        self._size += len(data)

    def _finish(self, final: Path) -> int:
        """Trailer, size line, link into the queue, unlock; the fd for the flush."""
        fd = self._fd
        assert fd is not None
        io = self._spool._io
        try:
            self._spool._write_all(fd, b"\nrelayd-end %08x\n" % self._crc)
            slot = streamed_size_line(self._size, self._body_crc)
            if io.pwrite(fd, slot, self._slot_at) != len(slot):
                raise OSError(errno.EIO, "short write of the size line")
            io.link(self._path, final)
            self._linked = final
        except FileExistsError:
            raise SpoolWriteError(f"spool: message id {self.id} is already queued") from None
        except OSError as exc:
            raise _spool_error(exc, "writing the message") from exc
        try:
            io.unlink(self._path)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise _spool_error(exc, "moving the message into the queue") from exc
        return fd
