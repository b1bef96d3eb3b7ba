"""The control socket's server: JSON lines on a Unix socket only relayd's user and root may use.

Takes: connections on `RelayConfig.control_path` (mode 0600, the peer checked
with SO_PEERCRED) and a table of handlers, command name to coroutine (the
commands themselves are relayd.ops.control).
Emits: one or more JSON lines per request; the last has ``"done": true`` and
either ``"ok": true`` plus data or ``"ok": false, "error": "sentence"``.
Untrusted input: request lines (capped at MAX_REQUEST bytes, parsed as JSON;
anything but an object with a "cmd" string gets an error line).
Fails: a handler raises `ControlError` for an ordinary refusal (sent as
``ok: false``); anything else is logged through `log_error` and answered
"internal error"; the daemon goes on.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from relayd.jsonwire import JsonOut, JsonOutObject, JsonValue
from relayd.ops.controlclient import socket_name

MAX_REQUEST = 32 * 1024 * 1024  # an id list for 100,000 messages is about 2 MB
_PEERCRED = struct.Struct("3i")


class ControlError(Exception):
    """An ordinary refusal: `message` goes back to the client as `error`."""

    def __init__(self, message: str, **extra: JsonOut) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


Emit = Callable[[JsonOutObject], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request: its arguments, who sent it, and ways to send lines before the answer.

    `emit` sends one JSON object as a line; `emit_raw` sends bytes that
    already are complete JSON lines (pre-encoded queue rows).
    """

    cmd: str
    args: Mapping[str, JsonValue]
    user: str
    emit: Emit
    emit_raw: Callable[[bytes], Awaitable[None]]


Handler = Callable[[Request], Awaitable[JsonOutObject]]


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


def _encode(message: JsonOutObject) -> bytes:
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

        async def emit(message: JsonOutObject) -> None:
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
    def _failure(error: str, **extra: JsonOut) -> JsonOutObject:
        return {**extra, "done": True, "ok": False, "error": error}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: JsonOutObject) -> None:
        writer.write(_encode(message))
        await writer.drain()
