"""Transports: hand one `Delivery` to an upstream SMTP server, or to a Maildir.

Takes: a `Delivery` (sender, recipients, CRLF body) and, for SMTP, the
transport's configuration, a credential lookup and the HELO name.
Emits: one `AttemptResult` per attempt, with one `RecipientResult` per
recipient whose outcome `relayd.delivery.failover.classify` decided.
Untrusted input: everything the upstream sends (greeting, EHLO keywords,
reply texts). Reply texts are flattened to one printable line before they go
anywhere, and never decide anything except through `failover.classify`.
How it fails: `send()` never raises for network, SMTP, TLS or disk trouble;
every such problem becomes an outcome. Passwords are revealed only as they
are handed to aiosmtplib and appear in no result, detail or log.

Security rules enforced here, whatever the configuration says: STARTTLS, when
required, is never skipped (a server that does not offer it is a failure, not
a reason to go on in plaintext), and AUTH is only sent over TLS whose
certificate and host name were verified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relayd.delivery import failover
from relayd.delivery import mime7bit
from relayd import safeio
from relayd.delivery.upstreamauth import AuthNoReply, AuthRefused, NoMechanism, UpstreamLogin, choose_mechanism
from relayd.config.model import CaptureTransportConfig, SmtpTransportConfig, TlsMode, TransportConfig
from relayd.values import (
    AttemptOutcome,
    AttemptResult,
    Delivery,
    RecipientResult,
    SmtpReply,
    Stage,
)

_QUIT_TIMEOUT = 5.0  # seconds a polite QUIT may take before the socket is just closed
_MAX_REPLY_TEXT = 500  # characters of an upstream reply kept for logs and DSNs


# A credential of any kind the AUTH mechanisms know (relayd.delivery.upstreamauth).
CredentialLike = UpstreamLogin

CredentialLookup = Callable[[str], CredentialLike | None]


class Transport(Protocol):
    """Something that can attempt one delivery and report per recipient."""

    name: str

    async def send(self, delivery: Delivery) -> AttemptResult: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class VerifyStep:
    """One step of `verify_transport`: connect, greeting, EHLO, STARTTLS, certificate, AUTH."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None


# --- small pure helpers ------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def clean_text(text: str) -> str:
    """An upstream's text as one printable line, of bounded length."""
    flat = _CONTROL.sub(" ", text.replace("\r\n", " ").replace("\n", " ")).strip()
    return flat if len(flat) <= _MAX_REPLY_TEXT else flat[: _MAX_REPLY_TEXT - 3] + "..."


def _reply(code: int, message: str) -> SmtpReply:
    return SmtpReply(code, clean_text(message))


def _reply_of(exc: SMTPResponseException) -> SmtpReply:
    return _reply(exc.code, exc.message)


def wire_body(body: bytes) -> bytes:
    """The body as sent after DATA: CRLF line ends, dot-stuffed, ending in CRLF.

    Any bare CR or LF becomes CRLF first, so a lone "." can never end the
    message early at the upstream (SMTP smuggling). The terminating ".\\r\\n"
    is not included.
    """
    crlf = body.count(b"\r\n")
    if body.count(b"\n") == crlf and body.count(b"\r") == crlf:
        normalised = body  # the listener already stores CRLF-only bodies
    else:
        normalised = _BARE_LINE_END.sub(b"\r\n", body)
    if not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    if not normalised.startswith(b".") and b"\r\n." not in normalised:
        return normalised
    return _LEADING_DOT.sub(b"..", normalised)


def _has_8bit(body: bytes) -> bool:
    return not body.isascii()


def smtputf8_need(delivery: Delivery) -> str | None:
    """Why this delivery can only travel with SMTPUTF8 (RFC 6531/6532), or None.

    As Postfix does (smtputf8_autodetect_classes unset), 8-bit header fields
    need SMTPUTF8 only when the client declared SMTPUTF8: applications that
    write raw UTF-8 subjects without asking for it (PHP mail(), many
    templates) have always been carried as 8-bit data, and bouncing them
    would break mail that every provider accepts.
    """
    if not delivery.sender.isascii() or not all(r.isascii() for r in delivery.recipients):
        return "non-ASCII addresses"
    if delivery.smtputf8 and not mime7bit.header_block(delivery.body).isascii():
        return "8-bit header fields"
    return None


def tls_label(ssl_object: ssl.SSLObject | None) -> str:
    """"TLS1.3" style protocol name for the log's X= field ("" without TLS)."""
    if ssl_object is None:
        return ""
    version = ssl_object.version() or "TLS"
    return version.replace("TLSv", "TLS")


def auth_precondition(config: SmtpTransportConfig) -> str | None:
    """Why this configuration can never send its credential safely, or None."""
    if config.credential is None:
        return None
    if config.tls is TlsMode.NONE:
        return f"refusing to send credential {config.credential} over a connection without TLS"
    if not config.verify_certificate:
        return (
            f"refusing to send credential {config.credential}: the upstream's certificate "
            "is not verified (verify_certificate is off)"
        )
    return None


def _no_reply_detail(exc: BaseException, what: str, timeout: float) -> str:
    if isinstance(exc, (SMTPTimeoutError, TimeoutError)):
        return f"timeout after {timeout:g}s waiting for the reply to {what}"
    return f"connection lost after {what}"


class _Stopped(Exception):
    """A session step failed; carries what `classify` and the verify report need."""

    def __init__(self, step: str, stage: Stage, reply: SmtpReply | None, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.step = step
        self.stage = stage
        self.reply = reply
        self.detail = detail or (str(reply) if reply is not None else stage.value)


# --- opening a session ---------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    """An open, ready (EHLO'd, TLS'd, authenticated) upstream connection."""

    smtp: aiosmtplib.SMTP
    ip: str
    tls: str
    messages: int = 0
    expiry: asyncio.TimerHandle | None = None


StepNote = Callable[[str, str], None]


def _no_note(step: str, detail: str) -> None:
    """Progress is only reported by verify_transport."""


def client_tls_context(config: SmtpTransportConfig) -> ssl.SSLContext:
    """The context that verifies the upstream's certificate and host name."""
    cafile = str(config.ca_file) if config.ca_file is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if not config.verify_certificate:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _open_session(
    config: SmtpTransportConfig,
    *,
    context: ssl.SSLContext,
    helo_name: str,
    credential: CredentialLike | None,
    credential_problem: str | None,
    note: StepNote = _no_note,
) -> _Connection:
    """Connect, read the greeting, EHLO, upgrade to TLS and log in; raise `_Stopped`."""
    implicit = config.tls is TlsMode.IMPLICIT
    try:
        smtp = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            local_hostname=helo_name,
            timeout=config.command_timeout,
            use_tls=implicit,
            start_tls=False,
            tls_context=context if implicit else None,
        )
    except ValueError as exc:  # a HELO name or host that cannot go on a command line
        raise _Stopped("connect", Stage.CONNECT, None, clean_text(str(exc))) from None
    stage = Stage.CONNECT
    try:
        ip = await _connect(smtp, config, note)
        stage = Stage.EHLO
        await _ehlo(smtp, config)
        note("EHLO", f"{len(smtp.esmtp_extensions)} extensions offered")
        if config.tls is TlsMode.STARTTLS:
            stage = Stage.STARTTLS
            await _starttls(smtp, config, context, note)
            await _ehlo(smtp, config)
        stage = Stage.AUTH
        ssl_object = smtp.get_transport_info("ssl_object")
        verified = ssl_object is not None and _verifies(context)
        await _authenticate(smtp, config, credential, credential_problem, verified, note)
        return _Connection(smtp=smtp, ip=ip, tls=tls_label(ssl_object))
    except (SMTPException, OSError) as exc:  # the net under the per-step handling
        smtp.close()
        detail = clean_text(f"{type(exc).__name__}: {exc}")
        raise _Stopped(stage.value if stage is not Stage.CONNECT else "connect", stage, None, detail) from None
    except BaseException:
        smtp.close()
        raise


def _verifies(context: ssl.SSLContext) -> bool:
    return context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


async def _connect(smtp: aiosmtplib.SMTP, config: SmtpTransportConfig, note: StepNote) -> str:
    where = f"{config.host} port {config.port}"
    try:
        greeting = await smtp.connect(timeout=config.connect_timeout)
    except SMTPConnectResponseError as exc:
        note("connect", f"connected to {where}")
        raise _Stopped("greeting", Stage.GREETING, _reply_of(exc)) from None
    except SMTPConnectTimeoutError as exc:
        if isinstance(exc.__cause__, SMTPTimeoutError):
            note("connect", f"connected to {where}")
            detail = f"timeout after {config.connect_timeout:g}s waiting for the greeting"
            raise _Stopped("greeting", Stage.GREETING, None, detail) from None
        detail = f"connect to {where}: timed out after {config.connect_timeout:g}s"
        raise _Stopped("connect", Stage.CONNECT, None, detail) from None
    except SMTPConnectError as exc:
        raise _connect_failure(exc.__cause__, where, note) from None
    except OSError as exc:  # raised before aiosmtplib wraps it (e.g. a bad address)
        raise _connect_failure(exc, where, note) from None
    peer = smtp.get_transport_info("peername")
    ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    note("connect", f"connected to {where} ({ip})")
    if config.tls is TlsMode.IMPLICIT:
        note("certificate", f"verified for {config.host}" if config.verify_certificate else "not verified")
    note("greeting", clean_text(f"{greeting.code} {greeting.message}"))
    return ip


def _connect_failure(cause: BaseException | None, where: str, note: StepNote) -> _Stopped:
    if isinstance(cause, SMTPServerDisconnected):
        note("connect", f"connected to {where}")
        return _Stopped("greeting", Stage.GREETING, None, "connection closed before the greeting")
    if isinstance(cause, ssl.SSLCertVerificationError):
        note("connect", f"connected to {where}")
        reason = cause.verify_message or str(cause)
        return _Stopped("certificate", Stage.CONNECT, None, f"certificate verify failed: {reason}")
    if isinstance(cause, ssl.SSLError):
        return _Stopped("connect", Stage.CONNECT, None, f"TLS handshake with {where} failed: {cause}")
    if isinstance(cause, ConnectionRefusedError):
        return _Stopped("connect", Stage.CONNECT, None, f"connect to {where}: connection refused")
    if isinstance(cause, socket.gaierror):
        return _Stopped("connect", Stage.CONNECT, None, f"host name lookup for {where} failed")
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return _Stopped("connect", Stage.CONNECT, None, f"connect to {where}: {reason}")


async def _ehlo(smtp: aiosmtplib.SMTP, config: SmtpTransportConfig) -> None:
    try:
        await smtp.ehlo(timeout=config.command_timeout)
    except SMTPHeloError as exc:
        raise _Stopped("EHLO", Stage.EHLO, _reply_of(exc)) from None
    except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
        detail = _no_reply_detail(exc, "EHLO", config.command_timeout)
        raise _Stopped("EHLO", Stage.EHLO, None, detail) from None


async def _starttls(
    smtp: aiosmtplib.SMTP, config: SmtpTransportConfig, context: ssl.SSLContext, note: StepNote
) -> None:
    if not smtp.supports_extension("starttls"):
        detail = f"{config.host} does not offer STARTTLS; refusing to go on without TLS"
        raise _Stopped("STARTTLS", Stage.STARTTLS, None, detail)
    try:
        await smtp.starttls(
            server_hostname=config.host, tls_context=context, timeout=config.connect_timeout
        )
    except SMTPResponseException as exc:
        raise _Stopped("STARTTLS", Stage.STARTTLS, _reply_of(exc)) from None
    except ssl.SSLCertVerificationError as exc:
        note("STARTTLS", "offered and accepted")
        reason = exc.verify_message or str(exc)
        detail = f"certificate verify failed: {reason}"
        raise _Stopped("certificate", Stage.STARTTLS, None, detail) from None
    except (ssl.SSLError, SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
        detail = f"TLS handshake after STARTTLS failed: {exc}"
        raise _Stopped("STARTTLS", Stage.STARTTLS, None, clean_text(detail)) from None
    note("STARTTLS", "upgraded to " + tls_label(smtp.get_transport_info("ssl_object")))
    note("certificate", f"verified for {config.host}" if config.verify_certificate else "not verified")


async def _authenticate(
    smtp: aiosmtplib.SMTP,
    config: SmtpTransportConfig,
    credential: CredentialLike | None,
    credential_problem: str | None,
    verified_tls: bool,
    note: StepNote,
) -> None:
    if credential_problem is not None:
        raise _Stopped("AUTH", Stage.AUTH, None, credential_problem)
    if credential is None:
        note("AUTH", "no credential configured; not attempted")
        return
    if not verified_tls:
        detail = (
            f"refusing to send credential {config.credential}: the connection is not TLS "
            "with a verified certificate"
        )
        raise _Stopped("AUTH", Stage.AUTH, None, detail)
    try:
        mechanism = choose_mechanism(
            smtp.server_auth_methods, kind=credential.kind, configured=config.auth_mechanism, host=config.host
        )
    except NoMechanism as exc:
        raise _Stopped("AUTH", Stage.AUTH, None, str(exc)) from None
    try:
        await mechanism.exchange(smtp, credential, config.command_timeout)
    except AuthRefused as exc:
        raise _Stopped("AUTH", Stage.AUTH, _reply(exc.code, exc.message)) from None
    except AuthNoReply as exc:
        detail = (
            f"timeout after {config.command_timeout:g}s waiting for the reply to AUTH"
            if exc.timed_out else "connection lost after AUTH"
        )
        raise _Stopped("AUTH", Stage.AUTH, None, detail) from None
    note("AUTH", f"logged in as {credential.user}")


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say goodbye if the upstream still listens; close the socket in any case."""
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=_QUIT_TIMEOUT)
    except (SMTPException, OSError, asyncio.TimeoutError):
        pass
    finally:
        smtp.close()


# --- the connection pool ---------------------------------------------------------------


class _Pool:
    """Idle authenticated connections of one transport, and a cap on open ones.

    `take()` hands out an idle connection or reserves a slot for a new one;
    every taken connection or reserved slot goes back through `give_back()`,
    `discard()` or `release_slot()`.
    """

    def __init__(self, config: SmtpTransportConfig) -> None:
        self._config = config
        self._idle: list[_Connection] = []
        self._open = 0
        self._cond = asyncio.Condition()
        self._goodbyes: set[asyncio.Task[None]] = set()
        self.closed = False

    async def take(self) -> _Connection | None:
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

    async def give_back(self, conn: _Connection) -> None:
        worn_out = conn.messages >= self._config.max_messages_per_connection
        if self.closed or worn_out or not conn.smtp.is_connected:
            await self.discard(conn, polite=True)
            return
        async with self._cond:
            loop = asyncio.get_running_loop()
            conn.expiry = loop.call_later(self._config.idle_timeout, self._expire, conn)
            self._idle.append(conn)
            self._cond.notify()

    async def discard(self, conn: _Connection, *, polite: bool) -> None:
        try:
            if polite:
                await _quit(conn.smtp)
        finally:
            conn.smtp.close()
            await self.release_slot()

    def _expire(self, conn: _Connection) -> None:
        # Nobody waits for a slot while a connection is idle, so no notify is needed.
        if conn in self._idle:
            self._idle.remove(conn)
            self._open -= 1
            task = asyncio.get_running_loop().create_task(_quit(conn.smtp))
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
        await asyncio.gather(*(_quit(c.smtp) for c in idle), *self._goodbyes)


def _cancel_expiry(conn: _Connection) -> None:
    if conn.expiry is not None:
        conn.expiry.cancel()
        conn.expiry = None


# --- one transaction ---------------------------------------------------------------------


@dataclass
class _Txn:
    """What one MAIL..DATA transaction produced, and what to do with the connection."""

    results: dict[str, RecipientResult] = field(default_factory=dict)
    keep: bool = False
    stale: bool = False  # the connection was found dead before MAIL was accepted
    connection_failed: bool = False
    detail: str = ""


class SmtpTransport:
    """An upstream SMTP server reached with STARTTLS, implicit TLS or (loopback) plaintext."""

    def __init__(
        self,
        config: SmtpTransportConfig,
        *,
        credentials: CredentialLookup,
        helo_name: str,
    ) -> None:
        self.name = config.name
        self.config = config
        self._credentials = credentials
        self._helo = config.helo_name or helo_name
        self._context: ssl.SSLContext | None = None
        self._pool = _Pool(config)

    def __repr__(self) -> str:
        c = self.config
        return f"<SmtpTransport {c.name} {c.host}:{c.port} tls={c.tls.value}>"

    async def send(self, delivery: Delivery) -> AttemptResult:
        """Attempt `delivery` once; see the module docstring for the guarantees."""
        if not delivery.recipients:
            return AttemptResult(transport=self.name, results=())
        for attempt in (1, 2):
            try:
                conn = await self._checkout()
            except _Stopped as stop:
                return self._stopped_result(delivery, stop)
            reused = conn.messages > 0
            txn = await self._transact(conn, delivery)
            # A reused connection that died while idle is replaced once: nothing
            # was sent on it, so a fresh connection is safe and no failure.
            if txn.stale and reused and attempt == 1:
                continue
            return self._txn_result(delivery, conn, txn)
        raise AssertionError("unreachable: the second attempt always returns")

    async def close(self) -> None:
        """QUIT every idle connection; busy ones are closed when they come back."""
        await self._pool.close()

    # -- connections

    async def _checkout(self) -> _Connection:
        credential, problem = self._lookup_credential()
        if problem is not None:
            raise _Stopped("AUTH", Stage.AUTH, None, problem)
        conn = await self._pool.take()
        if conn is not None:
            return conn
        try:
            return await _open_session(
                self.config,
                context=self._tls_context(),
                helo_name=self._helo,
                credential=credential,
                credential_problem=None,
            )
        except BaseException:
            await self._pool.release_slot()
            raise

    def _lookup_credential(self) -> tuple[CredentialLike | None, str | None]:
        return lookup_credential(self.config, self._credentials)

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = client_tls_context(self.config)
            except (OSError, ssl.SSLError) as exc:
                detail = f"cannot load ca_file {self.config.ca_file}: {exc.strerror or exc}"
                raise _Stopped("certificate", Stage.CONNECT, None, detail) from None
        return self._context

    # -- the transaction

    async def _transact(self, conn: _Connection, delivery: Delivery) -> _Txn:
        try:
            txn = await self._transaction(conn, delivery)
        except (SMTPException, OSError) as exc:
            # Every step handles its own failures; this is the net under them.
            # Not knowing how far the transaction got, assume the body may have
            # left (defer, never a second provider now).
            detail = clean_text(f"unexpected upstream error: {type(exc).__name__}: {exc}")
            txn = self._all(delivery.recipients, Stage.AFTER_DATA, None, detail, connection_failed=True)
        except BaseException:
            await self._pool.discard(conn, polite=False)
            raise
        if txn.keep and conn.smtp.is_connected:
            await self._pool.give_back(conn)
        else:
            await self._pool.discard(conn, polite=False)
        return txn

    async def _transaction(self, conn: _Connection, delivery: Delivery) -> _Txn:
        smtp = conn.smtp
        prepared = await self._fit_to_upstream(smtp, delivery)
        if isinstance(prepared, _Txn):
            return prepared
        delivery = prepared
        payload = wire_body(delivery.body)
        txn = await self._mail(conn, delivery, payload)
        if txn is not None:
            return txn
        txn, accepted = await self._rcpts(conn, delivery)
        if txn.connection_failed:
            return txn
        if not accepted:  # every recipient refused: end the transaction without DATA
            txn.keep = await self._rset(smtp)
            return txn
        return await self._data(conn, txn, accepted, payload)

    async def _fit_to_upstream(self, smtp: aiosmtplib.SMTP, delivery: Delivery) -> Delivery | _Txn:
        """The delivery as this upstream can take it (RFC 6152, RFC 6531), or why it cannot.

        SMTPUTF8 is used when the upstream offers it and the client asked for
        it or the message needs it. A message that needs it (non-ASCII
        addresses, 8-bit header fields) goes nowhere else: each recipient gets
        a local 5xx at MAIL, so the chain moves on and, when no transport of
        it offers SMTPUTF8, the recipient fails at once with that reason.
        An 8-bit body to an upstream without 8BITMIME is converted to 7-bit
        MIME in a worker thread (CPU work on up to 25 MB).
        """
        offers_smtputf8 = smtp.supports_extension("smtputf8")
        why = smtputf8_need(delivery)
        if why is not None and not offers_smtputf8:
            return self._smtputf8_missing(delivery, why)
        body = delivery.body
        if _has_8bit(body) and not smtp.supports_extension("8bitmime"):
            try:
                body = await asyncio.to_thread(mime7bit.to_7bit, body)
            except mime7bit.NeedsSmtpUtf8:
                return self._smtputf8_missing(delivery, "8-bit MIME part header fields")
        smtputf8 = offers_smtputf8 and (delivery.smtputf8 or why is not None)
        if body is delivery.body and smtputf8 == delivery.smtputf8:
            return delivery
        return dataclasses.replace(delivery, body=body, smtputf8=smtputf8)

    def _smtputf8_missing(self, delivery: Delivery, why: str) -> _Txn:
        address_case = why.startswith("non-ASCII")
        reply = SmtpReply(553, "5.6.7 SMTPUTF8 required") if address_case else SmtpReply(554, "5.6.9 SMTPUTF8 required")
        detail = (
            f"SMTPUTF8 required ({why}) but transport {self.name} ({self.config.host}) does not offer it"
        )
        txn = _Txn(keep=True, detail=detail)
        for address in delivery.recipients:
            txn.results[address] = RecipientResult(
                address, AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, reply, detail, local=True
            )
        return txn

    def _mail_options(self, smtp: aiosmtplib.SMTP, delivery: Delivery, payload: bytes) -> list[str]:
        options: list[str] = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(payload)}")
        if delivery.smtputf8:
            options.append("SMTPUTF8")
        if _has_8bit(delivery.body) and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        return options

    async def _mail(self, conn: _Connection, delivery: Delivery, payload: bytes) -> _Txn | None:
        smtp, timeout = conn.smtp, self.config.command_timeout
        options = self._mail_options(smtp, delivery, payload)
        encoding = "utf-8" if delivery.smtputf8 else "ascii"
        try:
            await smtp.mail(delivery.sender, options=options, encoding=encoding, timeout=timeout)
        except SMTPSenderRefused as exc:
            txn = self._all(delivery.recipients, Stage.MAIL, _reply_of(exc), "", keep=False)
            txn.keep = await self._rset(smtp)
            txn.connection_failed = True
            return txn
        except SMTPServerDisconnected as exc:
            txn = self._all(delivery.recipients, Stage.MAIL, None, _no_reply_detail(exc, "MAIL FROM", timeout))
            txn.stale = txn.connection_failed = True
            return txn
        except SMTPTimeoutError as exc:
            txn = self._all(delivery.recipients, Stage.MAIL, None, _no_reply_detail(exc, "MAIL FROM", timeout))
            txn.connection_failed = True
            return txn
        except (UnicodeEncodeError, ValueError):
            # The address cannot be written on an SMTP command line at all
            # (control characters, or non-ASCII without SMTPUTF8). No upstream
            # will ever take it, so this is permanent; nothing was sent.
            detail = "the sender address cannot be sent in an SMTP command"
            return self._all(delivery.recipients, Stage.MAIL, None, detail, keep=True, fixed=AttemptOutcome.FAIL)
        conn.messages += 1
        return None

    async def _rcpts(self, conn: _Connection, delivery: Delivery) -> tuple[_Txn, list[str]]:
        smtp, timeout = conn.smtp, self.config.command_timeout
        encoding = "utf-8" if delivery.smtputf8 else "ascii"
        txn = _Txn(keep=True)
        accepted: list[str] = []
        for address in delivery.recipients:
            try:
                await smtp.rcpt(address, encoding=encoding, timeout=timeout)
            except SMTPRecipientRefused as exc:
                reply = _reply_of(exc)
                if reply.code == 421:  # the upstream is closing: nobody goes through now
                    return self._all(delivery.recipients, Stage.RCPT, reply, "", connection_failed=True), []
                txn.results[address] = self._result(address, Stage.RCPT, reply, "")
                continue
            except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
                detail = _no_reply_detail(exc, "RCPT TO", timeout)
                return self._all(delivery.recipients, Stage.RCPT, None, detail, connection_failed=True), []
            except (UnicodeEncodeError, ValueError):
                detail = "the recipient address cannot be sent in an SMTP command"
                txn.results[address] = RecipientResult(address, AttemptOutcome.FAIL, Stage.RCPT, None, detail)
                continue
            accepted.append(address)
        return txn, accepted

    async def _data(self, conn: _Connection, txn: _Txn, accepted: list[str], payload: bytes) -> _Txn:
        smtp, timeout = conn.smtp, self.config.command_timeout
        try:
            start = await smtp.execute_command(b"DATA", timeout=timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
            return self._finish(txn, accepted, Stage.DATA, None, _no_reply_detail(exc, "DATA", timeout),
                                keep=False, connection_failed=True)
        if start.code != 354:
            reply = _reply(start.code, start.message)
            keep = reply.code != 421 and await self._rset(smtp)
            return self._finish(txn, accepted, Stage.DATA, reply, "", keep=keep,
                                connection_failed=reply.code == 421)
        final = await self._send_body(smtp, payload, timeout)
        if isinstance(final, str):
            return self._finish(txn, accepted, Stage.AFTER_DATA, None, final, keep=False)
        return self._finish(txn, accepted, Stage.AFTER_DATA, final, "",
                            keep=final.code != 421 and smtp.is_connected)

    async def _send_body(self, smtp: aiosmtplib.SMTP, payload: bytes, timeout: float) -> SmtpReply | str:
        """Write the dot-stuffed body and its terminator; the final reply, or why there is none.

        Done here rather than with aiosmtplib's data() so that a failure before
        the 354 (nothing sent) and one after the body (maybe delivered) stay apart.
        """
        protocol = smtp.protocol
        try:
            if protocol is None:
                raise SMTPServerDisconnected("connection lost")
            protocol.write(payload + b".\r\n")
            response = await protocol.read_response(timeout=timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
            smtp.close()
            return _no_reply_detail(exc, "end of data", timeout)
        except SMTPResponseException as exc:  # a malformed or oversized reply
            smtp.close()
            return _reply_of(exc)
        return _reply(response.code, response.message)

    async def _rset(self, smtp: aiosmtplib.SMTP) -> bool:
        """Reset the transaction so the connection can be reused; False: discard it."""
        if not smtp.is_connected:
            return False
        try:
            await smtp.rset(timeout=self.config.command_timeout)
        except (SMTPException, OSError):
            return False
        return True

    # -- building results

    def _result(self, address: str, stage: Stage, reply: SmtpReply | None, detail: str) -> RecipientResult:
        outcome = failover.classify(stage, reply, provider=self.config.provider)
        return RecipientResult(address, outcome, stage, reply, detail)

    def _all(
        self,
        addresses: tuple[str, ...],
        stage: Stage,
        reply: SmtpReply | None,
        detail: str,
        *,
        keep: bool = False,
        connection_failed: bool = False,
        fixed: AttemptOutcome | None = None,
    ) -> _Txn:
        txn = _Txn(keep=keep, connection_failed=connection_failed, detail=detail or str(reply or ""))
        for address in addresses:
            result = self._result(address, stage, reply, detail)
            if fixed is not None:
                result = RecipientResult(address, fixed, stage, reply, detail)
            txn.results[address] = result
        return txn

    def _finish(
        self,
        txn: _Txn,
        accepted: list[str],
        stage: Stage,
        reply: SmtpReply | None,
        detail: str,
        *,
        keep: bool,
        connection_failed: bool = False,
    ) -> _Txn:
        for address in accepted:
            txn.results[address] = self._result(address, stage, reply, detail)
        txn.keep = keep
        txn.connection_failed = connection_failed
        if reply is None or not 200 <= reply.code < 300:
            txn.detail = detail or str(reply)
        return txn

    def _txn_result(self, delivery: Delivery, conn: _Connection, txn: _Txn) -> AttemptResult:
        return AttemptResult(
            transport=self.name,
            results=tuple(txn.results[a] for a in delivery.recipients),
            host=self.config.host,
            ip=conn.ip,
            port=self.config.port,
            tls=conn.tls,
            connection_failed=txn.connection_failed,
            detail=txn.detail,
        )

    def _stopped_result(self, delivery: Delivery, stop: _Stopped) -> AttemptResult:
        results = tuple(self._result(a, stop.stage, stop.reply, stop.detail) for a in delivery.recipients)
        return AttemptResult(
            transport=self.name,
            results=results,
            host=self.config.host,
            port=self.config.port,
            connection_failed=True,
            detail=stop.detail,
        )


def lookup_credential(
    config: SmtpTransportConfig, credentials: CredentialLookup
) -> tuple[CredentialLike | None, str | None]:
    """The transport's credential, or why it cannot be used (never the secret itself)."""
    name = config.credential
    if name is None:
        return None, None
    problem = auth_precondition(config)
    if problem is not None:
        return None, problem
    try:
        credential = credentials(name)
    except Exception as exc:  # a store that cannot be read is this transport's failure
        return None, f"credential {name} could not be read from the store ({type(exc).__name__})"
    if credential is None:
        return None, f"credential {name} not found in the store"
    return credential, None


# --- verification without sending mail -------------------------------------------------


async def verify_transport(
    config: SmtpTransportConfig, *, credentials: CredentialLookup, helo_name: str,
    on_step: Callable[[VerifyStep], None] | None = None,
) -> list[VerifyStep]:
    """Walk connect, greeting, EHLO, STARTTLS, certificate and AUTH; stop at the first failure.

    `on_step` hears each step as soon as it is known (passed or failed), so a
    caller can show progress while a slow upstream keeps the next step waiting.
    """
    steps: list[VerifyStep] = []

    def add(step: VerifyStep) -> None:
        steps.append(step)
        if on_step is not None:
            on_step(step)

    def note(step: str, detail: str) -> None:
        add(VerifyStep(step, True, detail))

    credential, problem = lookup_credential(config, credentials)
    try:
        context = client_tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        detail = f"cannot load ca_file {config.ca_file}: {exc.strerror or exc}"
        add(VerifyStep("certificate", False, detail, failover.hint_for(config.provider, Stage.CONNECT, None, detail)))
        return steps
    try:
        conn = await _open_session(
            config,
            context=context,
            helo_name=config.helo_name or helo_name,
            credential=credential,
            credential_problem=problem,
            note=note,
        )
    except _Stopped as stop:
        hint = failover.hint_for(config.provider, stop.stage, stop.reply, stop.detail)
        add(VerifyStep(stop.step, False, stop.detail, hint))
        return steps
    await _quit(conn.smtp)
    return steps


# --- the capture transport ----------------------------------------------------------------


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class CaptureTransport:
    """Writes every message into a Maildir instead of sending it (development)."""

    def __init__(self, config: CaptureTransportConfig) -> None:
        self.name = config.name
        self.config = config
        self._counter = 0

    def __repr__(self) -> str:
        return f"<CaptureTransport {self.name} {self.config.maildir}>"

    async def send(self, delivery: Delivery) -> AttemptResult:
        """Deliver all recipients at once by writing one Maildir file; disk errors defer."""
        self._counter += 1
        name = _maildir_name(delivery.message_id, self._counter)
        try:
            await asyncio.to_thread(_write_maildir, self.config.maildir, name, _captured(delivery))
        except OSError as exc:
            detail = f"cannot write to maildir {self.config.maildir}: {exc.strerror or exc}"
            outcome = failover.classify(Stage.WRITE, None)
            results = tuple(RecipientResult(a, outcome, Stage.WRITE, None, detail) for a in delivery.recipients)
            return AttemptResult(transport=self.name, results=results, detail=detail)
        reply = SmtpReply(250, f"2.0.0 captured as {name}")
        outcome = failover.classify(Stage.WRITE, reply)
        results = tuple(RecipientResult(a, outcome, Stage.WRITE, reply) for a in delivery.recipients)
        return AttemptResult(transport=self.name, results=results)

    async def close(self) -> None:
        """Nothing stays open between deliveries."""


def _header_value(text: str) -> str:
    return _CONTROL.sub("?", text)


def _captured(delivery: Delivery) -> bytes:
    lines = [f"Return-Path: <{_header_value(delivery.sender)}>\r\n"]
    lines += [f"X-Relayd-Envelope-To: <{_header_value(r)}>\r\n" for r in delivery.recipients]
    return "".join(lines).encode("utf-8") + delivery.body


def _maildir_name(message_id: str, counter: int) -> str:
    """A unique Maildir file name: time, a sequence and random part, the message id."""
    now = time.time()
    safe_id = _UNSAFE_NAME.sub("_", message_id)[:64]
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}Q{counter}R{uuid.uuid4().hex[:12]}.{safe_id}"


def _write_maildir(maildir: Path, name: str, content: bytes) -> None:
    """Maildir delivery: write to tmp/, fsync, rename into new/, fsync new/."""
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    safeio.write_file(
        maildir / "new" / name, content, mode=0o600, directory_mode=None, temp_path=maildir / "tmp" / name
    )


# --- wiring ---------------------------------------------------------------------------------


def build_transports(
    configs: Mapping[str, TransportConfig],
    *,
    credentials: CredentialLookup,
    helo_name: str,
) -> dict[str, Transport]:
    """One transport object per configured transport, keyed by name."""
    transports: dict[str, Transport] = {}
    for name, config in configs.items():
        if isinstance(config, SmtpTransportConfig):
            transports[name] = SmtpTransport(config, credentials=credentials, helo_name=helo_name)
        else:
            transports[name] = CaptureTransport(config)
    return transports
