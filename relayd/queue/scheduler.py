"""Scheduler: which queued message is due, and how many deliveries run at once.

Takes: `QueueEntry` values (loaded from the spool at start, then one per
accepted message), and a `deliver(entry) -> entry` coroutine from the outcome
stage that makes one delivery attempt and returns the entry's new state.
Emits: calls to `deliver`, at most `max_parallel` at a time, never two for the
same message.
Untrusted input: none (entries come from relayd's own spool).
How it fails: an exception from `deliver` is logged and the message is tried
again after `error_backoff`; the scheduler itself never stops on one message.

The index is memory only; the spool is the truth and the index is rebuilt
from it at start. Due times sit in one heap per lane (a tenant and the first
transports its message will try, `relayd.queue.fairness.Lane`); which lane starts
next is `relayd.queue.fairness.pick_lane`: the tenant with the fewest deliveries in
flight first, and never more than a transport's `max_parallel` deliveries
starting on one transport. So a large queue does not make each pick slower,
one tenant's backlog does not delay another tenant's message, and one slow
upstream cannot take every slot. Stale heap entries (a message whose due time
or lane changed) are skipped lazily on pop.

A due message whose every transport is closed by a gate (`relayd.delivery.gates`:
the host retry state of `relayd.delivery.upstreamhealth`, and any later limit; the
optional `hold_until` callable says until when) is not started at all but
put back in the heap for that time, so a large queue behind a down upstream
costs no disk writes and no log lines, only one real attempt per upstream
retry time. When a gate opens before that time, `gate_opened()` makes those
messages due at once.

Operator actions (freeze, thaw, remove, give up) go through `exclusive()`:
it keeps the message out of delivery, waits (bounded) for an attempt already
running to finish, and serialises operators on the same message, so an
operator's change and a delivery's result never overwrite each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import AsyncIterator, Awaitable, Callable, Iterable

from relayd.queue.fairness import DueLane, Lane, TransportLimit, pick_lane
from relayd.values import QueueEntry

Deliver = Callable[[QueueEntry], Awaitable[QueueEntry | None]]
HoldUntil = Callable[[QueueEntry], "float | None"]
LaneOf = Callable[[QueueEntry], Lane]
HeapItem = tuple[float, int, str]


def tenant_lane(entry: QueueEntry) -> Lane:
    """The lane when nothing knows the routes: the tenant alone."""
    return Lane(entry.envelope.tenant)

# How many due-but-waiting messages one pass over the heap puts back before it
# yields to the event loop: start-up with 100,000 queued messages behind a
# down upstream must not stall the listeners for the whole sweep.
_POSTPONE_BATCH = 2000


class MessageBusy(Exception):
    """A delivery attempt of the message did not finish within the operator's wait."""


class Scheduler:
    """The in-memory index of the queue and the loop that starts deliveries."""

    def __init__(
        self,
        deliver: Deliver,
        *,
        max_parallel: int,
        clock: Callable[[], float] = time.time,
        error_backoff: float = 60.0,
        on_error: Callable[[str, BaseException], None] | None = None,
        hold_until: HoldUntil | None = None,
        sweep_interval: float = 60.0,
        lane_of: LaneOf = tenant_lane,
        transport_limit: TransportLimit | None = None,
    ) -> None:
        self._deliver = deliver
        self._lane_of = lane_of
        self._transport_limit: TransportLimit = transport_limit or (lambda _name: max_parallel)
        # The heap says when the next message is due, but the wall clock can
        # jump (NTP, a suspended VM): never sleep longer than this between looks.
        self._sweep_interval = sweep_interval
        self._hold_until = hold_until
        self._clock = clock
        self._max_parallel = max_parallel
        self._error_backoff = error_backoff
        self._on_error = on_error
        self._entries: dict[str, QueueEntry] = {}
        self._lanes: dict[Lane, list[HeapItem]] = {}  # due-time heap per lane
        self._lane_by_id: dict[str, Lane] = {}
        self._flight_lanes: dict[str, Lane] = {}
        self._tenant_in_flight: dict[str, int] = {}
        self._transport_in_flight: dict[str, int] = {}
        self._sweep_unfinished = False  # a put-back batch ended early: look again at once
        self._seq = itertools.count()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._forced: set[str] = set()
        self._force_after: set[str] = set()  # forced while in delivery: force once that attempt ends
        self._held: dict[str, int] = {}  # message id -> operators holding it
        self._locks: dict[str, asyncio.Lock] = {}
        self._attempt_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._waiting: dict[str, float] = {}  # due but put back: every transport in its retry wait

    # -- index ---------------------------------------------------------------

    def add(self, entry: QueueEntry) -> None:
        """Index a message (new, reloaded or updated) and wake the loop if it is due."""
        if entry.is_complete:
            self._entries.pop(entry.id, None)
            self._waiting.pop(entry.id, None)
            self._lane_by_id.pop(entry.id, None)
            return
        self._entries[entry.id] = entry
        self._lane_by_id[entry.id] = self._lane_for(entry)
        due = entry.next_due()
        if due is not None and not entry.frozen:
            self._push(entry.id, due)
            if due <= self._clock():
                self._wakeup.set()

    def _lane_for(self, entry: QueueEntry) -> Lane:
        try:
            return self._lane_of(entry)
        except Exception:  # a lane is only an ordering hint: never lose the message over it
            return tenant_lane(entry)

    def _push(self, message_id: str, due: float) -> None:
        lane = self._lane_by_id.get(message_id)
        if lane is None:
            return
        heapq.heappush(self._lanes.setdefault(lane, []), (due, next(self._seq), message_id))

    def add_all(self, entries: Iterable[QueueEntry]) -> None:
        for entry in entries:
            self.add(entry)
        self._wakeup.set()

    def add_loaded(self, entries: Iterable[QueueEntry]) -> int:
        """Index entries read from disk at start; returns how many were new.

        The index is loaded while the listeners already accept mail, so a
        message may already be indexed (accepted, or even delivered and
        updated) by the time its file's older reading arrives here: the index
        then knows better, and the reading is dropped.
        """
        added = 0
        for entry in entries:
            if entry.id not in self._entries:
                self.add(entry)
                added += 1
        self._wakeup.set()
        return added

    def forget(self, message_id: str) -> None:
        self._entries.pop(message_id, None)
        self._lane_by_id.pop(message_id, None)
        self._waiting.pop(message_id, None)
        self._attempt_ended(message_id)  # nobody waits for an attempt that cannot come

    def get(self, message_id: str) -> QueueEntry | None:
        return self._entries.get(message_id)

    def entries(self) -> list[QueueEntry]:
        return list(self._entries.values())

    def in_flight(self, message_id: str) -> bool:
        return message_id in self._in_flight

    def force(self, message_ids: Iterable[str]) -> None:
        """Deliver these now, ignoring retry times (Exim's -M / -qff)."""
        now = self._clock()
        for message_id in message_ids:
            if message_id in self._in_flight:
                self._force_after.add(message_id)  # the running attempt may not have been forced
            elif message_id in self._entries:
                self._forced.add(message_id)
                self._push(message_id, now)
        self._wakeup.set()

    def is_forced(self, message_id: str) -> bool:
        return message_id in self._forced

    def in_flight_ids(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    def waiting(self) -> dict[str, float]:
        """Due messages put back because every transport is in its retry wait, and until when."""
        return dict(self._waiting)

    def attempt_finished(self, message_id: str) -> "asyncio.Future[None]":
        """A future resolved when the next delivery attempt of the message ends.

        Take it before `force()` so the attempt cannot end unnoticed in between.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._attempt_waiters.setdefault(message_id, []).append(future)
        return future

    @contextlib.asynccontextmanager
    async def exclusive(self, message_id: str, timeout: float) -> AsyncIterator[QueueEntry | None]:
        """Hold a message out of delivery while an operator changes it.

        Waits up to `timeout` seconds for another operator on the same message
        and for a delivery attempt already running, then yields the current
        entry (None: it left the queue meanwhile, e.g. delivered). Raises
        MessageBusy when the wait runs out; nothing was changed then. The
        caller updates the index (`add`/`forget`) inside the block.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lock = self._locks.setdefault(message_id, asyncio.Lock())
        self._held[message_id] = self._held.get(message_id, 0) + 1
        try:
            try:
                await asyncio.wait_for(lock.acquire(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise MessageBusy(message_id) from None
            try:
                task = self._in_flight.get(message_id)
                if task is not None:
                    done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
                    if not done:
                        raise MessageBusy(message_id)
                yield self._entries.get(message_id)
            finally:
                lock.release()
        finally:
            self._release(message_id)

    def _release(self, message_id: str) -> None:
        left = self._held.get(message_id, 1) - 1
        if left > 0:
            self._held[message_id] = left
            return
        self._held.pop(message_id, None)
        self._locks.pop(message_id, None)
        entry = self._entries.get(message_id)
        if entry is not None:
            self.add(entry)  # heap items popped while it was held were dropped

    def _attempt_ended(self, message_id: str) -> None:
        for future in self._attempt_waiters.pop(message_id, []):
            if not future.done():
                future.set_result(None)

    def __len__(self) -> int:
        return len(self._entries)

    # -- loop ----------------------------------------------------------------

    def _startable(self, message_id: str, due: float, lane: Lane) -> bool:
        """False for a heap item that no longer stands for a delivery to start now."""
        entry = self._entries.get(message_id)
        if entry is None or entry.frozen or message_id in self._in_flight or message_id in self._held:
            return False
        if self._lane_by_id.get(message_id) != lane:
            return False  # re-indexed into another lane, which has its own item
        current = entry.next_due()
        return current is not None and (current <= due or message_id in self._forced)

    def _due_lanes(self, now: float) -> list[DueLane]:
        """Every lane whose first live item is due, dropping stale items and empty lanes."""
        due: list[DueLane] = []
        for lane in list(self._lanes):
            heap = self._lanes[lane]
            while heap and heap[0][0] <= now and not self._startable(heap[0][2], heap[0][0], lane):
                heapq.heappop(heap)
            if not heap:
                del self._lanes[lane]
            elif heap[0][0] <= now:
                due.append(DueLane(lane, heap[0][0]))
        return due

    def _pop_due(self) -> str | None:
        now = self._clock()
        postponed = 0
        self._sweep_unfinished = False
        while True:
            lane = pick_lane(
                self._due_lanes(now),
                tenant_in_flight=self._tenant_in_flight,
                transport_in_flight=self._transport_in_flight,
                transport_limit=self._transport_limit,
            )
            if lane is None:
                return None
            # Stay in the picked lane while its due messages are only put
            # back: a put-back starts nothing, so it needs no new pick, and
            # 100,000 messages behind a down upstream cost no lane scans.
            heap = self._lanes[lane]
            while heap and heap[0][0] <= now:
                due, _, message_id = heapq.heappop(heap)
                if not self._startable(message_id, due, lane):
                    continue
                until = self._held_until(message_id, now)
                if until is None:
                    return message_id
                self._waiting[message_id] = until
                self._push(message_id, until)
                postponed += 1
                if postponed >= _POSTPONE_BATCH:
                    self._sweep_unfinished = True
                    return None  # run() comes straight back after yielding

    def _held_until(self, message_id: str, now: float) -> float | None:
        """Until when a due message has nothing to try (every transport waiting); None: start it."""
        if message_id in self._forced or self._hold_until is None:
            return None
        until = self._hold_until(self._entries[message_id])
        return until if until is not None and until > now else None

    def _seconds_to_next(self) -> float | None:
        """Until the earliest lane item not yet due (due ones wait for a slot: a finish wakes us)."""
        if self._sweep_unfinished:
            return 0.0
        now = self._clock()
        future = [heap[0][0] for heap in self._lanes.values() if heap and heap[0][0] > now]
        return max(0.0, min(future) - now) if future else None

    def start_due(self) -> list[str]:
        """Start every due message the free slots, lanes and gates allow now; their ids.

        One step of `run()`, also what a test with a fake clock calls after
        moving the clock (the deliveries run as tasks of the running loop).
        """
        started: list[str] = []
        while len(self._in_flight) < self._max_parallel:
            message_id = self._pop_due()
            if message_id is None:
                break
            self._start(message_id)
            started.append(message_id)
        return started

    def gate_opened(self) -> None:
        """A gate opened before the time it had named: look again now at every message it held.

        Messages put back for a gate wait in the heap for its closing time;
        this makes them due now instead (the ones still held are simply put
        back again, in batches, by the next sweep).
        """
        now = self._clock()
        for message_id in self._waiting:
            self._push(message_id, now)
        self._wakeup.set()

    async def run(self) -> None:
        while not self._stopping:
            self.start_due()
            self._wakeup.clear()
            next_due = self._seconds_to_next()
            timeout: float | None = (
                self._sweep_interval if next_due is None else min(next_due, self._sweep_interval)
            )
            if len(self._in_flight) >= self._max_parallel:
                timeout = None  # a finishing delivery wakes us
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass

    def _start(self, message_id: str) -> None:
        self._waiting.pop(message_id, None)
        entry = self._entries[message_id]
        lane = self._lane_by_id.get(message_id, tenant_lane(entry))
        self._flight_lanes[message_id] = lane
        self._count_in_flight(lane, +1)
        task = asyncio.get_running_loop().create_task(self._run_one(entry))
        self._in_flight[message_id] = task

    def _count_in_flight(self, lane: Lane, step: int) -> None:
        for counts, key in ((self._tenant_in_flight, lane.tenant), *((self._transport_in_flight, t) for t in lane.transports)):
            value = counts.get(key, 0) + step
            if value > 0:
                counts[key] = value
            else:
                counts.pop(key, None)

    def in_flight_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Deliveries running now per tenant and per transport (status, tests)."""
        return dict(self._tenant_in_flight), dict(self._transport_in_flight)

    async def _run_one(self, entry: QueueEntry) -> None:
        message_id = entry.id
        failed = False
        updated: QueueEntry | None = None
        try:
            updated = await self._deliver(entry)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # one broken message must not stop the queue
            if self._on_error is not None:
                self._on_error(message_id, error)
            # Only the back-off item: re-adding the entry would push its old,
            # already-due time and retry a failing message in a tight loop.
            retry_at = self._clock() + self._error_backoff
            self._push(message_id, retry_at)
            failed = True
        finally:
            self._in_flight.pop(message_id, None)
            lane = self._flight_lanes.pop(message_id, None)
            if lane is not None:
                self._count_in_flight(lane, -1)
            self._forced.discard(message_id)
            self._wakeup.set()
        if not failed:
            if updated is None:
                self.forget(message_id)
            elif message_id in self._entries:
                self.add(updated)
        self._attempt_ended(message_id)
        if message_id in self._force_after:
            self._force_after.discard(message_id)
            self.force([message_id])

    async def stop(self, grace: float) -> None:
        """Stop starting deliveries; give running ones `grace` seconds, then cancel.

        A cancelled delivery leaves its recipients pending or deferred on disk,
        so it is simply tried again after restart.
        """
        self._stopping = True
        self._wakeup.set()
        tasks = list(self._in_flight.values())
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
