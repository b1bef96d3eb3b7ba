"""What every relayctl and mailq command shares: exit codes, errors, config and password input, output.

Takes: the parsed argument namespace (`args.config`, `args.environ`,
`args.stdin`, set up by `relayd.ops.cli.main` or `mailq_main`).
Emits: relay.yaml as a frozen RelayConfig, a password read without echo, tables
and JSON on stdout.
Untrusted input: stdin (passwords, bounded to MAX_PASSWORD_LENGTH) and the
config file.
Fails: with CliError (one line, exit status 1) or UsageError (exit status 2);
`relayd.ops.cli.main` prints them. The command modules (relayd.ops.cli,
relayd.ops.cli_admin, relayd.ops.cli_queue) import from here and never from each
other's private names, so there is one CliError class however relayctl is
started (`relayctl` or `python -m relayd.ops.cli`).
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

from relayd.config.loader import ConfigError, load_config
from relayd.config.credentials import CredentialError

if TYPE_CHECKING:
    from relayd.config.model import RelayConfig

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

PROG = "relayctl"
DEFAULT_CONFIG = Path("/etc/relayd/relay.yaml")
CONFIG_ENV = "RELAYD_CONFIG"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
MAX_PASSWORD_LENGTH = 4096  # the credential store's field limit
CONTROL_TIMEOUT = 30.0  # seconds; a reload or a health answer takes well under one


class CliError(Exception):
    """An ordinary failure: `message` is printed as one line, `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


# ------------------------------------------------------------------ helpers


def config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    from_env = args.environ.get(CONFIG_ENV, "")
    return Path(from_env) if from_env else DEFAULT_CONFIG


def load_relay_config(args: argparse.Namespace, *, check_files: bool = False) -> RelayConfig:
    """relay.yaml, parsed; a broken config becomes one `relay.yaml:LINE:COL: ...` line."""
    path = config_path(args)
    try:
        return load_config(path, check_files=check_files)
    except ConfigError as exc:
        raise CliError(str(exc) + dev_config_hint(path)) from None


DEV_CONFIG = Path(".relayd-dev") / "relay.yaml"  # where `relayd dev` (scripts/dev) keeps its config


def dev_config_hint(path: Path) -> str:
    """When the default config is missing but a dev relay's is here, say how to use it."""
    if path != DEFAULT_CONFIG or path.exists() or not DEV_CONFIG.exists():
        return ""
    return (f"\n(the development relay's config is {DEV_CONFIG.resolve()}: "
            f"export {CONFIG_ENV}={DEV_CONFIG.resolve()}, or give --config)")


def read_password(args: argparse.Namespace, prompt: str, *, confirm: bool) -> str:
    """A password from a no-echo prompt on a terminal, else one line of stdin."""
    stdin: TextIO | None = args.stdin
    if stdin is None:
        raise CliError("no stdin to read the password from")
    from_stdin = bool(getattr(args, "password_stdin", False))
    at_end = False
    if from_stdin or not stdin.isatty():
        password, at_end = _read_password_line(stdin)
    else:
        password = _prompt_password(prompt, confirm=confirm)
    if at_end and not from_stdin:  # nothing at all on stdin, and no terminal to ask on
        raise CliError("no password given: there is no terminal to ask on; pipe it in with "
                       f"--password-stdin (e.g. printf '%s\\n' \"$SMTP_PASSWORD\" | {PROG} ... --password-stdin)")
    if not password:
        raise CliError("refusing an empty password")
    return password


def _read_password_line(stdin: TextIO) -> tuple[str, bool]:
    """One line of stdin without its line end, and whether stdin was already at its end."""
    try:
        line = stdin.readline(MAX_PASSWORD_LENGTH + 2)
    except UnicodeDecodeError:
        raise CliError("the password on stdin is not valid UTF-8") from None
    password = line.removesuffix("\n").removesuffix("\r")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise CliError(f"the password is longer than {MAX_PASSWORD_LENGTH} characters")
    return password, line == ""


def _prompt_password(prompt: str, *, confirm: bool) -> str:
    try:
        password = getpass.getpass(prompt)
        if confirm and password and getpass.getpass("Repeat it: ") != password:
            raise CliError("the two passwords differ")
    except EOFError:
        raise CliError("no password given") from None
    return password


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def audit_failure(exc: BaseException) -> str:
    """The sentence main() prints for a failure, for the audit log; none holds a secret."""
    if isinstance(exc, CliError):
        return exc.message.splitlines()[0]
    if isinstance(exc, (CredentialError, ValueError)) and str(exc):
        return str(exc).splitlines()[0]
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
