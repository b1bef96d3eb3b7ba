"""Per-transport shaping: a token bucket per second and message/recipient caps per minute, hour and day.

Takes: each transport's `Shaping` limits (relayd.config.shaping, read from
the live config on every check, so a reload applies at once); the start and
end of every attempt (`relayd.delivery.gates.Gate`); a `WindowCounters` store
(relayd.observe.counters) that keeps the window counts across restarts.
Emits: per transport a `GateVerdict`: open, or closed until the next token or
the end of the window whose cap is reached, with the reason `mailq` shows
("daily quota 500 reached, resets 00:00 UTC"); a `ShapingStatus` per
transport for `relayctl status` and the metrics.
Untrusted input: none (reports come from relayd's own transports).
How it fails: a count the store cannot write is kept in memory (the caps
still hold in this process) and reported once through `on_error`; a store
that cannot be read at start stops the start (`load` raises).

What counts: a message once per transaction the upstream accepted (at
least one recipient taken), a recipient once per accepted RCPT. An attempt
in progress holds a place in every window cap (`attempt_started`), so
parallel deliveries cannot overshoot a cap together; it is released when
the attempt ends, and what the upstream took is counted then. A recipient
cap counts one place per attempt in progress: one message with many
recipients can pass the cap by its own recipients, never by more.

The token bucket holds at most `max(1, rate / 10)` tokens: at 2/s messages go
out every half second (any one-second window sees at most 2, plus 1 at its
edge), at 100/s in bursts of at most 10. A token is taken when an attempt
starts and not given back if the attempt fails (the provider saw the
connection).

Every closure here is not forceable: an operator's flush must not push a
day's backlog into an account that locks at its quota. Waiting for a window
is no failed attempt (the scheduler puts the message back; see
relayd.delivery.holding).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Callable, Iterable

from relayd.config.shaping import KEYS as SHAPING_KEYS, Shaping
from relayd.delivery.gates import OPEN, GateReport, GateVerdict, closed_until, combine
from relayd.observe.counters import CounterError, Span, Window, WindowCounters

RATE_GATE = "rate"
QUOTA_GATE = "quota"
_BURST_SHARE = 0.1  # bucket size as a share of one second's rate (at least one token)
_RATE_HALF_LIFE = 60.0  # seconds: the "current rate" is an average that forgets at this pace

LimitsOf = Callable[[str], Shaping]


@dataclass(frozen=True, slots=True)
class CapStatus:
    """One window cap of a transport: used against the limit (None: no limit), and when it resets."""

    span: str  # minute, hour, day
    what: str  # messages, recipients
    used: int
    limit: int | None
    resets_at: float


@dataclass(frozen=True, slots=True)
class ShapingStatus:
    """One transport as `relayctl status` and the metrics show it."""

    transport: str
    rate: float  # messages per second, averaged over about a minute
    limits: Shaping
    caps: tuple[CapStatus, ...]
    in_flight: int
    closed: GateVerdict  # OPEN, or until when and why
    next_release: float | None  # when a closed transport takes mail again

    def cap(self, span: str, what: str = "messages") -> CapStatus | None:
        return next((c for c in self.caps if c.span == span and c.what == what), None)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass(slots=True)
class _Rate:
    value: float = 0.0
    stamp: float = 0.0

    def now(self, now: float) -> float:
        return self.value * math.pow(0.5, max(0.0, now - self.stamp) / _RATE_HALF_LIFE)

    def add(self, n: int, now: float) -> None:
        self.value = self.now(now) + n * math.log(2) / _RATE_HALF_LIFE
        self.stamp = now


def message_key(transport: str) -> str:
    return f"transport:{transport}"


def recipient_key(transport: str) -> str:
    return f"transport:{transport}:rcpt"


class ShapingGate:
    """The shaping limits of every transport, as one `Gate`. See the module docstring."""

    def __init__(
        self,
        limits_of: LimitsOf,
        counters: WindowCounters,
        *,
        zone: tzinfo = timezone.utc,
        on_error: Callable[[str], None] = lambda _text: None,
    ) -> None:
        self._limits_of = limits_of
        self._counters = counters
        self._zone = zone
        self._windows = {span: Window(span, zone) for span in (Span.MINUTE, Span.HOUR, Span.DAY)}
        self._on_error = on_error
        self._counts: dict[tuple[str, str], int] = {}  # (key, window slot) -> count
        self._buckets: dict[str, _Bucket] = {}
        self._rates: dict[str, _Rate] = {}
        self._in_flight: dict[str, int] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._store_failing = False

    # -- start and stop -------------------------------------------------------------

    async def load(self, transports: Iterable[str], now: float) -> None:
        """Read the current windows' counts of these transports from the store (at start, reload).

        Raises CounterError when the store cannot be read.
        """
        for name in transports:
            for key, spans in ((message_key(name), tuple(self._windows)), (recipient_key(name), (Span.DAY,))):
                for span in spans:
                    window = self._windows[span]
                    stored = await self._counters.count(key, window, now)
                    slot = (key, window.slot(now))
                    self._counts[slot] = max(self._counts.get(slot, 0), stored)

    async def drain(self) -> None:
        """Wait for every count still being written (at stop)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # -- the Gate ---------------------------------------------------------------------

    def check(self, transport: str, now: float) -> GateVerdict:
        limits = self._limits_of(transport)
        if not limits.is_limited:
            return OPEN
        return combine(self._verdicts(transport, limits, now))

    def attempt_started(self, transport: str, now: float) -> None:
        self._in_flight[transport] = self._in_flight.get(transport, 0) + 1
        limits = self._limits_of(transport)
        if limits.max_per_second is not None:
            bucket = self._refilled(transport, limits.max_per_second, now)
            bucket.tokens -= 1.0

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        left = self._in_flight.get(transport, 0) - 1
        if left > 0:
            self._in_flight[transport] = left
        else:
            self._in_flight.pop(transport, None)
        if report.messages <= 0 and report.recipients <= 0:
            return
        self._rates.setdefault(transport, _Rate()).add(report.messages, now)
        additions = [(message_key(transport), self._windows[span], report.messages) for span in self._windows]
        additions.append((recipient_key(transport), self._windows[Span.DAY], report.recipients))
        for key, window, n in additions:
            self._prune(key, window, now)
            slot = (key, window.slot(now))
            self._counts[slot] = self._counts.get(slot, 0) + n
        self._persist(additions, now)

    # -- views --------------------------------------------------------------------------

    def status(self, transports: Iterable[str], now: float) -> list[ShapingStatus]:
        """Per transport: its rate, every window's count against its cap, and the next release."""
        result = []
        for name in transports:
            limits = self._limits_of(name)
            caps = tuple(
                CapStatus(span.value, what, self._used(key, window, now), limit, window.end(now))
                for span, window in self._windows.items()
                for what, key, limit in (
                    ("messages", message_key(name), _message_cap(limits, span)),
                    ("recipients", recipient_key(name), limits.max_recipients_per_day if span is Span.DAY else None),
                )
                if what == "messages" or span is Span.DAY
            )
            verdict = self.check(name, now)
            rate = self._rates.get(name)
            result.append(ShapingStatus(
                transport=name, rate=rate.now(now) if rate is not None else 0.0, limits=limits, caps=caps,
                in_flight=self._in_flight.get(name, 0), closed=verdict, next_release=verdict.until,
            ))
        return result

    def spacing(self, transport: str) -> float:
        """Seconds between two messages at the transport's per-second rate (0: no rate limit)."""
        rate = self._limits_of(transport).max_per_second
        return 1.0 / rate if rate else 0.0

    # -- inside -----------------------------------------------------------------------------

    def _verdicts(self, transport: str, limits: Shaping, now: float) -> list[GateVerdict]:
        verdicts: list[GateVerdict] = []
        in_flight = self._in_flight.get(transport, 0)
        for span, window in self._windows.items():
            cap = _message_cap(limits, span)
            if cap is not None and self._used(message_key(transport), window, now) + in_flight >= cap:
                verdicts.append(self._window_closed(transport, window, now, f"{_SPAN_WORD[span]} {cap} reached"))
        rcpt_cap = limits.max_recipients_per_day
        day = self._windows[Span.DAY]
        if rcpt_cap is not None and self._used(recipient_key(transport), day, now) + in_flight >= rcpt_cap:
            verdicts.append(self._window_closed(transport, day, now, f"daily recipient quota {rcpt_cap} reached"))
        if limits.max_per_second is not None:
            bucket = self._refilled(transport, limits.max_per_second, now)
            if bucket.tokens < 1.0:
                until = now + (1.0 - bucket.tokens) / limits.max_per_second
                verdicts.append(closed_until(
                    until, f"rate limit {_rate_text(limits.max_per_second)}/s", gate=RATE_GATE,
                    forceable=False, transport=transport,
                ))
        return verdicts

    def _window_closed(self, transport: str, window: Window, now: float, what: str) -> GateVerdict:
        end = window.end(now)
        return closed_until(
            end, f"{what}, resets {self._clock_text(end, window.span)}", gate=QUOTA_GATE,
            forceable=False, transport=transport,
        )

    def _clock_text(self, when: float, span: Span) -> str:
        moment = datetime.fromtimestamp(when, self._zone)
        zone = moment.tzname() or "UTC"
        if span is Span.MINUTE:
            return f"{moment:%H:%M:%S} {zone}"
        return f"{moment:%H:%M} {zone}"

    def _refilled(self, transport: str, rate: float, now: float) -> _Bucket:
        capacity = max(1.0, rate * _BURST_SHARE)
        bucket = self._buckets.get(transport)
        if bucket is None:
            bucket = self._buckets[transport] = _Bucket(capacity, now)
        elif now > bucket.stamp:
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        return bucket

    def _used(self, key: str, window: Window, now: float) -> int:
        return self._counts.get((key, window.slot(now)), 0)

    def _prune(self, key: str, window: Window, now: float) -> None:
        """Forget this key's counts of windows that are over (one live slot per key and span)."""
        live = window.slot(now)
        prefix = window.span.value + ":"
        for slot in [s for s in self._counts if s[0] == key and s[1].startswith(prefix) and s[1] != live]:
            del self._counts[slot]

    def _persist(self, additions: list[tuple[str, Window, int]], now: float) -> None:
        task = asyncio.get_running_loop().create_task(self._write(additions, now))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, additions: list[tuple[str, Window, int]], now: float) -> None:
        try:
            for key, window, n in additions:
                if n > 0:
                    total = await self._counters.add(key, window, n, now)
                    slot = (key, window.slot(now))
                    if slot in self._counts:
                        # A shared store may know of other nodes' sends: never count fewer.
                        self._counts[slot] = max(self._counts[slot], total)
        except CounterError as error:
            if not self._store_failing:
                self._store_failing = True
                self._on_error(f"shaping counts are kept in memory only: {error}")
            return
        if self._store_failing:
            self._store_failing = False
            self._on_error("shaping counts are written to the store again")


_SPAN_WORD = {Span.MINUTE: "per-minute limit", Span.HOUR: "hourly limit", Span.DAY: "daily quota"}


def _message_cap(limits: Shaping, span: Span) -> int | None:
    if span is Span.MINUTE:
        return limits.max_per_minute
    if span is Span.HOUR:
        return limits.max_per_hour
    return limits.max_per_day


def _rate_text(rate: float) -> str:
    return f"{rate:g}"



def status_wire(status: ShapingStatus) -> dict[str, object]:
    """One transport's shaping for the control socket (`relayctl status --json`): plain JSON values."""
    return {
        "rate": round(status.rate, 3),
        "limits": {key: getattr(status.limits, key) for key in SHAPING_KEYS if getattr(status.limits, key) is not None},
        "caps": [
            {"span": c.span, "what": c.what, "used": c.used, "limit": c.limit, "resets_at": c.resets_at}
            for c in status.caps
        ],
        "in_flight": status.in_flight,
        "held": f"{status.closed.reason}" if status.closed.until is not None else None,
        "next_release": status.next_release,
    }
