"""The generic checks every relay.yaml section uses: shape, text, numbers with bounds, sizes, durations.

Takes: `Node`s of relay.yaml (relayd.config.yamltree), untrusted in type and
value. Emits: plain Python values, or None after recording a `ConfigProblem`.
Fails: never raises for bad input; every getter reports and falls back to a
default so checking carries on and finds the next problem. Messages never
repeat the value of a key that may hold a secret.

`FieldReader` is the base of the section readers (listeners, transports,
tenants); a new section is a class of its own built on it.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import os
import re
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from relayd.config import bounds
from relayd.config.model import TlsMode
from relayd.config.retry import RetrySchedule, RetrySyntaxError, parse_duration, parse_retry_schedule
from relayd.config.yamltree import ConfigProblem, Map, Node, Pos, Scalar, Seq, is_broken, is_null
from relayd.netaddr import is_loopback

T = TypeVar("T")
D = TypeVar("D")

_SECRET_KEYS = frozenset(
    {"password", "pass", "passwd", "api_key", "apikey", "secret", "token", "client_send",
     "smtp_password"}
)
_SECRET_MESSAGE = (
    "plaintext secrets are not allowed in relay.yaml; store it with "
    "`relayctl secret set NAME --user USER` and refer to it with `credential: NAME`"
)

# --------------------------------------------------------------------------- sizes


class SizeSyntaxError(ValueError):
    """A size such as "25M" could not be read; the message says why."""


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmg])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``25M``, ``10MB``, ``512K``, ``1G`` or ``1048576``.

    Units are binary (K = 1024 bytes), as in Exim and Postfix; a trailing B or
    iB is accepted. A bare number is bytes and must be whole.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise SizeSyntaxError(f"{text} is not a size; a size cannot be negative")
        return text
    s = str(text).strip()
    m = _SIZE.fullmatch(s)
    if m is None:
        raise SizeSyntaxError(
            f"'{text}' is not a size; write a number of bytes or a number followed by "
            "K, M or G (e.g. 512K, 25M, 1G)"
        )
    number, unit = m.group(1), (m.group(2) or "").lower()
    if not unit and "." in number:
        raise SizeSyntaxError(f"'{text}' is not a whole number of bytes")
    return int(float(number) * _SIZE_UNITS[unit])


def format_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        size = _SIZE_UNITS[unit.lower()]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --------------------------------------------------------------------------- checks on text

_LABEL = r"[A-Za-z0-9\u0080-\uffff](?:[A-Za-z0-9\u0080-\uffff-]{0,61}[A-Za-z0-9\u0080-\uffff])?"
DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\uffff-]+"
                         r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\uffff-]+)*")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
CREDENTIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")


def ip_address_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _sender_pattern_ok(pattern: str) -> bool:
    if pattern == "*":
        return True  # any sender: meant for the capture-only development default
    local, at, domain = pattern.rpartition("@")
    if not at or len(pattern) > 254:
        return False
    return (local == "*" or (len(local) <= 64 and LOCAL_PART.fullmatch(local) is not None)) and (
        DOMAIN.fullmatch(domain) is not None
    )


def _domain_pattern_ok(pattern: str) -> bool:
    if pattern == "*":
        return True
    bare = pattern[2:] if pattern.startswith("*.") else pattern
    return DOMAIN.fullmatch(bare.rstrip(".")) is not None


def _password_hash_ok(text: str) -> bool:
    """The shape relayd.config.passwords.hash_password writes: scrypt$log2n$r$p$salt$hash."""
    fields = text.split("$")
    return len(fields) == 6 and fields[0] == "scrypt" and all(fields[1:])


def kind(node: Node) -> str:
    """What a node is, in words, for "must be X, but this is Y" messages."""
    if isinstance(node, Map):
        return "a mapping"
    if isinstance(node, Seq):
        return "a list"
    v = node.value
    if v is None:
        return "empty"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "text"
    return f"a {type(v).__name__}"


def suggest(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


Conv = Callable[[Node, str], T | None]


# --------------------------------------------------------------------------- the reader


class FieldReader:
    """Collects problems and turns nodes into values; the section readers build on it.

    Each getter returns a usable value even after reporting a problem (the
    default), so checking carries on and finds the next problem; the caller
    raises if any problem was collected.
    """

    def __init__(self, file: str, base: Path, check_files: bool, *, managed: bool = False,
                 bind_owner: dict[str, str] | None = None) -> None:
        self.file = file
        self.base = base
        self.check_files = check_files
        self.managed = managed  # reading the managed tenants file rather than relay.yaml
        self.transports_file = "relay.yaml"  # where the transports are, for the managed file
        self.problems: list[ConfigProblem] = []
        self._bind_owner: dict[str, str] = {} if bind_owner is None else bind_owner
        self._uid_owner: dict[int, str] = {}

    def add(self, pos: Pos, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, pos.line, pos.col, message))

    # -- shape ---------------------------------------------------------------

    def section(self, m: Map, name: str, keys: Sequence[str]) -> Map | None:
        """The optional top-level mapping `name` with its keys checked; None when absent or not a mapping."""
        node = m.value(name)
        s = self.as_map(node, name) if node is not None else None
        if s is not None:
            self.check_keys(s, keys, name)
        return s

    def as_map(self, node: Node, what: str) -> Map | None:
        if isinstance(node, Map):
            return node
        self.add(node.pos, f"{what} must be a mapping of 'key: value' lines, but this is {kind(node)}")
        return None

    def as_list(self, node: Node, what: str) -> tuple[Node, ...] | None:
        """A list; a single scalar is taken as a list of one (senders: "*@acme.example")."""
        if isinstance(node, Seq):
            return node.items
        if isinstance(node, Scalar) and isinstance(node.value, str):
            return (node,)
        self.add(node.pos, f"{what} must be a list, but this is {kind(node)}")
        return None

    def check_keys(self, m: Map, allowed: Sequence[str], where: str) -> None:
        for e in m.entries:
            if e.key in allowed or e.key.lower() in _SECRET_KEYS:
                continue  # secrets are reported by scan_secrets, wherever they are
            guess = suggest(e.key, allowed)
            hint = f"did you mean '{guess}'?" if guess else "allowed keys are " + ", ".join(allowed)
            self.add(e.key_pos, f"unknown key '{e.key}' in {where}; {hint}")

    def scan_secrets(self, node: Node, under_tenants: bool = False,
                     seen: set[int] | None = None) -> None:
        """Report every password-like key anywhere, without repeating its value."""
        seen = set() if seen is None else seen
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Seq):
            for item in node.items:
                self.scan_secrets(item, under_tenants, seen)
        elif isinstance(node, Map):
            for e in node.entries:
                if e.key.lower() in _SECRET_KEYS:
                    hint = ""
                    if under_tenants:
                        hint = (" (a tenant's own login belongs in password_hash, set with "
                                "`relayctl tenant passwd`)")
                    self.add(e.key_pos, f"'{e.key}': {_SECRET_MESSAGE}{hint}")
                self.scan_secrets(e.value, under_tenants or e.key == "tenants", seen)

    def get(self, m: Map, key: str, conv: Conv[T], default: D) -> T | D:
        node = m.value(key)
        if node is None or is_broken(node):
            return default
        value = conv(node, key)
        return default if value is None else value

    def need(self, m: Map, key: str, conv: Conv[T], default: D, hint: str = "") -> T | D:
        e = m.entry(key)
        if e is None:
            self.add(m.pos, f"required key '{key}' is missing{hint}")
            return default
        if is_broken(e.value):
            return default
        if is_null(e.value):
            self.add(e.key_pos, f"'{key}' is empty; it needs a value{hint}")
            return default
        value = conv(e.value, key)
        return default if value is None else value

    # -- scalar converters: (node, key) -> value, or None after reporting ----

    def text(self, node: Node, key: str) -> str | None:
        if isinstance(node, Scalar) and isinstance(node.value, str) and node.value.strip():
            return node.value.strip()
        if isinstance(node, Scalar) and isinstance(node.value, str):
            self.add(node.pos, f"{key} must not be empty")
        else:
            self.add(node.pos, f"{key} must be text, but this is {kind(node)}")
        return None

    def boolean(self, node: Node, key: str) -> bool | None:
        if isinstance(node, Scalar) and isinstance(node.value, bool):
            return node.value
        self.add(node.pos, f"{key} must be true or false, but this is {kind(node)}")
        return None

    def integer(self, bounds: tuple[int, int]) -> Conv[int]:
        lo, hi = bounds

        def conv(node: Node, key: str) -> int | None:
            v = node.value if isinstance(node, Scalar) else None
            if not isinstance(v, int) or isinstance(v, bool):
                self.add(node.pos, f"{key} must be a whole number, but this is {kind(node)}")
                return None
            if isinstance(node, Scalar) and not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", node.raw):
                # YAML 1.1 reads 0465 as octal 309 and 1:30 as 90; say so rather than guess.
                self.add(node.pos, f"write {key} as a plain decimal number; YAML reads "
                                   f"'{node.raw}' as {v}")
                return None
            if not lo <= v <= hi:
                self.add(node.pos, f"{key} must be from {lo} to {hi}; {v} is out of range")
                return None
            return v

        return conv

    def size(self, bounds: tuple[int, int]) -> Conv[int]:
        lo, hi = bounds

        def conv(node: Node, key: str) -> int | None:
            v = node.value if isinstance(node, Scalar) else None
            if not isinstance(node, Scalar) or not isinstance(v, (str, int)) or isinstance(v, bool):
                self.add(node.pos, f"{key} must be a size such as 25M, but this is {kind(node)}")
                return None
            try:
                # The text as written: YAML would read 0512 as an octal number.
                n = parse_size(v if isinstance(v, str) else node.raw)
            except SizeSyntaxError as exc:
                self.add(node.pos, f"{key}: {exc}")
                return None
            if not lo <= n <= hi:
                self.add(node.pos, f"{key} must be from {format_size(lo)} to {format_size(hi)}; "
                                   f"{v} is out of range")
                return None
            return n

        return conv

    def duration(self, bounds: tuple[float, float]) -> Conv[float]:
        lo, hi = bounds

        def conv(node: Node, key: str) -> float | None:
            v = node.value if isinstance(node, Scalar) else None
            if not isinstance(node, Scalar) or not isinstance(v, (str, int, float)) or isinstance(v, bool):
                self.add(node.pos, f"{key} must be a duration such as 30s or 5m, but this is {kind(node)}")
                return None
            try:
                seconds = parse_duration(v if isinstance(v, str) else node.raw)
            except RetrySyntaxError as exc:
                self.add(node.pos, f"{key}: {exc}")
                return None
            if not lo <= seconds <= hi:
                self.add(node.pos, f"{key} must be from {format_seconds(lo)} to "
                                   f"{format_seconds(hi)}; {v} is out of range")
                return None
            return seconds

        return conv

    def schedule(self, node: Node, key: str) -> RetrySchedule | None:
        v = node.value if isinstance(node, Scalar) else None
        if not isinstance(v, str):
            self.add(node.pos, f"{key} must be a retry schedule such as \"F,2h,15m; F,4d,6h\", "
                               f"but this is {kind(node)}")
            return None
        try:
            return parse_retry_schedule(v)
        except RetrySyntaxError as exc:
            self.add(node.pos, f"{key}: {exc}")
            return None

    def choice(self, enum_type: type[enum.Enum]) -> Conv[enum.Enum]:
        allowed = [str(m.value) for m in enum_type]

        def conv(node: Node, key: str) -> enum.Enum | None:
            v = node.value if isinstance(node, Scalar) else None
            if isinstance(v, str) and v.strip().lower() in allowed:
                return enum_type(v.strip().lower())
            shown = f"'{v}'" if isinstance(v, str) else kind(node)
            self.add(node.pos, f"{key} must be one of {', '.join(allowed)}; {shown} is not")
            return None

        return conv

    def tls_mode(self, node: Node, key: str) -> TlsMode | None:
        mode = self.choice(TlsMode)(node, key)
        return mode if isinstance(mode, TlsMode) else None

    def path(self, node: Node, key: str) -> Path | None:
        s = self.text(node, key)
        if s is None:
            return None
        if s.startswith("~"):
            self.add(node.pos, f"{key}: '~' is not expanded; write the full path")
            return None
        return Path(os.path.normpath(self.base / s))

    def existing_file(self, node: Node, key: str) -> Path | None:
        p = self.path(node, key)
        if p is None or not self.check_files:
            return p
        if not p.exists():
            self.add(node.pos, f"{key}: {p} does not exist")
            return None
        if p.is_dir():
            self.add(node.pos, f"{key}: {p} is a directory, not a file")
            return None
        return p

    def ip_literal(self, node: Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if ip_address_of(s) is None:
            self.add(node.pos, f"{key} must be an IP address such as 127.0.0.1 or ::1; "
                               f"'{s}' is not (host names are not looked up here)")
            return None
        return s

    def hostname(self, node: Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if HOSTNAME.fullmatch(s.rstrip(".")) is None:
            self.add(node.pos, f"{key} must be a host name such as relay.example.com; '{s}' is not")
            return None
        return s

    def host(self, node: Node, key: str) -> str | None:
        """A host to connect to: a host name or an IP literal."""
        s = self.text(node, key)
        if s is None:
            return None
        if ip_address_of(s) is None and HOSTNAME.fullmatch(s.rstrip(".")) is None:
            self.add(node.pos, f"{key} must be a host name or an IP address; '{s}' is neither")
            return None
        return s

    def credential_name(self, node: Node, key: str) -> str | None:
        # The value is never repeated: a password pasted here by mistake stays out of logs.
        v = node.value if isinstance(node, Scalar) else None
        if isinstance(v, str) and CREDENTIAL.fullmatch(v.strip()):
            return v.strip()
        self.add(node.pos, f"{key} must be the name of a stored credential (letters, digits and "
                           "_ . @ + -), as given to `relayctl secret set NAME`")
        return None

    def password_hash(self, node: Node, key: str) -> str | None:
        # Not repeated either: it may be a plaintext password written in the wrong place.
        v = node.value if isinstance(node, Scalar) else None
        if isinstance(v, str) and _password_hash_ok(v.strip()):
            return v.strip()
        self.add(node.pos, f"{key} must have the form scrypt$<log2n>$<r>$<p>$<salt>$<hash>, as "
                           "written by `relayctl tenant passwd`; this value does not (it is not "
                           "shown here in case it is a password)")
        return None

    def text_list(self, item: Callable[[Node, str], str | None], what: str) -> Conv[tuple[str, ...]]:
        def conv(node: Node, key: str) -> tuple[str, ...] | None:
            items = self.as_list(node, key)
            if items is None:
                return None
            if not items:
                self.add(node.pos, f"{key} must list at least one {what}")
                return None
            values = [item(i, key) for i in items]
            good = tuple(v for v in values if v is not None)
            return good if len(good) == len(values) else None

        return conv

    def sender_pattern(self, node: Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if not _sender_pattern_ok(s):
            self.add(node.pos, f"'{s}' is not a sender pattern; write an address (billing@acme.example) "
                               "or *@domain (*@acme.example)")
            return None
        return s

    def domain_pattern(self, node: Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if not _domain_pattern_ok(s):
            self.add(node.pos, f"'{s}' is not a domain pattern; write a domain (example.com), "
                               "*.example.com for its subdomains, or * for every domain")
            return None
        return s.lower()

    def loopback(self, node: Node, key: str) -> str | None:
        s = self.ip_literal(node, key)
        if s is None:
            return None
        if not is_loopback(s):
            self.add(node.pos, f"{s} is not a loopback address; only 127.0.0.0/8 and ::1 may stand "
                               "in for a login, because other addresses can be reached from the network")
            return None
        return s

    # -- names and positions ------------------------------------------------

    def pos_of(self, m: Map, key: str) -> Pos:
        """Where `key`'s value is, or the mapping itself when the key was left out."""
        e = m.entry(key)
        return e.value.pos if e is not None else m.pos

    def name(self, what: str) -> Conv[str]:
        def conv(node: Node, key: str) -> str | None:
            s = self.text(node, key)
            if s is not None and NAME.fullmatch(s) is None:
                self.add(node.pos, f"{what} name '{s}' may only hold letters, digits, _ . - "
                                   "(at most 64, starting with a letter or digit)")
                return None
            return s

        return conv

    def system_id(self, node: Node, key: str, lookup: Callable[[str], int], what: str, command: str,
                  advice: str) -> int | None:
        """A uid or gid written as a number, or a name `lookup` resolves on this machine."""
        v = node.value if isinstance(node, Scalar) else None
        if isinstance(v, int) and not isinstance(v, bool):
            return self.integer(bounds.UID)(node, key)
        name = self.text(node, key)
        if name is None:
            return None
        try:
            return lookup(name)
        except KeyError:
            self.add(node.pos, f"{key}: there is no {what} '{name}' on this machine ({command}); write {advice}")
            return None
