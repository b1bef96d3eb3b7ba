"""Opening an upstream SMTP session: connect, greeting, EHLO, STARTTLS, certificate, AUTH.

Takes: a transport's configuration, its TLS context, the HELO name and the
credential to log in with (or why there is none).
Emits: an `UpstreamConnection` ready for MAIL, or raises `SessionStopped`
naming the step that failed, its stage for `failover.classify`, and the
upstream's reply; `verify_transport` reports the same steps to an operator
without sending mail.
Untrusted input: everything the upstream sends before MAIL.
How it fails: only with `SessionStopped` (or a cancellation); the socket is
closed first. Secrets are revealed only as they are handed to aiosmtplib.

Security rules enforced here, whatever the configuration says: STARTTLS, when
required, is never skipped, and AUTH is only sent over TLS whose certificate
and host name were verified.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relayd.config.model import SmtpTransportConfig, TlsMode
from relayd.delivery import failover
from relayd.delivery.smtpwire import (
    auth_precondition,
    clean_text,
    no_reply_detail,
    reply_of,
    smtp_reply,
    tls_label,
)
from relayd.delivery.tokensource import TokenUnavailable
from relayd.delivery.upstreamauth import (
    AuthNoReply,
    AuthRefused,
    BearerLogin,
    NoMechanism,
    PasswordCredential,
    UpstreamLogin,
    choose_mechanism,
)
from relayd.values import SmtpReply, Stage

_QUIT_TIMEOUT = 5.0  # seconds a polite QUIT may take before the socket is just closed

class TokenSourceLike(Protocol):
    """Hands out a current access token for XOAUTH2 (`relayd.delivery.tokensource.TokenSource`)."""

    @property
    def kind(self) -> Literal["oauth"]: ...

    async def bearer(self) -> BearerLogin: ...

    def refused(self) -> None: ...


# What a transport's credential lookup hands back: a password credential, or
# a token source whose current token becomes a bearer login just before AUTH.
CredentialLike = PasswordCredential | TokenSourceLike

CredentialLookup = Callable[[str], CredentialLike | None]


@dataclass(frozen=True, slots=True)
class VerifyStep:
    """One step of `verify_transport`: connect, greeting, EHLO, STARTTLS, certificate, AUTH."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None

class SessionStopped(Exception):
    """A session step failed; carries what `classify` and the verify report need."""

    def __init__(self, step: str, stage: Stage, reply: SmtpReply | None, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.step = step
        self.stage = stage
        self.reply = reply
        self.detail = detail or (str(reply) if reply is not None else stage.value)


# --- opening a session ---------------------------------------------------------------


@dataclass(eq=False)
class UpstreamConnection:
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


async def open_session(
    config: SmtpTransportConfig,
    *,
    context: ssl.SSLContext,
    helo_name: str,
    credential: UpstreamLogin | None,
    credential_problem: str | None,
    note: StepNote = _no_note,
) -> UpstreamConnection:
    """Connect, read the greeting, EHLO, upgrade to TLS and log in; raise `SessionStopped`."""
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
        raise SessionStopped("connect", Stage.CONNECT, None, clean_text(str(exc))) from None
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
        return UpstreamConnection(smtp=smtp, ip=ip, tls=tls_label(ssl_object))
    except (SMTPException, OSError) as exc:  # the net under the per-step handling
        smtp.close()
        detail = clean_text(f"{type(exc).__name__}: {exc}")
        raise SessionStopped(stage.value if stage is not Stage.CONNECT else "connect", stage, None, detail) from None
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
        raise SessionStopped("greeting", Stage.GREETING, reply_of(exc)) from None
    except SMTPConnectTimeoutError as exc:
        if isinstance(exc.__cause__, SMTPTimeoutError):
            note("connect", f"connected to {where}")
            detail = f"timeout after {config.connect_timeout:g}s waiting for the greeting"
            raise SessionStopped("greeting", Stage.GREETING, None, detail) from None
        detail = f"connect to {where}: timed out after {config.connect_timeout:g}s"
        raise SessionStopped("connect", Stage.CONNECT, None, detail) from None
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


def _connect_failure(cause: BaseException | None, where: str, note: StepNote) -> SessionStopped:
    if isinstance(cause, SMTPServerDisconnected):
        note("connect", f"connected to {where}")
        return SessionStopped("greeting", Stage.GREETING, None, "connection closed before the greeting")
    if isinstance(cause, ssl.SSLCertVerificationError):
        note("connect", f"connected to {where}")
        reason = cause.verify_message or str(cause)
        return SessionStopped("certificate", Stage.CONNECT, None, f"certificate verify failed: {reason}")
    if isinstance(cause, ssl.SSLError):
        return SessionStopped("connect", Stage.CONNECT, None, f"TLS handshake with {where} failed: {cause}")
    if isinstance(cause, ConnectionRefusedError):
        return SessionStopped("connect", Stage.CONNECT, None, f"connect to {where}: connection refused")
    if isinstance(cause, socket.gaierror):
        return SessionStopped("connect", Stage.CONNECT, None, f"host name lookup for {where} failed")
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return SessionStopped("connect", Stage.CONNECT, None, f"connect to {where}: {reason}")


async def _ehlo(smtp: aiosmtplib.SMTP, config: SmtpTransportConfig) -> None:
    try:
        await smtp.ehlo(timeout=config.command_timeout)
    except SMTPHeloError as exc:
        raise SessionStopped("EHLO", Stage.EHLO, reply_of(exc)) from None
    except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
        detail = no_reply_detail(exc, "EHLO", config.command_timeout)
        raise SessionStopped("EHLO", Stage.EHLO, None, detail) from None


async def _starttls(
    smtp: aiosmtplib.SMTP, config: SmtpTransportConfig, context: ssl.SSLContext, note: StepNote
) -> None:
    if not smtp.supports_extension("starttls"):
        detail = f"{config.host} does not offer STARTTLS; refusing to go on without TLS"
        raise SessionStopped("STARTTLS", Stage.STARTTLS, None, detail)
    try:
        await smtp.starttls(
            server_hostname=config.host, tls_context=context, timeout=config.connect_timeout
        )
    except SMTPResponseException as exc:
        raise SessionStopped("STARTTLS", Stage.STARTTLS, reply_of(exc)) from None
    except ssl.SSLCertVerificationError as exc:
        note("STARTTLS", "offered and accepted")
        reason = exc.verify_message or str(exc)
        detail = f"certificate verify failed: {reason}"
        raise SessionStopped("certificate", Stage.STARTTLS, None, detail) from None
    except (ssl.SSLError, SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
        detail = f"TLS handshake after STARTTLS failed: {exc}"
        raise SessionStopped("STARTTLS", Stage.STARTTLS, None, clean_text(detail)) from None
    note("STARTTLS", "upgraded to " + tls_label(smtp.get_transport_info("ssl_object")))
    note("certificate", f"verified for {config.host}" if config.verify_certificate else "not verified")


async def _authenticate(
    smtp: aiosmtplib.SMTP,
    config: SmtpTransportConfig,
    credential: UpstreamLogin | None,
    credential_problem: str | None,
    verified_tls: bool,
    note: StepNote,
) -> None:
    if credential_problem is not None:
        raise SessionStopped("AUTH", Stage.AUTH, None, credential_problem)
    if credential is None:
        note("AUTH", "no credential configured; not attempted")
        return
    if not verified_tls:
        detail = (
            f"refusing to send credential {config.credential}: the connection is not TLS "
            "with a verified certificate"
        )
        raise SessionStopped("AUTH", Stage.AUTH, None, detail)
    try:
        mechanism = choose_mechanism(
            smtp.server_auth_methods, kind=credential.kind, configured=config.auth_mechanism, host=config.host
        )
    except NoMechanism as exc:
        raise SessionStopped("AUTH", Stage.AUTH, None, str(exc)) from None
    try:
        await mechanism.exchange(smtp, credential, config.command_timeout)
    except NoMechanism as exc:
        raise SessionStopped("AUTH", Stage.AUTH, None, str(exc)) from None
    except AuthRefused as exc:
        raise SessionStopped("AUTH", Stage.AUTH, smtp_reply(exc.code, exc.message)) from None
    except AuthNoReply as exc:
        detail = (
            f"timeout after {config.command_timeout:g}s waiting for the reply to AUTH"
            if exc.timed_out else "connection lost after AUTH"
        )
        raise SessionStopped("AUTH", Stage.AUTH, None, detail) from None
    note("AUTH", f"logged in as {credential.user}")


async def quit_session(smtp: aiosmtplib.SMTP) -> None:
    """Say goodbye if the upstream still listens; close the socket in any case."""
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=_QUIT_TIMEOUT)
    except (SMTPException, OSError, asyncio.TimeoutError):
        pass
    finally:
        smtp.close()



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


async def resolve_login(credential: CredentialLike | None) -> tuple[UpstreamLogin | None, str | None]:
    """The login to present: a password credential as it is, a token source's current token.

    A token that cannot be had is the second value, a sentence with the
    command that fixes it; nothing is connected for it.
    """
    if credential is None or credential.kind == "password":
        return credential, None
    try:
        return await credential.bearer(), None
    except TokenUnavailable as exc:
        return None, exc.detail


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

    source, problem = lookup_credential(config, credentials)
    credential, token_problem = await resolve_login(source)
    problem = problem or token_problem
    try:
        context = client_tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        detail = f"cannot load ca_file {config.ca_file}: {exc.strerror or exc}"
        add(VerifyStep("certificate", False, detail, failover.hint_for(config.provider, Stage.CONNECT, None, detail)))
        return steps
    try:
        conn = await open_session(
            config,
            context=context,
            helo_name=config.helo_name or helo_name,
            credential=credential,
            credential_problem=problem,
            note=note,
        )
    except SessionStopped as stop:
        hint = failover.hint_for(config.provider, stop.stage, stop.reply, stop.detail)
        add(VerifyStep(stop.step, False, stop.detail, hint))
        return steps
    await quit_session(conn.smtp)
    return steps


