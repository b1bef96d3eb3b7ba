"""A message a tenant quota holds, seen from the delivery side: its maximum age, and its end past it.

Takes: the scheduler's index, the delivery agent and the live config (the
scheduler and the agent handed over as callables: the daemon builds the
quota book before them).
Emits: for the quota book (`relayd.queue.quotaage.HeldQueue`): a release
nudge to the scheduler, whether a held message is still queued, its arrival
and maximum age, and its failure past that age through the agent's own
bounce path (`DeliveryAgent.give_up`: `**` lines, DSN, bounce-loop guard,
Completed).
Untrusted input: none.
How it fails: a message busy in an operator's hands for `BUSY_WAIT` seconds
is left held (`expire` answers False; the quota book tries again later); a
spool error while queueing the bounce propagates, with nothing recorded.

Which maximum age: a held message was never tried, so its age counts from
arrival, against the schedule the walk would apply to it: per route group
the retry schedule of the chain's last transport (as `DeliveryAgent.gate_hold`
and `holding.held_back` count a message waiting for a transport's limit);
over several route groups the longest, so no recipient is failed before its
own schedule ran out. A message with no route left (a reload removed its
tenant or rules) keeps the top-level schedule: it must not wait for ever.
"""

from __future__ import annotations

from typing import Callable

from relayd.config.model import RelayConfig
from relayd.delivery.outcome import RETRY_TIMEOUT
from relayd.delivery.router import route
from relayd.delivery.walk import DeliveryAgent
from relayd.queue.quotaage import HeldAge
from relayd.queue.scheduler import MessageBusy, Scheduler
from relayd.queue.spool import SpoolCorruptError
from relayd.values import QueueEntry

BUSY_WAIT = 5.0  # seconds an expiry waits for an operator (or a forced attempt) holding the message


def held_max_age(entry: QueueEntry, config: RelayConfig) -> float:
    """The maximum age of a message never tried; see the module docstring. Pure."""
    tenant = config.tenants.get(entry.envelope.tenant)
    ages: set[float] = set()
    if tenant is not None:
        for recipient in entry.undelivered:
            found = route(tenant, recipient.address)
            if found is not None and found.transports:
                ages.add(config.retry_for(found.transports[-1]).max_age)
    return max(ages, default=config.retry.max_age)


class QuotaHeldQueue:
    """The `HeldQueue` of relayd.queue.quotaage, made of the scheduler and the delivery agent."""

    def __init__(
        self,
        scheduler: Callable[[], Scheduler],
        agent: Callable[[], DeliveryAgent],
        config: Callable[[], RelayConfig],
        *,
        busy_wait: float = BUSY_WAIT,
    ) -> None:
        self._scheduler = scheduler
        self._agent = agent
        self._config = config
        self._busy_wait = busy_wait

    def released(self) -> None:
        self._scheduler().gate_opened()

    def exists(self, queue_id: str) -> bool:
        return self._scheduler().get(queue_id) is not None

    def age(self, queue_id: str) -> HeldAge | None:
        entry = self._scheduler().get(queue_id)
        if entry is None:
            return None
        return HeldAge(entry.envelope.received_at, held_max_age(entry, self._config()))

    async def expire(self, queue_id: str, why: str) -> bool:
        """Fail every open recipient with "retry timeout exceeded: <why>" and bounce; False: busy."""
        scheduler = self._scheduler()
        try:
            async with scheduler.exclusive(queue_id, self._busy_wait) as entry:
                if entry is None:
                    return True  # left the queue meanwhile (delivered, removed)
                try:
                    await self._agent().give_up(entry, reason=f"{RETRY_TIMEOUT}: {why}", reply=None)
                except SpoolCorruptError:
                    pass  # set aside and reported by the agent: nothing left to hold
                scheduler.forget(queue_id)
                return True
        except MessageBusy:
            return False
