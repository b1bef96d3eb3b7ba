"""relayd-sendmail's command line: sendmail's flags read into `Options`.

Takes: the arguments as given (flags may be bundled: -ti, -fme@x; -o and -b
modes; `--` ends the flags).
Emits: a frozen `Options`; the exit codes (`Exit`, sysexits.h) and the one
`Failure` every part of relayd-sendmail raises to stop.
Untrusted input: every argument; the recipient count is capped before any
work is done (MAX_ARGUMENT_RECIPIENTS).
Fails: with `Failure(Exit.USAGE, sentence)` for anything sendmail would not
take or relayd-sendmail does not support (-bs, -bd and other modes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypedDict

PROG = "relayd-sendmail"
DEFAULT_CONFIG = Path("/etc/relayd/relay.yaml")
CONFIG_ENV = "RELAYD_CONFIG"
DEFAULT_SOCKET = Path("/run/relayd/submit.sock")
SOCKET_ENV = "RELAYD_SUBMIT_SOCKET"
MAX_ARGUMENT_RECIPIENTS = 10_000  # the largest recipient limit relay.yaml accepts


class Exit(enum.IntEnum):
    """sysexits.h, as sendmail uses them."""

    OK = 0
    USAGE = 64  # bad command line
    DATAERR = 65  # the message itself is unacceptable (size, content, addresses)
    NOUSER = 67  # a recipient was refused permanently
    UNAVAILABLE = 69  # relayd refused for another permanent reason
    SOFTWARE = 70  # a bug here
    PROTOCOL = 76  # relayd answered something SMTP does not allow at that point
    NOPERM = 77  # the tenant may not send this (sender or header From: not allowed)
    TEMPFAIL = 75  # relayd unreachable, or a 4xx answer: try again later
    CONFIG = 78  # relay.yaml unusable for local submission


class Failure(Exception):
    """Stops the run: `message` goes to stderr as one line, `code` is the exit status."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def usage_error(message: str) -> Failure:
    return Failure(Exit.USAGE, message)


USAGE = f"""usage: {PROG} [-t] [-i] [-f sender] [-F "Full Name"] [-v] [--socket PATH] [--config relay.yaml] [--]
                       [recipient ...]
Reads one message from standard input and queues it in the running relayd.
  -t              also send to the To:, Cc: and Bcc: addresses of the message (Bcc: is removed)
  -i, -oi         a line with a single dot does not end the message
  -f ADDR, -r ADDR  envelope sender (default: the From: address, else user@hostname)
  -F NAME         full name for the From: header added when the message has none
  -v              say on stderr what happens
  --socket PATH   relayd's unix listener (default: ${SOCKET_ENV}, else the one in relay.yaml, else {DEFAULT_SOCKET});
                  a relay.yaml without one is reached from the address of a tenant with bind_addresses
  --config PATH   relay.yaml (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG}); also -C PATH
Accepted and ignored: -m -n -U -oem -oee -oep -oeq -oew -odb -odi -odq -odf -oQ... -om -oo -B TYPE -N DSN -R RET -V ENVID -h N -bm
Exit status (sysexits): 0 queued, 64 usage, 65 bad message, 67 recipient refused, 69 refused,
  75 relayd unreachable or busy (try again), 76 protocol, 77 sender or local user not allowed,
  78 configuration.
"""


# ----------------------------------------------------------------- the command line


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    extract_recipients: bool = False  # -t
    dot_ends_input: bool = True  # a lone "." line ends the message unless -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    config: Path | None = None  # --config / -C
    socket: Path | None = None  # --socket
    recipients: tuple[str, ...] = ()
    show_help: bool = False


class OptionFields(TypedDict, total=False):
    """The `Options` fields the flags set, gathered while reading them."""

    extract_recipients: bool
    dot_ends_input: bool
    sender: str
    full_name: str
    verbose: bool
    config: Path
    socket: Path
    show_help: bool


# Flags that take no value and change nothing here (-m "me too", -n no aliasing,
# -U initial submission): sendmail callers pass them habitually.
_IGNORED_FLAGS = frozenset("mnU")
# Flags whose value is accepted and ignored: body type, DSN notify/return,
# envelope id, hop count. relayd does not carry DSN requests upstream.
_IGNORED_WITH_VALUE = frozenset("BNRVh")
_VALUE_FLAGS = frozenset("fFrC") | _IGNORED_WITH_VALUE


def _apply_o(option: str, opts: OptionFields) -> None:
    """-oX options: -oi means -i; error, delivery and queue modes are meaningless here."""
    if option in ("i", "itrue"):
        opts["dot_ends_input"] = False
    elif option == "ifalse":
        opts["dot_ends_input"] = True
    elif option[:1] in ("e", "d", "Q") or option in ("m", "o"):
        return  # -oem/-oee/..., -odb/-odi/..., -oQdir, -om, -oo: accepted, like Exim
    else:
        raise usage_error(f"-o{option}: unsupported option")


def _refuse_mode(mode: str) -> Failure:
    if mode == "p":
        return usage_error("-bp: the queue is relayd's; list it with `relayctl queue list` or `mailq`")
    if mode == "s":
        return usage_error("-bs: SMTP on standard input is not supported; connect to relayd's listener instead")
    return usage_error(
        f"-b{mode}: unsupported mode; {PROG} only submits a message read from standard input"
    )


def parse_arguments(argv: Sequence[str]) -> Options:
    """sendmail's getopt-style command line (flags may be bundled: -ti, -fme@x)."""
    opts: OptionFields = {}
    recipients: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            recipients.extend(args[i:])
            break
        if arg.startswith("--"):
            i = _long_option(arg, args, i, opts)
            continue
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
            continue
        i = _short_cluster(arg, args, i, opts)
    if len(recipients) > MAX_ARGUMENT_RECIPIENTS:
        raise usage_error(f"more than {MAX_ARGUMENT_RECIPIENTS} recipients")
    return Options(recipients=tuple(recipients), **opts)


def _long_option(arg: str, args: list[str], i: int, opts: OptionFields) -> int:
    name, eq, value = arg[2:].partition("=")
    if name == "help":
        opts["show_help"] = True
        return i
    if name not in ("config", "socket"):
        raise usage_error(f"{arg}: unknown option (see --help)")
    if not eq:
        if i >= len(args):
            raise usage_error(f"--{name} needs a path")
        value, i = args[i], i + 1
    if name == "config":
        opts["config"] = Path(value)
    else:
        opts["socket"] = Path(value)
    return i


def _short_cluster(arg: str, args: list[str], i: int, opts: OptionFields) -> int:
    """One `-xyz` word; returns the index of the next word."""
    j = 1
    while j < len(arg):
        flag = arg[j]
        j += 1
        if flag == "t":
            opts["extract_recipients"] = True
        elif flag == "i":
            opts["dot_ends_input"] = False
        elif flag == "v":
            opts["verbose"] = True
        elif flag in _IGNORED_FLAGS:
            pass
        elif flag in _VALUE_FLAGS or flag == "o":
            value = arg[j:]
            if not value:
                if i >= len(args):
                    raise usage_error(f"-{flag} needs a value")
                value, i = args[i], i + 1
            _apply_value(flag, value, opts)
            return i
        elif flag == "b":
            if arg[j:] != "m":
                raise _refuse_mode(arg[j:])
            return i
        elif flag == "q":
            raise usage_error("-q: relayd runs its queue itself; use `relayctl queue flush` to retry now")
        elif flag == "I":
            raise usage_error("-I: relayd has no alias database")
        else:
            raise usage_error(f"-{flag}: unknown option (see --help)")
    return i


def _apply_value(flag: str, value: str, opts: OptionFields) -> None:
    if flag in ("f", "r"):
        opts["sender"] = value
    elif flag == "F":
        opts["full_name"] = value
    elif flag == "C":
        opts["config"] = Path(value)
    elif flag == "o":
        _apply_o(value, opts)
    # else: a flag in _IGNORED_WITH_VALUE

