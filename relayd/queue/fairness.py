"""Fair delivery order: which due message starts next, so no tenant or upstream starves another.

Takes: the due messages grouped into lanes (one tenant, the same first
transports), how many deliveries each tenant and each transport has in
flight, and each transport's limit. Emits: the lane whose oldest due message
should start next, or None (every due lane is at a transport limit).
Untrusted input: none. Pure: no I/O, no clock, no state; the scheduler owns
the heaps and the counts and asks here for every start.

The rule, in the spirit of Postfix's per-destination concurrency and its
round-robin over recipients' destinations:

* a lane is eligible only while every transport it will try first is under
  that transport's `max_parallel`, so one slow provider can hold at most its
  own share of the delivery slots and mail for other providers keeps moving;
* among eligible lanes, the tenant with the fewest deliveries in flight goes
  first (max-min fairness: a tenant with one message waiting is served before
  a tenant already running twenty, however long the latter's backlog);
* ties go to the lane whose message has been due longest (first come, first
  served), then to the lane's name so the order is deterministic.

A tenant's backlog therefore delays another tenant by at most one delivery
finishing (when every slot is taken), never by the length of the backlog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence


class Lane(NamedTuple):
    """Messages that compete for the same things: one tenant, the same first transports.

    `transports` holds, sorted, the first usable transport of each due
    recipient's chain (one name for nearly every message; several when its
    recipients match different route rules). It is what the per-transport
    limits are counted against. A named tuple, not a dataclass: one is made
    for every message indexed, 100,000 of them at start-up.
    """

    tenant: str
    transports: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DueLane:
    """A lane with at least one due message, and since when its oldest one is due."""

    lane: Lane
    oldest_due: float


@dataclass(frozen=True, slots=True)
class DueMessage:
    """A due message as `plan_starts` sees it."""

    message_id: str
    lane: Lane
    due: float


TransportLimit = Callable[[str], int]


def lane_is_open(lane: Lane, transport_in_flight: Mapping[str, int], transport_limit: TransportLimit) -> bool:
    """True when every transport the lane starts with has a free slot."""
    return all(transport_in_flight.get(name, 0) < transport_limit(name) for name in lane.transports)


def pick_lane(
    due: Iterable[DueLane],
    *,
    tenant_in_flight: Mapping[str, int],
    transport_in_flight: Mapping[str, int],
    transport_limit: TransportLimit,
) -> Lane | None:
    """The lane whose oldest due message starts next; None when every due lane is blocked."""
    best: Lane | None = None
    best_key: tuple[int, float, Lane] | None = None
    for item in due:
        if not lane_is_open(item.lane, transport_in_flight, transport_limit):
            continue
        key = (tenant_in_flight.get(item.lane.tenant, 0), item.oldest_due, item.lane)
        if best_key is None or key < best_key:
            best, best_key = item.lane, key
    return best


def plan_starts(
    due: Sequence[DueMessage],
    *,
    free_slots: int,
    tenant_in_flight: Mapping[str, int],
    transport_in_flight: Mapping[str, int],
    transport_limit: TransportLimit,
) -> list[str]:
    """The ids of the messages to start now, in order (at most `free_slots`).

    Applies `pick_lane` once per start, counting each start as in flight for
    the next pick, exactly as the scheduler does message by message.
    """
    queues: dict[Lane, list[DueMessage]] = {}
    for message in sorted(due, key=lambda m: m.due):
        queues.setdefault(message.lane, []).append(message)
    tenants = dict(tenant_in_flight)
    transports = dict(transport_in_flight)
    started: list[str] = []
    while len(started) < free_slots:
        heads = [DueLane(lane, queue[0].due) for lane, queue in queues.items() if queue]
        lane = pick_lane(heads, tenant_in_flight=tenants, transport_in_flight=transports, transport_limit=transport_limit)
        if lane is None:
            break
        started.append(queues[lane].pop(0).message_id)
        tenants[lane.tenant] = tenants.get(lane.tenant, 0) + 1
        for name in lane.transports:
            transports[name] = transports.get(name, 0) + 1
    return started
