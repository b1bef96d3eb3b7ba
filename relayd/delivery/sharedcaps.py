"""Shared transport caps: a provider account's window caps and send rate, kept by several relayd nodes in one store.

Takes: the claims and pace of one attempt on a transport (`reserve`), what
the attempt came to (`settle`), what this node sent while the store was
away (`counted`).
Emits: a `Reserved` answer from the store (the places taken, or refused with
the counts and the pace's wait), or None while the store is away, when the
shaping gate applies this node's `local_share` of every cap and of the rate
on its own counts (relayd.delivery.shaping). A line for the main log when
the store goes away and when it is shared again (`on_change`).
Untrusted input: none (the store reads Redis's replies as integers).
How it fails: a store that cannot be reached, or answers past its timeout,
is never taken as "no limit": see above. A task tries it again every
`probe_every` seconds; once it answers, what this node sent meanwhile (in
windows still open) is added to it first, so the other nodes see it.

Why reserve before the send: checking shared counts and then sending is a
race between nodes (both see 499 under 500 and both send). A reservation
takes the place in the same atomic step as the check. A send that did not
happen (the upstream took nothing) gives its places back, so an unreachable
upstream does not use up the account's quota. Under a recipient cap one
place is reserved per attempt and the other recipients are added once the
upstream took them: a message can pass a recipient cap by its own
recipients, never by more (as in one node).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Coroutine, Sequence

from relayd.delivery.gates import GateReport
from relayd.observe.claims import Claim, Pace, Reserved, SharedClaims
from relayd.observe.counters import CounterError, Span, Window

PROBE_EVERY = 5.0  # seconds between two tries of a store that went away
_PROBE = Window(Span.DAY)


class SharedCaps:
    """Reservations in the shared store, with this node's fallback while it is away. See the module docstring."""

    def __init__(
        self,
        store: SharedClaims,
        where: str,
        *,
        local_share: Callable[[], float],
        on_change: Callable[[str], None],
        probe_every: float = PROBE_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.where = where
        self.local_share = local_share
        self._on_change = on_change
        self._probe_every = probe_every
        self._clock = clock
        self.away_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._pending: dict[tuple[str, Window, float], int] = {}  # (key, window, window start) -> sent while away
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def away(self) -> bool:
        return self.away_since is not None

    async def reserve(self, claims: Sequence[Claim], pace: Pace | None, now: float) -> Reserved | None:
        """The store's answer for one attempt's places; None while it is away (the local share applies)."""
        if self.away_since is not None:
            return None
        try:
            return await self.store.reserve(claims, pace, now)
        except CounterError as error:
            self._went_away(str(error), now)
            return None

    def settle(self, claims: Sequence[Claim], report: GateReport, at: float) -> None:
        """An attempt reserved at `at` ended: give its places back if nothing went out, add its other recipients."""
        if report.messages <= 0:
            self._later(self.store.give_back(claims, 1, at), at)
            return
        more = report.recipients - 1
        for claim in claims:
            if claim.key.endswith(":rcpt") and more > 0:
                self._later(self._add(claim, more, at), at)

    def counted(self, key: str, window: Window, n: int, now: float) -> None:
        """This node sent `n` while the store was away: to be added to it when it answers again."""
        if self.away_since is not None and n > 0:
            slot = (key, window, window.start(now))
            self._pending[slot] = self._pending.get(slot, 0) + n

    async def drain(self) -> None:
        """Stop trying a store that is away; wait for the give-backs and additions still on their way (at stop)."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def status(self) -> str:
        """Where the caps are kept, for `relayctl status`."""
        if self.away_since is None:
            return f"shared in {self.where}"
        return f"{self.where} unreachable: this node keeps to {self.local_share():.0%} of each cap and rate"

    # -- inside ---------------------------------------------------------------------------

    async def _add(self, claim: Claim, n: int, at: float) -> None:
        await self.store.add(claim.key, claim.window, n, at)

    def _later(self, work: Coroutine[object, object, object], at: float) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(work, at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, work: Coroutine[object, object, object], at: float) -> None:
        try:
            await work
        except CounterError as error:
            # A place not given back errs on the provider's side: the cap is met sooner, never passed.
            self._went_away(str(error), at)

    def _went_away(self, detail: str, now: float) -> None:
        if self.away_since is None:
            self.away_since = now
            self._on_change(
                f"transport caps: {detail}; this node keeps to its local share "
                f"({self.local_share():.0%}) of every transport's caps and rate until it answers"
            )
            self._probe = asyncio.get_running_loop().create_task(self._until_back())

    async def _until_back(self) -> None:
        """Try the store every `probe_every` seconds until it answers (a task while it is away)."""
        while self.away_since is not None:
            await asyncio.sleep(self._probe_every)
            await self._come_back(self._clock())
        self._probe = None

    async def _come_back(self, now: float) -> None:
        """Hand the store what this node sent meanwhile; if it answers, the caps are shared again."""
        try:
            for slot, n in list(self._pending.items()):
                key, window, start = slot
                if start == window.start(now):  # a window already over is not worth adding to
                    await self.store.add(key, window, n, now)
                del self._pending[slot]
            await self.store.count("probe", _PROBE, now)  # proof it answers, with nothing pending
        except CounterError:
            return
        self.away_since = None
        self._on_change(f"transport caps: {self.where} reachable again; caps and rates are shared")
