"""relayctl oauth: authorise an OAuth credential, and show every credential's token state.

Takes: relay.yaml (the transports with an `auth:` block), the credential
store and master key, stdin (a client secret, the pasted redirect URL) and,
for a Google service account, its JSON key file.
Emits: the URL or device code to approve; the tokens and secrets, sealed in
the store under the store's lock; one line saying which account was
authorised; `status` as a table or `--json`.
Untrusted input: everything pasted or read from files, and the provider's
answers (see relayd.ops.oauthflows and relayd.delivery.tokengrants).
Fails: with `CliError` sentences; no token or secret is ever printed.

The running daemon needs no signal: it re-reads the store at its next token
request, and its OAuth gate reopens as soon as the store changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

from relayd.config.credentials import CredentialStore, locate_master_keys
from relayd.config.oauthentry import OAuthCredential
from relayd.config.model import OAuthConfig, OAuthGrant, RelayConfig, SmtpTransportConfig
from relayd.config.secret import Secret
from relayd.delivery.oauthsources import STATE_FILE, read_token_states
from relayd.delivery.tokengrants import (
    TokenGrant,
    TokenRequestFailed,
    client_credentials_form,
    request_token,
    service_account_form,
)
from relayd.delivery.tokensource import TokenState
from relayd.observe.audit import audited
from relayd.ops.clicommon import (
    EXIT_OK,
    CliError,
    audit_failure,
    load_relay_config,
    print_json,
    print_table,
    read_password,
)
from relayd.ops.oauthflows import (
    DEFAULT_REDIRECT,
    MAX_PASTE,
    FlowError,
    code_from_paste,
    code_request,
    exchange_code,
    finish_device_flow,
    start_device_flow,
)

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers

MAX_KEY_FILE = 64 * 1024  # a Google service account key file is about 2.3K


def oauth_transports(config: RelayConfig, name: str) -> list[SmtpTransportConfig]:
    """The transports whose XOAUTH2 credential is `name`."""
    return [t for t in config.transports.values()
            if isinstance(t, SmtpTransportConfig) and t.oauth is not None and t.credential == name]


def _settings(config: RelayConfig, name: str) -> tuple[OAuthConfig, list[str]]:
    transports = oauth_transports(config, name)
    if not transports:
        names = sorted({t.credential for t in config.transports.values()
                        if isinstance(t, SmtpTransportConfig) and t.oauth is not None and t.credential})
        known = ", ".join(names) if names else "none"
        raise CliError(f"no transport in relay.yaml logs in with OAuth credential {name!r} "
                       f"(OAuth credentials: {known})")
    settings = {t.oauth for t in transports}
    if len(settings) > 1:
        raise CliError(f"the transports using credential {name} have different auth: blocks; "
                       "give each its own credential name")
    oauth = transports[0].oauth
    assert oauth is not None
    return oauth, [t.name for t in transports]


def _store(config: RelayConfig, args: argparse.Namespace) -> CredentialStore:
    keys = locate_master_keys(config.credentials, args.environ).keys
    return CredentialStore.open(config.credentials.store, keys)


T = TypeVar("T")


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(_awaited(coro))
    except FlowError as exc:
        raise CliError(str(exc)) from None
    except TokenRequestFailed as exc:
        raise CliError(exc.detail) from None


async def _awaited(coro: Awaitable[T]) -> T:
    return await coro


def _read_line(args: argparse.Namespace) -> str:
    line = args.stdin.readline(MAX_PASTE + 2)
    if line == "":
        raise CliError("nothing was pasted (stdin ended)")
    return str(line)


# ------------------------------------------------------------------------ authorize


@audited("oauth.authorize", locate=lambda a: load_relay_config(a).audit_path, describe=audit_failure,
         target=lambda a: str(a.name))
def cmd_oauth_authorize(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    oauth, transports = _settings(config, args.name)
    store = _store(config, args)
    stored = store.get(args.name)
    previous = stored if isinstance(stored, OAuthCredential) else None
    if oauth.grant is OAuthGrant.REFRESH_TOKEN:
        secret = _client_secret(args, oauth, previous)
        grant = _delegated(args, oauth, secret)
        fields: dict[str, str | float | None] = {"refresh_token": _reveal(grant.refresh_token)}
        if secret is not None:
            fields["client_secret"] = secret.reveal()
        account = grant.account or oauth.user or ""
    elif oauth.grant is OAuthGrant.CLIENT_CREDENTIALS:
        secret = Secret(read_password(args, "Client secret: ", confirm=False))
        form = client_credentials_form(oauth.client_id, secret, oauth.scope)
        grant = _run(request_token(oauth.token_url, form, timeout=oauth.timeout))
        fields = {"client_secret": secret.reveal()}
        account = oauth.user or ""
    else:
        issuer, key = _service_account_key(args)
        form = service_account_form(issuer=issuer, subject=oauth.user or "", private_key=key,
                                    token_url=oauth.token_url, scope=oauth.scope, now=time.time())
        grant = _run(request_token(oauth.token_url, form, timeout=oauth.timeout))
        fields = {"private_key": key.reveal(), "issuer": issuer}
        account = oauth.user or ""
    fields.update(access_token=grant.access_token.reveal(), access_expires=time.time() + grant.expires_in)
    store.update(lambda s: s.set_oauth(args.name, account, fields))
    who = account or "the account"
    print(f"authorised {who} for credential {args.name} ({oauth.grant.value}; transport"
          f"{'s' if len(transports) > 1 else ''} {', '.join(transports)}); a running relayd uses it "
          "from its next delivery attempt")
    return EXIT_OK


def _reveal(secret: Secret | None) -> str:
    return secret.reveal() if secret is not None else ""


def _client_secret(args: argparse.Namespace, oauth: OAuthConfig,
                   previous: OAuthCredential | None) -> Secret | None:
    """Google's clients always have a secret; Microsoft's public clients have none."""
    if args.client_secret or (oauth.provider == "google" and (previous is None or previous.client_secret is None)):
        return Secret(read_password(args, "Client secret: ", confirm=False))
    return previous.client_secret if previous is not None else None


def _delegated(args: argparse.Namespace, oauth: OAuthConfig, secret: Secret | None) -> TokenGrant:
    if args.device:
        if not oauth.device_url:
            raise CliError(f"{oauth.provider} offers no device flow for this scope; "
                           "leave out --device and paste the redirect URL instead")
        device = _run(start_device_flow(oauth))
        print(device.message or f"To sign in, open {device.verification_uri} and enter the code "
                                 f"{device.user_code}", flush=True)
        print(f"waiting up to {device.expires_in:.0f}s for the sign-in ...", flush=True)
        grant: TokenGrant = _run(finish_device_flow(oauth, device, secret))
        return grant
    request = code_request(oauth, args.redirect_uri)
    print("Open this URL in a browser, sign in as the sending mailbox and consent:\n")
    print(f"  {request.url}\n")
    print(f"The browser then goes to {request.redirect_uri}/?code=... and shows an error page: that is "
          "expected. Paste that page's full address (or only the code) here and press Enter:", flush=True)
    code = _run_flow(lambda: code_from_paste(_read_line(args), request))
    grant = _run(exchange_code(oauth, request, code, secret))
    return grant


def _run_flow(step: Callable[[], str]) -> str:
    try:
        return step()
    except FlowError as exc:
        raise CliError(str(exc)) from None


def _service_account_key(args: argparse.Namespace) -> tuple[str, Secret]:
    path: Path | None = args.service_account_key
    if path is None:
        raise CliError("grant: service_account needs --service-account-key PATH (the JSON key file "
                       "from Google Cloud: IAM > Service accounts > Keys)")
    with open(path, "rb") as f:
        data = f.read(MAX_KEY_FILE + 1)
    try:
        doc = json.loads(data) if len(data) <= MAX_KEY_FILE else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if (not isinstance(doc, dict) or doc.get("type") != "service_account"
            or not isinstance(doc.get("client_email"), str) or not isinstance(doc.get("private_key"), str)):
        raise CliError(f"{path}: not a Google service account key file (JSON with type service_account)")
    return doc["client_email"], Secret(doc["private_key"])


# ------------------------------------------------------------------------ status


def _when(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value)) if value else "-"


@dataclass(frozen=True, slots=True)
class CredentialStatus:
    """One row of `relayctl oauth status` (and one object of its --json)."""

    credential: str
    grant: str
    transports: list[str]
    account: str
    authorised: bool  # the store holds what the grant needs
    token_expires: float | None
    last_refresh: float | None  # by the daemon
    last_error: str
    needs_reauthorisation: bool


def cmd_oauth_status(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    names = sorted({t.credential for t in config.transports.values()
                    if isinstance(t, SmtpTransportConfig) and t.oauth is not None and t.credential})
    try:
        states = read_token_states(config.spool_dir / STATE_FILE)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    store = _store(config, args) if names else None
    rows = [_status_row(config, name, store, states.get(name)) for name in names]
    if args.json:
        print_json([asdict(row) for row in rows])
    elif not rows:
        print("no transport in relay.yaml logs in with OAuth (an auth: block)")
    else:
        print_table(["CREDENTIAL", "GRANT", "ACCOUNT", "TOKEN EXPIRES", "LAST REFRESH", "LAST ERROR"],
                    [[r.credential, r.grant, r.account or "-", _when(r.token_expires),
                      _when(r.last_refresh), r.last_error or "-"] for r in rows])
    return EXIT_OK


def _status_row(config: RelayConfig, name: str, store: CredentialStore | None,
                state: TokenState | None) -> CredentialStatus:
    oauth, transports = _settings(config, name)
    stored = store.get(name) if store is not None else None
    credential = stored if isinstance(stored, OAuthCredential) else None
    expires = credential.access_expires if credential is not None else None
    authorised = credential is not None and any(
        secret is not None for secret in (credential.refresh_token, credential.client_secret, credential.private_key))
    return CredentialStatus(
        credential=name,
        grant=oauth.grant.value,
        transports=transports,
        account=oauth.user or (credential.user if credential else "") or (state.account if state else ""),
        authorised=authorised,
        token_expires=expires if expires is not None else (state.expires_at if state else None),
        last_refresh=state.last_refresh if state else None,
        last_error=state.last_error if state else "",
        needs_reauthorisation=bool(state and state.needs_reauthorisation) or not authorised,
    )


# ------------------------------------------------------------------------ registration


def add_oauth_commands(subparsers: Subparsers) -> None:
    group = subparsers.add_parser("oauth", help="OAuth 2.0 credentials of XOAUTH2 transports (Google, Microsoft 365)")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("authorize", help="get and store the tokens of an OAuth credential")
    p.add_argument("name", help="the credential: name of a transport's `credential:` with an auth: block")
    p.add_argument("--device", action="store_true",
                   help="device-code sign-in (Microsoft 365): enter a short code on any machine")
    p.add_argument("--redirect-uri", default=DEFAULT_REDIRECT, metavar="URI",
                   help=f"the redirect URI registered for the client (default {DEFAULT_REDIRECT})")
    p.add_argument("--client-secret", action="store_true",
                   help="read a (new) client secret from stdin (always asked for Google's first authorisation)")
    p.add_argument("--password-stdin", action="store_true", help="read the client secret from stdin, not a prompt")
    p.add_argument("--service-account-key", type=Path, metavar="PATH",
                   help="Google service account JSON key file (grant: service_account)")
    p.set_defaults(func=cmd_oauth_authorize)
    p = verbs.add_parser("status", help="each OAuth credential: grant, account, token expiry, last refresh, last error")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=cmd_oauth_status)
