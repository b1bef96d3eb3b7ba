"""Listener: the SMTP submission session (aiosmtpd), AUTH and submission policy.

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

aiosmtpd does the command loop, STARTTLS and address parsing; this module
replaces EHLO (exact capability list), AUTH (async password check, TLS rule,
throttling), and DATA (reads large chunks instead of line by line and streams
them to the spool, with relayd's own smuggling, NUL and line-length rules:
relayd.smtp.datastream), and adds enhanced status codes to the replies aiosmtpd
writes itself.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import functools
import ipaddress
import itertools
import os
import pwd
import re
import socket
import ssl
import struct
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from aiosmtpd.smtp import MISSING, SMTP, Envelope as SmtpEnvelope, Session

from relayd.smtp import policy
from relayd import replies
from relayd.smtp.authguard import Attempt, AuthGuard, limits_of
from relayd.config.model import ListenerConfig, RelayConfig, TenantConfig, TlsMode
from relayd.smtp.datastream import DataDecoder
from relayd.observe.events import (
    AuthFailed, AuthThrottled, ConnectionRefused, EventSink, Notice, RejectionsNotLogged, SessionClosed,
    SessionDropped, SessionOpened, SmtpRefused,
)
from relayd.smtp.intake import DataTurns, IncomingBody, MessageIntake
from relayd.smtp.intake import SubmissionRefused as SubmissionRefused  # raised by the services' accept and receive
from relayd.delivery.router import route  # a pure function of the config: RCPT is refused, not bounced later
from relayd.smtp.sessionlimits import ConnectionCounter, DataDeadline, LogGate, SessionBudget, write_and_close
from relayd.values import Envelope

# asyncio's default of 100 overflows when hundreds of clients connect at once:
# the kernel then drops handshakes and those clients wait with no greeting.
_LISTEN_BACKLOG = 1024
_READ_CHUNK = 64 * 1024  # larger reads leave glibc's heap fragmented under many TLS sessions
_ENHANCED = re.compile(rb"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
# Enhanced codes for replies that aiosmtpd writes itself (RFC 3463).
_DEFAULT_ENHANCED = {
    b"220": b"2.0.0", b"221": b"2.0.0", b"235": b"2.7.0", b"250": b"2.0.0",
    b"252": b"2.5.0", b"421": b"4.3.0", b"451": b"4.3.0", b"452": b"4.3.1",
    b"454": b"4.7.0", b"500": b"5.5.2", b"501": b"5.5.4", b"502": b"5.5.1",
    b"503": b"5.5.1", b"504": b"5.5.4", b"530": b"5.7.0", b"535": b"5.7.8",
    b"538": b"5.7.11", b"550": b"5.7.1", b"552": b"5.3.4", b"553": b"5.1.3",
    b"554": b"5.7.0", b"555": b"5.5.4",
}


@dataclass(frozen=True)
class ListenerServices:
    """What the listener needs from the rest of relayd, passed in by the daemon."""

    config: Callable[[], RelayConfig]
    authenticate: Callable[[str, str], Awaitable[Optional[TenantConfig]]]
    accept: Callable[[Envelope, bytes], Awaitable[str]]  # returns the queue id
    new_id: Callable[[], str]
    guard: AuthGuard
    events: EventSink  # relayd.observe.events: the main log and the metrics are sinks
    clock: Callable[[], float] = time.time
    # Room on the spool for a tenant's new message of a declared size: a 452
    # reply, or None (relayd.queue.spoolroom.SpoolRoom.refusal).
    admit: Callable[[str, int], Optional[str]] = lambda _tenant, _size: None
    # Opens a message in the queue whose body is written as DATA arrives.
    receive: Callable[[Envelope], Awaitable[IncomingBody]] | None = None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


class SubmissionSession(Session):
    """aiosmtpd's session plus who the client is, for relayd's policy."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.tenant_name: str | None = None
        self.auth_mechanism: str | None = None
        # The connection's rejection-log budget (it outlives the session at STARTTLS).
        self.may_log: Callable[[], bool] | None = None
        self.local_uid: int | None = None  # the peer's uid, on a Unix-socket listener
        self.local_user: str = ""  # "uid/name" for the log's U= field


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def describe_uid(uid: int) -> str:
    """``uid/name`` as the log shows a local user (the number alone if it has no name)."""
    try:
        return f"{uid}/{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return str(uid)


class SubmissionProtocol(SMTP):
    """One client connection on one listener."""

    # The stream buffer size; command lines are still capped by aiosmtpd's
    # command_size_limit, and DATA lines by the listener's max_line_length.
    line_length_limit = 65536

    def __init__(
        self,
        listener: ListenerConfig,
        services: ListenerServices,
        *,
        handler: "SubmissionHandler",
        hostname: str,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        sessions: set["SubmissionProtocol"],
        connections: ConnectionCounter | None = None,
    ) -> None:
        # aiosmtpd's own constructor inspects every attribute of the protocol and
        # the handler on each connection (about half a millisecond); relayd's
        # options are fixed per listener, so set the same state directly.
        # tests/test_listener.py checks that this stays a superset of what
        # aiosmtpd's constructor sets.
        loop = asyncio.get_running_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
        )
        self.__ident__ = "relayd ESMTP"
        self.event_handler = handler
        self.data_size_limit = listener.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = None if implicit_tls else tls_context
        self.require_starttls = False
        self._timeout_duration = listener.command_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {}  # smtp_AUTH below does PLAIN and LOGIN itself
        self._handle_hooks = handler.hooks
        self._ehlo_hook_ver = None
        self._smtp_methods = {name: self._budgeted(getattr(self, f"smtp_{name}")) for name in _SMTP_COMMANDS}
        self._enforce_call_limit = False
        self.listener = listener
        self.services = services
        self.implicit_tls = implicit_tls
        self._greeted = False
        self._sessions = sessions
        self._in_data = False
        self._data_deadline: DataDeadline | None = None  # set while DATA is being read
        self._connections = connections or connection_counter(listener)
        self._admitted: bool | None = None  # None until connection_made; then: did aiosmtpd get it
        self._counted = False  # holds a slot in the listener's ConnectionCounter
        self._last_command_at = 0.0  # loop time of admission or of the latest command
        self._activity = 0  # order of admission or latest command: loop time is cached per loop round
        self._peer_ip = ""
        self._closing = False
        self._budget = SessionBudget(listener.max_commands_before_auth, listener.hard_error_limit)
        self._rejection_log = LogGate(burst=_REJECTIONS_LOGGED, window=60.0)
        # aiosmtpd keeps these per class and grows them on every EHLO; fix them per connection.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"MAIL": SMTP.command_size_limit + 26 + 10 + 16}
        )

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Plain `<local@domain>` addresses without aiosmtpd's full RFC 5322 parser."""
        match = _SIMPLE_ANGLE_ADDR.match(arg or "")
        if match is not None:
            return match.group(1), match.group(2)
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    # -- connection bookkeeping -------------------------------------------------

    def _create_session(self) -> Session:
        session = SubmissionSession(self.loop)
        session.may_log = self.may_log_rejection
        return session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS on the same connection: the
        # connection is counted (and the gauge bumped) only the first time.
        if self._admitted is None and not self._admit(transport):
            return
        super().connection_made(transport)
        if self.listener.unix_path is not None and self.session is not None:
            session = self.submission_session()
            session.local_uid = peer_uid(transport)
            if session.local_uid is not None:
                session.local_user = describe_uid(session.local_uid)

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection, or refuse it with 421 before any other work.

        When the listener is full, the unauthenticated connection idle the
        longest makes room (see `_evict_idle_stranger`): a flood of idle
        connections cannot keep a legitimate client out, even from 127.0.0.1.
        """
        peer = transport.get_extra_info("peername")
        self._peer_ip = str(peer[0]) if peer else ""
        refused = self._connections.admit(self._peer_ip)
        if refused == "total" and self._evict_idle_stranger():
            refused = self._connections.admit(self._peer_ip)
        self._admitted = self._counted = refused is None
        if refused is not None:
            host = self.services.config().hostname
            write_and_close(transport, (replies.too_many_connections(host, from_address=refused == "address") + "\r\n").encode())
            self._log_connection_refused(refused)
            return False
        self._last_command_at = self.loop.time()
        self._activity = next(_ACTIVITY)
        self._sessions.add(self)
        self.services.events.emit(SessionOpened())
        return True

    def _evict_idle_stranger(self) -> bool:
        """Close this listener's unauthenticated connection idle the longest; False if none."""
        strangers = [s for s in self._sessions if s.listener is self.listener and s._evictable()]
        if not strangers:
            return False
        victim = min(strangers, key=lambda s: (s._last_command_at, s._activity))
        write, suppressed = self._connections.log_gate.admit(self.loop.time())
        if write:
            self.services.events.emit(SessionDropped(
                client_ip=victim.client_ip,
                reason=f"idle before authentication while {self.listener.name} is at max_connections "
                       f"{self.listener.max_connections}" + (f" ({suppressed} similar line(s) not logged)" if suppressed else "")))
        victim._drop(replies.evicted(self.hostname), "", log=False)
        victim._release()  # now, not at connection_lost: the new connection needs the slot
        return True

    def _evictable(self) -> bool:
        return self._counted and not self._closing and not self._in_data and not self._identified()

    def _log_connection_refused(self, refused: str) -> None:
        write, suppressed = self._connections.log_gate.admit(self.loop.time())
        limit = (f"max_connections_per_ip {self.listener.max_connections_per_ip}" if refused == "address"
                 else f"max_connections {self.listener.max_connections}")
        self.services.events.emit(ConnectionRefused(
            client_ip=self._peer_ip, reason=f"too many connections ({limit} on {self.listener.name})",
            suppressed=suppressed, logged=write))

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            super().data_received(data)

    def eof_received(self) -> Optional[bool]:
        return super().eof_received() if self._admitted else False

    def _release(self) -> None:
        """Give back this connection's slot, once."""
        if not self._counted:
            return
        self._counted = False
        self._connections.release(self._peer_ip)
        self._sessions.discard(self)
        self.services.events.emit(SessionClosed())

    def connection_lost(self, error: Optional[Exception]) -> None:
        if not self._admitted:
            return  # refused in connection_made: aiosmtpd never saw it
        self._admitted = False
        self._release()
        suppressed = self._rejection_log.take_suppressed()
        if suppressed:
            self.services.events.emit(RejectionsNotLogged(client_ip=self._peer_ip, count=suppressed))
        super().connection_lost(error)

    @property
    def client_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if peer else ""

    @property
    def client_port(self) -> int:
        peer = self.session.peer if self.session is not None else None
        return int(peer[1]) if peer and len(peer) > 1 else 0

    @property
    def auth_source(self) -> str:
        """Who is attempting a login, for throttling: the address, or the local uid."""
        session = self.session
        if self.listener.unix_path is not None and isinstance(session, SubmissionSession):
            return f"uid:{session.local_uid}"
        return self.client_ip

    @property
    def is_encrypted(self) -> bool:
        return self._tls_protocol is not None or self.implicit_tls

    def tls_version(self) -> str | None:
        if not self.is_encrypted or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else "TLS"

    def auth_offered(self) -> bool:
        """AUTH needs TLS, unless plaintext AUTH is allowed on a loopback listener.

        On a Unix socket nothing crosses a wire: AUTH is offered.
        """
        if self.is_encrypted or self.listener.unix_path is not None:
            return True
        return self.listener.allow_plaintext_auth and is_loopback(self.client_ip)

    def close_with(self, reply: str) -> None:
        """Write a final reply and close (used for timeouts, limits and shutdown).

        The transport is asked for `write` rather than tested for its class:
        uvloop's TCP transport is no `asyncio.WriteTransport` subclass.
        """
        self._closing = True
        write_and_close(self.transport, reply.encode("ascii", "replace") + b"\r\n")

    def _drop(self, reply: str, reason: str, *, log: bool = True) -> None:
        """Log why, say 421 and close; the command loop stops at its next await."""
        if self._closing:
            return
        if log:
            self.services.events.emit(SessionDropped(client_ip=self.client_ip, reason=reason))
        self.close_with(reply)
        handler_task = self._handler_coroutine
        if handler_task is not None and not handler_task.done():
            handler_task.cancel()

    def _budgeted(self, method: Callable[[str], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
        """`method` behind the pre-authentication command budget."""

        @functools.wraps(method)
        async def run(arg: str) -> None:
            self._last_command_at = self.loop.time()
            self._activity = next(_ACTIVITY)
            if method.__name__ != "smtp_QUIT" and not self._budget.command(identified=self._identified()):
                reason = f"too many commands before authentication ({self.listener.max_commands_before_auth})"
                self._drop(replies.too_many_commands(self.hostname), reason)
                return
            await method(arg)

        return run

    def _identified(self) -> bool:
        """True once the client is a tenant: by AUTH or by a bound loopback address."""
        session = self.session
        if not isinstance(session, SubmissionSession):
            return False
        handler: SubmissionHandler = self.event_handler
        return session.authenticated or handler.tenant_for(session) is not None

    def may_log_rejection(self) -> bool:
        """False once this connection has logged its share of rejections (see LogGate)."""
        write, _suppressed = self._rejection_log.admit(self.loop.time())
        return write

    def submission_session(self) -> SubmissionSession:
        """The current session, with relayd's fields (always set while connected).

        A method, not a property: aiosmtpd inspects every attribute of the
        protocol object in its constructor, before any session exists.
        """
        session = self.session
        assert isinstance(session, SubmissionSession)
        return session

    def _timeout_cb(self) -> None:
        if self._in_data:
            self._drop(replies.data_too_slow(self.hostname), "data timeout or too slow (message abandoned)")
        else:
            self._drop(replies.timeout(self.hostname), "command timeout")

    @property
    def in_transaction(self) -> bool:
        return self._in_data

    # -- replies ----------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if self._closing:
            return  # a 421 has been sent: nothing more goes to this client
        line = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        if not self._greeted:
            self._greeted = True  # the greeting carries no enhanced code
        else:
            line = _with_enhanced_code(line)
        await super().push(line)
        if line[:1] in (b"4", b"5") and not line.startswith(b"421") and not self._budget.error(line):
            reason = f"too many errors ({self.listener.hard_error_limit}; last reply {line[:3].decode('ascii', 'replace')})"
            self._drop(replies.too_many_errors(self.hostname), reason)

    async def _push_lines(self, lines: list[str]) -> None:
        text = "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        )
        self._writer.write(text.encode("utf-8"))
        await self._writer.drain()

    # -- commands ---------------------------------------------------------------

    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and not _helo_name_ok(hostname):
            await self.push(replies.bad_helo("HELO"))
            return
        await super().smtp_HELO(hostname)

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        if not _helo_name_ok(hostname):
            await self.push(replies.bad_helo("EHLO"))  # never echoed: it may not even decode
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        session = self.submission_session()
        session.extended_smtp = True
        session.host_name = hostname
        lines = [
            f"{self.hostname} Hello {hostname} [{self.client_ip}]",
            f"SIZE {self.listener.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and not self.is_encrypted:
            lines.append("STARTTLS")
        if self.auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        await self._push_lines(lines)

    async def smtp_AUTH(self, arg: str) -> None:
        session = self.submission_session()
        if not session.host_name or not session.extended_smtp:
            await self.push(replies.AUTH_NEEDS_EHLO)
            return
        if not self.auth_offered():
            await self.push(replies.AUTH_NEEDS_TLS)
            return
        if session.authenticated:
            await self.push(replies.AUTH_ALREADY)
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            await self.push(replies.AUTH_SYNTAX)
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            credentials = await self._read_plain(args[1] if len(args) == 2 else None)
        elif mechanism == "LOGIN":
            credentials = await self._read_login(args[1] if len(args) == 2 else None)
        else:
            await self.push(replies.AUTH_MECHANISM_UNKNOWN)
            return
        if credentials is None:
            return
        login, password = credentials
        # Counted before the (slow) check starts, so parallel attempts are counted too.
        attempt = self.services.guard.begin(login, self.auth_source, limits_of(self.listener))
        if not isinstance(attempt, Attempt):
            self.services.events.emit(AuthThrottled(
                client_ip=self.client_ip or self.auth_source, login=login,
                reason=attempt.reason, retry_after=attempt.retry_after,
            ))
            await self._reply_and_close(replies.AUTH_TOO_MANY)
            return
        tenant = await self.services.authenticate(login, password) if login else None
        if tenant is not None:
            self.services.guard.succeeded(attempt)
            session.authenticated = True
            session.tenant_name = tenant.name
            session.auth_mechanism = mechanism
            await self.push(replies.AUTH_OK)
            return
        await self._auth_failed(login, attempt)

    async def _auth_failed(self, login: str, attempt: Attempt) -> None:
        delay = self.services.guard.failed(attempt)
        self.services.events.emit(AuthFailed(client_ip=self.client_ip or self.auth_source, login=login))
        if delay:
            await asyncio.sleep(delay)
        await self.push(replies.AUTH_INVALID)

    async def _reply_and_close(self, reply: str) -> None:
        """Say `reply` and hang up (a throttled login gets no second try on this connection)."""
        await self.push(reply)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _decode_b64(self, text: str) -> bytes | None:
        if text == "=":
            return b""
        try:
            return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            await self.push(replies.AUTH_BAD_BASE64)
            return None

    async def _challenge(self, prompt: str) -> bytes | None:
        answer = await self.challenge_auth(prompt)
        return None if answer is MISSING else bytes(answer)

    async def _read_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = await (self._decode_b64(initial) if initial is not None else self._challenge(""))
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push(replies.AUTH_BAD_BASE64)
            return None
        try:
            authzid, login, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            await self.push(replies.AUTH_BAD_BASE64)
            return None
        if authzid and authzid != login:
            return "", ""  # acting as another identity is not supported: plain failure
        return login, password

    async def _read_login(self, initial: str | None) -> tuple[str, str] | None:
        user = await (
            self._decode_b64(initial) if initial is not None else self._challenge("Username:")
        )
        if user is None:
            return None
        password = await self._challenge("Password:")
        if password is None:
            return None
        try:
            return user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push(replies.AUTH_BAD_BASE64)
            return None

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push(replies.NEED_MAIL)
            return
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler: SubmissionHandler = self.event_handler
        tenant = handler.tenant_for(self.submission_session())
        if tenant is None:
            await self.push(replies.AUTH_REQUIRED)
            return
        size_limit = policy.effective_limit(self.listener.max_message_size, tenant.max_message_size)
        refusal = handler.room_refusal(self.submission_session(), tenant, self.envelope.mail_options)
        if refusal is not None:
            await self.push(refusal)
            return
        await self.push(replies.START_DATA)
        self._in_data = True
        self._data_deadline = DataDeadline(
            started=self.loop.time(), line_timeout=self.listener.data_timeout,
            min_rate=self.listener.min_data_rate, max_bytes=size_limit,
        )
        try:
            reply = await handler.receive_message(self, tenant, size_limit)
        finally:
            self._in_data = False
            self._data_deadline = None
        if reply is None:
            return  # connection closed mid-DATA: nothing was promised
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if reply.startswith("250"):
            self._budget.message_accepted()
        await self.push(reply)

    async def read_data_chunk(self) -> bytes:
        """The next piece of DATA as the client sent it; b"" when the client went away.

        Deadlines that apply inside DATA belong here: every read passes through.
        """
        deadline = self._data_deadline
        if deadline is not None and not self._arm_data_deadline(deadline):
            return b""  # too slow: the 421 is written and the connection is closing
        if deadline is None:
            self._reset_timeout(self.listener.data_timeout)
        chunk: bytes = await self._reader.read(_READ_CHUNK)
        if chunk and deadline is not None:
            deadline.note(chunk, self.loop.time())
        return chunk

    def end_of_data(self, leftover: bytes) -> None:
        """After the final dot: commands pipelined behind it go back to aiosmtpd's command loop."""
        if leftover:
            self._reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        self._reset_timeout()

    def _arm_data_deadline(self, deadline: DataDeadline) -> bool:
        """Time the next DATA read out at the nearest deadline; False if one has passed."""
        left = deadline.seconds_left(self.loop.time())
        if left <= 0:
            self._timeout_cb()
            return False
        self._reset_timeout(left)
        return True


_ACTIVITY = itertools.count()  # orders connections whose loop times are equal
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default; shorter when command_timeout is
_REJECTIONS_LOGGED = 10  # per connection per minute; the rest are counted in one summary line
_SMTP_COMMANDS = tuple(
    name[5:] for name in dir(SubmissionProtocol) if name.startswith("smtp_")
)
_SIMPLE_ANGLE_ADDR = re.compile(
    r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)\Z",
    re.DOTALL,
)


def _helo_name_ok(name: str) -> bool:
    """Printable ASCII without spaces: a domain, an address literal, or a sloppy but harmless name.

    Anything 8-bit or undecodable (aiosmtpd hands it over as surrogates) or a
    control character is refused, so it is never echoed, logged or kept.
    """
    return len(name) <= 255 and all("!" <= ch <= "~" for ch in name)


def connection_counter(listener: ListenerConfig) -> ConnectionCounter:
    return ConnectionCounter(
        max_total=listener.max_connections,
        max_per_address=listener.max_connections_per_ip,
        limit_loopback_per_address=listener.per_ip_limit_on_loopback,
    )


def _with_enhanced_code(line: bytes) -> bytes:
    code = line[:3]
    if code in (b"334", b"354") or len(line) < 4 or _ENHANCED.match(line):
        return line
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None:
        return line
    return code + line[3:4] + enhanced + b" " + line[4:]


class SubmissionHandler:
    """aiosmtpd hooks for MAIL and RCPT, and relayd's side of DATA."""

    def __init__(
        self, listener: ListenerConfig, services: ListenerServices, *, data_turns: DataTurns | None = None
    ) -> None:
        self.listener = listener
        self.services = services
        self.data_turns = data_turns if data_turns is not None else DataTurns()
        # What aiosmtpd's constructor would find by scanning for handle_* methods.
        self.hooks: dict[str, Callable[..., Any]] = {
            "MAIL": self.handle_MAIL,
            "RCPT": self.handle_RCPT,
            "exception": self.handle_exception,
        }

    def tenant_for(self, session: SubmissionSession) -> TenantConfig | None:
        """The authenticated tenant, or one bound to the client's loopback address."""
        config = self.services.config()
        if session.authenticated and session.tenant_name:
            tenant = config.tenants.get(session.tenant_name)
            return tenant if tenant is not None and tenant.enabled else None
        if self.listener.unix_path is not None:
            if session.local_uid is None:
                return None
            tenant = config.tenant_for_uid(session.local_uid)
            return tenant if tenant is not None and tenant.enabled else None
        peer = session.peer[0] if session.peer else ""
        if not is_loopback(str(peer)):
            return None
        for tenant in config.tenants.values():
            # configfile refuses bind_addresses without trust_every_local_user; checked again here.
            if tenant.enabled and tenant.trust_every_local_user and str(peer) in tenant.bind_addresses:
                return tenant
        return None

    def _refusal_without_tenant(self, session: SubmissionSession) -> tuple[str, str]:
        """The reply (and log detail) when a session has no tenant: AUTH, or an unlisted local user."""
        if self.listener.unix_path is None or session.authenticated:
            return replies.AUTH_REQUIRED, "no AUTH"
        who = session.local_user or "unknown"
        return replies.local_user_not_allowed(who), f"U={who} is in no tenant's local_users"

    def _refuse(
        self, session: SubmissionSession, stage: str, reply: str, detail: str, address: str | None = None
    ) -> str:
        peer = session.peer[0] if session.peer else ""
        logged = session.may_log is None or session.may_log()
        self.services.events.emit(SmtpRefused(
            client_ip=str(peer), stage=stage, reply=reply, detail=detail, address=address, logged=logged
        ))
        return reply

    async def handle_MAIL(
        self, server: SubmissionProtocol, session: SubmissionSession,
        envelope: SmtpEnvelope, address: str, mail_options: list[str],
    ) -> str:
        tenant = self.tenant_for(session)
        if tenant is None:
            reply, detail = self._refusal_without_tenant(session)
            return self._refuse(session, "MAIL", reply, detail, address)
        if not policy.address_is_valid(address):
            return self._refuse(session, "MAIL", replies.bad_address(address), "", address)
        if policy.needs_smtputf8(address) and "SMTPUTF8" not in mail_options:
            return self._refuse(session, "MAIL", replies.SMTPUTF8_NEEDED, "", address)
        if not policy.sender_allowed(tenant, address):
            reply = replies.sender_not_allowed(address, tenant.name, "Sender")
            return self._refuse(session, "MAIL", reply, f"A={tenant.name}", address)
        size = _size_option(mail_options)
        limit = policy.effective_limit(self.listener.max_message_size, tenant.max_message_size)
        if size is not None and size > limit:
            return self._refuse(session, "MAIL", replies.message_too_big(limit), f"SIZE={size}", address)
        refusal = self.services.admit(tenant.name, size or 0)
        if refusal is not None:
            return self._refuse(session, "MAIL", refusal, f"A={tenant.name} spool", address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    def room_refusal(self, session: SubmissionSession, tenant: TenantConfig, mail_options: list[str]) -> str | None:
        """Room on the spool, checked again right before DATA (the disk may have filled since MAIL)."""
        refusal = self.services.admit(tenant.name, _size_option(mail_options) or 0)
        if refusal is None:
            return None
        return self._refuse(session, "DATA", refusal, f"A={tenant.name} spool")

    async def handle_RCPT(
        self, server: SubmissionProtocol, session: SubmissionSession,
        envelope: SmtpEnvelope, address: str, rcpt_options: list[str],
    ) -> str:
        tenant = self.tenant_for(session)
        if tenant is None:
            return self._refuse(session, "RCPT", replies.AUTH_REQUIRED, "no AUTH", address)
        limit = policy.effective_limit(self.listener.max_recipients, tenant.max_recipients)
        if len(envelope.rcpt_tos) >= limit:
            return self._refuse(session, "RCPT", replies.TOO_MANY_RECIPIENTS, f"limit {limit}", address)
        if not policy.address_is_valid(address):
            return self._refuse(session, "RCPT", replies.bad_address(address), "", address)
        if policy.needs_smtputf8(address) and not envelope.smtp_utf8:
            return self._refuse(session, "RCPT", replies.SMTPUTF8_NEEDED, "", address)
        if route(tenant, address) is None:
            reply = replies.no_route(address, tenant.name)
            return self._refuse(session, "RCPT", reply, f"A={tenant.name}", address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    async def receive_message(
        self, server: SubmissionProtocol, tenant: TenantConfig, size_limit: int
    ) -> str | None:
        """Read DATA to the final dot, streaming it into the queue; the reply, None on disconnect.

        Only the header block is held in memory (see relayd.smtp.intake); the
        partial file is removed on any way out but a 250.
        """
        session = server.submission_session()
        receive = self.services.receive
        if receive is None:
            raise RuntimeError("the listener was started without a queue to receive into")
        decoder = DataDecoder(max_line_length=self.listener.max_line_length, size_limit=size_limit)
        intake = MessageIntake(
            template=self._envelope_template(server, tenant),
            tenant=tenant,
            listener=self.listener,
            hostname=self.services.config().hostname,
            receive=receive,
        )
        try:
            while decoder.end is None:
                chunk = await server.read_data_chunk()
                if not chunk:
                    return None
                async with self.data_turns:
                    checked = decoder.feed(chunk)
                    if decoder.refusal is None:
                        await intake.take(checked)
                    else:
                        intake.abort()
            server.end_of_data(decoder.end.leftover)
            if decoder.end.refusal is not None:
                detail = "too big" if decoder.end.refusal.startswith("552") else ""
                return self._refuse(session, "DATA", decoder.end.refusal, detail)
            reply = await intake.finish()
            if intake.refusal is not None and not intake.refusal_logged:
                return self._refuse(session, "DATA", intake.refusal, intake.refusal_detail)
            return reply
        finally:
            intake.abort()

    def _envelope_template(self, server: SubmissionProtocol, tenant: TenantConfig) -> Envelope:
        """The message's envelope as far as it is known at DATA (id and size come later)."""
        session = server.submission_session()
        envelope = server.envelope
        assert envelope is not None and envelope.mail_from is not None
        return Envelope(
            id=self.services.new_id(),
            tenant=tenant.name,
            sender=envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            received_at=self.services.clock(),
            size=0,
            client_ip=server.client_ip,
            client_port=server.client_port,
            local_user=session.local_user,
            tls=server.tls_version() or "",
            client_helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8),
            protocol=_protocol_name(server),
            auth_mechanism=(session.auth_mechanism or "").lower() if session.authenticated else "",
        )

    async def handle_exception(self, error: Exception) -> str:
        self.services.events.emit(Notice(text=f"SMTP session error: {type(error).__name__}: {error}", level="error"))
        return replies.INTERNAL_ERROR


def _protocol_name(server: SubmissionProtocol) -> str:
    """Exim's P= values: esmtp, plus s for TLS and a for AUTH."""
    session = server.submission_session()
    name = "esmtp" if session.extended_smtp else "smtp"
    if server.listener.unix_path is not None:
        name = "local-" + name  # Exim's P=local-esmtp for SMTP from a local process
    if server.is_encrypted:
        name += "s"
    if session.authenticated:
        name += "a"
    return name


def _size_option(options: list[str]) -> int | None:
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class SubmissionServer:
    """The sockets of all configured listeners, and the sessions on them."""

    def __init__(self, services: ListenerServices, tls_context: ssl.SSLContext | None) -> None:
        self.services = services
        self.tls_context = tls_context
        self.sessions: set[SubmissionProtocol] = set()
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
