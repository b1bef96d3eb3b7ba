"""The control socket: how relayctl steers a running relayd, and how it knows none runs.

Takes: JSON-line requests on a Unix stream socket (`RelayConfig.control_path`,
mode 0600), from processes of relayd's own user or root only (checked with
SO_PEERCRED); the running stages (scheduler, spool, delivery agent, health
table, main log) handed in through `QueueControl`'s constructor.
Emits: one or more JSON lines per request; the last has ``"done": true`` and
either ``"ok": true`` plus data or ``"ok": false, "error": "sentence"``. Long
actions send ``{"progress": n, "total": m}`` lines first; `queue.list` sends
``{"rows": [...]}`` chunks of compact rows (`queuewire.wire_row`).
Untrusted input: request lines (size-capped, parsed as JSON, every argument
checked; message ids must have the id shape before they touch a path). Only
relayd's user and root can connect, but a malformed request still only gets
an error line.
How it fails: a handler raises `ControlError` for an ordinary refusal (sent as
``ok: false``); anything else is logged and answered "internal error". The
client side is relayd.ops.controlclient (its `ControlUnavailable` says, in one
sentence, that the daemon is not running or that it stopped answering).

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
import contextlib
import json
import os
import pwd
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

from relayd.ops.controlclient import socket_name
from relayd.observe.events import EventSink, MessageCompleted, OperatorAction
from relayd.queue.msgid import is_message_id
from relayd.observe.outcomes import RecentOutcomes
from relayd.queue.queuewire import entry_to_json, queue_counts, wire_row
from relayd.values import QueueEntry, RecipientState

MAX_REQUEST = 32 * 1024 * 1024  # an id list for 100,000 messages is about 2 MB
LIST_CHUNK = 5000  # rows per queue.list line: big enough to be cheap, small enough to stream
PROGRESS_EVERY = 50  # messages between progress lines of a long action
DEFAULT_BUSY_WAIT = 60.0  # seconds an operator action waits for a running delivery attempt
DEFAULT_DELIVER_WAIT = 120.0  # seconds `deliver` waits for its attempts to end
LOG_READ_CAP = 64 * 1024 * 1024  # the tail of the main log searched for a message's history
_PEERCRED = struct.Struct("3i")


class ControlError(Exception):
    """An ordinary refusal: `message` goes back to the client as `error`."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


# ------------------------------------------------------------------ server

Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request: its arguments, who sent it, and ways to send lines before the answer.

    `emit` sends one JSON object as a line; `emit_raw` sends bytes that
    already are complete JSON lines (pre-encoded queue rows).
    """

    cmd: str
    args: Mapping[str, Any]
    user: str
    emit: Emit
    emit_raw: Callable[[bytes], Awaitable[None]]


Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def _peer(sock: socket.socket | None) -> tuple[int, str]:
    """The connecting process's uid and user name (SO_PEERCRED)."""
    if sock is None:
        return -1, "unknown"
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, f"uid {uid}"


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


class ControlServer:
    """Serves `handlers` on a Unix socket that only relayd's user and root may use."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        log_error: Callable[[str], None],
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.path = Path(path)
        self._handlers = handlers
        # Answers wait for this (the queue index loaded at start), so that
        # `mailq` right after a restart never shows half a queue.
        self._ready = ready
        self._log_error = log_error
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind the socket with mode 0600 before anyone can see it, replacing a stale one."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            private = Path(tempfile.mkdtemp(prefix=".control-", dir=self.path.parent))
            try:
                with socket_name(private / "s") as name:
                    sock.bind(name)
                os.chmod(private / "s", 0o600)
                os.replace(private / "s", self.path)
            finally:
                with contextlib.suppress(OSError):
                    (private / "s").unlink()
                os.rmdir(private)
            st = os.stat(self.path, follow_symlinks=False)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        """Stop listening, end open connections, and remove the socket file if it is still ours."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()  # after the connections: newer Pythons wait for them
        with contextlib.suppress(OSError):
            st = os.stat(self.path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            uid, user = _peer(writer.get_extra_info("socket"))
            if uid not in (0, os.geteuid()):
                await self._send(writer, self._failure(f"permission denied for {user}"))
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, self._failure("request line too long"))
                    return
                if not line:
                    return
                if self._ready is not None:
                    await self._ready()
                await self._answer(line, user, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, user: str, writer: asyncio.StreamWriter) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("cmd"), str):
            await self._send(writer, self._failure('a request is one JSON object with a "cmd" string'))
            return
        cmd = obj.pop("cmd")
        handler = self._handlers.get(cmd)
        if handler is None:
            await self._send(writer, self._failure(f"unknown command '{cmd[:40]}'"))
            return

        async def emit(message: dict[str, Any]) -> None:
            await self._send(writer, message)

        async def emit_raw(lines: bytes) -> None:
            writer.write(lines)
            await writer.drain()

        try:
            data = await handler(Request(cmd, obj, user, emit, emit_raw))
        except ControlError as exc:
            await self._send(writer, self._failure(exc.message, **exc.extra))
            return
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug must not kill the daemon or leave the client hanging
            self._log_error(f"control command {cmd} failed: {type(exc).__name__}: {exc}")
            await self._send(writer, self._failure(f"internal error ({type(exc).__name__}); see the main log"))
            return
        await self._send(writer, {**data, "done": True, "ok": True})

    @staticmethod
    def _failure(error: str, **extra: Any) -> dict[str, Any]:
        return {**extra, "done": True, "ok": False, "error": error}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: Mapping[str, Any]) -> None:
        writer.write(_encode(message))
        await writer.drain()


# ------------------------------------------------------ the main log


def read_log_lines(path: Path | None, message_id: str, *, cap: int = LOG_READ_CAP) -> list[str]:
    """Main log lines that mention `message_id`, from the last `cap` bytes of the file."""
    if path is None or not is_message_id(message_id):
        return []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - cap)
            f.seek(start)
            data = f.read(cap)
    except FileNotFoundError:
        return []
    if start > 0:
        data = data.partition(b"\n")[2]  # the first line was cut
    needle = message_id.encode()
    return [
        line.decode("utf-8", "replace")
        for line in data.split(b"\n")
        if needle in line
    ]


# ---------------------------------------------------------- the commands


def _ids(args: Mapping[str, Any]) -> list[str]:
    ids = args.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ControlError('"ids" must be a list of message ids')
    bad = [i for i in ids if not is_message_id(i)]
    if bad:
        raise ControlError(f"'{bad[0][:40]}' is not a message id")
    return list(dict.fromkeys(ids))


def _seconds(args: Mapping[str, Any], name: str, default: float) -> float:
    value = args.get(name, default)
    if type(value) not in (int, float) or not 0 <= value <= 3600:
        raise ControlError(f'"{name}" must be a number of seconds between 0 and 3600')
    return float(value)


def _entry_id(entry: QueueEntry) -> str:
    return entry.envelope.id


class QueueControl:
    """The commands, over the daemon's own stages (all handed in; nothing global).

    `scheduler` is a relayd.queue.scheduler.Scheduler, `spool` a relayd.queue.spool.Spool,
    `agent` a relayd.delivery.walk.DeliveryAgent, `health` an UpstreamHealth, `events`
    where operator actions are emitted, `outcomes` the recent events the
    daemon keeps, which `deliver` and `queue.outcome` answer from. `reload` re-reads the configuration and returns its problems
    (empty when it took); `listeners` gives the bound (name, address, port).
    """

    def __init__(
        self,
        *,
        config: Callable[[], Any],
        scheduler: Any,
        spool: Any,
        agent: Any,
        health: Any,
        events: EventSink,
        outcomes: RecentOutcomes,
        reload: Callable[[], Awaitable[list[str]]],
        listeners: Callable[[], Sequence[tuple[str, str, int]]],
        clock: Callable[[], float] = time.time,
        spool_room: Callable[[], dict[str, object]] | None = None,
        shaping: Callable[[], dict[str, dict[str, object]]] = dict,
        hold_reasons: Callable[[], dict[str, str]] = dict,
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
        self._shaping = shaping  # per transport: rate, counts against limits, next release
        self._hold_reasons = hold_reasons  # message id -> "held: <transport> <limit>, resets ..."
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

    def _health_table(self) -> dict[str, dict[str, Any]]:
        snapshot = self._health.snapshot()
        table: dict[str, dict[str, Any]] = {}
        for name in set(self._config().transports) | set(snapshot):
            record, skipped = snapshot.get(name, (None, None))
            table[name] = {
                "skipped_until": skipped.next_try if skipped is not None else None,
                "last_success": record.last_success if record is not None else None,
                "last_error": record.last_error if record is not None else None,
                "last_error_at": record.last_error_at if record is not None else None,
            }
        return table

    async def health(self, request: Request) -> dict[str, Any]:
        return {"transports": self._health_table()}

    async def status(self, request: Request) -> dict[str, Any]:
        now = self._clock()
        return {
            "pid": os.getpid(),
            "uptime": now - self._started,
            "started_at": self._started,
            "config": str(self._config().source),
            "listeners": [{"name": n, "address": a, "port": p} for n, a, p in self._listeners()],
            "queue": queue_counts(
                self._scheduler.entries(), self._scheduler.in_flight_ids(), now, self._scheduler.waiting()
            ),
            "transports": self._health_table(),
            "spool": self._spool_status(),
            "shaping": self._shaping(),
        }

    def _spool_status(self) -> dict[str, Any]:
        """Free space, the reserve, and messages whose outcome the spool could not record."""
        status: dict[str, Any] = dict(self._spool_room()) if self._spool_room is not None else {}
        status["unrecorded"] = self._agent.unrecorded()
        return status

    async def reload(self, request: Request) -> dict[str, Any]:
        problems = await self._reload()
        if problems:
            raise ControlError("\n".join(problems), problems=problems)
        return {"config": str(self._config().source)}

    async def queue_list(self, request: Request) -> dict[str, Any]:
        """The whole index in `{"rows": [...]}` lines of LIST_CHUNK compact rows.

        Each row's JSON is kept between calls while its entry (an immutable
        value) and in-delivery flag are unchanged, so listing a large,
        mostly quiet queue costs little more than joining bytes; the event
        loop gets a turn after every chunk.
        """
        entries = sorted(self._scheduler.entries(), key=_entry_id)
        flying = self._scheduler.in_flight_ids()
        old, fresh = self._row_cache, {}
        held = self._hold_reasons()
        if held:  # before the rows, so the listing can print each reason under its message
            await request.emit({"held": held})
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

    async def queue_count(self, request: Request) -> dict[str, Any]:
        return queue_counts(
            self._scheduler.entries(), self._scheduler.in_flight_ids(), self._clock(), self._scheduler.waiting()
        )

    async def queue_show(self, request: Request) -> dict[str, Any]:
        message_id = request.args.get("id")
        if not isinstance(message_id, str) or not is_message_id(message_id):
            raise ControlError('"id" must be a message id')
        entry = self._scheduler.get(message_id)
        answer: dict[str, Any] = {"message": None, "in_flight": False}
        if request.args.get("log"):
            answer["log"] = await self._log_lines(message_id)
        if entry is None:
            if "log" in answer:
                return answer
            raise ControlError(f"message {message_id} is not in the queue")
        answer["message"] = entry_to_json(entry)
        answer["in_flight"] = self._scheduler.in_flight(message_id)
        answer["waiting_until"] = self._scheduler.waiting().get(message_id)
        answer["held"] = self._hold_reasons().get(message_id)
        answer["cannot_record"] = self._agent.unrecorded().get(message_id)
        if request.args.get("body"):
            from relayd.queue.spool import SpoolCorruptError, SpoolEntryMissing

            try:
                body: bytes = await asyncio.to_thread(self._spool.read_body, message_id)
            except SpoolEntryMissing:
                raise ControlError(f"message {message_id} is not in the queue") from None
            except SpoolCorruptError as exc:
                raise ControlError(str(exc)) from None
            answer["body"] = body.decode("utf-8", "surrogateescape")
        return answer

    async def queue_log(self, request: Request) -> dict[str, Any]:
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

    async def queue_outcome(self, request: Request) -> dict[str, Any]:
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
        from relayd.queue.spool import SpoolEntryMissing

        changed = replace(entry, frozen=frozen)
        try:
            await self._spool.update(changed, durable=True)
        except SpoolEntryMissing:
            self._scheduler.forget(entry.envelope.id)
            return None
        self._scheduler.add(changed)
        return changed

    async def freeze(self, request: Request) -> dict[str, Any]:
        return await self._set_frozen(request, True)

    async def thaw(self, request: Request) -> dict[str, Any]:
        return await self._set_frozen(request, False)

    async def _on_each_exclusively(
        self, request: Request, action: Callable[[str, QueueEntry], Awaitable[str]]
    ) -> dict[str, Any]:
        """Run `action` on every requested message while the daemon keeps it out of delivery.

        A message in delivery is waited for (up to the request's `wait`); one
        that stays busy is reported as such and left unchanged.
        """
        from relayd.queue.scheduler import MessageBusy

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

    async def _set_frozen(self, request: Request, frozen: bool) -> dict[str, Any]:
        """Exim's -Mf / -Mt: the frozen flag is written to the spool, so it survives restarts."""
        unchanged, done = ("already frozen", "frozen") if frozen else ("not frozen", "thawed")

        async def set_flag(message_id: str, entry: QueueEntry) -> str:
            if entry.frozen == frozen:
                return unchanged
            if await self._write_frozen(entry, frozen) is None:
                return "not in queue"
            self._events.emit(OperatorAction(action="freeze" if frozen else "thaw", user=request.user, queue_id=message_id))
            return done

        return await self._on_each_exclusively(request, set_flag)

    async def remove(self, request: Request) -> dict[str, Any]:
        async def remove_one(message_id: str, entry: QueueEntry) -> str:
            gone = await asyncio.to_thread(self._spool.remove, message_id)
            self._scheduler.forget(message_id)
            self._agent.forget(message_id)
            if not gone:
                return "not in queue"
            self._events.emit(OperatorAction(action="remove", user=request.user, queue_id=message_id))
            self._events.emit(MessageCompleted(queue_id=message_id))
            return "removed"

        return await self._on_each_exclusively(request, remove_one)

    async def giveup(self, request: Request) -> dict[str, Any]:
        from relayd.queue.spool import SpoolCorruptError

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

    async def deliver(self, request: Request) -> dict[str, Any]:
        """Exim's -M: thaw if frozen, then one attempt now, ignoring retry times; wait for it."""
        from relayd.queue.scheduler import MessageBusy

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

    async def flush(self, request: Request) -> dict[str, Any]:
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
                from relayd.queue.scheduler import MessageBusy

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
