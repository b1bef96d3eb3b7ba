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

Nodes sharing a provider account (`usage.store: redis`) share its caps and
rate: with `shared` set, each attempt reserves its places in Redis before the
send (`reserve`, relayd.delivery.sharedcaps), the checks here use the
shared counts last seen, and while Redis is away the node keeps to its
`local_share` of every cap and of the rate on its own counts.

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
from relayd.delivery.gates import HELD, OPEN, GateReport, GateVerdict, Reservation, closed_until, combine
from relayd.delivery.sharedcaps import SharedCaps
from relayd.jsonwire import JsonOutObject
from relayd.observe.claims import Claim, Pace
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
    shared: str = ""  # where the caps are shared, or why only the local share applies ("": not shared)

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


@dataclass(slots=True)
class _Current:
    """One kind of window and its current bounds, recomputed only when `now` leaves them.

    Checks run several times per message; calendar arithmetic on each would
    cost more than everything else the gate does.
    """

    window: Window
    word: str  # how a closure names it: "daily quota"
    start: float = 0.0
    end: float = -1.0
    slot: str = ""

    def at(self, now: float) -> str:
        if not self.start <= now < self.end:
            self.start, self.end = self.window.bounds(now)
            self.slot = self.window.slot(now)
        return self.slot


_Cap = tuple[str, _Current, int, str]  # counter key, window, cap, how a closure names it
_NO_CAP_ROOM = 2**62  # the room under no cap at all


class ShapingGate:
    """The shaping limits of every transport, as one `Gate`. See the module docstring."""

    def __init__(
        self,
        limits_of: LimitsOf,
        counters: WindowCounters,
        *,
        zone: tzinfo = timezone.utc,
        on_error: Callable[[str], None] = lambda _text: None,
        shared: SharedCaps | None = None,
    ) -> None:
        self._limits_of = limits_of
        self._shared = shared
        self._shared_counts: dict[tuple[str, str], int] = {}  # (key, window slot) -> all nodes' count last seen
        self._paced: dict[str, float] = {}  # transport -> until when the shared pace holds it
        self._counters = counters
        self._zone = zone
        self._minute = _Current(Window(Span.MINUTE, zone), "per-minute limit")
        self._hour = _Current(Window(Span.HOUR, zone), "hourly limit")
        self._day = _Current(Window(Span.DAY, zone), "daily quota")
        self._spans = (self._minute, self._hour, self._day)
        self._keys: dict[str, tuple[str, str]] = {}
        self._caps: dict[str, tuple[Shaping, tuple[_Cap, ...]]] = {}
        # transport -> (limits, places left under its caps, the span of time that holds for)
        self._room: dict[str, tuple[Shaping, int, float, float]] = {}
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
            messages, recipients = self._keys_of(name)
            for key, current in (*((messages, c) for c in self._spans), (recipients, self._day)):
                stored = await self._counters.count(key, current.window, now)
                slot = (key, current.at(now))
                self._counts[slot] = max(self._counts.get(slot, 0), stored)
        self._room.clear()

    async def drain(self) -> None:
        """Wait for every count still being written (at stop)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._shared is not None:
            await self._shared.drain()

    # -- the Gate ---------------------------------------------------------------------

    def check(self, transport: str, now: float) -> GateVerdict:
        limits = self._limits_of(transport)
        if not limits.is_limited:
            return OPEN
        verdicts = self._verdicts(transport, limits, now)
        return combine(verdicts) if verdicts else OPEN

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
        messages, recipients = self._keys_of(transport)
        additions = [(messages, current, report.messages) for current in self._spans]
        additions.append((recipients, self._day, report.recipients))
        written: list[tuple[str, Window, int, tuple[str, str]]] = []
        for key, current, n in additions:
            slot = (key, current.at(now))
            if slot not in self._counts:
                self._prune(key, current)  # a new window began: forget this key's last one
            self._counts[slot] = self._counts.get(slot, 0) + n
            written.append((key, current.window, n, slot))
        self._room.pop(transport, None)
        self._persist(written, now)
        if self._shared is not None and self._shared.away:
            for key, current, n in additions:
                self._shared.counted(key, current.window, n, now)

    async def reserve(self, transport: str, now: float) -> Reservation:
        """The attempt's places in the shared store (`gates.Reserving`); HELD when nothing is shared."""
        shared = self._shared
        limits = self._limits_of(transport)
        if shared is None or not limits.is_limited:
            return HELD
        claims = self._claims(transport, limits)
        pace = self._pace(transport, limits.max_per_second)
        if not claims and pace is None:
            return HELD
        reserved = await shared.reserve(claims, pace, now)
        if reserved is None:
            # The store is away (perhaps since this very call): the local share decides.
            verdict = combine(self._verdicts(transport, limits, now, started=True))
            return HELD if verdict.is_open else Reservation(verdict)
        for claim, count in zip(claims, reserved.counts):
            self._remember_shared(claim, count, now)
        if reserved.ok:
            return Reservation(OPEN, lambda report, _at: self._settle(shared, claims, report, now))
        if not reserved.full:
            self._paced[transport] = now + reserved.wait
        verdict = combine(self._verdicts(transport, limits, now))
        if verdict.is_open:  # the counts moved on meanwhile; the store's refusal stands all the same
            full = [c for c, n in zip(claims, reserved.counts) if c.cap is not None and n + 1 > c.cap]
            current = next((c for c in self._spans if full and c.window == full[0].window), self._day)
            verdict = self._window_closed(transport, current, f"{current.word} reached on the shared count")
        return Reservation(verdict)

    # -- views --------------------------------------------------------------------------

    def status(self, transports: Iterable[str], now: float) -> list[ShapingStatus]:
        """Per transport: its rate, every window's count against its cap, and the next release."""
        result = []
        for name in transports:
            limits = self._limits_of(name)
            messages, recipients = self._keys_of(name)
            caps = [
                CapStatus(c.window.span.value, "messages", self._taken(messages, c, now, 0), cap, c.end)
                for c, cap in zip(self._spans, _message_caps(limits))
            ]
            caps.append(CapStatus(
                "day", "recipients", self._taken(recipients, self._day, now, 0), limits.max_recipients_per_day,
                self._day.end,
            ))
            verdict = self.check(name, now)
            rate = self._rates.get(name)
            result.append(ShapingStatus(
                transport=name, rate=rate.now(now) if rate is not None else 0.0, limits=limits, caps=tuple(caps),
                in_flight=self._in_flight.get(name, 0), closed=verdict, next_release=verdict.until,
                shared=self._shared.status() if self._shared is not None else "",
            ))
        return result

    def spacing(self, transport: str) -> float:
        """Seconds between two messages at the transport's per-second rate (0: no rate limit)."""
        rate = self._limits_of(transport).max_per_second
        return 1.0 / rate if rate else 0.0

    # -- inside -----------------------------------------------------------------------------

    def _verdicts(self, transport: str, limits: Shaping, now: float, *, started: bool = False) -> list[GateVerdict]:
        """Every limit that closes the transport now; `started`: asked for an attempt already counted in flight.

        Asked several times per message: the window caps are walked with
        plain lookups, and a reason is only worded for a limit that closes.
        """
        verdicts: list[GateVerdict] = []
        in_flight = self._in_flight.get(transport, 0) - (1 if started else 0)
        share = self._share()
        seen = self._shared_counts if self._shared is not None and share is None else None
        known = self._room.get(transport)
        if known is None or known[0] is not limits or not known[2] <= now < known[3] or in_flight >= known[1] \
                or seen is not None or share is not None:
            self._window_verdicts(transport, limits, now, in_flight, share, seen, verdicts)
        rate = limits.max_per_second
        if rate is not None and not started:  # a started attempt has taken its token already
            rate *= share if share is not None else 1.0
            bucket = self._refilled(transport, rate, now)
            paced = self._paced.get(transport, 0.0) if share is None else 0.0
            if bucket.tokens < 1.0 or paced > now:
                until = max(now + (1.0 - bucket.tokens) / rate, paced)
                verdicts.append(closed_until(
                    until, f"rate limit {_rate_text(rate)}/s", gate=RATE_GATE, forceable=False, transport=transport,
                ))
        return verdicts

    def _window_verdicts(
        self, transport: str, limits: Shaping, now: float, in_flight: int, share: float | None,
        seen: dict[tuple[str, str], int] | None, verdicts: list[GateVerdict],
    ) -> None:
        """The window caps that close the transport; remembers the room left while only this node counts."""
        counts = self._counts
        room, valid_from, valid_until = _NO_CAP_ROOM, -math.inf, math.inf
        for key, current, cap, word in self._caps_of(transport, limits):
            slot = (key, current.at(now))
            used = counts.get(slot, 0)
            room = min(room, cap - used)
            valid_from, valid_until = max(valid_from, current.start), min(valid_until, current.end)
            used += in_flight
            if seen is not None:
                used = max(used, seen.get(slot, 0))
            if used >= (cap if share is None else _part(cap, share)):
                verdicts.append(self._window_closed(transport, current, f"{word} {_cap_text(cap, share)} reached"))
        if seen is None and share is None:
            # Until a count changes or a window ends, a check with fewer attempts
            # in flight than this room has nothing to look at (most checks).
            self._room[transport] = (limits, room, valid_from, valid_until)

    def _caps_of(self, transport: str, limits: Shaping) -> tuple[_Cap, ...]:
        """The transport's window caps as (counter key, window, cap, wording), remembered per `Shaping` value."""
        known = self._caps.get(transport)
        if known is not None and known[0] is limits:
            return known[1]
        messages, recipients = self._keys_of(transport)
        caps = [(messages, c, cap, c.word) for c, cap in zip(self._spans, _message_caps(limits)) if cap is not None]
        if limits.max_recipients_per_day is not None:
            caps.append((recipients, self._day, limits.max_recipients_per_day, "daily recipient quota"))
        self._caps[transport] = (limits, tuple(caps))
        return self._caps[transport][1]

    def _settle(self, shared: SharedCaps, claims: list[Claim], report: GateReport, reserved_at: float) -> None:
        """A reserved attempt ended: the store settles it; a place given back is free here at once too."""
        shared.settle(claims, report, reserved_at)
        if report.messages <= 0:
            for claim in claims:
                slot = (claim.key, claim.window.slot(reserved_at))
                if slot in self._shared_counts:
                    self._shared_counts[slot] = max(0, self._shared_counts[slot] - 1)

    def _remember_shared(self, claim: Claim, count: int, now: float) -> None:
        slot = (claim.key, claim.window.slot(now))
        if slot not in self._shared_counts:  # a new window: forget the key's earlier one of this span
            prefix = claim.window.span.value + ":"
            for old in [k for k in self._shared_counts if k[0] == claim.key and k[1].startswith(prefix)]:
                del self._shared_counts[old]
        self._shared_counts[slot] = count

    def _share(self) -> float | None:
        """This node's share of every cap while the shared store is away; None otherwise (whole caps)."""
        shared = self._shared
        return shared.local_share() if shared is not None and shared.away else None

    def _taken(self, key: str, current: _Current, now: float, in_flight: int) -> int:
        """Places used in a window: this node's count and attempts, or all nodes' count last seen if more."""
        used = self._used(key, current, now) + in_flight
        if self._shared is not None and not self._shared.away:
            used = max(used, self._shared_counts.get((key, current.at(now)), 0))
        return used

    def _claims(self, transport: str, limits: Shaping) -> list[Claim]:
        messages, recipients = self._keys_of(transport)
        claims = [Claim(messages, c.window, cap) for c, cap in zip(self._spans, _message_caps(limits)) if cap is not None]
        if limits.max_recipients_per_day is not None:
            claims.append(Claim(recipients, self._day.window, limits.max_recipients_per_day))
        return claims

    def _pace(self, transport: str, rate: float | None) -> Pace | None:
        """The shared form of the token bucket: the same spacing and burst, kept by the store."""
        if rate is None:
            return None
        capacity = max(1.0, rate * _BURST_SHARE)
        return Pace(f"{message_key(transport)}:pace", 1.0 / rate, (capacity - 1.0) / rate)

    def _window_closed(self, transport: str, current: _Current, what: str) -> GateVerdict:
        return closed_until(
            current.end, f"{what}, resets {self._clock_text(current.end, current.window.span)}",
            gate=QUOTA_GATE, forceable=False, transport=transport,
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

    def _used(self, key: str, current: _Current, now: float) -> int:
        return self._counts.get((key, current.at(now)), 0)

    def _keys_of(self, transport: str) -> tuple[str, str]:
        keys = self._keys.get(transport)
        if keys is None:
            keys = self._keys[transport] = (message_key(transport), recipient_key(transport))
        return keys

    def _prune(self, key: str, current: _Current) -> None:
        """Forget this key's counts of earlier windows of the same span (one live slot per key and span)."""
        prefix = current.window.span.value + ":"
        for slot in [s for s in self._counts if s[0] == key and s[1].startswith(prefix) and s[1] != current.slot]:
            del self._counts[slot]

    def _persist(self, additions: list[tuple[str, Window, int, tuple[str, str]]], now: float) -> None:
        task = asyncio.get_running_loop().create_task(self._write(additions, now))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, additions: list[tuple[str, Window, int, tuple[str, str]]], now: float) -> None:
        """Add one attempt's counts to the store: (key, window, n, the slot they were counted in here)."""
        try:
            # Together, so a store that commits in groups writes one delivery's counts at once.
            wanted = [(key, window, n, slot) for key, window, n, slot in additions if n > 0]
            totals = await asyncio.gather(*(self._counters.add(key, window, n, now) for key, window, n, _ in wanted))
            for (_key, _window, _n, slot), total in zip(wanted, totals):
                if slot in self._counts and total > self._counts[slot]:
                    # A store written by an earlier run (or shared) knew more: never count fewer.
                    self._counts[slot] = total
                    self._room.clear()
        except CounterError as error:
            if not self._store_failing:
                self._store_failing = True
                self._on_error(f"shaping counts are kept in memory only: {error}")
            return
        if self._store_failing:
            self._store_failing = False
            self._on_error("shaping counts are written to the store again")


def _message_caps(limits: Shaping) -> tuple[int | None, int | None, int | None]:
    """The message caps per minute, hour and day, in the order of `ShapingGate._spans`."""
    return limits.max_per_minute, limits.max_per_hour, limits.max_per_day


def _rate_text(rate: float) -> str:
    return f"{rate:g}"


def _part(cap: int, share: float | None) -> int:
    """A cap, or this node's share of it (rounded down: never more than the whole between the nodes)."""
    return cap if share is None else math.floor(cap * share)


def _cap_text(cap: int, share: float | None) -> str:
    return str(cap) if share is None else f"{_part(cap, share)} (local share of {cap})"



def status_wire(status: ShapingStatus) -> JsonOutObject:
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
        "shared": status.shared or None,
    }
