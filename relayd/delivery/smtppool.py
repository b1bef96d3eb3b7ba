"""The pool of authenticated upstream connections of one SMTP transport.

Takes: connections the transport opened and gives back after a transaction.
Emits: an idle connection to reuse, or a reserved slot for a new one, never
more open connections than the transport's `max_connections`.
Untrusted input: none (the connections' sockets are only closed here).
How it fails: never; a connection that cannot say QUIT is just closed.
"""

from __future__ import annotations

import asyncio

from relayd.config.model import SmtpTransportConfig
from relayd.delivery.smtpsession import UpstreamConnection, quit_session


class ConnectionPool:
    """Idle authenticated connections of one transport, and a cap on open ones.

    `take()` hands out an idle connection or reserves a slot for a new one;
    every taken connection or reserved slot goes back through `give_back()`,
    `discard()` or `release_slot()`.
    """

    def __init__(self, config: SmtpTransportConfig) -> None:
        self._config = config
        self._idle: list[UpstreamConnection] = []
        self._open = 0
        self._cond = asyncio.Condition()
        self._goodbyes: set[asyncio.Task[None]] = set()
        self.closed = False

    async def take(self) -> UpstreamConnection | None:
        async with self._cond:
            while True:
                while self._idle:
                    conn = self._idle.pop()
                    _cancel_expiry(conn)
                    if conn.smtp.is_connected:
                        return conn
                    self._open -= 1
                    conn.smtp.close()
                if self._open < self._config.max_connections:
                    self._open += 1
                    return None
                await self._cond.wait()

    async def release_slot(self) -> None:
        async with self._cond:
            self._open -= 1
            self._cond.notify()

    async def give_back(self, conn: UpstreamConnection) -> None:
        worn_out = conn.messages >= self._config.max_messages_per_connection
        if self.closed or worn_out or not conn.smtp.is_connected:
            await self.discard(conn, polite=True)
            return
        async with self._cond:
            loop = asyncio.get_running_loop()
            conn.expiry = loop.call_later(self._config.idle_timeout, self._expire, conn)
            self._idle.append(conn)
            self._cond.notify()

    async def discard(self, conn: UpstreamConnection, *, polite: bool) -> None:
        try:
            if polite:
                await quit_session(conn.smtp)
        finally:
            conn.smtp.close()
            await self.release_slot()

    def _expire(self, conn: UpstreamConnection) -> None:
        # Nobody waits for a slot while a connection is idle, so no notify is needed.
        if conn in self._idle:
            self._idle.remove(conn)
            self._open -= 1
            task = asyncio.get_running_loop().create_task(quit_session(conn.smtp))
            self._goodbyes.add(task)
            task.add_done_callback(self._goodbyes.discard)

    async def close(self) -> None:
        self.closed = True
        async with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            _cancel_expiry(conn)
        await asyncio.gather(*(quit_session(c.smtp) for c in idle), *self._goodbyes)


def _cancel_expiry(conn: UpstreamConnection) -> None:
    if conn.expiry is not None:
        conn.expiry.cancel()
        conn.expiry = None


