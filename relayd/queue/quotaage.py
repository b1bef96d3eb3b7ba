"""Quota holds and the maximum age: a warning at half of it, the message's end past it.

Takes: the messages a tenant quota holds (`relayd.queue.quotaholds.QuotaHold`)
and, through `HeldQueue`, the queue's view of each: when it arrived and the
maximum age of its retry schedule (`age`), and the way to fail it (`expire`).
Emits: one `MessageHeldLong` per message once it has waited half its maximum
age; past the maximum age an `expire` call, which fails every open recipient
with "retry timeout exceeded: held by the daily quota of tenant acme since
..." and bounces to the sender, and the ids that left the hold that way.
Untrusted input: none.
How it fails: an expiry the queue could not carry out (the message in an
operator's hands, a bounce the spool could not take) leaves the message held
and is tried again `EXPIRE_RETRY` seconds later; an error says so in the log.

Waiting for a tenant's quota is not a failed attempt, but the message does
not wait for ever: like a message held by a transport's limit
(relayd.delivery.holding) it keeps the maximum age of its retry schedule,
counted from arrival (a held message was never tried). Past it the message is
not sent, since its tenant is over its quota, but fails, as any message that
could not go out in time. When a window ends with room, release comes first:
a message released past its age is tried once, as the walk tries one whose
schedule ran out. The warnings are remembered in memory: after a restart a
message may be warned about once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

from relayd.config.model import RelayConfig
from relayd.observe import events as ev
from relayd.queue.quotaholds import QuotaHold

EXPIRE_RETRY = 30.0  # seconds before an expiry the queue could not carry out is tried again
# A message is held before it is indexed (its body may still be arriving), so
# its age is learnt on a later look: looks come at least this share of the
# shortest maximum age apart, and never closer than `_MIN_LOOK` seconds.
_LOOK_SHARE = 0.1
_MIN_LOOK = 0.5


def look_interval(config: RelayConfig, longest: float) -> float:
    """Seconds between two looks at the holds: `longest`, or less under a very short maximum age."""
    ages = [config.retry.max_age, *(t.retry.max_age for t in config.transports.values() if t.retry is not None)]
    return min(longest, max(_MIN_LOOK, min(ages) * _LOOK_SHARE))


@dataclass(frozen=True, slots=True)
class HeldAge:
    """A queued message's arrival and the maximum age of its retry schedule (seconds)."""

    arrived: float
    max_age: float

    @property
    def warn_at(self) -> float:
        return self.arrived + self.max_age / 2

    @property
    def expires_at(self) -> float:
        return self.arrived + self.max_age


class HeldQueue(Protocol):
    """The queue as the quota book sees it (relayd.delivery.quotaexpiry.QuotaHeldQueue)."""

    def released(self) -> None:
        """Held messages were released: the scheduler looks at them again now."""

    def exists(self, queue_id: str) -> bool:
        """Whether the message is still queued."""

    def age(self, queue_id: str) -> HeldAge | None:
        """Its arrival and maximum age; None while it is not (or no longer) in the queue's index."""

    async def expire(self, queue_id: str, why: str) -> bool:
        """Fail its open recipients (`why`: "held by ... since ...") and bounce; False: not now, try later."""


def hold_subject(held: QuotaHold) -> str:
    """What holds the message, from the hold's own reason: "daily quota of tenant acme"."""
    return held.reason.partition(" reached")[0]


class HoldAges:
    """Which held messages reached half their maximum age (warned once) or all of it (expired)."""

    def __init__(self, queue: HeldQueue, events: ev.EventSink, *, time_text: Callable[[float], str]) -> None:
        self._queue = queue
        self._events = events
        self._time_text = time_text
        self._ages: dict[str, HeldAge] = {}  # asked once per message: a route lookup per recipient
        self._warned: set[str] = set()
        self._retry_at: dict[str, float] = {}

    def reset(self, held: Iterable[str]) -> None:
        """Forget the ages (a reload may change the retry schedules); keep the warnings of `held`."""
        self._ages.clear()
        self._warned &= set(held)
        self._retry_at.clear()

    def forget(self, queue_id: str) -> None:
        self._ages.pop(queue_id, None)
        self._warned.discard(queue_id)
        self._retry_at.pop(queue_id, None)

    def next_look(self, holds: Iterable[QuotaHold]) -> float | None:
        """The earliest moment a held message is due a warning or its expiry; None: none known."""
        moments: list[float] = []
        for held in holds:
            age = self._age(held.queue_id)
            if age is None:
                continue
            if held.queue_id not in self._warned:
                moments.append(age.warn_at)
            moments.append(max(age.expires_at, self._retry_at.get(held.queue_id, 0.0)))
        return min(moments, default=None)

    async def check(self, holds: Sequence[QuotaHold], now: float) -> list[str]:
        """Warn about the messages past half their age, expire those past all of it; the ids expired."""
        expired: list[str] = []
        for held in holds:
            age = self._age(held.queue_id)
            if age is None:
                continue
            if now >= age.expires_at:
                self._warned.add(held.queue_id)  # too late for a warning: it fails now
                if self._retry_at.get(held.queue_id, 0.0) <= now and await self._expire(held, age, now):
                    expired.append(held.queue_id)
            elif now >= age.warn_at and held.queue_id not in self._warned:
                self._warned.add(held.queue_id)
                self._events.emit(ev.MessageHeldLong(
                    queue_id=held.queue_id, tenant=held.tenant, held_for=now - age.arrived, max_age=age.max_age,
                    reason=held.reason,
                ))
        return expired

    async def _expire(self, held: QuotaHold, age: HeldAge, now: float) -> bool:
        why = f"held by the {hold_subject(held)} since {self._time_text(age.arrived)}"
        try:
            done = await self._queue.expire(held.queue_id, why)
        except Exception as error:  # e.g. the spool refused the bounce: the message stays held
            self._events.emit(ev.Notice(
                text=f"{held.queue_id} past its maximum age, cannot be failed now: "
                f"{type(error).__name__}: {error}; trying again in {EXPIRE_RETRY:.0f}s", level="error",
            ))
            done = False
        if not done:
            self._retry_at[held.queue_id] = now + EXPIRE_RETRY
        return done

    def _age(self, queue_id: str) -> HeldAge | None:
        age = self._ages.get(queue_id)
        if age is None:
            age = self._queue.age(queue_id)
            if age is not None:
                self._ages[queue_id] = age
        return age
