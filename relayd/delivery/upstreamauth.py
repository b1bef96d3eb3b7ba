"""Upstream AUTH: which SASL mechanism to use, and one exchange function per mechanism.

Takes: an aiosmtplib session that is already on verified TLS (the transport
enforces that before anything here runs), the mechanisms the upstream
advertised in EHLO, the transport's configured `auth_mechanism` (if any) and
the credential from the store.
Emits: an `AuthAccepted` carrying the upstream's 235 reply, or raises
`AuthRefused` (the upstream answered with a code) or `AuthNoReply` (it hung
up or timed out), so the caller classifies by SMTP code as for every other
stage.
Untrusted input: the advertised mechanism list and the reply texts.
How it fails: never with the secret in a message, a repr or a traceback: a
credential shows its user only, the secret is a redacted type revealed only
as it is handed to aiosmtplib.

The choice (`choose_mechanism`) is pure: with an `auth_mechanism` configured,
exactly that one (it must be advertised and fit the credential's kind);
otherwise the first entry of `PREFERENCE` that the upstream advertises and
that can use the credential's kind. PLAIN comes before LOGIN: one round trip
instead of three, and every provider that offers LOGIN offers PLAIN too.

Credential kinds form a tagged union (`UpstreamLogin`, told apart by `kind`):
`PasswordCredential` (user + password: app passwords, API keys, SES SMTP
credentials) and `BearerLogin` (user + a current OAuth 2.0 access token, which
the transport got from the credential's token source just before it
connected). XOAUTH2 is the only mechanism for a bearer login and never gets a
password: sending an app password as a bearer token would leak it to a
provider that logs failed tokens. On failure the upstream answers XOAUTH2
with a 334 challenge holding a JSON error; relayd answers with an empty line
(RFC 7628 section 3.2.3) and takes the final reply: 535 means the token was
refused (the caller drops it and fetches a new one), 454 a temporary failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Literal, Mapping, Protocol

import aiosmtplib
from aiosmtplib import SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError


class SecretLike(Protocol):
    """What `relayd.config.credentials.Secret` offers: the value only on request, a redacted repr."""

    def reveal(self) -> str: ...


class PasswordCredential(Protocol):
    """A user name and a password (`relayd.config.credentials.UpstreamCredential` is one)."""

    @property
    def kind(self) -> Literal["password"]: ...

    @property
    def user(self) -> str: ...

    @property
    def password(self) -> SecretLike: ...


class BearerLogin(Protocol):
    """A mailbox and a current OAuth 2.0 access token for it (`relayd.delivery.tokensource`)."""

    @property
    def kind(self) -> Literal["bearer"]: ...

    @property
    def user(self) -> str: ...

    @property
    def token(self) -> SecretLike: ...


# Every kind of credential a mechanism can use, told apart by `kind`.
UpstreamLogin = PasswordCredential | BearerLogin


@dataclass(frozen=True, slots=True)
class AuthAccepted:
    """The upstream took the login: its reply (235) and the mechanism used."""

    mechanism: str
    code: int
    message: str


class AuthFailure(Exception):
    """A login that did not succeed; never carries the secret."""

    def __init__(self, mechanism: str, detail: str) -> None:
        super().__init__(detail)
        self.mechanism = mechanism
        self.detail = detail


class AuthRefused(AuthFailure):
    """The upstream answered the exchange with a failure code (535, 454, 530, ...)."""

    def __init__(self, mechanism: str, code: int, message: str) -> None:
        super().__init__(mechanism, f"{code} {message}")
        self.code = code
        self.message = message


class AuthNoReply(AuthFailure):
    """The upstream closed the connection or did not answer in time during the exchange."""

    def __init__(self, mechanism: str, detail: str, *, timed_out: bool) -> None:
        super().__init__(mechanism, detail)
        self.timed_out = timed_out


Exchange = Callable[[aiosmtplib.SMTP, UpstreamLogin, float], Awaitable[AuthAccepted]]


@dataclass(frozen=True, slots=True)
class Mechanism:
    """One SASL mechanism: its EHLO name, the credential kinds it uses, and its exchange."""

    name: str
    kinds: frozenset[str]
    exchange: Exchange


async def _plain(smtp: aiosmtplib.SMTP, login: UpstreamLogin, timeout: float) -> AuthAccepted:
    """RFC 4616: one AUTH PLAIN line with the initial response."""
    if login.kind != "password":
        raise NoMechanism("AUTH PLAIN needs a password credential")
    try:
        reply = await smtp.auth_plain(login.user, login.password.reveal(), timeout=timeout)
    except (SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError) as exc:
        raise _failure("PLAIN", exc) from None
    return AuthAccepted("PLAIN", reply.code, reply.message)


async def _login(smtp: aiosmtplib.SMTP, login: UpstreamLogin, timeout: float) -> AuthAccepted:
    """The LOGIN mechanism: user and password each answer a 334 challenge."""
    if login.kind != "password":
        raise NoMechanism("AUTH LOGIN needs a password credential")
    try:
        reply = await smtp.auth_login(login.user, login.password.reveal(), timeout=timeout)
    except (SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError) as exc:
        raise _failure("LOGIN", exc) from None
    return AuthAccepted("LOGIN", reply.code, reply.message)


async def _xoauth2(smtp: aiosmtplib.SMTP, login: UpstreamLogin, timeout: float) -> AuthAccepted:
    """XOAUTH2: base64("user=U\x01auth=Bearer T\x01\x01"); a 334 error challenge gets an empty line.

    aiosmtplib (5.0 and later) sends exactly that exchange; the final reply
    after the empty line (535 refused, 454 temporary) comes back as a refusal.
    """
    if login.kind != "bearer":
        raise NoMechanism("AUTH XOAUTH2 needs an OAuth credential")
    if "\x01" in login.user:
        raise NoMechanism("the XOAUTH2 user name must not contain \\x01")
    try:
        reply = await smtp.auth_xoauth2(login.user, login.token.reveal(), timeout=timeout)
    except (SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError) as exc:
        raise _failure("XOAUTH2", exc) from None
    return AuthAccepted("XOAUTH2", reply.code, reply.message)


def _failure(mechanism: str, exc: Exception) -> AuthFailure:
    """The aiosmtplib error as a typed failure (SMTPAuthenticationError and odd codes alike)."""
    if isinstance(exc, SMTPResponseException):
        return AuthRefused(mechanism, exc.code, exc.message)
    return AuthNoReply(mechanism, str(exc), timed_out=isinstance(exc, SMTPTimeoutError))


_PASSWORD = frozenset({"password"})
_BEARER = frozenset({"bearer"})

MECHANISMS: Mapping[str, Mechanism] = {
    "PLAIN": Mechanism("PLAIN", _PASSWORD, _plain),
    "LOGIN": Mechanism("LOGIN", _PASSWORD, _login),
    "XOAUTH2": Mechanism("XOAUTH2", _BEARER, _xoauth2),
}

# The order tried when the transport names no mechanism: the first one the
# upstream advertises and the credential fits (a credential's kind fits
# either the password mechanisms or XOAUTH2, so the order only matters
# among the password ones).
PREFERENCE: tuple[str, ...] = ("XOAUTH2", "PLAIN", "LOGIN")


class NoMechanism(Exception):
    """No mechanism both sides can use; the message says what each side offers."""


def choose_mechanism(
    offered: Iterable[str], *, kind: str, configured: str | None, host: str
) -> Mechanism:
    """The mechanism to log in with (pure); raises NoMechanism with a sentence for the operator."""
    advertised = [m.upper() for m in offered]
    shown = " ".join(advertised) or "nothing"
    if configured is not None:
        mechanism = MECHANISMS.get(configured.upper())
        if mechanism is None:  # the config loader accepts only known names
            raise NoMechanism(f"auth_mechanism {configured} is not supported")
        if kind not in mechanism.kinds:
            raise NoMechanism(f"auth_mechanism {mechanism.name} cannot use a {kind} credential")
        if mechanism.name not in advertised:
            raise NoMechanism(f"{host} does not offer AUTH {mechanism.name} (offers {shown})")
        return mechanism
    usable = [MECHANISMS[name] for name in PREFERENCE if kind in MECHANISMS[name].kinds]
    for mechanism in usable:
        if mechanism.name in advertised:
            return mechanism
    names = " or ".join(m.name for m in usable)
    raise NoMechanism(f"{host} offers no AUTH {names} (offers {shown})")
