"""What operators see of the queue: rows, filters, listings, summaries, status tables.

Takes: `QueueEntry` values (on the daemon side, or read from the spool when
the daemon is stopped), compact rows as they travel over the control socket,
filter options, and the current time (always passed in).
Emits: `QueueRow` values, text lines in the shapes Exim operators know
(`exim -bp`, exiqsumm), and dicts for `--json`. The rows and messages as they
travel over the control socket are relayd.queue.queuewire's, which the daemon uses
without this module.
Untrusted input: addresses, HELO names and headers come from SMTP clients;
every field printed for a human goes through `mainlog.sanitize` (header
blocks through `printable_block`), so no client can put terminal escape
sequences or fake lines on an operator's screen. Rows from the control
socket are checked for shape; a bad one raises ValueError.
Pure: no I/O, no clock, no globals.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from relayd.jsonwire import JsonObject, JsonValue, as_float, as_object, as_objects
from relayd.observe.mainlog import MAX_FIELD
from relayd.observe.mainlog import sanitize as _sanitize
from relayd.queue.queuewire import QueueRow as QueueRow
from relayd.queue.queuewire import RecipientRow as RecipientRow
from relayd.queue.queuewire import row_from_wire, wire_row
from relayd.values import QueueEntry, Recipient, RecipientState

def sanitize(text: str, limit: int = MAX_FIELD) -> str:
    """`mainlog.sanitize`, with a fast path for the common plain field (100,000 rows add up)."""
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text
    return _sanitize(text, limit)


AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<5m", 300.0),
    ("<1h", 3600.0),
    ("<4h", 4 * 3600.0),
    ("<1d", 86400.0),
    (">=1d", float("inf")),
)
NO_ROUTE = "(no route)"


# --------------------------------------------------------------- wire rows


def row_from_entry(entry: QueueEntry, in_flight: bool = False) -> QueueRow:
    return row_from_wire(wire_row(entry, in_flight))


def row_to_json(row: QueueRow, now: float) -> JsonObject:
    """The `--json` form of one listed message."""
    return {
        "id": row.id,
        "tenant": row.tenant,
        "sender": row.sender,
        "received_at": row.received_at,
        "age": max(0.0, now - row.received_at),
        "size": row.size,
        "frozen": row.frozen,
        "in_flight": row.in_flight,
        "state": message_state(row, now),
        "recipients": [
            {"address": r.address, "state": r.state.value, "attempts": r.attempts, "next_attempt": r.next_attempt}
            for r in row.recipients
        ],
    }


# ----------------------------------------------------------------- states


def message_state(row: QueueRow, now: float) -> str:
    """frozen | in delivery | active (due now) | deferred (waiting for a retry time)."""
    return _state(row.frozen, row.in_flight, row.next_due(), now)


def _state(frozen: bool, in_flight: bool, due: float | None, now: float) -> str:
    if frozen:
        return "frozen"
    if in_flight:
        return "in delivery"
    return "deferred" if due is not None and due > now else "active"


# ---------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """exiqgrep's selections; every given condition must hold."""

    tenant: str | None = None
    sender: re.Pattern[str] | None = None
    recipient: re.Pattern[str] | None = None
    older_than: float | None = None  # seconds
    younger_than: float | None = None
    frozen: bool = False
    deferred: bool = False

    @property
    def is_empty(self) -> bool:
        return self == QueueFilter()


def compile_address_pattern(text: str) -> re.Pattern[str]:
    """A case-insensitive search pattern; ValueError with a sentence when it is not a regex."""
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"'{text}' is not a regular expression ({exc})") from None


def matches(row: QueueRow, selection: QueueFilter, now: float) -> bool:
    age = now - row.received_at
    if selection.tenant is not None and row.tenant != selection.tenant:
        return False
    if selection.older_than is not None and age < selection.older_than:
        return False
    if selection.younger_than is not None and age >= selection.younger_than:
        return False
    if selection.frozen and not row.frozen:
        return False
    if selection.deferred and (row.frozen or not any(r.state is RecipientState.DEFERRED for r in row.recipients)):
        return False
    if selection.sender is not None and selection.sender.search(row.sender) is None:
        return False
    if selection.recipient is not None and not any(
        selection.recipient.search(r.address) for r in row.recipients
    ):
        return False
    return True


def select(rows: Iterable[QueueRow], selection: QueueFilter, now: float) -> Iterator[QueueRow]:
    if selection.is_empty:
        yield from rows
        return
    for row in rows:
        if matches(row, selection, now):
            yield row


# -------------------------------------------------------- exim -bp listing


def format_age(seconds: float) -> str:
    """Exim's queue age: minutes up to 90, then hours up to 72, then days."""
    minutes = int(max(0.0, seconds) // 60)
    if minutes <= 90:
        return f"{minutes}m"
    hours = (minutes + 30) // 60
    if hours <= 72:
        return f"{hours}h"
    return f"{(hours + 12) // 24}d"


def format_size(size: int) -> str:
    """Exim's message size: bytes below 1K, then 4.3K, 123K, 4.3M, 123M."""
    if size < 1024:
        return str(size)
    for unit, scale in (("K", 1024), ("M", 1024 * 1024), ("G", 1024 ** 3)):
        value = size / scale
        if value < 10:
            return f"{value:.1f}{unit}"
        if value < 1024 or unit == "G":
            return f"{int(value)}{unit}"
    return str(size)


_MARKS = {"D": "D", "F": "F"}


def listing_text(wire_rows: Iterable[Sequence[JsonValue]], now: float) -> str:
    """`listing_lines` for a chunk of unfiltered wire rows, as one string, fast.

    100,000 messages must list in well under a second, so this reads the
    compact rows directly and remembers the few distinct ages, sizes,
    senders and tenants it has already formatted. ValueError on a bad row.
    """
    ages: dict[int, str] = {}
    sizes: dict[int, str] = {}
    clean: dict[str, str] = {}
    out: list[str] = []
    add = out.append
    try:
        for mid, tenant, sender, received, size, frozen, _in_flight, rcpts in wire_rows:
            if not (isinstance(received, (int, float)) and isinstance(size, int) and isinstance(rcpts, list)
                    and isinstance(sender, str) and isinstance(tenant, str)):
                raise ValueError("malformed queue row")
            minutes = int((now - received) // 60)
            age = ages.get(minutes)
            if age is None:
                age = ages[minutes] = f"{format_age(minutes * 60.0):>3}"
            size_text = sizes.get(size)
            if size_text is None:
                size_text = sizes[size] = f"{format_size(int(size)):>5}"
            who = clean.get(sender)
            if who is None:
                who = clean[sender] = sanitize(str(sender))
            org = clean.get(tenant)
            if org is None:
                org = clean[tenant] = sanitize(str(tenant))
            add(f"{age} {size_text} {mid} <{who}> A={org}{' *** frozen ***' if frozen else ''}\n")
            for rcpt in rcpts:
                if not isinstance(rcpt, list) or len(rcpt) != 4 or not isinstance(rcpt[0], str):
                    raise ValueError("malformed queue row")
                address, state = rcpt[0], rcpt[1]
                plain = address.isprintable() and "\\" not in address and len(address) <= MAX_FIELD
                add(f"        {_MARKS.get(state, ' ') if isinstance(state, str) else ' '} {address if plain else sanitize(str(address))}\n")
            add("\n")
    except (TypeError, ValueError, AttributeError):
        raise ValueError("malformed queue row") from None
    return "".join(out)


def listing_lines(row: QueueRow, now: float) -> list[str]:
    """One message in `exim -bp` shape, plus its tenant and a blank line after it.

    ``25m  4.3K 1tA2bC-0000aB-x9 <billing@acme.example> A=acme *** frozen ***``
    then one indented line per recipient, ``D`` before delivered ones and
    ``F`` before failed ones.
    """
    head = (
        f"{format_age(now - row.received_at):>3} {format_size(row.size):>5} {row.id} "
        f"<{sanitize(row.sender)}> A={sanitize(row.tenant)}"
    )
    if row.frozen:
        head += " *** frozen ***"
    lines = [head]
    for r in row.recipients:
        mark = "D" if r.state is RecipientState.DELIVERED else "F" if r.state is RecipientState.FAILED else " "
        lines.append(f"        {mark} {sanitize(r.address)}")
    lines.append("")
    return lines


# ----------------------------------------------------- exiqsumm / qshape


@dataclass(slots=True)
class Bucket:
    """Messages, their total size, and the oldest and newest arrival in one group."""

    messages: int = 0
    volume: int = 0
    oldest: float | None = None  # received_at
    newest: float | None = None

    def add(self, row: QueueRow) -> None:
        self.messages += 1
        self.volume += row.size
        if self.oldest is None or row.received_at < self.oldest:
            self.oldest = row.received_at
        if self.newest is None or row.received_at > self.newest:
            self.newest = row.received_at


@dataclass(slots=True)
class Summary:
    total: Bucket = field(default_factory=Bucket)
    by_tenant: dict[str, Bucket] = field(default_factory=dict)
    by_domain: dict[str, Bucket] = field(default_factory=dict)
    by_transport: dict[str, Bucket] = field(default_factory=dict)
    by_age: dict[str, Bucket] = field(default_factory=dict)


def age_bucket(age: float) -> str:
    for name, limit in AGE_BUCKETS:
        if age < limit:
            return name
    return AGE_BUCKETS[-1][0]


def backlog_transport(chain: Sequence[str], skipped_until: Mapping[str, float], now: float) -> str | None:
    """The transport that holds a waiting recipient: the one its next attempt starts with; pure.

    Attempts walk the chain in order and pass over transports in their retry
    wait, so that is the first transport not waiting; when every one waits,
    the one whose wait ends first. None for an empty chain.
    """
    if not chain:
        return None
    for name in chain:
        until = skipped_until.get(name)
        if until is None or until <= now:
            return name
    return min(chain, key=lambda name: skipped_until[name])


def summarize(
    rows: Iterable[QueueRow],
    now: float,
    first_transport: Callable[[str, str], str | None],
) -> Summary:
    """Counts and volume by tenant, recipient domain, transport, and age.

    A message is counted once in each domain (and transport) that one of its
    open recipients has; `first_transport(tenant, address)` names the
    transport holding that recipient (see `backlog_transport`; None: no route
    matches any more).
    """
    summary = Summary(by_age={name: Bucket() for name, _ in AGE_BUCKETS})
    for row in rows:
        summary.total.add(row)
        summary.by_tenant.setdefault(row.tenant, Bucket()).add(row)
        summary.by_age[age_bucket(now - row.received_at)].add(row)
        domains: set[str] = set()
        transports: set[str] = set()
        for r in row.open_recipients:
            domains.add(r.address.rpartition("@")[2].lower() or r.address.lower())
            transports.add(first_transport(row.tenant, r.address) or NO_ROUTE)
        for domain in domains:
            summary.by_domain.setdefault(domain, Bucket()).add(row)
        for transport in transports:
            summary.by_transport.setdefault(transport, Bucket()).add(row)
    return summary


def _bucket_json(key: str, bucket: Bucket, now: float) -> JsonObject:
    return {
        "key": key,
        "messages": bucket.messages,
        "volume": bucket.volume,
        "oldest_age": None if bucket.oldest is None else max(0.0, now - bucket.oldest),
        "newest_age": None if bucket.newest is None else max(0.0, now - bucket.newest),
    }


def _sorted_groups(groups: Mapping[str, Bucket]) -> list[tuple[str, Bucket]]:
    return sorted(groups.items(), key=lambda kv: (-kv[1].messages, kv[0]))


def summary_to_json(summary: Summary, now: float) -> JsonObject:
    return {
        "total": _bucket_json("TOTAL", summary.total, now),
        "by_tenant": [_bucket_json(k, b, now) for k, b in _sorted_groups(summary.by_tenant)],
        "by_domain": [_bucket_json(k, b, now) for k, b in _sorted_groups(summary.by_domain)],
        "by_transport": [_bucket_json(k, b, now) for k, b in _sorted_groups(summary.by_transport)],
        "by_age": [_bucket_json(k, b, now) for k, b in summary.by_age.items()],
    }


def summary_lines(summary: Summary, now: float) -> list[str]:
    """exiqsumm's columns (Count Volume Oldest Newest), one section per grouping."""
    lines: list[str] = []
    sections = (
        ("tenant", _sorted_groups(summary.by_tenant)),
        ("recipient domain", _sorted_groups(summary.by_domain)),
        ("transport", _sorted_groups(summary.by_transport)),
        ("age", list(summary.by_age.items())),
    )
    for title, groups in sections:
        lines.append(f"By {title}:")
        lines.append(f"{'Count':>7}  {'Volume':>6}  {'Oldest':>6}  {'Newest':>6}  {title.capitalize()}")
        for key, bucket in groups:
            lines.append(_bucket_line(bucket, sanitize(key), now))
        lines.append("-" * 48)
        lines.append(_bucket_line(summary.total, "TOTAL", now))
        lines.append("")
    return lines


def _bucket_line(bucket: Bucket, label: str, now: float) -> str:
    oldest = format_age(now - bucket.oldest) if bucket.oldest is not None else "-"
    newest = format_age(now - bucket.newest) if bucket.newest is not None else "-"
    return f"{bucket.messages:>7}  {format_size(bucket.volume):>6}  {oldest:>6}  {newest:>6}  {label}"


# ------------------------------------------------------------------ show


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h5m, 2d3h."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def format_time(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def split_message(body: bytes) -> tuple[bytes, bytes]:
    """(header block, body) at the first empty line; the body is b"" when there is none."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = body.find(sep)
        if at >= 0:
            return body[: at + len(sep) // 2], body[at + len(sep) :]
    return body, b""


def printable_block(data: bytes) -> str:
    """Header lines for a terminal: every line sanitised, no control characters."""
    text = data.decode("utf-8", "replace")
    return "\n".join(sanitize(line, limit=100_000) for line in text.replace("\r\n", "\n").split("\n"))


def show_lines(
    entry: QueueEntry, *, in_flight: bool, now: float, waiting_until: float | None = None,
    cannot_record: str | None = None,
) -> list[str]:
    """Envelope, state and one line per recipient with its delivery state.

    `waiting_until`: the message is due but every transport is in its retry
    wait until then. `cannot_record`: why the outcome of its last attempt is
    held in memory only (the spool could not write it); delivery waits.
    """
    env = entry.envelope
    row = row_from_entry(entry, in_flight)
    state = message_state(row, now)
    if state == "active" and waiting_until is not None and waiting_until > now:
        state = f"deferred (every transport is in its retry wait until {format_time(waiting_until)})"
    if cannot_record:
        state = f"held: cannot record delivery state ({sanitize(cannot_record, limit=300)})"
    client = f"[{sanitize(env.client_ip)}]:{env.client_port}" if env.client_ip else "local"
    if env.client_helo:
        client += f" ({sanitize(env.client_helo)})"
    lines = [
        f"Message {env.id}",
        f"  state:      {state}",
        f"  tenant:     {sanitize(env.tenant)}",
        f"  sender:     <{sanitize(env.sender)}>",
        f"  received:   {format_time(env.received_at)} ({format_duration(now - env.received_at)} ago)"
        f" from {client} P={sanitize(env.protocol)}" + (f" X={sanitize(env.tls)}" if env.tls else ""),
        f"  size:       {env.size}" + (f" ({format_size(env.size)})" if env.size >= 1024 else ""),
    ]
    if env.header_message_id:
        lines.append(f"  message-id: {sanitize(env.header_message_id)}")
    if env.bounce_of:
        lines.append(f"  bounce of:  {sanitize(env.bounce_of)}")
    lines.append("Recipients:")
    for r in entry.recipients:
        lines.append(f"  {sanitize(r.address)}: {_recipient_state(r, now)}")
        if r.last_error and r.state is not RecipientState.DELIVERED:
            lines.append(f"      last error: {sanitize(r.last_error)}")
    return lines


def _recipient_state(r: Recipient, now: float) -> str:
    text = r.state.value
    if r.attempts:
        text += f", {r.attempts} attempt{'s' if r.attempts != 1 else ''}"
    if not r.state.is_final and r.next_attempt is not None:
        if r.next_attempt > now:
            text += f", next attempt {format_time(r.next_attempt)} (in {format_duration(r.next_attempt - now)})"
        else:
            text += ", due now"
    return text


# ---------------------------------------------------------------- status


def _number(value: JsonValue) -> float | None:
    """A number read from the status answer, or None for anything else (absent, null, text)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def status_lines(status: JsonObject, now: float) -> list[str]:
    """`relayctl status` for a human: daemon, listeners, queue, one row per transport."""
    queue = as_object(status["queue"])
    oldest = _number(queue.get("oldest_age"))
    lines = [
        f"relayd pid {status['pid']}, up {format_duration(as_float(status['uptime']))}, "
        f"config {sanitize(str(status.get('config', '')))}",
        "listeners: " + ", ".join(
            f"{sanitize(str(b['name']))} {sanitize(str(b['address']))}" + (f":{b['port']}" if b["port"] else "")
            for b in as_objects(status["listeners"])  # port 0: a unix listener, named by its path
        ),
        f"queue: {queue['total']} message(s): {queue['active']} active, {queue['deferred']} deferred, "
        f"{queue['frozen']} frozen" + (f"; oldest {format_duration(oldest)}" if oldest is not None else ""),
        "",
    ]
    lines[-1:-1] = spool_lines(as_object(status.get("spool")))
    transports = as_object(status["transports"])
    lines.extend(transport_table({name: as_object(h) for name, h in transports.items()}, now))
    return lines


def spool_lines(spool: JsonObject) -> list[str]:
    """Free space against the reserve, and messages whose outcome could not be recorded."""
    lines: list[str] = []
    free, reserve = spool.get("free_bytes"), spool.get("reserve_bytes")
    if isinstance(free, int) and isinstance(reserve, int):
        state = "new mail refused (452 4.3.1)" if free < reserve else "ok"
        lines.append(f"spool: {format_size(free)} free, reserve {format_size(reserve)}: {state}")
    if spool.get("emergency_reserve_used"):
        lines.append("spool: the disk filled up and the emergency reserve file is used; "
                     "new mail refused (452 4.3.1) until there is room to put it back")
    failure = spool.get("state_write_failure")
    unrecorded = spool.get("unrecorded")
    held = [str(mid) for mid in unrecorded] if isinstance(unrecorded, (dict, list)) else []
    if failure:
        lines.append(f"spool: cannot record delivery state ({sanitize(str(failure), limit=300)}); "
                     "new mail refused (452 4.3.1)")
    for mid in sorted(held)[:20]:
        lines.append(f"  {sanitize(str(mid))} held: cannot record delivery state")
    return lines


def transport_state(h: JsonObject) -> str:
    """One word (or phrase) for a transport's health; pure.

    `unused` until relayd has tried it (a transport is not `ok` because
    nothing has gone wrong yet), `failing` when its last attempt failed more
    recently than its last success, `retry wait until ...` while skipped.
    """
    skipped = _number(h.get("skipped_until"))
    if skipped:
        return f"retry wait until {format_time(skipped)}"
    success, error_at = _number(h.get("last_success")), _number(h.get("last_error_at"))
    if not success and not h.get("last_error"):
        return "unused"
    if h.get("last_error") and (not success or (error_at is not None and error_at > success)):
        return "failing"
    return "ok"


def _verify_cell(verify: JsonValue, now: float) -> str:
    if not isinstance(verify, dict):
        return "-"
    word = "ok" if verify.get("ok") else "FAILED"
    at = _number(verify.get("at"))
    when = f" {format_duration(now - at)} ago" if at is not None else ""
    detail = "" if verify.get("ok") else f": {sanitize(str(verify.get('detail', '')), limit=80)}"
    return f"{word}{when}{detail}"


def transport_table(transports: Mapping[str, JsonObject], now: float) -> list[str]:
    headers = ["TRANSPORT", "STATE", "LAST SUCCESS", "LAST ERROR", "LAST VERIFY"]
    rows: list[list[str]] = []
    for name in sorted(transports):
        h = transports[name]
        state = transport_state(h)
        success = _number(h.get("last_success"))
        last_success = f"{format_duration(now - success)} ago" if success else "-"
        error = h.get("last_error")
        last_error = "-"
        if error:
            at = _number(h.get("last_error_at"))
            when = f"{format_duration(now - at)} ago: " if at else ""
            last_error = when + sanitize(str(error), limit=120)
        rows.append([sanitize(name), state, last_success, last_error, _verify_cell(h.get("last_verify"), now)])
    return table_lines(headers, rows)


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
