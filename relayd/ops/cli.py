"""relayctl: the operator's command line.

Takes: command-line arguments, the environment (config path, master key),
stdin (passwords, never as arguments, so they stay out of `ps` and shell
history) and the files named in relay.yaml.
Emits: tables for humans or JSON for scripts on stdout; one line per error on
stderr, prefixed `relayctl: `; exit status 0 ok, 1 failure, 2 usage.
Untrusted input: arguments, stdin, and the config, key and store files.
Fails: never with a traceback; passwords and keys never reach stdout or stderr.

Layout, for adding verbs: each group registers its commands in an
`add_<group>_commands(subparsers)` function listed in `_COMMAND_GROUPS`, so a
new verb group is a module of its own plus one line there; each
command is `cmd_<group>_<verb>(args) -> int` and raises `CliError` for an
ordinary failure. `main()` puts the environment and stdin on the namespace as
`args.environ` and `args.stdin`, so commands read those rather than globals,
and a test can hand in its own. What every command module shares (errors,
exit codes, relay.yaml via `load_relay_config(args)`, password input, tables)
is in relayd.ops.clicommon; the command modules never import each other.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, TextIO

from relayd.observe.audit import audited
from relayd.ops.cli_admin import add_admin_commands
from relayd.ops.cli_daemon import add_daemon_commands
from relayd.ops.cli_oauth import add_oauth_commands
from relayd.ops.cli_queue import add_queue_commands
from relayd.ops.cli_queueact import add_action_verbs
from relayd.ops.cli_tenant import add_tenant_verbs
from relayd.ops.cli_usage import add_usage_commands
from relayd.ops.cli_webhook import add_webhook_commands
from relayd.ops.clicommon import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    UsageError,
    audit_failure,
    load_relay_config,
    print_json,
    print_table,
    read_password,
)
from relayd.config.model import CredentialsConfig
from relayd.config.credentials import (
    CredentialError,
    CredentialStore,
    KeySource,
    MasterKeyMissing,
    MasterKeys,
    check_name,
    generate_master_key,
    key_id,
    locate_master_keys,
    rotate_key,
    write_key_file,
)
from relayd.config.passwords import hash_password

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers


# ------------------------------------------------------ secret: upstream logins


def _credentials_target(args: argparse.Namespace) -> CredentialsConfig:
    """Where the store and key file are: --store/--key-file, else relay.yaml."""
    if args.store is not None:
        return CredentialsConfig(store=args.store, master_key_file=args.key_file)
    configured = load_relay_config(args).credentials
    if args.key_file is not None:
        return CredentialsConfig(store=configured.store, master_key_file=args.key_file)
    return configured


def _open_store(args: argparse.Namespace) -> tuple[CredentialStore, MasterKeys]:
    target = _credentials_target(args)
    found = locate_master_keys(target, args.environ)
    return CredentialStore.open(target.store, found.keys), found


def _secret_audit_log(args: argparse.Namespace) -> Path:
    """relay.yaml's audit_log; with --store (relay.yaml not read), audit.log beside the store."""
    return args.store.parent / "audit.log" if args.store is not None else load_relay_config(args).audit_path


def _audited(action: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Record a secret command in the audit log (relayd.observe.audit): who, what, which name, outcome."""
    return audited(action, locate=_secret_audit_log, describe=audit_failure,
                   target=lambda a: str(getattr(a, "name", None) or "credential store"))


@_audited("secret.set")
def cmd_secret_set(args: argparse.Namespace) -> int:
    check_name(args.name)
    target = _credentials_target(args)
    new_key: bytes | None = None
    try:
        keys = locate_master_keys(target, args.environ).keys
    except MasterKeyMissing as exc:
        if target.master_key_file is None:
            raise CliError(f"{exc}; create one with: {PROG} key generate PATH") from None
        if target.store.exists():
            raise CliError(f"{target.store}: the store exists but {exc}") from None
        new_key = generate_master_key()
        keys = (new_key,)
    store = CredentialStore.open(target.store, keys)
    password = read_password(args, f"Password for {args.name}: ", confirm=True)
    store.set(args.name, args.user, password)
    if new_key is not None and target.master_key_file is not None:
        write_key_file(target.master_key_file, [new_key], replace=False)
        print(
            f"created master key file {target.master_key_file} (key id {key_id(new_key)}, "
            "mode 0600); back it up: the store cannot be decrypted without it"
        )
    # Re-read and written under the store's lock, so a token the daemon writes back meanwhile stays.
    store.update(lambda current: current.set(args.name, args.user, password))
    print(f"stored credential {args.name} (user {args.user}) in {store.path}")
    return EXIT_OK


def cmd_secret_list(args: argparse.Namespace) -> int:
    store, _ = _open_store(args)
    users = store.users()
    if args.json:
        print_json([{"name": name, "user": user} for name, user in users.items()])
    elif not users:
        print(f"no credentials in {store.path}")
    else:
        print_table(["NAME", "USER"], [[name, user] for name, user in users.items()])
    return EXIT_OK


@_audited("secret.remove")
def cmd_secret_remove(args: argparse.Namespace) -> int:
    store, _ = _open_store(args)
    if not store.remove(args.name):
        raise CliError(f"{store.path}: no credential named {args.name!r}")
    store.update(lambda current: current.remove(args.name))
    print(f"removed credential {args.name} from {store.path}")
    return EXIT_OK


@_audited("secret.rotate-key")
def cmd_secret_rotate_key(args: argparse.Namespace) -> int:
    target = _credentials_target(args)
    found = locate_master_keys(target, args.environ)
    if args.new_key_file is not None:
        return _rotate_to_new_file(target.store, found, args.new_key_file)
    if found.source is not KeySource.KEY_FILE or found.path is None:
        raise UsageError(
            f"the master key comes from {found.describe()}, which {PROG} does not rewrite; "
            f"rerun with --new-key-file PATH, then put PATH's contents there"
        )
    new_id = rotate_key(target.store, found.path, current_keys=found.keys)
    print(f"re-encrypted {target.store} with new master key {new_id}; {found.path} holds only it")
    print(_RUNNING_DAEMON_NOTE)
    return EXIT_OK


# relayd reads its master key only at start (systemd copies a LoadCredential=
# file once, and the environment variable is removed after reading).
_RUNNING_DAEMON_NOTE = (
    "a running relayd keeps the old key until it restarts: reloads go on with the credentials "
    "it already holds; restart it (systemctl restart relayd) to use the new key and any "
    "credential changed from now on"
)


def _rotate_to_new_file(store: Path, found: MasterKeys, new_key_file: Path) -> int:
    if new_key_file.exists():
        raise CliError(f"{new_key_file}: already exists; name a new file")
    new_id = rotate_key(store, new_key_file, current_keys=found.keys)
    print(f"re-encrypted {store} with new master key {new_id}, written to {new_key_file}")
    print(f"replace the key at {found.describe()} with it, then restart relayd")
    print(_RUNNING_DAEMON_NOTE)
    return EXIT_OK


_ROTATE_HELP = """\
Replace the master key and re-encrypt the store with it.

When the key comes from a key file (credentials.master_key_file or
--key-file), the file is rewritten in place: first [new, old], then the store
is re-encrypted, then [new]; a crash at any point leaves a file that opens
the store.

When the key comes from $RELAYD_MASTER_KEY or the systemd credential,
relayctl cannot rewrite it: give --new-key-file PATH (a file that does not
exist yet). PATH gets [new, old] (mode 0600), the store is re-encrypted,
then PATH keeps only the new key. Then put PATH's contents where relayd
reads its key and restart relayd.
Without --new-key-file this case exits with status 2.
"""


def _add_secret_commands(subparsers: Subparsers) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--store", type=Path, metavar="PATH", help="credential store file (instead of relay.yaml)")
    where.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help="master key file (instead of credentials.master_key_file); "
        "$CREDENTIALS_DIRECTORY/relayd-master-key and $RELAYD_MASTER_KEY still come first",
    )
    group = subparsers.add_parser(
        "secret",
        help="upstream logins in the encrypted credential store",
        description="Upstream logins in the encrypted credential store. With --store, "
        "relay.yaml is not read.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("set", parents=[where], help="add or replace a login")
    p.add_argument("name", help="credential name, as in `credential:` of a transport")
    p.add_argument("--user", required=True, help="the upstream SMTP user name")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password as one line of stdin even on a terminal",
    )
    p.set_defaults(func=cmd_secret_set)

    p = verbs.add_parser("list", parents=[where], help="names and users (never passwords)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_secret_list)

    p = verbs.add_parser("remove", parents=[where], help="delete a login")
    p.add_argument("name", help="the credential's name")
    p.set_defaults(func=cmd_secret_remove)

    p = verbs.add_parser(
        "rotate-key",
        parents=[where],
        help="replace the master key and re-encrypt",
        description=_ROTATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--new-key-file", type=Path, metavar="PATH", help="write the new key here (must not exist)")
    p.set_defaults(func=cmd_secret_rotate_key)


# ------------------------------------------------------------- key: master keys


def cmd_key_generate(args: argparse.Namespace) -> int:
    key = generate_master_key()
    try:
        write_key_file(args.path, [key], replace=args.force)
    except FileExistsError:
        raise CliError(f"{args.path}: already exists; use --force to replace it") from None
    print(f"wrote a new master key to {args.path} (key id {key_id(key)}, mode 0600)")
    return EXIT_OK


def _add_key_commands(subparsers: Subparsers) -> None:
    group = subparsers.add_parser("key", help="master keys for the credential store")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("generate", help="write a fresh master key file (mode 0600)")
    p.add_argument("path", type=Path, help="the key file to create, e.g. /etc/relayd/master.key")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing file (a store encrypted with the old key is then unreadable)",
    )
    p.set_defaults(func=cmd_key_generate)


# ----------------------------------------------------------- tenant: submitters


def cmd_tenant_hash_password(args: argparse.Namespace) -> int:
    password = read_password(args, "Tenant password: ", confirm=True)
    print(hash_password(password))
    return EXIT_OK


def _add_tenant_commands(subparsers: Subparsers) -> None:
    group = subparsers.add_parser("tenant", help="tenants that submit mail")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser(
        "hash-password",
        help="print the hash of a password, for `password_hash:` in relay.yaml",
    )
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password as one line of stdin even on a terminal",
    )
    p.set_defaults(func=cmd_tenant_hash_password)
    add_tenant_verbs(verbs)


def _add_admin_commands(subparsers: Subparsers) -> None:
    """config check, route test, transport verify (relayd.ops.cli_admin)."""
    add_admin_commands(subparsers)


def _add_queue_commands(subparsers: Subparsers) -> None:
    """queue list/count/summary/show (relayd.ops.cli_queue), then its actions (relayd.ops.cli_queueact)."""
    add_action_verbs(add_queue_commands(subparsers))


# --------------------------------------------------------------------- main

_COMMAND_GROUPS: tuple[Callable[[Subparsers], None], ...] = (
    _add_secret_commands,
    _add_key_commands,
    _add_tenant_commands,
    _add_admin_commands,
    _add_queue_commands,
    add_daemon_commands,  # reload, status, send-test (relayd.ops.cli_daemon)
    add_oauth_commands,  # oauth authorize, oauth status (relayd.ops.cli_oauth)
    add_usage_commands,  # usage (relayd.ops.cli_usage)
    add_webhook_commands,  # webhook secret (relayd.ops.cli_webhook)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Operate the relayd SMTP relay.")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"relay.yaml to read (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )
    subparsers = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for add_commands in _COMMAND_GROUPS:
        add_commands(subparsers)
    describe_subcommands(parser)
    return parser


def describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its one-line help as one, so
    `relayctl VERB --help` says what the verb does, not only its options."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    text = str(helps[name])
                    sub.description = text[0].upper() + text[1:] + "."
                describe_subcommands(sub)


def _describe_os_error(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or type(exc).__name__


def _error(message: str) -> None:
    """One `relayctl: ` line per problem (a config error may list several)."""
    for line in message.splitlines() or [message]:
        print(f"{PROG}: {line}", file=sys.stderr)


def main(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Run one relayctl command; returns the exit status (0 ok, 1 failure, 2 usage)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits after --help or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    args.environ = os.environ if environ is None else environ
    args.stdin = sys.stdin if stdin is None else stdin
    try:
        return int(args.func(args))
    except CliError as exc:
        _error(exc.message)
        return exc.code
    except UnicodeError as exc:  # its text quotes the bytes at fault: keep them out
        _error(f"cannot {'decode' if isinstance(exc, UnicodeDecodeError) else 'encode'} text")
        return EXIT_FAILURE
    except (CredentialError, ValueError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except OSError as exc:
        _error(_describe_os_error(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_FAILURE
    except Exception as exc:  # a bug; its text could hold anything, so only the type
        _error(f"internal error ({type(exc).__name__}); please report it")
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
