"""Getting the first OAuth tokens on a headless server: PKCE authorization code and device code.

Takes: a transport's `auth:` settings, the text an operator pastes (the
redirect URL from the browser's address bar, or just the code), and the
provider's device-code answers.
Emits: the authorization URL to open, then a `TokenGrant` with the refresh
token and the account the provider named.
Untrusted input: the pasted text (bounded, parsed as a URL; its `state` must
match) and the provider's answers (bounded in tokengrants).
Fails: `FlowError` with one sentence for the operator, never a secret.

The code flow is OAuth 2.0 for native apps (RFC 8252) with PKCE S256
(RFC 7636): relayd opens no port; the browser's redirect to
http://localhost fails to load, and the operator copies the address it
shows. The device flow (RFC 8628) suits Microsoft 365, whose device login
page takes a short code typed on any machine.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from typing import Awaitable, Callable

from relayd.config.model import OAuthConfig
from relayd.config.secret import Secret
from relayd.delivery.tokengrants import (
    TokenGrant,
    TokenRequestFailed,
    authorization_code_form,
    parse_token_answer,
    post_form,
    request_token,
)

DEFAULT_REDIRECT = "http://localhost"
IDENTITY_SCOPES = "openid email"  # so the answer names the account that consented
MAX_PASTE = 8192  # a redirect URL with a code is well under 2K
MAX_DEVICE_WAIT = 900.0  # seconds; providers expire device codes after 15 minutes
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class FlowError(Exception):
    """The authorisation did not complete; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class CodeRequest:
    """One authorization request: the URL for the browser and what checks the answer."""

    url: str
    state: str
    verifier: str
    redirect_uri: str


def code_request(config: OAuthConfig, redirect_uri: str = DEFAULT_REDIRECT) -> CodeRequest:
    """The URL to open, with a fresh PKCE verifier and state."""
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    query = {
        "client_id": config.client_id, "response_type": "code", "redirect_uri": redirect_uri,
        "scope": f"{config.scope} {IDENTITY_SCOPES}", "state": state,
        "code_challenge": challenge, "code_challenge_method": "S256",
        # Google hands out a refresh token only for offline access and on a fresh consent.
        "access_type": "offline", "prompt": "consent",
    }
    if config.user:
        query["login_hint"] = config.user
    return CodeRequest(f"{config.authorize_url}?{urllib.parse.urlencode(query)}", state, verifier, redirect_uri)


def code_from_paste(pasted: str, request: CodeRequest) -> str:
    """The authorization code in what the operator pasted: the redirect URL, or the bare code."""
    text = pasted.strip()
    if not text:
        raise FlowError("nothing was pasted")
    if len(text) > MAX_PASTE:
        raise FlowError("the pasted text is too long to be a redirect URL")
    if "://" not in text and "=" not in text:
        return text  # the bare code
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(text).query)
    error = query.get("error", [""])[0]
    if error:
        described = query.get("error_description", [""])[0][:200]
        raise FlowError(f"the provider refused: {error}" + (f" ({described})" if described else ""))
    if query.get("state", [""])[0] != request.state:
        raise FlowError("the pasted URL is not the answer to this request (state differs); start again")
    code = query.get("code", [""])[0]
    if not code:
        raise FlowError("the pasted URL holds no code")
    return code


async def exchange_code(config: OAuthConfig, request: CodeRequest, code: str,
                        client_secret: Secret | None) -> TokenGrant:
    form = authorization_code_form(client_id=config.client_id, client_secret=client_secret, code=code,
                                   redirect_uri=request.redirect_uri, verifier=request.verifier)
    return await _needs_refresh_token(request_token(config.token_url, form, timeout=config.timeout))


async def _needs_refresh_token(pending: Awaitable[TokenGrant]) -> TokenGrant:
    try:
        grant = await pending
    except TokenRequestFailed as exc:
        raise FlowError(exc.detail) from None
    if grant.refresh_token is None:
        raise FlowError("the provider sent no refresh token; remove relayd's access in the account's "
                        "security settings (Google: myaccount.google.com/permissions) and authorise again")
    return grant


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """What the operator is told to do, and what relayd polls with."""

    device_code: str
    user_code: str
    verification_uri: str
    interval: float
    expires_in: float
    message: str


async def start_device_flow(config: OAuthConfig) -> DeviceCode:
    form = {"client_id": config.client_id, "scope": f"{config.scope} {IDENTITY_SCOPES}"}
    try:
        status, body = await post_form(config.device_url, form, timeout=config.timeout)
    except TokenRequestFailed as exc:
        raise FlowError(exc.detail) from None
    try:
        doc = json.loads(body)
        device = DeviceCode(
            device_code=str(doc["device_code"]), user_code=str(doc["user_code"])[:32],
            verification_uri=str(doc.get("verification_uri") or doc.get("verification_url"))[:300],
            interval=min(max(float(doc.get("interval", 5)), 1.0), 60.0),
            expires_in=min(float(doc.get("expires_in", MAX_DEVICE_WAIT)), MAX_DEVICE_WAIT),
            message=str(doc.get("message", ""))[:500],
        )
    except (ValueError, KeyError, TypeError):
        raise FlowError(f"the device endpoint answered HTTP {status} without a device code") from None
    return device


async def finish_device_flow(
    config: OAuthConfig, device: DeviceCode, client_secret: Secret | None,
    *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> TokenGrant:
    """Poll until the operator approved, refused, or the code expired (RFC 8628 section 3.5)."""
    form = {"grant_type": DEVICE_GRANT, "client_id": config.client_id, "device_code": device.device_code}
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
    interval = device.interval
    deadline = time.monotonic() + device.expires_in
    while time.monotonic() < deadline:
        await sleep(interval)
        try:
            status, body = await post_form(config.token_url, form, timeout=config.timeout)
        except TokenRequestFailed:
            continue  # a hiccup while the operator types: ask again at the next interval
        pending = _device_pending(body)
        if pending == "authorization_pending":
            continue
        if pending == "slow_down":
            interval = min(interval + 5, 60.0)
            continue
        return await _needs_refresh_token(_parsed(status, body))
    raise FlowError("the device code expired before it was approved; start again")


async def _parsed(status: int, body: bytes) -> TokenGrant:
    return parse_token_answer(status, body)


def _device_pending(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if error in ("authorization_pending", "slow_down") else ""
