"""Claims under caps: add to several window counters only if every one of them stays within its cap.

Takes: `take(claims, n, now)`: a few (key, window, cap) claims to grow by `n` together.
Emits: a `Taken`: whether they were added (all of them, or none), and the
counts as they are afterwards (as they were, when refused).
Untrusted input: none.
How it fails: `CounterError` from the store underneath; nothing is added then.

Checking a count and then adding to it is a race as soon as two sessions
(or two relayd nodes) do it at once: both see 999 under a cap of 1000 and
both send. A claim closes it. `LocalClaims` serialises the claims of one
process over any `WindowCounters` store (the embedded SQLite one is only
ever written by its own relayd); the Redis store answers a claim with one
script, which Redis runs alone, so nodes sharing it cannot overshoot
together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, Sequence

from relayd.observe.counters import Window, WindowCounters


@dataclass(frozen=True, slots=True)
class Claim:
    """One counter to grow, in the window containing `now`, never past `cap` (None: no cap)."""

    key: str
    window: Window
    cap: int | None


@dataclass(frozen=True, slots=True)
class Taken:
    ok: bool
    counts: tuple[int, ...]  # one per claim, in order


class ClaimCounters(WindowCounters, Protocol):
    """A `WindowCounters` that can also take claims atomically."""

    async def take(self, claims: Sequence[Claim], n: int, now: float) -> Taken: ...


@dataclass(frozen=True, slots=True)
class Pace:
    """A send rate shared by several nodes: one send per `interval` seconds, `tolerance` seconds of burst."""

    key: str
    interval: float
    tolerance: float = 0.0


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reservation's answer: whether the places were taken, the counts, and the pace's wait when it refused."""

    ok: bool
    counts: tuple[int, ...]  # one per claim, in order
    wait: float = 0.0  # seconds until the pace lets the next send go (0 when it did not refuse)

    @property
    def full(self) -> bool:
        """A window cap refused (not only the pace)."""
        return not self.ok and self.wait <= 0.0


class SharedClaims(ClaimCounters, Protocol):
    """A store shared by several relayd nodes, where a send's places are reserved before it goes out.

    `reserve` takes one place in every claim and one step of the pace in one
    atomic step (all or nothing); `give_back` returns places of a send that
    did not happen, to the windows that were current at `at`.
    """

    async def reserve(self, claims: Sequence[Claim], pace: Pace | None, now: float) -> Reserved: ...

    async def give_back(self, claims: Sequence[Claim], n: int, at: float) -> None: ...


class LocalClaims:
    """Claims over a store that only this process writes, decided in memory and then written.

    The current window's count of a key is read from the store once, then
    kept here; a claim is checked and counted in memory in one step (no
    await in between, so two sessions cannot both take the last place), and
    `take` returns once the store has the new counts (a kill -9 right after
    loses nothing the caller acknowledged).
    """

    def __init__(self, counters: WindowCounters) -> None:
        self.counters = counters
        self._known: dict[tuple[str, str], int] = {}  # (key, window slot) -> count

    async def _load(self, key: str, window: Window, now: float) -> tuple[str, str]:
        slot = (key, window.slot(now))
        if slot not in self._known:
            stored = await self.counters.count(key, window, now)
            self._forget_older(key, window, slot[1])
            self._known[slot] = max(self._known.get(slot, 0), stored)
        return slot

    def _forget_older(self, key: str, window: Window, live: str) -> None:
        prefix = window.span.value + ":"
        for old in [k for k in self._known if k[0] == key and k[1].startswith(prefix) and k[1] != live]:
            del self._known[old]

    async def add(self, key: str, window: Window, n: int, now: float) -> int:
        slot = await self._load(key, window, now)
        self._known[slot] += n
        await self.counters.add(key, window, n, now)
        return self._known[slot]

    async def count(self, key: str, window: Window, now: float) -> int:
        return self._known[await self._load(key, window, now)]

    async def close(self) -> None:
        await self.counters.close()

    async def take(self, claims: Sequence[Claim], n: int, now: float) -> Taken:
        slots = [await self._load(c.key, c.window, now) for c in claims]
        counts = [self._known[slot] for slot in slots]
        if any(c.cap is not None and count + n > c.cap for c, count in zip(claims, counts)):
            return Taken(ok=False, counts=tuple(counts))
        for slot in slots:
            self._known[slot] += n
        taken = Taken(ok=True, counts=tuple(self._known[slot] for slot in slots))
        await asyncio.gather(*(self.counters.add(c.key, c.window, n, now) for c in claims))
        return taken
