"""OAuth 2.0 token requests: one form per grant, one bounded HTTPS POST, one parsed answer.

Takes: a token endpoint URL, the form of a grant (refresh token, client
credentials, signed JWT assertion, authorization code, device code) and a
timeout.
Emits: a `TokenGrant` (access token as a `Secret`, its lifetime, a rotated
refresh token if the provider sent one, the account named by an ID token),
or raises `TokenRequestFailed` saying whether only an operator can fix it
(`needs_reauthorisation`: consent revoked, password changed, secret expired)
or it is worth trying again (endpoint down, 5xx, 429, timeout).
Untrusted input: everything the endpoint answers: bounded to
`MAX_TOKEN_RESPONSE` bytes and `timeout` seconds before it is parsed, and
never echoed except the OAuth error code and a short, flattened description.
How it fails: only with `TokenRequestFailed`, whose text never holds a
secret (forms travel in the body, never in the URL).

httpx is the HTTP client (async, HTTP/1.1 with TLS verification and proxies
from the environment); the JWT assertion for a Google service account is
signed here with `cryptography` (RS256), which relayd already depends on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass
from typing import Mapping

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relayd.config.secret import Secret

MAX_TOKEN_RESPONSE = 64 * 1024  # a token answer is a few KiB; anything larger is not one
ASSERTION_LIFETIME = 3600  # seconds; Google accepts at most one hour
DEFAULT_EXPIRES_IN = 3600.0  # when an answer names no lifetime
MIN_EXPIRES_IN, MAX_EXPIRES_IN = 60.0, 86400.0  # a lifetime outside this is clamped
# OAuth error codes (RFC 6749 section 5.2) that only a person can fix.
REAUTHORISE = frozenset({"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                         "access_denied", "unsupported_grant_type", "invalid_request"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class TokenRequestFailed(Exception):
    """No token: `detail` says why (no secret in it); `error` the OAuth error code, if any."""

    def __init__(self, detail: str, *, needs_reauthorisation: bool, error: str = "",
                 status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.needs_reauthorisation = needs_reauthorisation
        self.error = error
        self.status = status


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A token endpoint's successful answer."""

    access_token: Secret
    expires_in: float
    refresh_token: Secret | None = None  # only when the provider rotated it (or first issued it)
    account: str | None = None  # e-mail or user principal name from the ID token, if any
    scope: str = ""


# --- forms -------------------------------------------------------------------------------


def refresh_form(client_id: str, client_secret: Secret | None, refresh_token: Secret, scope: str) -> dict[str, str]:
    """RFC 6749 section 6 (Google and Microsoft delegated access)."""
    form = {"grant_type": "refresh_token", "client_id": client_id,
            "refresh_token": refresh_token.reveal(), "scope": scope}
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
    return form


def client_credentials_form(client_id: str, client_secret: Secret, scope: str) -> dict[str, str]:
    """RFC 6749 section 4.4 (Microsoft 365 app-only: scope https://outlook.office365.com/.default)."""
    return {"grant_type": "client_credentials", "client_id": client_id,
            "client_secret": client_secret.reveal(), "scope": scope}


def service_account_form(*, issuer: str, subject: str, private_key: Secret, token_url: str,
                         scope: str, now: float) -> dict[str, str]:
    """RFC 7523 JWT bearer grant: Google service account with domain-wide delegation."""
    claims = {"iss": issuer, "sub": subject, "scope": scope, "aud": token_url,
              "iat": int(now), "exp": int(now) + ASSERTION_LIFETIME}
    return {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": signed_jwt(claims, private_key)}


def authorization_code_form(*, client_id: str, client_secret: Secret | None, code: str,
                            redirect_uri: str, verifier: str) -> dict[str, str]:
    """RFC 6749 section 4.1.3 with the PKCE verifier of RFC 7636."""
    form = {"grant_type": "authorization_code", "client_id": client_id, "code": code,
            "redirect_uri": redirect_uri, "code_verifier": verifier}
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
    return form


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed_jwt(claims: Mapping[str, object], private_key: Secret) -> str:
    """A compact JWS (RS256) of `claims`; raises TokenRequestFailed for an unusable key."""
    try:
        key = serialization.load_pem_private_key(private_key.reveal().encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TokenRequestFailed("the stored private key is not a PEM RSA key",
                                 needs_reauthorisation=True) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TokenRequestFailed("the stored private key is not an RSA key", needs_reauthorisation=True)
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{_b64url(signature)}"


# --- the request ---------------------------------------------------------------------------


async def request_token(url: str, form: Mapping[str, str], *, timeout: float,
                        transport: httpx.AsyncBaseTransport | None = None) -> TokenGrant:
    """POST `form` to `url` and parse the answer; see the module docstring."""
    status, body = await post_form(url, form, timeout=timeout, transport=transport)
    return parse_token_answer(status, body)


async def post_form(url: str, form: Mapping[str, str], *, timeout: float,
                    transport: httpx.AsyncBaseTransport | None = None) -> tuple[int, bytes]:
    """One bounded POST; the status and at most MAX_TOKEN_RESPONSE bytes of body."""
    try:
        return await asyncio.wait_for(_post(url, form, timeout, transport), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise TokenRequestFailed(f"token endpoint {_where(url)} did not answer within {timeout:g}s",
                                 needs_reauthorisation=False) from None
    except httpx.HTTPError as exc:
        raise TokenRequestFailed(f"token endpoint {_where(url)} unreachable: {type(exc).__name__}",
                                 needs_reauthorisation=False) from None


async def _post(url: str, form: Mapping[str, str], timeout: float,
                transport: httpx.AsyncBaseTransport | None) -> tuple[int, bytes]:
    headers = {"Accept": "application/json", "User-Agent": "relayd"}
    async with httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False) as client:
        async with client.stream("POST", url, data=dict(form), headers=headers) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_TOKEN_RESPONSE:
                    raise TokenRequestFailed(
                        f"token endpoint {_where(url)} answered more than {MAX_TOKEN_RESPONSE} bytes",
                        needs_reauthorisation=False, status=response.status_code)
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)


def _where(url: str) -> str:
    return httpx.URL(url).host or url[:80]


def _flat(text: object, limit: int = 160) -> str:
    flat = _CONTROL.sub(" ", str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_token_answer(status: int, body: bytes) -> TokenGrant:
    """The grant in a 200 answer, or TokenRequestFailed classified by status and OAuth error."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict):
        temporary = status >= 500 or status in (408, 429) or status == 200
        raise TokenRequestFailed(f"token endpoint answered HTTP {status} without a JSON object",
                                 needs_reauthorisation=not temporary, status=status)
    if status != 200 or "error" in doc:
        error = _flat(doc.get("error", ""), 60)
        described = _flat(doc.get("error_description", ""))
        text = f"token endpoint refused: HTTP {status} {error}" + (f" ({described})" if described else "")
        reauthorise = error in REAUTHORISE or (status in (400, 401, 403) and not error)
        raise TokenRequestFailed(text, needs_reauthorisation=reauthorise, error=error, status=status)
    token = doc.get("access_token")
    if not isinstance(token, str) or not token or not token.isprintable() or len(token) > 16384:
        raise TokenRequestFailed("token endpoint answered without a usable access_token",
                                 needs_reauthorisation=False, status=status)
    refresh = doc.get("refresh_token")
    return TokenGrant(
        access_token=Secret(token),
        expires_in=_lifetime(doc.get("expires_in")),
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        account=id_token_account(doc.get("id_token")),
        scope=_flat(doc.get("scope", ""), 400),
    )


def _lifetime(value: object) -> float:
    if isinstance(value, str) and value.isdigit():  # some endpoints send a string
        value = int(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return DEFAULT_EXPIRES_IN
    return min(max(float(value), MIN_EXPIRES_IN), MAX_EXPIRES_IN)


def id_token_account(id_token: object) -> str | None:
    """The e-mail (or user principal name) an OpenID Connect ID token names.

    Not verified: it came straight from the token endpoint over TLS, which
    OpenID Connect Core (3.1.3.7) accepts for this use, and it only names the
    account for the operator; relayd never trusts it for anything else.
    """
    if not isinstance(id_token, str) or id_token.count(".") != 2 or len(id_token) > 16384:
        return None
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    for key in ("email", "preferred_username", "upn"):
        value = claims.get(key)
        if isinstance(value, str) and value and value.isprintable() and len(value) <= 320:
            return value
    return None

