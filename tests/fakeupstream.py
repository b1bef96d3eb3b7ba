"""A fake upstream SMTP server for tests: a real aiosmtpd server on 127.0.0.1:0.

Takes: a TLS mode, the logins it accepts, and a script of failures that tests
change while it runs. Emits: what it received (messages exactly as they
arrived after dot-unstuffing, logins, connection counts).
Untrusted input: whatever the client under test sends; it is only recorded.
Fails loudly: `start()` raises if the server cannot bind within ten seconds.

The server runs in its own thread with its own event loop, so it serves async
tests in the same process and a relayd subprocess alike. Every scripting method
and every record is safe to use from any thread. Passwords are checked and
counted, never stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

import trustme
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.ports import candidate_ports

DEFAULT_USER = "relay@example.com"
DEFAULT_PASSWORD = "abcd efgh ijkl mnop"  # shaped like a Gmail app password
COMMANDS = ("GREETING", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA")
_THREAD_TIMEOUT = 10.0  # seconds any call into the server thread may take

T = TypeVar("T")


def make_ca() -> trustme.CA:
    """A fresh certificate authority for one test's TLS."""
    return trustme.CA()


def write_ca_file(ca: trustme.CA, directory: Path) -> Path:
    """Write the CA's certificate as PEM into `directory`, for a transport's ca_file."""
    path = directory / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@dataclass(frozen=True)
class ReceivedMessage:
    """One message whose data the fake read completely."""

    mail_from: str  # "" for the null sender
    rcpt_tos: list[str]
    data: bytes  # exactly as received, after dot-unstuffing
    login: str | None
    tls: bool
    mail_options: list[str]
    reply: str  # the final reply given; "" when the fake dropped the connection


@dataclass
class _Rule:
    command: str
    reply: str | None  # None: close the connection without answering
    for_address: str | None
    times: int | None
    delay: float = 0.0  # seconds to wait before answering (or dropping)


@dataclass
class _Records:
    messages: list[ReceivedMessage] = field(default_factory=list)
    received: list[ReceivedMessage] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    auth_attempts: int = 0
    auth_passwords_seen: int = 0
    connections: int = 0
    mechanisms: list[str] = field(default_factory=list)


class FakeUpstream:
    """A scriptable upstream SMTP server; see the module docstring."""

    def __init__(
        self,
        *,
        tls: str = "starttls",
        users: dict[str, str] | None = None,
        require_auth: bool = True,
        ca: trustme.CA | None = None,
        hostname: str = "fake-upstream",
        no_starttls: bool = False,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        auth_exclude: tuple[str, ...] = (),
    ) -> None:
        if tls not in ("starttls", "implicit", "none"):
            raise ValueError(f"tls must be starttls, implicit or none, not {tls!r}")
        self.tls_mode = tls
        self._users = dict(users) if users is not None else {DEFAULT_USER: DEFAULT_PASSWORD}
        self.require_auth = require_auth
        self.ca = ca if ca is not None else make_ca()
        self.hostname = hostname
        self.no_starttls = no_starttls
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime  # False: EHLO does not announce 8BITMIME (a 7-bit upstream)
        self.auth_exclude = auth_exclude  # SASL mechanisms not offered, e.g. ("PLAIN",)
        self.host = "127.0.0.1"
        self.port = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rules: list[_Rule] = []
        self._records = _Records()
        self._live: set[_FakeSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tmpdir: Path | None = None
        self._server_tls = self._make_server_context()

    def __repr__(self) -> str:
        return f"<FakeUpstream {self.host}:{self.port} tls={self.tls_mode}>"

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> "FakeUpstream":
        """Bind 127.0.0.1:0 in a new thread and return once it is listening."""
        self._tmpdir = Path(tempfile.mkdtemp(prefix="fakeupstream-"))
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"fake-upstream-{id(self)}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_THREAD_TIMEOUT):
            raise RuntimeError("the fake upstream did not start listening in time")
        self._call(self._listen).result(_THREAD_TIMEOUT)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown).result(_THREAD_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_THREAD_TIMEOUT)
            self._loop = self._thread = None
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def ca_file(self) -> Path:
        """PEM file of the CA that signed this server's certificate."""
        if self._tmpdir is None:
            raise RuntimeError("start the fake upstream first")
        path = self._tmpdir / "upstream-ca.pem"
        if not path.exists():
            write_ca_file(self.ca, self._tmpdir)
        return path

    # --- scripting ------------------------------------------------------------

    def reply_to(
        self,
        command: str,
        reply: str,
        *,
        for_address: str | None = None,
        times: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer `command` with `reply` instead of going on normally.

        GREETING replaces the 220 banner (the fake then closes the connection);
        DATA is the reply after the whole message was read. `for_address`
        limits a MAIL or RCPT rule to one address; `times` to that many uses;
        `delay` (at most 10 s) holds the answer back, to provoke client timeouts.
        """
        self._add_rule(_Rule(command, reply, for_address, times, delay))

    def drop_at(
        self, command: str, *, for_address: str | None = None, times: int | None = None, delay: float = 0.0
    ) -> None:
        """Close the connection instead of answering `command` (DATA: after the data)."""
        self._add_rule(_Rule(command, None, for_address, times, delay))

    def drop_after_data(self, *, times: int | None = None) -> None:
        """Read the whole message, then close the connection without answering."""
        self._add_rule(_Rule("DATA", None, None, times))

    def clear_script(self) -> None:
        with self._lock:
            self._rules.clear()

    def refuse_connections(self) -> None:
        """Close the listening socket: connecting now gets ECONNREFUSED."""
        self._call(self._close_listener).result(_THREAD_TIMEOUT)

    def accept_connections(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen).result(_THREAD_TIMEOUT)

    def kill_connections(self) -> None:
        """Abort every open client connection, as an upstream's idle timeout does."""
        self._call(self._abort_all).result(_THREAD_TIMEOUT)

    # --- records --------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted with a 2xx reply."""
        with self._lock:
            return list(self._records.messages)

    @property
    def received(self) -> list[ReceivedMessage]:
        """Every message whose data was read, whatever the reply (or none)."""
        with self._lock:
            return list(self._records.received)

    @property
    def logins(self) -> list[str]:
        with self._lock:
            return list(self._records.logins)

    @property
    def mechanisms(self) -> list[str]:
        """The SASL mechanism of every AUTH received, in order."""
        with self._lock:
            return list(self._records.mechanisms)

    @property
    def auth_attempts(self) -> int:
        """AUTH commands received, successful or not."""
        with self._lock:
            return self._records.auth_attempts

    @property
    def auth_passwords_seen(self) -> int:
        """How many times a password reached the fake (the password is not kept)."""
        with self._lock:
            return self._records.auth_passwords_seen

    @property
    def connections(self) -> int:
        """Connections accepted since start."""
        with self._lock:
            return self._records.connections

    @property
    def live_connections(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._live)

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least `n` messages were accepted; raise on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._records.messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected {n} messages, got {len(self._records.messages)} in {timeout}s"
                    )
                self._changed.wait(remaining)
            return list(self._records.messages)

    # --- used by the server thread ---------------------------------------------

    def take_rule(self, command: str, address: str | None) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.command != command:
                    continue
                if rule.for_address is not None and (
                    address is None or rule.for_address.lower() != address.lower()
                ):
                    continue
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                return rule
        return None

    def check_login(self, login: bytes, password: bytes) -> bool:
        with self._lock:
            self._records.auth_passwords_seen += 1
            user = login.decode("utf-8", "replace")
            ok = self._users.get(user) == password.decode("utf-8", "replace")
            if ok:
                self._records.logins.append(user)
            return ok

    def note_auth(self, carries_password: bool) -> None:
        with self._lock:
            self._records.auth_attempts += 1
            if carries_password:
                self._records.auth_passwords_seen += 1

    def record(self, message: ReceivedMessage, accepted: bool) -> None:
        with self._changed:
            self._records.received.append(message)
            if accepted:
                self._records.messages.append(message)
            self._changed.notify_all()

    def connection_opened(self, session: "_FakeSMTP") -> None:
        with self._lock:
            self._records.connections += 1
            self._live.add(session)

    def connection_closed(self, session: "_FakeSMTP") -> None:
        with self._lock:
            self._live.discard(session)

    # --- internals -------------------------------------------------------------

    def _add_rule(self, rule: _Rule) -> None:
        if rule.command not in COMMANDS:
            raise ValueError(f"command must be one of {', '.join(COMMANDS)}")
        if rule.times is not None and rule.times < 1:
            raise ValueError("times must be at least 1")
        if not 0 <= rule.delay <= _THREAD_TIMEOUT:
            raise ValueError(f"delay must be between 0 and {_THREAD_TIMEOUT:g} seconds")
        with self._lock:
            self._rules.append(rule)

    def _make_server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        return context

    def _run(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _call(self, fn: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """Run `fn` (plain or async) in the server's loop; the caller waits on the future."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake upstream is not running")

        async def runner() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), loop)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        assert self._loop is not None
        # The first listen picks a port from the reserved range, so that listening
        # again after refusing connections finds it still free (tests/ports.py).
        for port in [self.port] if self.port else candidate_ports():
            try:
                self._server = await self._loop.create_server(
                    self._make_protocol,
                    host=self.host,
                    port=port,
                    ssl=self._server_tls if self.tls_mode == "implicit" else None,
                    reuse_address=True,
                )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self.port:
                    raise
                continue
            break
        assert self._server is not None, "no free port in the reserved range"
        self.port = self._server.sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _abort_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for session in live:
            session.drop()

    async def _shutdown(self) -> None:
        self._close_listener()
        self._abort_all()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def _make_protocol(self) -> "_FakeSMTP":
        starttls = self.tls_mode == "starttls" and not self.no_starttls
        session = _FakeSMTP(
            self,
            _Handler(self),
            hostname=self.hostname,
            ident="fake upstream",
            tls_context=self._server_tls if starttls else None,
            require_starttls=starttls,
            # AUTH is offered without STARTTLS when the connection is implicit
            # TLS, and also in plaintext modes, so a client that would send a
            # password in the clear gets the chance to (and the test sees it).
            auth_require_tls=starttls,
            authenticator=_authenticator(self),
            auth_exclude_mechanism=self.auth_exclude,
            enable_SMTPUTF8=self.smtputf8,
            loop=self._loop,
        )
        self.connection_opened(session)
        return session


def _authenticator(fake: FakeUpstream) -> Callable[..., AuthResult]:
    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        with fake._lock:
            fake._records.mechanisms.append(mechanism)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = fake.check_login(auth_data.login, auth_data.password)
        # Only the login name is kept on the session; the password is dropped here.
        return AuthResult(success=ok, handled=False, auth_data=_Login(auth_data.login) if ok else None)

    return authenticate


@dataclass(frozen=True)
class _Login:
    login: bytes


class _FakeSMTP(SMTP):
    """aiosmtpd's server with a scriptable greeting and STARTTLS answer."""

    def __init__(self, fake: FakeUpstream, handler: "_Handler", **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.fake = fake
        self.implicit_tls = fake.tls_mode == "implicit"

    def drop(self) -> None:
        _abort(self.transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.fake.connection_closed(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        rule = self.fake.take_rule("GREETING", None)
        if rule is None:
            await super()._handle_client()
            return
        await asyncio.sleep(rule.delay)
        if rule.reply is not None:
            await self.push(rule.reply)
        if self.transport is not None:
            self.transport.close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        rule = self.fake.take_rule("STARTTLS", None)
        if rule is None:
            await super().smtp_STARTTLS(arg)
        else:
            await self.push(await _answer(self, rule))

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or (self.session is not None and self.session.ssl is not None)


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Close at once, without a reply and without flushing (an abrupt peer)."""
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    elif transport is not None:
        transport.close()


async def _answer(server: SMTP, rule: _Rule) -> str:
    """The scripted reply, after the scripted delay; or drop the connection."""
    await asyncio.sleep(rule.delay)
    return await _drop(server) if rule.reply is None else rule.reply


async def _drop(server: SMTP) -> str:
    """Abort the connection; the session's task is cancelled when it is gone."""
    _abort(server.transport)
    await asyncio.sleep(_THREAD_TIMEOUT)
    return "421 4.4.2 dropped"  # never reaches a client: the transport is gone


class _Handler:
    """aiosmtpd hooks: apply the script, then behave like a normal upstream."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        rule = self.fake.take_rule("EHLO", None)
        if rule is None:
            session.host_name = hostname
            if not self.fake.eightbitmime:
                return [r for r in responses if r[4:].upper() != "8BITMIME"]
            return responses
        return [await _answer(server, rule)]

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: list[str]) -> Any:
        mechanism = args[0].upper() if args else ""
        rule = self.fake.take_rule("AUTH", None)
        self.fake.note_auth(carries_password=rule is not None and mechanism == "PLAIN" and len(args) > 1)
        if rule is None:
            return MISSING
        return await _answer(server, rule)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.fake.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        sender = "" if address == "<>" else address
        rule = self.fake.take_rule("MAIL", sender)
        if rule is not None:
            return await _answer(server, rule)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rule = self.fake.take_rule("RCPT", address)
        if rule is not None:
            return await _answer(server, rule)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rule = self.fake.take_rule("DATA", None)
        reply = "250 2.0.0 OK queued" if rule is None else (rule.reply or "")
        auth = session.auth_data
        login = auth.login if isinstance(auth, _Login) else None
        message = ReceivedMessage(
            mail_from="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            login=login.decode("utf-8", "replace") if isinstance(login, bytes) else None,
            tls=isinstance(server, _FakeSMTP) and server.is_tls,
            mail_options=list(envelope.mail_options),
            reply=reply,
        )
        self.fake.record(message, accepted=reply.startswith("2"))
        return reply if rule is None else await _answer(server, rule)
