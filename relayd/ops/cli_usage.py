"""relayctl usage: per tenant, messages and recipients today and this month against its quota.

Takes: `--tenant T` (one tenant) and `--json`; the running daemon's answer
to the control socket's `usage` request.
Emits: a table for humans (one line per tenant and window, then what each
transport of its routes delivered), or the daemon's JSON for scripts.
Untrusted input: the arguments (the daemon checks the tenant name).
Fails: with a `relayctl:` line when relayd is not running or refuses.

The counts are the daemon's: with `usage.store: redis` they are the shared
counts of every node, and only a running relayd can ask Redis.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from relayd.ops.clicommon import EXIT_OK, CliError, load_relay_config, print_json, print_table
from relayd.ops.controlclient import ControlClient, ControlUnavailable
from relayd.jsonwire import JsonObject
from relayd.ops.usageview import usage_rows, usage_store_lines

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers


def add_usage_commands(subparsers: "Subparsers") -> None:
    p = subparsers.add_parser("usage", help="tenant usage today and this month against quotas")
    p.add_argument("--tenant", metavar="T", help="only this tenant")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_usage)


def cmd_usage(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    request: JsonObject = {"tenant": args.tenant} if args.tenant else {}
    try:
        reply = ControlClient(config.control_path).request("usage", **request)
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error") or "relayd refused the request"))
    reply.pop("ok", None)
    reply.pop("done", None)
    if args.json:
        print_json(reply)
        return EXIT_OK
    try:
        rows, store = usage_rows(reply), usage_store_lines(reply)
    except TypeError as exc:
        raise CliError(f"relayd sent a usage report this relayctl cannot read: {exc}") from None
    print_table(["TENANT", "WINDOW", "MESSAGES", "RECIPIENTS", "QUOTA", "USED", "RESETS"], rows)
    for line in store:
        print(line)
    return EXIT_OK
