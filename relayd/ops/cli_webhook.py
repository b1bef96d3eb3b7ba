"""relayctl webhook: the signing secrets of webhook endpoints.

Takes: the endpoint's credential name, and the secret from a no-echo prompt or
one line of stdin (never an argument: it would show in `ps` and shell history),
or `--generate` for a fresh random one.
Emits: the secret stored in the encrypted credential store (user "webhook"),
an audit log line, and with `--generate` the new secret printed once, for the
operator to give to the receiver.
Untrusted input: arguments, stdin, the config, key and store files.
Fails: CliError / CredentialError sentences that never contain the secret.
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from relayd.config.credentials import CredentialStore, check_name, locate_master_keys
from relayd.observe.audit import audited
from relayd.ops.clicommon import EXIT_OK, PROG, CliError, audit_failure, load_relay_config, read_password

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers

WEBHOOK_USER = "webhook"  # the store's user field for a signing secret
MIN_SECRET_LENGTH = 16  # characters: a shorter HMAC key can be guessed offline from one signed request
GENERATED_SECRET_BYTES = 32  # 256 bits, HMAC-SHA256's block-size-friendly key length


def _audit_log(args: argparse.Namespace) -> Path:
    return load_relay_config(args).audit_path


@audited("webhook.secret", locate=_audit_log, describe=audit_failure, target=lambda a: str(a.name))
def cmd_webhook_secret(args: argparse.Namespace) -> int:
    check_name(args.name)
    config = load_relay_config(args)
    keys = locate_master_keys(config.credentials, args.environ).keys
    store = CredentialStore.open(config.credentials.store, keys)
    if args.generate:
        secret = secrets.token_urlsafe(GENERATED_SECRET_BYTES)
    else:
        secret = read_password(args, f"Signing secret for {args.name}: ", confirm=True)
        if len(secret) < MIN_SECRET_LENGTH:
            raise CliError(f"the secret must be at least {MIN_SECRET_LENGTH} characters; "
                           f"use --generate for a random one")
    store.set(args.name, WEBHOOK_USER, secret)
    store.save()
    used_by = [e.name for e in config.webhooks.endpoints if e.credential == args.name]
    where = f" (endpoint {', '.join(used_by)})" if used_by else " (no endpoint in relay.yaml names it yet)"
    print(f"stored webhook signing secret {args.name} in {store.path}{where}")
    if args.generate:
        print("give this secret to the receiver; relayd does not show it again:")
        print(secret)
    print(f"a running relayd uses it after `{PROG} reload`")
    return EXIT_OK


def add_webhook_commands(subparsers: "Subparsers") -> None:
    group = subparsers.add_parser("webhook", help="webhook endpoints' signing secrets")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser(
        "secret", help="store an endpoint's HMAC signing secret in the credential store",
        description="Store the HMAC-SHA256 signing secret of a webhook endpoint (its `credential:` "
        "name) in the encrypted credential store. The secret is read from a no-echo prompt or one "
        "line of stdin, or generated with --generate and printed once.",
    )
    p.add_argument("name", help="the credential name, as in `credential:` of a webhook endpoint")
    p.add_argument("--generate", action="store_true", help="generate a random secret and print it once")
    p.add_argument("--secret-stdin", dest="password_stdin", action="store_true",
                   help="read the secret as one line of stdin even on a terminal")
    p.set_defaults(func=cmd_webhook_secret)
