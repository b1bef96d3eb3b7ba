"""Bounds on one client and on all clients of a listener: counts, deadlines, budgets.

Takes: a listener's limits (relayd.config.model.ListenerConfig), client addresses,
byte counts and an injected clock.
Emits: decisions (admit or refuse a connection, how long the next read may
wait, whether a command or an error is over budget, whether a log line may be
written) as plain values; the listener does the I/O and the replying.
Untrusted input: none directly; every value comes from the listener, which
counts what the client sends.
How it fails: it does not; a refusal is a return value.

Why each bound exists:
- `ConnectionCounter`: every connection holds a file descriptor and some
  memory; without a cap, a thousand idle connections exhaust the descriptors
  and the next legitimate client is dropped. Loopback clients are counted only
  against the listener's total by default: every local application connects
  from 127.0.0.1, so a per-address cap there would let one application's
  connections lock out all the others. When the total is reached the listener
  closes its longest-idle unauthenticated connection to make room, so idle
  connections, from anywhere, cannot keep a legitimate client out.
- `DataDeadline`: aiosmtpd's idle timer is re-armed by every byte, so one byte
  a second holds a session for days. A line must end within the idle timeout,
  and the whole DATA phase must keep up a minimum average rate (Postfix's
  smtpd_timeout per record plus smtpd_min_data_rate).
- `SessionBudget`: a client that never authenticates may send only so many
  commands, and any client only so many refused commands (Postfix's
  smtpd_hard_error_limit), before it is disconnected.
- `LogGate`: one connection, or one flood of connections, must not grow the
  main log by megabytes; past a burst, lines are counted and summarised.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from relayd.netaddr import is_loopback


class Writable(Protocol):
    """What a final reply needs from a transport (asyncio's, uvloop's or an SSL one).

    uvloop's TCPTransport is not an `asyncio.WriteTransport` subclass, so the
    listener must never test the transport's class: it asks for these methods.
    """

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


def write_and_close(transport: object, line: bytes) -> bool:
    """Write one final line and close; False when there was nothing open to write to."""
    write = getattr(transport, "write", None)
    is_closing = getattr(transport, "is_closing", None)
    close = getattr(transport, "close", None)
    if write is None or is_closing is None or close is None or is_closing():
        return False
    write(line)
    close()
    return True


@dataclass
class ConnectionCounter:
    """Open connections on one listener, in total and per client address."""

    max_total: int
    max_per_address: int
    limit_loopback_per_address: bool = False
    total: int = 0
    by_address: Counter[str] = field(default_factory=Counter)
    # A flood of refused connections is summarised rather than logged line by line.
    log_gate: LogGate = field(default_factory=lambda: LogGate(burst=10, window=60.0))

    def admit(self, address: str) -> str | None:
        """Count a new connection, or say why it is refused ("total" or "address")."""
        if self.total >= self.max_total:
            return "total"
        # "" is a Unix-socket peer: local users there are told apart by uid, not
        # address, so only the total applies to them.
        per_address = bool(address) and (self.limit_loopback_per_address or not is_loopback(address))
        if per_address and self.by_address[address] >= self.max_per_address:
            return "address"
        self.total += 1
        self.by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


@dataclass
class DataDeadline:
    """When a DATA phase must have made progress by, consulted once per chunk read.

    - per line: a line must end (LF) within `line_timeout` of its first byte;
    - whole DATA: the phase may last `line_timeout` plus one second for every
      `min_rate` bytes received, and never more than `line_timeout` plus
      `max_bytes / min_rate` (the size limit at the minimum rate).

    A sender at or above `min_rate` is never cut off; a trickle is, within
    about `line_timeout` of falling behind.
    """

    started: float
    line_timeout: float
    min_rate: float
    max_bytes: int
    received: int = 0
    line_started: float = field(init=False)

    def __post_init__(self) -> None:
        self.line_started = self.started

    def note(self, chunk: bytes, now: float) -> None:
        """Account for one chunk read at `now`."""
        self.received += len(chunk)
        if b"\n" in chunk:
            self.line_started = now  # the last line in the chunk began no earlier

    def whole_deadline(self) -> float:
        credited = min(self.received, self.max_bytes) / self.min_rate
        cap = self.max_bytes / self.min_rate
        return self.started + self.line_timeout + min(credited, cap)

    def seconds_left(self, now: float) -> float:
        """Time the next read may wait; zero or less means the deadline has passed."""
        line_deadline = self.line_started + self.line_timeout
        return min(line_deadline, self.whole_deadline()) - now


RECIPIENT_OVERSHOOT = 1000


@dataclass
class SessionBudget:
    """Commands before authentication and refused commands, for one connection."""

    max_commands_before_auth: int
    max_errors: int
    commands_before_auth: int = 0
    errors: int = 0
    recipient_overshoot: int = 0

    def command(self, *, identified: bool) -> bool:
        """Count one command; False when it is over the pre-authentication budget."""
        if identified:
            return True
        self.commands_before_auth += 1
        return self.commands_before_auth <= self.max_commands_before_auth

    def error(self, reply: bytes) -> bool:
        """Count one refused command; False once the hard error limit is reached.

        Recipients over the per-message limit (452 4.5.3) are the client's cue
        to send the rest in another message, not an error, up to
        `RECIPIENT_OVERSHOOT` of them (Postfix's smtpd_recipient_overshoot_limit).
        """
        if reply.startswith(b"452 4.5.3") and self.recipient_overshoot < RECIPIENT_OVERSHOOT:
            self.recipient_overshoot += 1
            return True
        self.errors += 1
        return self.errors < self.max_errors

    def message_accepted(self) -> None:
        """A delivered message forgives earlier errors (as Postfix's smtpd does)."""
        self.errors = 0


@dataclass
class LogGate:
    """At most `burst` lines per `window` seconds; the rest are counted, not written."""

    burst: int
    window: float
    window_start: float = float("-inf")
    written: int = 0
    suppressed: int = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """(write this line?, lines suppressed since the last one written)."""
        if now - self.window_start >= self.window:
            self.window_start = now
            self.written = 0
        if self.written >= self.burst:
            self.suppressed += 1
            return False, 0
        self.written += 1
        skipped, self.suppressed = self.suppressed, 0
        return True, skipped

    def take_suppressed(self) -> int:
        """Lines suppressed and not yet reported (for a summary at the end)."""
        skipped, self.suppressed = self.suppressed, 0
        return skipped
