"""A fake OAuth 2.0 token server for tests: a real HTTP server on 127.0.0.1:0.

Takes: the clients, refresh tokens and service-account keys it knows, and a
failure mode tests change while it runs (down: 503; refusing: invalid_grant).
Emits: access tokens with a lifetime, rotated refresh tokens when asked, ID
tokens naming the account; records how many token requests it served per
grant. `valid(user, token)` is what a fake upstream asks to check XOAUTH2.
Untrusted input: whatever the client under test posts; it is only checked.
Fails loudly: `start()` raises if the server cannot bind.

Speaks the grants relayd uses: refresh_token, client_credentials, the JWT
bearer assertion (RS256, checked against the service account's public key),
authorization_code with PKCE (S256), and the device code flow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def id_token_for(account: str) -> str:
    """An (unsigned) ID token naming `account`, shaped like Google's and Microsoft's."""
    header = _b64url(json.dumps({"alg": "none"}).encode())
    claims = _b64url(json.dumps({"email": account, "iss": "fake"}).encode())
    return f"{header}.{claims}.sig"


@dataclass
class _Device:
    device_code: str
    user_code: str
    client_id: str
    account: str | None = None


@dataclass
class _State:
    clients: dict[str, str | None] = field(default_factory=dict)  # client_id -> secret (None: public)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # token -> account
    service_accounts: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)  # issuer -> key
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (user, expires)
    codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # code -> (account, challenge, redirect)
    devices: dict[str, _Device] = field(default_factory=dict)  # device_code -> device
    requests: dict[str, int] = field(default_factory=dict)  # grant_type -> count
    mode: str = "ok"  # ok | down | invalid_grant
    expires_in: int = 3600
    rotate: bool = False
    delay: float = 0.0
    subjects: list[str] = field(default_factory=list)  # service-account `sub` claims seen


class FakeOAuth:
    """See the module docstring; every method is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = _State()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> "FakeOAuth":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode("utf-8")))
                status, body = fake._answer(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests read the records instead."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-oauth", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOAuth":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def device_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/devicecode"

    # --- scripting ---------------------------------------------------------------

    def add_client(self, client_id: str, secret: str | None) -> None:
        with self._lock:
            self._state.clients[client_id] = secret

    def add_refresh_token(self, token: str, account: str) -> None:
        with self._lock:
            self._state.refresh_tokens[token] = account

    def add_service_account(self, issuer: str, public_key: rsa.RSAPublicKey) -> None:
        with self._lock:
            self._state.service_accounts[issuer] = public_key

    def set_mode(self, mode: str) -> None:
        """ok, down (HTTP 503 to everything) or invalid_grant (consent revoked)."""
        with self._lock:
            self._state.mode = mode

    def set_expires_in(self, seconds: int) -> None:
        with self._lock:
            self._state.expires_in = seconds

    def set_rotate(self, rotate: bool) -> None:
        with self._lock:
            self._state.rotate = rotate

    def set_delay(self, seconds: float) -> None:
        with self._lock:
            self._state.delay = seconds

    def expire_all(self) -> None:
        """Every access token handed out so far stops working (as at the end of its life)."""
        with self._lock:
            self._state.access_tokens = {t: (u, 0.0) for t, (u, _) in self._state.access_tokens.items()}

    def approve_code(self, account: str, challenge: str, redirect_uri: str) -> str:
        """What the provider's consent page does: an authorization code for this PKCE challenge."""
        code = "code-" + secrets.token_urlsafe(8)
        with self._lock:
            self._state.codes[code] = (account, challenge, redirect_uri)
        return code

    def approve_device(self, user_code: str, account: str) -> None:
        with self._lock:
            for device in self._state.devices.values():
                if device.user_code == user_code:
                    device.account = account

    # --- records -----------------------------------------------------------------

    def requests(self, grant: str | None = None) -> int:
        with self._lock:
            if grant is None:
                return sum(self._state.requests.values())
            return self._state.requests.get(grant, 0)

    def refresh_tokens(self) -> dict[str, str]:
        with self._lock:
            return dict(self._state.refresh_tokens)

    def access_tokens(self) -> list[str]:
        with self._lock:
            return list(self._state.access_tokens)

    @property
    def subjects(self) -> list[str]:
        with self._lock:
            return list(self._state.subjects)

    def valid(self, user: str, token: str) -> bool:
        """For FakeUpstream(bearer_check=...): a token this server issued for `user`, unexpired."""
        with self._lock:
            entry = self._state.access_tokens.get(token)
        return entry is not None and entry[0] == user and time.time() < entry[1]

    # --- the server side ---------------------------------------------------------

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            delay = self._state.delay
        if delay:
            time.sleep(delay)
        with self._lock:
            if path == "/devicecode":
                return self._device_start(form)
            grant = form.get("grant_type", "")
            self._state.requests[grant] = self._state.requests.get(grant, 0) + 1
            if self._state.mode == "down":
                return 503, {"error": "temporarily_unavailable"}
            if self._state.mode == "invalid_grant":
                return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
            if not self._client_ok(form, grant):
                return 401, {"error": "invalid_client"}
            if grant == "refresh_token":
                return self._refresh(form)
            if grant == "client_credentials":
                return self._issue(f"app:{form.get('client_id')}", None)
            if grant == JWT_GRANT:
                return self._jwt(form)
            if grant == "authorization_code":
                return self._code(form)
            if grant == DEVICE_GRANT:
                return self._device_poll(form)
            return 400, {"error": "unsupported_grant_type"}

    def _client_ok(self, form: dict[str, str], grant: str) -> bool:
        if grant == JWT_GRANT:
            return True  # the assertion authenticates the service account
        client_id = form.get("client_id", "")
        if client_id not in self._state.clients:
            return False
        secret = self._state.clients[client_id]
        return secret is None or form.get("client_secret") == secret

    def _issue(self, account: str, refresh: str | None, *, id_token: bool = False) -> tuple[int, dict[str, Any]]:
        token = "at-" + secrets.token_urlsafe(16)
        self._state.access_tokens[token] = (account, time.time() + self._state.expires_in)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": self._state.expires_in}
        if refresh is not None:
            body["refresh_token"] = refresh
        if id_token:
            body["id_token"] = id_token_for(account)
        return 200, body

    def _new_refresh(self, account: str) -> str:
        token = "rt-" + secrets.token_urlsafe(16)
        self._state.refresh_tokens[token] = account
        return token

    def _refresh(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        account = self._state.refresh_tokens.get(form.get("refresh_token", ""))
        if account is None:
            return 400, {"error": "invalid_grant", "error_description": "Bad Request"}
        rotated = None
        if self._state.rotate:
            del self._state.refresh_tokens[form["refresh_token"]]
            rotated = self._new_refresh(account)
        return self._issue(account, rotated)

    def _jwt(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            header, payload, signature = form.get("assertion", "").split(".")
            claims = json.loads(_b64url_decode(payload))
            key = self._state.service_accounts[claims["iss"]]
            key.verify(_b64url_decode(signature), f"{header}.{payload}".encode(),
                       padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, KeyError, InvalidSignature):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if claims.get("aud") != self.token_url or claims.get("exp", 0) < time.time():
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: audience or expiry"}
        self._state.subjects.append(str(claims.get("sub")))
        return self._issue(str(claims.get("sub")), None)

    def _code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        found = self._state.codes.pop(form.get("code", ""), None)
        if found is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown code"}
        account, challenge, redirect = found
        verifier = form.get("code_verifier", "")
        if _b64url(hashlib.sha256(verifier.encode()).digest()) != challenge or form.get("redirect_uri") != redirect:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        return self._issue(account, self._new_refresh(account), id_token=True)

    def _device_start(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        device = _Device("dc-" + secrets.token_urlsafe(8), secrets.token_hex(4).upper(), form.get("client_id", ""))
        self._state.devices[device.device_code] = device
        return 200, {"device_code": device.device_code, "user_code": device.user_code,
                     "verification_uri": "https://microsoft.com/devicelogin", "expires_in": 900,
                     "interval": 1, "message": f"enter {device.user_code}"}

    def _device_poll(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        device = self._state.devices.get(form.get("device_code", ""))
        if device is None:
            return 400, {"error": "expired_token"}
        if device.account is None:
            return 400, {"error": "authorization_pending"}
        del self._state.devices[device.device_code]
        return self._issue(device.account, self._new_refresh(device.account), id_token=True)
