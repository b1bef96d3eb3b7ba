"""Listener: the sockets of the configured listeners and the SMTP sessions on them.

Takes: client connections on the configured listeners (TCP; or a Unix socket,
where the peer's uid from SO_PEERCRED picks the tenant); a `ListenerServices`
bundle (current config, password check, the queue's accept call, auth guard,
log, metrics) handed in by the daemon.
Emits: an `Envelope` and the checked message, streamed into the queue through
`services.receive` (see relayd.smtp.intake), and answers 250 only after the
message is committed, i.e. once it is durable.
Untrusted input: every byte from the client: commands, addresses, AUTH data,
message content. Policy decisions live in relayd.smtp.policy (pure functions).
How it fails: every refusal is a named reply (relayd.replies); an unexpected
exception becomes `451 4.3.0` and a log line, never a traceback to the client.

The session is built in layers, each its own module: relayd.smtp.services (what
the daemon hands in, and the session's state), relayd.smtp.connection (admission,
limits and closing), relayd.smtp.session (the SMTP commands) and
relayd.smtp.submission (MAIL/RCPT policy and the DATA hand-off to the queue).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

from relayd import replies
from relayd.config.model import ListenerConfig, TlsMode
from relayd.smtp.connection import SubmissionConnection, connection_counter
from relayd.smtp.intake import DataTurns
from relayd.smtp.intake import SubmissionRefused as SubmissionRefused  # raised by the services' accept and receive
from relayd.smtp.services import ListenerServices as ListenerServices
from relayd.smtp.session import SubmissionProtocol as SubmissionProtocol
from relayd.smtp.submission import SubmissionHandler as SubmissionHandler

# asyncio's default of 100 overflows when hundreds of clients connect at once:
# the kernel then drops handshakes and those clients wait with no greeting.
_LISTEN_BACKLOG = 1024
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default; shorter when command_timeout is


class SubmissionServer:
    """The sockets of all configured listeners, and the sessions on them."""

    def __init__(self, services: ListenerServices, tls_context: ssl.SSLContext | None) -> None:
        self.services = services
        self.tls_context = tls_context
        self.sessions: set[SubmissionConnection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self.bound: list[tuple[str, str, int]] = []  # (listener name, address, port); unix: (name, path, 0)
        self._unix_paths: list[Path] = []
        self._data_turns = DataTurns()  # shared by every listener's DATA sessions

    async def start(self, listeners: tuple[ListenerConfig, ...]) -> None:
        loop = asyncio.get_running_loop()
        for listener in listeners:
            if listener.unix_path is not None:
                await self._start_unix(listener)
                continue
            implicit = listener.tls is TlsMode.IMPLICIT
            starttls_ctx = self.tls_context if listener.tls is TlsMode.STARTTLS else None
            handler = SubmissionHandler(listener, self.services, data_turns=self._data_turns)
            counter = connection_counter(listener)
            server = await loop.create_server(
                lambda listener=listener, implicit=implicit, ctx=starttls_ctx, handler=handler, counter=counter: SubmissionProtocol(
                    listener, self.services, handler=handler, hostname=self.services.config().hostname,
                    tls_context=ctx, implicit_tls=implicit, sessions=self.sessions, connections=counter,
                ),
                host=listener.address,
                port=listener.port,
                ssl=self.tls_context if implicit else None,
                # A handshake is not yet a counted connection: bound its time.
                ssl_handshake_timeout=min(listener.command_timeout, _HANDSHAKE_TIMEOUT) if implicit else None,
                reuse_address=True,
                backlog=_LISTEN_BACKLOG,
            )
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.bound.append((listener.name, listener.address, port))

    async def _start_unix(self, listener: ListenerConfig) -> None:
        """A Unix-socket listener: who connects is the peer's uid, so the mode can be wide."""
        assert listener.unix_path is not None
        path = listener.unix_path
        remove_stale_socket(path)
        handler = SubmissionHandler(listener, self.services, data_turns=self._data_turns)
        counter = connection_counter(listener)
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: SubmissionProtocol(
                listener, self.services, handler=handler, hostname=self.services.config().hostname,
                tls_context=None, implicit_tls=False, sessions=self.sessions, connections=counter,
            ),
            path=str(path),
        )
        if listener.unix_group is not None:
            os.chown(path, -1, listener.unix_group)
        os.chmod(path, listener.unix_mode)
        self._servers.append(server)
        self._unix_paths.append(path)
        self.bound.append((listener.name, str(path), 0))

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)  # a later relayd-sendmail fails at once (75), not after a timeout

    async def drain(self, grace: float) -> None:
        """Let sessions in the middle of DATA finish, then say 421 to everyone."""
        deadline = asyncio.get_running_loop().time() + grace
        while any(s.in_transaction for s in self.sessions):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        host = self.services.config().hostname
        for session in list(self.sessions):
            session.close_with(replies.shutting_down(host))
        for server in self._servers:
            await server.wait_closed()


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a relayd that is gone; refuse to steal a live one."""
    try:
        is_socket = path.is_socket()
    except OSError:
        return
    if not is_socket:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody answers: stale
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use by another process (another relayd?)")
