"""Token sources: a current OAuth 2.0 access token for each OAuth credential, fetched once.

Takes: a credential's name and `auth:` settings, a way to read its stored
secrets (the encrypted store, re-read on every refresh so a new
`relayctl oauth authorize` is seen at once), a way to write tokens back, and
the token request (relayd.delivery.tokengrants).
Emits: a `Bearer` login for XOAUTH2, and a `TokenState` (account, expiry, last
refresh, last error) after every refresh, for the gate, the events and
`relayctl oauth status`.
Untrusted input: none directly (token answers are checked in tokengrants).
How it fails: `bearer()` raises `TokenUnavailable` with a sentence holding
the command that fixes it; it never holds a secret.

The rules:
* the access token is kept in memory and, encrypted, in the store, so a
  restart does not ask for a new one; it is refreshed `refresh_margin`
  seconds before it ends (half way through its life if it lives shorter
  than twice the margin);
* one refresh at a time per credential: every delivery that needs a token
  while one is being fetched waits for that one (single flight);
* a refresh token the provider rotates is written back before the new access
  token is used (the store's own locked, atomic, durable write);
* an upstream that refuses the token (535) makes the source forget it, so
  the next attempt fetches a fresh one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Literal, Mapping

from relayd.config.model import OAuthConfig, OAuthGrant
from relayd.config.oauthentry import OAuthCredential
from relayd.config.secret import Secret
from relayd.delivery.tokengrants import (
    TokenGrant,
    TokenRequestFailed,
    client_credentials_form,
    refresh_form,
    service_account_form,
)

TokenRequest = Callable[[str, Mapping[str, str], float], Awaitable[TokenGrant]]
LoadSecrets = Callable[[], Awaitable[OAuthCredential | None]]
SaveTokens = Callable[[Mapping[str, str | float | None]], Awaitable[None]]


def reauthorise_command(name: str) -> str:
    return f"relayctl oauth authorize {name}"


@dataclass(frozen=True, slots=True)
class Bearer:
    """A mailbox and its current access token (`relayd.delivery.upstreamauth.BearerLogin`)."""

    user: str
    token: Secret
    kind: Literal["bearer"] = "bearer"


@dataclass(frozen=True, slots=True)
class TokenState:
    """What `relayctl oauth status` and the gate know about one credential (no secret)."""

    credential: str
    grant: str
    account: str = ""
    expires_at: float | None = None
    last_refresh: float | None = None
    last_error: str = ""
    failed_at: float | None = None  # when the last refresh failed; None after a success
    first_failed_at: float | None = None  # the first of the failures in a row
    failures: int = 0  # refreshes failed in a row
    needs_reauthorisation: bool = False
    refreshes: int = 0  # token requests made since start


class TokenUnavailable(Exception):
    """No access token now; the message is the operator's sentence."""

    def __init__(self, detail: str, *, needs_reauthorisation: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.needs_reauthorisation = needs_reauthorisation


class TokenSource:
    """One OAuth credential's access tokens; see the module docstring."""

    kind: Literal["oauth"] = "oauth"

    def __init__(
        self,
        name: str,
        config: OAuthConfig,
        *,
        load: LoadSecrets,
        save: SaveTokens,
        request: TokenRequest,
        clock: Callable[[], float] = time.time,
        on_state: Callable[[TokenState], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._load = load
        self._save = save
        self._request = request
        self._clock = clock
        self._on_state = on_state
        self._token: Secret | None = None
        self._refresh_at = 0.0  # when the token in memory is to be replaced
        self._refused: Secret | None = None  # the token an upstream refused: never reuse it
        self._inflight: asyncio.Task[Bearer] | None = None
        self.state = TokenState(credential=name, grant=config.grant.value, account=config.user or "")

    def __repr__(self) -> str:
        return f"<TokenSource {self.name} {self.config.grant.value}>"

    @property
    def user(self) -> str:
        return self.config.user or self.state.account

    async def bearer(self) -> Bearer:
        """A current access token; one refresh in flight however many callers wait."""
        if self._token is not None and self._clock() < self._refresh_at:
            return Bearer(self.user, self._token)
        if self._inflight is None:
            task = asyncio.get_running_loop().create_task(self._refresh())
            task.add_done_callback(self._flight_done)
            self._inflight = task
        return await asyncio.shield(self._inflight)

    def refused(self) -> None:
        """The upstream refused the token (535 to XOAUTH2): fetch a new one next time."""
        if self._token is not None:
            self._refused = self._token
        self._token = None
        self._refresh_at = 0.0

    def _flight_done(self, task: asyncio.Task[Bearer]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here too, so a flight nobody awaits any more is quiet

    async def _refresh(self) -> Bearer:
        now = self._clock()
        try:
            stored = await self._load()
        except Exception as exc:  # an unreadable store is this credential's failure, never a crash
            raise self._failed(f"the credential store could not be read ({type(exc).__name__})",
                               reauthorise=False) from None
        if stored is None:
            raise self._failed(f"credential {self.name} is not in the store", reauthorise=True)
        cached = stored.access_token
        if (cached is not None and stored.access_expires is not None and cached != self._refused
                and now < stored.access_expires - self.config.refresh_margin):
            self._adopt(cached, stored.access_expires, stored.access_expires - self.config.refresh_margin,
                        stored.user, now, fetched=False)
            return Bearer(self.user, cached)
        try:
            form = self._form(stored, now)
            self.state = replace(self.state, refreshes=self.state.refreshes + 1)
            grant = await self._request(self.config.token_url, form, self.config.timeout)
        except TokenRequestFailed as exc:
            raise self._failed(exc.detail, reauthorise=exc.needs_reauthorisation) from None
        except Exception as exc:  # a bug or an odd library error: a temporary failure, never a crash
            raise self._failed(f"token request failed ({type(exc).__name__})", reauthorise=False) from None
        expires = now + grant.expires_in
        fields: dict[str, str | float | None] = {
            "access_token": grant.access_token.reveal(), "access_expires": expires}
        if grant.refresh_token is not None and grant.refresh_token != stored.refresh_token:
            fields["refresh_token"] = grant.refresh_token.reveal()
        save_error = ""
        try:
            await self._save(fields)
        except Exception as exc:  # the token still works; the write is reported, not fatal
            save_error = f"could not write tokens back to the store ({type(exc).__name__})"
        # A token shorter-lived than twice the margin is used for half its life,
        # so a provider's short tokens are not refreshed for every message.
        refresh_at = expires - min(self.config.refresh_margin, grant.expires_in / 2)
        self._adopt(grant.access_token, expires, refresh_at, grant.account or stored.user, now,
                    fetched=True, error=save_error)
        return Bearer(self.user, grant.access_token)

    def _form(self, stored: OAuthCredential, now: float) -> dict[str, str]:
        c = self.config
        if c.grant is OAuthGrant.REFRESH_TOKEN:
            if stored.refresh_token is None:
                raise TokenRequestFailed("no refresh token stored", needs_reauthorisation=True)
            return refresh_form(c.client_id, stored.client_secret, stored.refresh_token, c.scope)
        if c.grant is OAuthGrant.CLIENT_CREDENTIALS:
            if stored.client_secret is None:
                raise TokenRequestFailed("no client secret stored", needs_reauthorisation=True)
            return client_credentials_form(c.client_id, stored.client_secret, c.scope)
        if stored.private_key is None or not stored.issuer:
            raise TokenRequestFailed("no service account key stored", needs_reauthorisation=True)
        return service_account_form(issuer=stored.issuer, subject=self.user, private_key=stored.private_key,
                                    token_url=c.token_url, scope=c.scope, now=now)

    def _adopt(self, token: Secret, expires: float, refresh_at: float, account: str, now: float, *,
               fetched: bool, error: str = "") -> None:
        self._token, self._refresh_at = token, refresh_at
        self.state = replace(
            self.state, account=self.config.user or account, expires_at=expires,
            last_refresh=now if fetched else self.state.last_refresh, last_error=error,
            failed_at=None, first_failed_at=None, failures=0, needs_reauthorisation=False,
        )
        self._tell()

    def _failed(self, detail: str, *, reauthorise: bool) -> TokenUnavailable:
        self._token, self._refresh_at = None, 0.0
        fix = f"; needs re-authorisation: {reauthorise_command(self.name)}" if reauthorise else ""
        sentence = f"credential {self.name}: {detail}{fix}"
        now = self._clock()
        self.state = replace(
            self.state, last_error=sentence, failed_at=now, failures=self.state.failures + 1,
            first_failed_at=self.state.first_failed_at or now, needs_reauthorisation=reauthorise,
        )
        self._tell()
        return TokenUnavailable(sentence, needs_reauthorisation=reauthorise)

    def _tell(self) -> None:
        if self._on_state is not None:
            self._on_state(self.state)
