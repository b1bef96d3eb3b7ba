"""The control socket's commands: how relayctl steers a running relayd.

Takes: JSON-line requests on a Unix stream socket (`RelayConfig.control_path`,
mode 0600), from processes of relayd's own user or root only (checked with
SO_PEERCRED); the running stages (scheduler, spool, delivery agent, health
table, events) handed in through `QueueControl`'s constructor as the small
ports below; the socket itself is relayd.ops.controlserver.
Emits: one or more JSON lines per request; the last has ``"done": true`` and
either ``"ok": true`` plus data or ``"ok": false, "error": "sentence"``. Long
actions send ``{"progress": n, "total": m}`` lines first; `queue.list` sends
``{"rows": [...]}`` chunks of compact rows (`queuewire.wire_row`).
Untrusted input: request lines (size-capped, parsed as JSON, every argument
checked; message ids must have the id shape before they touch a path). Only
relayd's user and root can connect, but a malformed request still only gets
an error line.
How it fails: a handler raises `ControlError` for an ordinary refusal (sent as
``ok: false``); anything else is logged and answered "internal error"
(relayd.ops.controlserver). The client side is relayd.ops.controlclient (its
`ControlUnavailable` says, in one sentence, that the daemon is not running or
that it stopped answering).

Every change to a queued message goes through the daemon, which owns the
index and the set of messages in delivery: `Scheduler.exclusive` keeps the
message out of delivery and waits (bounded) for a running attempt, so a
removal can never be undone by a delivery finishing later, and two operators
never overwrite each other. While relayd runs it holds an exclusive flock on
``<spool_dir>/daemon.lock`` (relayd.queue.spoollock); relayctl takes the same lock
before touching the spool directly, so offline edits and a starting daemon
never overlap.

Commands: health, status, reload, queue.list, queue.count, queue.show,
queue.log, deliver, flush, freeze, thaw, remove, giveup.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import AbstractAsyncContextManager
from typing import Awaitable, Callable, Iterable, Mapping, Protocol, Sequence

from relayd.config.model import RelayConfig
from relayd.delivery.upstreamhealth import UpstreamRecord, UpstreamState
from relayd.jsonwire import JsonOut, JsonValue, scalar_fields
from relayd.observe.events import EventSink, OperatorAction
from relayd.observe.outcomes import RecentOutcomes
from relayd.ops.controlserver import ControlError, Handler, Request
from relayd.ops import queueedit
from relayd.ops.mainlogread import read_log_lines
from relayd.queue.msgid import is_message_id
from relayd.queue.queuewire import entry_to_json, queue_counts, wire_row
from relayd.queue.scheduler import MessageBusy
from relayd.queue.spool import SpoolCorruptError, SpoolEntryMissing
from relayd.values import QueueEntry, RecipientState

LIST_CHUNK = 5000  # rows per queue.list line: big enough to be cheap, small enough to stream
PROGRESS_EVERY = 50  # messages between progress lines of a long action
DEFAULT_BUSY_WAIT = 60.0  # seconds an operator action waits for a running delivery attempt
DEFAULT_DELIVER_WAIT = 120.0  # seconds `deliver` waits for its attempts to end


# ------------------------------------------------------------------ the ports


class QueueIndex(Protocol):
    """The scheduler's side (relayd.queue.scheduler.Scheduler): the index and who is in delivery."""

    def entries(self) -> list[QueueEntry]: ...
    def get(self, message_id: str) -> QueueEntry | None: ...
    def add(self, entry: QueueEntry) -> None: ...
    def forget(self, message_id: str) -> None: ...
    def in_flight(self, message_id: str) -> bool: ...
    def in_flight_ids(self) -> frozenset[str]: ...
    def waiting(self) -> dict[str, float]: ...
    def force(self, message_ids: Iterable[str]) -> None: ...
    def attempt_finished(self, message_id: str) -> asyncio.Future[None]: ...
    def exclusive(self, message_id: str, timeout: float) -> AbstractAsyncContextManager[QueueEntry | None]: ...


class SpoolFiles(Protocol):
    """The spool's side (relayd.queue.spool.Spool): what an operator action reads and writes."""

    def read_body(self, id: str) -> bytes: ...
    async def update(self, entry: QueueEntry, *, durable: bool = False) -> None: ...
    def remove(self, id: str) -> bool: ...


class Outcomes(Protocol):
    """The delivery agent's side (relayd.delivery.walk.DeliveryAgent)."""

    def unrecorded(self) -> dict[str, str]: ...
    def forget(self, message_id: str) -> None: ...
    async def give_up(self, entry: QueueEntry) -> bool: ...


class HealthTable(Protocol):
    """The upstream health gate (relayd.delivery.upstreamhealth.UpstreamHealth)."""

    def snapshot(self) -> dict[str, tuple[UpstreamRecord, UpstreamState | None]]: ...
    def clear(self) -> None: ...


def _ids(args: Mapping[str, JsonValue]) -> list[str]:
    given = args.get("ids")
    ids = [i for i in given if isinstance(i, str)] if isinstance(given, list) else []
    if not isinstance(given, list) or len(ids) != len(given):
        raise ControlError('"ids" must be a list of message ids')
    bad = [i for i in ids if not is_message_id(i)]
    if bad:
        raise ControlError(f"'{bad[0][:40]}' is not a message id")
    return list(dict.fromkeys(ids))


def _seconds(args: Mapping[str, JsonValue], name: str, default: float) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise ControlError(f'"{name}" must be a number of seconds between 0 and 3600')
    return float(value)


def _entry_id(entry: QueueEntry) -> str:
    return entry.envelope.id


class QueueControl:
    """The commands, over the daemon's own stages (all handed in; nothing global).

    `scheduler` (a `QueueIndex`: relayd.queue.scheduler.Scheduler), `spool`
    (`SpoolFiles`: relayd.queue.spool.Spool), `agent` (`Outcomes`:
    relayd.delivery.walk.DeliveryAgent), `health` (`HealthTable`: UpstreamHealth),
    `events` where operator actions are emitted, `outcomes` the recent events the
    daemon keeps, which `deliver` and `queue.outcome` answer from. `reload`
    re-reads the configuration and returns its problems (empty when it took);
    `listeners` gives the bound (name, address, port).
    """

    def __init__(
        self,
        *,
        config: Callable[[], RelayConfig],
        scheduler: QueueIndex,
        spool: SpoolFiles,
        agent: Outcomes,
        health: HealthTable,
        events: EventSink,
        outcomes: RecentOutcomes,
        reload: Callable[[], Awaitable[list[str]]],
        listeners: Callable[[], Sequence[tuple[str, str, int]]],
        clock: Callable[[], float] = time.time,
        spool_room: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self._config = config
        self._scheduler = scheduler
        self._spool = spool
        self._agent = agent
        self._health = health
        self._events = events
        self._outcomes = outcomes
        self._reload = reload
        self._listeners = listeners
        self._clock = clock
        self._spool_room = spool_room
        self._started = clock()
        self._row_cache: dict[str, tuple[QueueEntry, bool, bytes]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {
            "health": self.health,
            "status": self.status,
            "reload": self.reload,
            "queue.list": self.queue_list,
            "queue.count": self.queue_count,
            "queue.show": self.queue_show,
            "queue.log": self.queue_log,
            "queue.outcome": self.queue_outcome,
            "deliver": self.deliver,
            "flush": self.flush,
            "freeze": self.freeze,
            "thaw": self.thaw,
            "remove": self.remove,
            "giveup": self.giveup,
        }

    # -- observation -----------------------------------------------------------

    def _health_table(self) -> dict[str, JsonOut]:
        snapshot = self._health.snapshot()
        table: dict[str, JsonOut] = {}
        for name in set(self._config().transports) | set(snapshot):
            record, skipped = snapshot.get(name, (None, None))
            table[name] = {
                "skipped_until": skipped.next_try if skipped is not None else None,
                "last_success": record.last_success if record is not None else None,
                "last_error": record.last_error if record is not None else None,
                "last_error_at": record.last_error_at if record is not None else None,
            }
        return table

    async def health(self, request: Request) -> dict[str, JsonOut]:
        return {"transports": self._health_table()}

    async def status(self, request: Request) -> dict[str, JsonOut]:
        now = self._clock()
        return {
            "pid": os.getpid(),
            "uptime": now - self._started,
            "started_at": self._started,
            "config": str(self._config().source),
            "listeners": [{"name": n, "address": a, "port": p} for n, a, p in self._listeners()],
            "queue": queue_counts(
                self._scheduler.entries(), self._scheduler.in_flight_ids(), now, self._scheduler.waiting()
            ).as_json(),
            "transports": self._health_table(),
            "spool": self._spool_status(),
        }

    def _spool_status(self) -> dict[str, JsonOut]:
        """Free space, the reserve, and messages whose outcome the spool could not record."""
        status: dict[str, JsonOut] = dict(scalar_fields(self._spool_room())) if self._spool_room is not None else {}
        status["unrecorded"] = self._agent.unrecorded()
        return status

    async def reload(self, request: Request) -> dict[str, JsonOut]:
        problems = await self._reload()
        if problems:
            raise ControlError("\n".join(problems), problems=problems)
        return {"config": str(self._config().source)}

    async def queue_list(self, request: Request) -> dict[str, JsonOut]:
        """The whole index in `{"rows": [...]}` lines of LIST_CHUNK compact rows.

        Each row's JSON is kept between calls while its entry (an immutable
        value) and in-delivery flag are unchanged, so listing a large,
        mostly quiet queue costs little more than joining bytes; the event
        loop gets a turn after every chunk.
        """
        entries = sorted(self._scheduler.entries(), key=_entry_id)
        flying = self._scheduler.in_flight_ids()
        old, fresh = self._row_cache, {}
        for start in range(0, len(entries), LIST_CHUNK):
            parts = []
            for entry in entries[start : start + LIST_CHUNK]:
                mid = entry.envelope.id
                busy = mid in flying
                cached = old.get(mid)
                if cached is None or cached[0] is not entry or cached[1] != busy:
                    cached = (entry, busy, json.dumps(wire_row(entry, busy), separators=(",", ":")).encode())
                fresh[mid] = cached
                parts.append(cached[2])
            await request.emit_raw(b'{"rows":[' + b",".join(parts) + b"]}\n")
        self._row_cache = fresh
        return {"count": len(entries), "now": self._clock(), "unrecorded": self._agent.unrecorded()}

    async def queue_count(self, request: Request) -> dict[str, JsonOut]:
        return dict(queue_counts(
            self._scheduler.entries(), self._scheduler.in_flight_ids(), self._clock(), self._scheduler.waiting()
        ).as_json())

    async def queue_show(self, request: Request) -> dict[str, JsonOut]:
        message_id = request.args.get("id")
        if not isinstance(message_id, str) or not is_message_id(message_id):
            raise ControlError('"id" must be a message id')
        entry = self._scheduler.get(message_id)
        answer: dict[str, JsonOut] = {"message": None, "in_flight": False}
        if request.args.get("log"):
            answer["log"] = await self._log_lines(message_id)
        if entry is None:
            if "log" in answer:
                return answer
            raise ControlError(f"message {message_id} is not in the queue")
        answer["message"] = entry_to_json(entry)
        answer["in_flight"] = self._scheduler.in_flight(message_id)
        answer["waiting_until"] = self._scheduler.waiting().get(message_id)
        answer["cannot_record"] = self._agent.unrecorded().get(message_id)
        if request.args.get("body"):
            try:
                body: bytes = await asyncio.to_thread(self._spool.read_body, message_id)
            except SpoolEntryMissing:
                raise ControlError(f"message {message_id} is not in the queue") from None
            except SpoolCorruptError as exc:
                raise ControlError(str(exc)) from None
            answer["body"] = body.decode("utf-8", "surrogateescape")
        return answer

    async def queue_log(self, request: Request) -> dict[str, JsonOut]:
        message_id = request.args.get("id")
        if not isinstance(message_id, str) or not is_message_id(message_id):
            raise ControlError('"id" must be a message id')
        lines = await self._log_lines(message_id)
        return {"log": lines, "queued": self._scheduler.get(message_id) is not None}

    async def _log_lines(self, message_id: str) -> list[str]:
        """A message's history for a human: the main log file, or (logging to stderr) the recent events."""
        log_file = self._config().log_file
        if log_file is None:
            return self._outcomes.lines_since(message_id)
        return await asyncio.to_thread(read_log_lines, log_file, message_id)

    async def queue_outcome(self, request: Request) -> dict[str, JsonOut]:
        """What became of one recipient of a message, from the recent events (send-test follows this).

        `outcome` is delivered, deferred or failed with the log line's detail;
        "completed" when the message left the queue without a verdict still
        remembered; None while the attempt is still to come.
        """
        message_id = request.args.get("id")
        recipient = request.args.get("recipient")
        if not isinstance(message_id, str) or not is_message_id(message_id):
            raise ControlError('"id" must be a message id')
        if not isinstance(recipient, str):
            raise ControlError('"recipient" must be an address')
        verdict = self._outcomes.outcome(message_id, recipient)
        if verdict is not None:
            return {"outcome": verdict.outcome, "detail": verdict.detail}
        if self._scheduler.get(message_id) is None:
            return {"outcome": "completed", "detail": "the message left the queue; see the main log for how"}
        return {"outcome": None, "detail": ""}

    # -- actions ---------------------------------------------------------------

    async def _each(
        self, request: Request, ids: list[str], act: Callable[[str], Awaitable[str]]
    ) -> list[dict[str, str]]:
        """Run `act` on every id in turn, with progress lines; one result per id."""
        results: list[dict[str, str]] = []
        total = len(ids)
        for n, message_id in enumerate(ids, 1):
            results.append({"id": message_id, "result": await act(message_id)})
            if total > 1 and (n % PROGRESS_EVERY == 0 or n == total):
                await request.emit({"progress": n, "total": total})
        return results

    async def _write_frozen(self, entry: QueueEntry, frozen: bool) -> QueueEntry | None:
        changed = await queueedit.write_frozen(self._spool, entry, frozen)
        self._index_written(entry.envelope.id, changed)
        return changed

    def _index_written(self, message_id: str, changed: QueueEntry | None) -> None:
        """The index after a spool edit: the new entry, or none when its file was gone."""
        if changed is None:
            self._scheduler.forget(message_id)
        else:
            self._scheduler.add(changed)

    async def freeze(self, request: Request) -> dict[str, JsonOut]:
        return await self._set_frozen(request, True)

    async def thaw(self, request: Request) -> dict[str, JsonOut]:
        return await self._set_frozen(request, False)

    async def _on_each_exclusively(
        self, request: Request, action: Callable[[str, QueueEntry], Awaitable[str]]
    ) -> dict[str, JsonOut]:
        """Run `action` on every requested message while the daemon keeps it out of delivery.

        A message in delivery is waited for (up to the request's `wait`); one
        that stays busy is reported as such and left unchanged.
        """
        wait = _seconds(request.args, "wait", DEFAULT_BUSY_WAIT)

        async def act(message_id: str) -> str:
            try:
                async with self._scheduler.exclusive(message_id, wait) as entry:
                    if entry is None:
                        return "not in queue"
                    return await action(message_id, entry)
            except MessageBusy:
                return "busy"

        return {"results": await self._each(request, _ids(request.args), act)}

    async def _set_frozen(self, request: Request, frozen: bool) -> dict[str, JsonOut]:
        """Exim's -Mf / -Mt: the frozen flag is written to the spool, so it survives restarts."""
        async def set_flag(message_id: str, entry: QueueEntry) -> str:
            return await queueedit.set_frozen(
                self._spool, entry, frozen, user=request.user, events=self._events,
                written=lambda changed: self._index_written(message_id, changed),
            )

        return await self._on_each_exclusively(request, set_flag)

    async def remove(self, request: Request) -> dict[str, JsonOut]:
        async def remove_one(message_id: str, entry: QueueEntry) -> str:
            return await queueedit.remove(
                self._spool, message_id, user=request.user, events=self._events, removed=self._forget,
            )

        return await self._on_each_exclusively(request, remove_one)

    def _forget(self, message_id: str) -> None:
        self._scheduler.forget(message_id)
        self._agent.forget(message_id)

    async def giveup(self, request: Request) -> dict[str, JsonOut]:
        async def give_up_one(message_id: str, entry: QueueEntry) -> str:
            self._events.emit(OperatorAction(action="giveup", user=request.user, queue_id=message_id))
            try:
                done = await self._agent.give_up(entry)
            except SpoolCorruptError:
                self._scheduler.forget(message_id)
                return "damaged, set aside"
            self._scheduler.forget(message_id)
            if not done:
                return "not in queue"
            return "bounce removed" if entry.envelope.is_bounce else "cancelled and bounced"

        return await self._on_each_exclusively(request, give_up_one)

    async def deliver(self, request: Request) -> dict[str, JsonOut]:
        """Exim's -M: thaw if frozen, then one attempt now, ignoring retry times; wait for it."""
        busy_wait = _seconds(request.args, "wait", DEFAULT_BUSY_WAIT)
        attempt_wait = _seconds(request.args, "attempt_wait", DEFAULT_DELIVER_WAIT)
        ids = _ids(request.args)
        results: dict[str, str] = {}
        started: dict[str, asyncio.Future[None]] = {}
        mark = self._outcomes.mark()
        for message_id in ids:
            try:
                async with self._scheduler.exclusive(message_id, busy_wait) as entry:
                    if entry is None:
                        results[message_id] = "not in queue"
                        continue
                    if entry.frozen:
                        if await self._write_frozen(entry, False) is None:
                            results[message_id] = "not in queue"
                            continue
                        self._events.emit(OperatorAction(action="thaw", user=request.user, queue_id=message_id))
                    started[message_id] = self._scheduler.attempt_finished(message_id)
            except MessageBusy:
                results[message_id] = "busy"
        self._scheduler.force(list(started))
        if started:
            await self._wait_attempts(request, started, attempt_wait)
        out = []
        for message_id in ids:
            result = results.get(message_id) or self._after_attempt(message_id, started[message_id])
            out.append({"id": message_id, "result": result, "log": self._outcomes.lines_since(message_id, mark)})
        return {"results": out}

    async def _wait_attempts(
        self, request: Request, futures: Mapping[str, asyncio.Future[None]], timeout: float
    ) -> None:
        pending = set(futures.values())
        total = len(pending)
        deadline = asyncio.get_running_loop().time() + timeout
        while pending:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if total > 1:
                await request.emit({"progress": total - len(pending), "total": total})
        for future in pending:
            future.cancel()

    def _after_attempt(self, message_id: str, future: asyncio.Future[None]) -> str:
        if not future.done() or future.cancelled():
            return "still waiting" if self._scheduler.get(message_id) is not None else "completed"
        entry = self._scheduler.get(message_id)
        if entry is None:
            return "completed"
        states = {r.state for r in entry.undelivered}
        return "deferred" if RecipientState.DEFERRED in states else "pending"

    async def flush(self, request: Request) -> dict[str, JsonOut]:
        """Exim's -qff: every message (or the given ones) now, ignoring every retry time."""
        include_frozen = bool(request.args.get("include_frozen", True))
        if "ids" in request.args:
            ids = _ids(request.args)
        else:
            ids = [e.envelope.id for e in sorted(self._scheduler.entries(), key=_entry_id)]
        self._health.clear()
        thawed = 0
        forced: list[str] = []
        for n, message_id in enumerate(ids, 1):
            entry = self._scheduler.get(message_id)
            if entry is None:
                continue
            if entry.frozen:
                if not include_frozen:
                    continue
                try:
                    async with self._scheduler.exclusive(message_id, DEFAULT_BUSY_WAIT) as current:
                        if current is None or await self._write_frozen(current, False) is None:
                            continue
                        self._events.emit(OperatorAction(action="thaw", user=request.user, queue_id=message_id))
                        thawed += 1
                except MessageBusy:
                    continue
            forced.append(message_id)
            if n % (PROGRESS_EVERY * 20) == 0:
                await request.emit({"progress": n, "total": len(ids)})
        self._scheduler.force(forced)
        self._events.emit(OperatorAction(action="flush", user=request.user, count=len(forced)))
        return {"forced": len(forced), "thawed": thawed}
