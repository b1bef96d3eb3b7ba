"""Listener: the SMTP submission session (aiosmtpd), AUTH and submission policy.

Takes: client connections on the configured listeners; a `ListenerServices`
bundle (current config, password check, the queue's accept call, auth guard,
log, metrics) handed in by the daemon.
Emits: an `Envelope` and the checked message, streamed into the queue through
`services.receive` (see relayd.intake), and answers 250 only after the
message is committed, i.e. once it is durable.
Untrusted input: every byte from the client: commands, addresses, AUTH data,
message content. Policy decisions live in relayd.policy (pure functions).
How it fails: every refusal is a named reply (relayd.replies); an unexpected
exception becomes `451 4.3.0` and a log line, never a traceback to the client.

aiosmtpd does the command loop, STARTTLS and address parsing; this module
replaces EHLO (exact capability list), AUTH (async password check, TLS rule,
throttling), and DATA (reads large chunks instead of line by line and streams
them to the spool, with relayd's own smuggling, NUL and line-length rules:
relayd.datastream), and adds enhanced status codes to the replies aiosmtpd
writes itself.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from aiosmtpd.smtp import MISSING, SMTP, Envelope as SmtpEnvelope, Session

from relayd import policy, replies
from relayd.authguard import AuthGuard
from relayd.config import ListenerConfig, RelayConfig, TenantConfig, TlsMode
from relayd.datastream import DataDecoder
from relayd.intake import DataTurns, IncomingBody, MessageIntake
from relayd.intake import SubmissionRefused as SubmissionRefused  # raised by the services' accept and receive
from relayd.router import route  # a pure function of the config: RCPT is refused, not bounced later
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
    log: Any  # relayd.mainlog.MainLog
    metrics: Any = None  # relayd.metrics.RelayMetrics | None
    clock: Callable[[], float] = time.time
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
        self._smtp_methods = {name: getattr(self, f"smtp_{name}") for name in _SMTP_COMMANDS}
        self._enforce_call_limit = False
        self.listener = listener
        self.services = services
        self.implicit_tls = implicit_tls
        self._greeted = False
        self._sessions = sessions
        self._in_data = False
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
        return SubmissionSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sessions.add(self)
        if self.services.metrics is not None:
            self.services.metrics.sessions.inc()

    def connection_lost(self, error: Optional[Exception]) -> None:
        if self in self._sessions:
            self._sessions.discard(self)
            if self.services.metrics is not None:
                self.services.metrics.sessions.dec()
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
    def is_encrypted(self) -> bool:
        return self._tls_protocol is not None or self.implicit_tls

    def tls_version(self) -> str | None:
        if not self.is_encrypted or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else "TLS"

    def auth_offered(self) -> bool:
        """AUTH needs TLS, unless plaintext AUTH is allowed on a loopback listener."""
        if self.is_encrypted:
            return True
        return self.listener.allow_plaintext_auth and is_loopback(self.client_ip)

    def close_with(self, reply: str) -> None:
        """Write a final reply and close (used for timeouts and shutdown)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(reply.encode("ascii", "replace") + b"\r\n")
            transport.close()

    def submission_session(self) -> SubmissionSession:
        """The current session, with relayd's fields (always set while connected).

        A method, not a property: aiosmtpd inspects every attribute of the
        protocol object in its constructor, before any session exists.
        """
        session = self.session
        assert isinstance(session, SubmissionSession)
        return session

    def _timeout_cb(self) -> None:
        self.close_with(replies.timeout(self.hostname))

    @property
    def in_transaction(self) -> bool:
        return self._in_data

    # -- replies ----------------------------------------------------------------

    async def push(self, status: Any) -> None:
        line = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        if not self._greeted:
            self._greeted = True  # the greeting carries no enhanced code
        else:
            line = _with_enhanced_code(line)
        await super().push(line)

    async def _push_lines(self, lines: list[str]) -> None:
        text = "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        )
        self._writer.write(text.encode("utf-8"))
        await self._writer.drain()

    # -- commands ---------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
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
        guard = self.services.guard
        if guard.is_blocked(self.client_ip):
            self.close_with(replies.AUTH_TOO_MANY)
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
        tenant = await self.services.authenticate(login, password) if login else None
        if tenant is not None:
            guard.record_success(self.client_ip)
            session.authenticated = True
            session.tenant_name = tenant.name
            session.auth_mechanism = mechanism
            await self.push(replies.AUTH_OK)
            return
        await self._auth_failed(login)

    async def _auth_failed(self, login: str) -> None:
        guard = self.services.guard
        guard.record_failure(self.client_ip)
        self.services.log.auth_failed(client_ip=self.client_ip, login=login)
        if self.services.metrics is not None:
            self.services.metrics.auth_failures.inc()
        delay = guard.delay_for(self.client_ip)
        if delay:
            await asyncio.sleep(delay)
        if guard.is_blocked(self.client_ip):
            self.close_with(replies.AUTH_TOO_MANY)
        else:
            await self.push(replies.AUTH_INVALID)

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
        await self.push(replies.START_DATA)
        self._in_data = True
        try:
            reply = await handler.receive_message(self, tenant, size_limit)
        finally:
            self._in_data = False
        if reply is None:
            return  # connection closed mid-DATA: nothing was promised
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)

    async def read_data_chunk(self) -> bytes:
        """The next piece of DATA as the client sent it; b"" when the client went away.

        Deadlines that apply inside DATA belong here: every read passes through.
        """
        self._reset_timeout(self.listener.data_timeout)
        return await self._reader.read(_READ_CHUNK)

    def end_of_data(self, leftover: bytes) -> None:
        """After the final dot: commands pipelined behind it go back to aiosmtpd's command loop."""
        if leftover:
            self._reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        self._reset_timeout()


_SMTP_COMMANDS = tuple(
    name[5:] for name in dir(SubmissionProtocol) if name.startswith("smtp_")
)
_SIMPLE_ANGLE_ADDR = re.compile(
    r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)\Z",
    re.DOTALL,
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
        peer = session.peer[0] if session.peer else ""
        if not is_loopback(str(peer)):
            return None
        for tenant in config.tenants.values():
            if tenant.enabled and str(peer) in tenant.bind_addresses:
                return tenant
        return None

    def _refuse(
        self, session: SubmissionSession, stage: str, reply: str, detail: str, address: str | None = None
    ) -> str:
        peer = session.peer[0] if session.peer else ""
        self.services.log.rejected(client_ip=str(peer), stage=stage, reply=reply, detail=detail, address=address)
        if self.services.metrics is not None:
            self.services.metrics.smtp_rejections.labels(reason=stage).inc()
        return reply

    async def handle_MAIL(
        self, server: SubmissionProtocol, session: SubmissionSession,
        envelope: SmtpEnvelope, address: str, mail_options: list[str],
    ) -> str:
        tenant = self.tenant_for(session)
        if tenant is None:
            return self._refuse(session, "MAIL", replies.AUTH_REQUIRED, "no AUTH", address)
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
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

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

        Only the header block is held in memory (see relayd.intake); the
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
            tls=server.tls_version() or "",
            client_helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8),
            protocol=_protocol_name(server),
        )

    async def handle_exception(self, error: Exception) -> str:
        self.services.log.error(f"SMTP session error: {type(error).__name__}: {error}")
        return replies.INTERNAL_ERROR


def _protocol_name(server: SubmissionProtocol) -> str:
    """Exim's P= values: esmtp, plus s for TLS and a for AUTH."""
    session = server.submission_session()
    name = "esmtp" if session.extended_smtp else "smtp"
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
        self.bound: list[tuple[str, str, int]] = []  # (listener name, address, port)
        self._data_turns = DataTurns()  # shared by every listener's DATA sessions

    async def start(self, listeners: tuple[ListenerConfig, ...]) -> None:
        loop = asyncio.get_running_loop()
        for listener in listeners:
            implicit = listener.tls is TlsMode.IMPLICIT
            starttls_ctx = self.tls_context if listener.tls is TlsMode.STARTTLS else None
            handler = SubmissionHandler(listener, self.services, data_turns=self._data_turns)
            server = await loop.create_server(
                lambda listener=listener, implicit=implicit, ctx=starttls_ctx, handler=handler: SubmissionProtocol(
                    listener, self.services, handler=handler, hostname=self.services.config().hostname,
                    tls_context=ctx, implicit_tls=implicit, sessions=self.sessions,
                ),
                host=listener.address,
                port=listener.port,
                ssl=self.tls_context if implicit else None,
                reuse_address=True,
                backlog=_LISTEN_BACKLOG,
            )
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.bound.append((listener.name, listener.address, port))

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

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
