"""Wiring OAuth token sources: one per credential named by a transport with an `auth:` block.

Takes: the configured transports, the credential store (re-read on every
refresh, written under its lock), the token request and a state callback.
Emits: the `TokenSource`s by transport name (for the credential lookup and
the OAuth gate); the token states as a JSON file beside the spool
(`oauth-state.json`, written atomically) for `relayctl oauth status`.
Untrusted input: the state file, when `read_token_states` reads it back.
How it fails: a store that cannot be read or written is a failed refresh,
reported through the token source; the state file is best effort (an
OSError is reported to the caller's warning callback).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping

from relayd import safeio
from relayd.config.credentials import CredentialStore, UpstreamCredential
from relayd.config.model import SmtpTransportConfig, TransportConfig
from relayd.config.oauthentry import OAuthCredential
from relayd.config.retry import RetrySchedule
from relayd.jsonwire import JsonObject
from relayd.delivery.oauthgate import OAuthGate, closed_reason
from relayd.delivery.smtpsession import CredentialLike
from relayd.delivery.tokengrants import TokenGrant, request_token
from relayd.delivery.tokensource import TokenRequest, TokenSource, TokenState, reauthorise_command
from relayd.observe import events as ev
from relayd.observe.oauthmetrics import TokenLife
from relayd.observe.events import EventSink

STATE_FILE = "oauth-state.json"
MAX_STATE_FILE = 1024 * 1024


async def _default_request(url: str, form: Mapping[str, str], timeout: float) -> TokenGrant:
    return await request_token(url, form, timeout=timeout)


class StoreAccess:
    """The encrypted store as the token sources use it: read fresh, write under the lock."""

    def __init__(self, store: CredentialStore) -> None:
        self._store = store

    async def load(self, name: str) -> OAuthCredential | None:
        def read() -> OAuthCredential | None:
            credential = self._store.reread().get(name)
            return credential if isinstance(credential, OAuthCredential) else None
        return await asyncio.to_thread(read)

    async def save(self, name: str, fields: Mapping[str, str | float | None]) -> None:
        await asyncio.to_thread(self._store.update, lambda s: s.set_oauth(name, "", fields))

    def stamp(self) -> tuple[int, int, int] | None:
        """Which version of the store file is on disk: every save renames a new file in.

        (inode, mtime, size) rather than the mtime alone: the file system's
        clock is coarser than time.time(), so a write just after a failure
        can carry an earlier mtime than the failure.
        """
        try:
            st = os.stat(self._store.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size


def build_token_sources(
    transports: Mapping[str, TransportConfig],
    store: StoreAccess,
    *,
    request: TokenRequest = _default_request,
    on_state: Callable[[TokenState], None] | None = None,
) -> dict[str, TokenSource]:
    """One token source per OAuth credential, keyed by every transport that uses it."""
    by_credential: dict[str, TokenSource] = {}
    by_transport: dict[str, TokenSource] = {}
    for name, config in transports.items():
        if not isinstance(config, SmtpTransportConfig) or config.oauth is None or config.credential is None:
            continue
        credential = config.credential
        source = by_credential.get(credential)
        if source is None:
            source = TokenSource(
                credential, config.oauth, load=_loader(store, credential), save=_saver(store, credential),
                request=request, on_state=on_state,
            )
            by_credential[credential] = source
        by_transport[name] = source
    return by_transport


def _loader(store: StoreAccess, name: str) -> Callable[[], Awaitable[OAuthCredential | None]]:
    return lambda: store.load(name)


def _saver(store: StoreAccess, name: str) -> Callable[[Mapping[str, str | float | None]], Awaitable[None]]:
    return lambda fields: store.save(name, fields)


def standalone_lookup(transports: Mapping[str, TransportConfig], store: CredentialStore
                      ) -> Callable[[str], CredentialLike | None]:
    """A credential lookup for a command outside the daemon (`relayctl transport verify`)."""
    sources = build_token_sources(transports, StoreAccess(store))
    by_credential = {source.name: source for source in sources.values()}

    def lookup(name: str) -> CredentialLike | None:
        if name in by_credential:
            return by_credential[name]
        credential = store.get(name)
        return credential if isinstance(credential, UpstreamCredential) else None

    return lookup


class TokenStateFile:
    """`oauth-state.json`: the last state of every token source, for `relayctl oauth status`."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        self.path = path
        self._warn = warn
        self._states: dict[str, TokenState] = {}
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()

    def record(self, state: TokenState) -> None:
        """Keep `state` and write the file in the background (one write at a time)."""
        self._states[state.credential] = state
        task = asyncio.get_running_loop().create_task(self._write())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self) -> None:
        async with self._lock:
            data = encode_token_states(self._states.values())
            try:
                await asyncio.to_thread(safeio.write_file, self.path, data, mode=0o640, directory_mode=None)
            except OSError as exc:
                self._warn(f"cannot write {self.path}: {exc.strerror or exc}")

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def encode_token_states(states: Iterable[TokenState]) -> bytes:
    rows = {s.credential: dataclasses.asdict(s) for s in states}
    return (json.dumps(rows, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_token_states(path: Path) -> dict[str, TokenState]:
    """The states the daemon last wrote; empty when there is no file. Raises ValueError if damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return {}
    if len(data) > MAX_STATE_FILE:
        raise ValueError(f"{path}: too large to be a token state file")
    try:
        doc = json.loads(data)
        fields = {f.name for f in dataclasses.fields(TokenState)}
        return {name: TokenState(**{k: v for k, v in row.items() if k in fields}) for name, row in doc.items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{path}: not a token state file") from None


class OAuthSources:
    """What the composition root holds for OAuth: the sources, their gate, their state file.

    `rebuild` at start and on every reload (token sources are cheap: a new one
    takes the access token the store caches, without a request).
    """

    def __init__(self, state_path: Path, events: EventSink, retry_for: Callable[[str], RetrySchedule], *,
                 request: TokenRequest = _default_request) -> None:
        self._events = events
        self._request = request
        self._store: StoreAccess | None = None
        self._refreshed: dict[str, float] = {}  # the last refresh announced, per credential
        self._failure_stamps: dict[str, tuple[int, int, int] | None] = {}  # the store at each failure
        self.by_transport: dict[str, TokenSource] = {}
        self.state_file = TokenStateFile(state_path, lambda text: events.emit(ev.Notice(text=text, level="warning")))
        self.gate = OAuthGate(lambda: self.by_transport, retry_for,
                              store_changed=self._store_changed_since_failure)

    def rebuild(self, transports: Mapping[str, TransportConfig], store: CredentialStore | None) -> None:
        self._store = StoreAccess(store) if store is not None else None
        if self._store is None:
            self.by_transport = {}
            return
        self.by_transport = build_token_sources(
            transports, self._store, request=self._request, on_state=self._state_changed)

    def lookup(self, name: str, store: CredentialStore | None) -> CredentialLike | None:
        """The credential lookup handed to the transports: a token source, or a stored password."""
        for source in self.by_transport.values():
            if source.name == name:
                return source
        credential = store.get(name) if store is not None else None
        return credential if isinstance(credential, UpstreamCredential) else None

    def token_lives(self) -> list[TokenLife]:
        """Each credential's token expiry and failures in a row, for the metrics (no secret)."""
        return [TokenLife(s.state.credential, s.state.expires_at, s.state.failures) for s in self.by_transport.values()]

    def _store_changed_since_failure(self, state: TokenState) -> bool:
        before = self._failure_stamps.get(state.credential)
        return self._store is not None and before is not None and self._store.stamp() != before

    def _state_changed(self, state: TokenState) -> None:
        self.state_file.record(state)
        if state.failed_at is not None:
            self._failure_stamps[state.credential] = self._store.stamp() if self._store is not None else None
            self._events.emit(ev.OAuthTokenFailed(
                credential=state.credential, reason=state.last_error,
                needs_reauthorisation=state.needs_reauthorisation,
                command=reauthorise_command(state.credential),
            ))
        elif (state.last_refresh is not None and state.expires_at is not None
              and self._refreshed.get(state.credential) != state.last_refresh):
            self._refreshed[state.credential] = state.last_refresh
            self._events.emit(ev.OAuthTokenRefreshed(
                credential=state.credential, account=state.account,
                expires_in=state.expires_at - state.last_refresh,
            ))


def oauth_transport_states(transports: Mapping[str, TransportConfig], states: Mapping[str, TokenState]
                           ) -> dict[str, JsonObject]:
    """For `relayctl status`: each XOAUTH2 transport's credential state, and a state phrase if it fails."""
    rows: dict[str, JsonObject] = {}
    for name, config in transports.items():
        if not isinstance(config, SmtpTransportConfig) or config.oauth is None or config.credential is None:
            continue
        state = states.get(config.credential)
        row: JsonObject = {"credential": config.credential, "grant": config.oauth.grant.value}
        if state is not None:
            row.update(account=state.account, expires_at=state.expires_at, last_refresh=state.last_refresh,
                       last_error=state.last_error, needs_reauthorisation=state.needs_reauthorisation)
            if state.failed_at is not None:
                row["state"] = closed_reason(state)
        rows[name] = row
    return rows
