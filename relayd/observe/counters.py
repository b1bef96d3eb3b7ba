"""Window counters: how many messages (or recipients) a key used in the current minute, hour, day or month.

Takes: `add(key, window, n, now)` after something was used (a transport
took a message, a tenant sent one), `count(key, window, now)` to ask.
Emits: the count of the calendar window that contains `now`; `add` returns
the new count, so a shared backend (several relayd nodes on one provider
account) tells each node the total all of them reached.
Untrusted input: none (keys are built by relayd from configured names).
How it fails: an implementation raises `CounterError` when its store
cannot be read or written; callers decide what a missing count means
(a gate never treats it as "unlimited").

Windows are calendar windows in a time zone (`Window.zone`, UTC unless
configured): a day window resets at 00:00 of that zone, a month window on
the 1st. A count belongs to the window it was added in and is forgotten
once that window is over, so `count` never needs a clean-up pass.

Keys are plain strings in one flat key space, named by their owner:
`transport:<name>` (messages), `transport:<name>:rcpt` (recipients),
`tenant:<name>`... Two owners never share a key.

The seam is deliberately small and async: the embedded implementation
(`relayd.observe.countstore.SqliteCounters`) does its disk work off the event
loop, and a network store (Redis: INCRBY on `<key>:<window>:<start>` with an
expiry past the window's end) fits it unchanged. `MemoryCounters` is the
reference behaviour, for tests and for a node that keeps nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Protocol


class CounterError(Exception):
    """The counter store could not be read or written (the message says why)."""


class Span(enum.Enum):
    """How long a calendar window lasts."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Window:
    """A kind of calendar window in a time zone; `bounds(now)` is the one that contains `now`."""

    span: Span
    zone: tzinfo = timezone.utc

    def bounds(self, now: float) -> tuple[float, float]:
        """Start and end (epoch seconds) of the window containing `now`; start <= now < end."""
        local = datetime.fromtimestamp(now, self.zone)
        if self.span is Span.MINUTE:
            start = local.replace(second=0, microsecond=0)
            end = start + timedelta(minutes=1)
        elif self.span is Span.HOUR:
            start = local.replace(minute=0, second=0, microsecond=0)
            end = start + timedelta(hours=1)
        elif self.span is Span.DAY:
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = _next_midnight(start)
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
            end = start.replace(year=year, month=month)
        return start.timestamp(), end.timestamp()

    def start(self, now: float) -> float:
        return self.bounds(now)[0]

    def end(self, now: float) -> float:
        return self.bounds(now)[1]

    def slot(self, now: float) -> str:
        """The name of the window containing `now` in a store: `<span>:<start epoch>`."""
        return self.slot_at(self.start(now))

    def slot_at(self, start: float) -> str:
        """The name of the window that starts at `start` (one of `bounds`)."""
        return f"{self.span.value}:{int(start)}"


def _next_midnight(start: datetime) -> datetime:
    """The next day's 00:00 in the same zone (a DST day is 23 or 25 hours long)."""
    return (start + timedelta(hours=36)).replace(hour=0, minute=0, second=0, microsecond=0)


MINUTE = Window(Span.MINUTE)
HOUR = Window(Span.HOUR)
DAY = Window(Span.DAY)
MONTH = Window(Span.MONTH)


class WindowCounters(Protocol):
    """Counts per key and calendar window. See the module docstring."""

    async def add(self, key: str, window: Window, n: int, now: float) -> int:
        """Add `n` (>= 0) to the key's count in the window containing `now`; the new count."""
        ...

    async def count(self, key: str, window: Window, now: float) -> int:
        """The key's count in the window containing `now` (0 when nothing was added)."""
        ...

    async def close(self) -> None:
        """Release the store (files, connections); further calls raise CounterError."""
        ...


class MemoryCounters:
    """A `WindowCounters` that keeps its counts in memory only (tests; nothing survives a restart)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._ends: dict[tuple[str, str], float] = {}
        self._closed = False

    async def add(self, key: str, window: Window, n: int, now: float) -> int:
        self._check(n)
        slot = (key, window.slot(now))
        self._expire(now)
        self._counts[slot] = self._counts.get(slot, 0) + n
        self._ends[slot] = window.end(now)
        return self._counts[slot]

    async def count(self, key: str, window: Window, now: float) -> int:
        if self._closed:
            raise CounterError("counters are closed")
        return self._counts.get((key, window.slot(now)), 0)

    async def close(self) -> None:
        self._closed = True

    def _check(self, n: int) -> None:
        if self._closed:
            raise CounterError("counters are closed")
        if n < 0:
            raise ValueError("a count only grows")

    def _expire(self, now: float) -> None:
        for slot in [s for s, end in self._ends.items() if end <= now]:
            self._counts.pop(slot, None)
            self._ends.pop(slot, None)
