"""One client connection's plumbing: admission, connection limits, eviction, budgets and closing.

Takes: a new connection on one listener, and its `ListenerServices`. Emits:
`SessionOpened`, `SessionClosed`, `ConnectionRefused`, `SessionDropped` and
`RejectionsNotLogged` events. Untrusted input: the number, rate and idleness of
connections and commands. Fails: a connection over a limit gets `421` and is
closed before any other work; the SMTP commands themselves are in
relayd.smtp.session, which builds on `SubmissionConnection`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import re
import ssl
from typing import Awaitable, Callable, Optional

from aiosmtpd.smtp import SMTP, Session

from relayd import replies
from relayd.config.model import ListenerConfig
from relayd.observe.events import ConnectionRefused, RejectionsNotLogged, SessionClosed, SessionDropped, SessionOpened
from relayd.netaddr import is_loopback
from relayd.smtp.services import ListenerServices, SubmissionSession, describe_uid, peer_uid
from relayd.smtp.sessionlimits import ConnectionCounter, DataDeadline, LogGate, SessionBudget, write_and_close
from relayd.smtp.submission import SubmissionHandler

READ_CHUNK = 64 * 1024  # larger reads leave glibc's heap fragmented under many TLS sessions
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
_ACTIVITY = itertools.count()  # orders connections whose loop times are equal
_REJECTIONS_LOGGED = 10  # per connection per minute; the rest are counted in one summary line


_COMMANDS_OF: dict[type[SMTP], tuple[str, ...]] = {}


def smtp_commands(protocol: type[SMTP]) -> tuple[str, ...]:
    """The commands a protocol class answers (its smtp_* methods), found once per class."""
    known = _COMMANDS_OF.get(protocol)
    if known is None:
        known = _COMMANDS_OF[protocol] = tuple(name[5:] for name in dir(protocol) if name.startswith("smtp_"))
    return known


_SIMPLE_ANGLE_ADDR = re.compile(
    r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)\Z",
    re.DOTALL,
)


def helo_name_ok(name: str) -> bool:
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


def with_enhanced_code(line: bytes) -> bytes:
    code = line[:3]
    if code in (b"334", b"354") or len(line) < 4 or _ENHANCED.match(line):
        return line
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None:
        return line
    return code + line[3:4] + enhanced + b" " + line[4:]


class SubmissionConnection(SMTP):
    """One client connection on one listener: everything but the SMTP commands."""

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
        sessions: set["SubmissionConnection"],
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
        self._smtp_methods = {name: self._budgeted(getattr(self, f"smtp_{name}")) for name in smtp_commands(type(self))}
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
