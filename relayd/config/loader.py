"""Reads relay.yaml once into the frozen `RelayConfig`, or says everything wrong with it.

Takes: the path of relay.yaml. Its author is the operator, but its shape, size
and values are untrusted: anything may be misspelt, mistyped, duplicated or out
of range, and a plaintext password may have been pasted in by habit.
Emits: a `RelayConfig` (relayd.config.model), or raises `ConfigError` carrying every
`ConfigProblem` found, sorted by position, each printed as
``relay.yaml:LINE:COL: sentence``. Nothing is half-applied: a reload either gets
a whole new config or an error.
How it fails: a YAML syntax error stops at once (there is no document to check);
otherwise every key is checked and all problems are collected. Messages never
repeat the value of a key that may hold a secret (password-like keys,
`password_hash`, `credential`).

Tenants come from two places: relay.yaml's `tenants:` section, which only the
operator edits, and the managed tenants file (`tenants_file:`, default
tenants.yaml beside the credential store), which `relayctl tenant` rewrites.
Both use the same schema and are merged; a name defined in both is an error
naming both places, and the managed file's problems carry its own name.

The YAML is composed into nodes rather than loaded, so every key and value keeps
its line and column, and a duplicate key is an error instead of pyyaml's silent
"last one wins". Relative paths are resolved against the YAML file's directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import grp
import ipaddress
import os
import pwd
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Sequence, TypeVar, Union

import yaml  # type: ignore[import-untyped]  # pyyaml ships no type hints

from relayd.config.webhookconfig import (
    WEBHOOK_KIND_PATTERN,
    LogFormat,
    WebhookEndpoint,
    WebhooksConfig,
)
from relayd.config.model import (
    UPSTREAM_AUTH_MECHANISMS,
    CaptureTransportConfig,
    CredentialsConfig,
    DeliveryConfig,
    ListenerConfig,
    MetricsConfig,
    RelayConfig,
    RouteRule,
    SmtpTransportConfig,
    SpoolLimits,
    TenantConfig,
    TlsFiles,
    TlsMode,
    TransportConfig,
)
from relayd.config.presets import PROVIDER_PRESETS, PresetError, resolve_preset
from relayd.config.retry import (
    DEFAULT_RETRY,
    RetrySchedule,
    RetrySyntaxError,
    parse_duration,
    parse_retry_schedule,
)

T = TypeVar("T")
D = TypeVar("D")

# A relay.yaml for thousands of tenants stays far below this; a bigger file is a mistake.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Deeper nesting than this only comes from a self-referencing YAML alias.
_MAX_DEPTH = 40

_SECRET_KEYS = frozenset(
    {"password", "pass", "passwd", "api_key", "apikey", "secret", "token", "client_send",
     "smtp_password"}
)
_SECRET_MESSAGE = (
    "plaintext secrets are not allowed in relay.yaml; store it with "
    "`relayctl secret set NAME --user USER` and refer to it with `credential: NAME`"
)

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the file, at a 1-based line and column (0: the whole file)."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        if self.line <= 0:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """relay.yaml could not be used; `problems` lists every reason, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


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


def _format_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        size = _SIZE_UNITS[unit.lower()]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --------------------------------------------------------------------------- YAML tree
# The composed YAML becomes a tiny tree of our own: each node and each mapping
# key keeps its 1-based position.


@dataclass(frozen=True, slots=True)
class _Pos:
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class _Scalar:
    value: object  # str, int, float, bool, None, or another YAML scalar type
    pos: _Pos
    raw: str = ""  # the text as written, before YAML resolved its type
    broken: bool = False  # could not be read; already reported, so not checked again


@dataclass(frozen=True, slots=True)
class _Seq:
    items: tuple[_Node, ...]
    pos: _Pos


@dataclass(frozen=True, slots=True)
class _Entry:
    key: str
    key_pos: _Pos
    value: _Node


@dataclass(frozen=True, slots=True)
class _Map:
    entries: tuple[_Entry, ...]
    pos: _Pos

    def entry(self, key: str) -> _Entry | None:
        for e in self.entries:
            if e.key == key:
                return e
        return None

    def value(self, key: str) -> _Node | None:
        """The value under `key`; None when the key is absent or its value is null."""
        e = self.entry(key)
        if e is None or _is_null(e.value):
            return None
        return e.value


_Node = Union[_Scalar, _Seq, _Map]


def _is_null(node: _Node) -> bool:
    return isinstance(node, _Scalar) and node.value is None and not node.broken


def _is_broken(node: _Node) -> bool:
    return isinstance(node, _Scalar) and node.broken


def _pos(mark: yaml.Mark | None) -> _Pos:
    if mark is None:
        return _Pos(1, 1)
    return _Pos(mark.line + 1, mark.column + 1)


class _TreeBuilder:
    """Turns composed pyyaml nodes into `_Node`s, reporting duplicate and odd keys."""

    def __init__(self, report: Callable[[_Pos, str], None]) -> None:
        self._report = report
        self._constructor = yaml.constructor.SafeConstructor()
        # An alias refers to the same composed node; converting it once keeps
        # "billion laughs" documents linear.
        self._done: dict[int, _Node] = {}

    def build(self, node: yaml.Node, depth: int = 0) -> _Node:
        here = _pos(node.start_mark)
        if depth > _MAX_DEPTH:
            self._report(here, f"nesting is deeper than {_MAX_DEPTH} levels (a self-referencing alias?)")
            return _Scalar(None, here)
        known = self._done.get(id(node))
        if known is not None:
            return known
        built: _Node
        if isinstance(node, yaml.MappingNode):
            built = _Map(tuple(self._entries(node, depth)), here)
        elif isinstance(node, yaml.SequenceNode):
            built = _Seq(tuple(self.build(n, depth + 1) for n in node.value), here)
        else:
            built = self._scalar(node, here)
        self._done[id(node)] = built
        return built

    def _scalar(self, node: yaml.Node, here: _Pos) -> _Scalar:
        try:
            return _Scalar(self._constructor.construct_object(node, deep=True), here, str(node.value))
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            # An explicit tag that does not fit the text (!!int abc) or an unknown tag.
            # The text itself is not repeated: it could be a secret.
            problem = getattr(exc, "problem", None) or f"this value cannot be read as {node.tag}"
            self._report(here, str(problem))
            return _Scalar(None, here, "", broken=True)

    def _entries(self, node: yaml.MappingNode, depth: int) -> Iterator[_Entry]:
        seen: dict[str, _Pos] = {}
        for key_node, value_node in node.value:
            key_pos = _pos(key_node.start_mark)
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._report(key_pos, "merge keys (<<) are not supported here; write the keys out")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._report(key_pos, "a key must be a plain name, not a list or a mapping")
                continue
            key = str(key_node.value)
            if key in seen:
                first = seen[key]
                self._report(
                    key_pos,
                    f"duplicate key '{key}'; it is already set at line {first.line}, "
                    "and only one value can apply",
                )
                continue
            seen[key] = key_pos
            yield _Entry(key, key_pos, self.build(value_node, depth + 1))


# --------------------------------------------------------------------------- checks on text

_LABEL = r"[A-Za-z0-9\u0080-\uffff](?:[A-Za-z0-9\u0080-\uffff-]{0,61}[A-Za-z0-9\u0080-\uffff])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\uffff-]+"
                         r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\uffff-]+)*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
_CREDENTIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_loopback(text: str) -> bool:
    ip = _ip(text)
    return ip is not None and ip.is_loopback


def _sender_pattern_ok(pattern: str) -> bool:
    if pattern == "*":
        return True  # any sender: meant for the capture-only development default
    local, at, domain = pattern.rpartition("@")
    if not at or len(pattern) > 254:
        return False
    return (local == "*" or (len(local) <= 64 and _LOCAL_PART.fullmatch(local) is not None)) and (
        _DOMAIN.fullmatch(domain) is not None
    )


def _domain_pattern_ok(pattern: str) -> bool:
    if pattern == "*":
        return True
    bare = pattern[2:] if pattern.startswith("*.") else pattern
    return _DOMAIN.fullmatch(bare.rstrip(".")) is not None


def _password_hash_ok(text: str) -> bool:
    """The shape relayd.config.passwords.hash_password writes: scrypt$log2n$r$p$salt$hash."""
    fields = text.split("$")
    return len(fields) == 6 and fields[0] == "scrypt" and all(fields[1:])


def _kind(node: _Node) -> str:
    """What a node is, in words, for "must be X, but this is Y" messages."""
    if isinstance(node, _Map):
        return "a mapping"
    if isinstance(node, _Seq):
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


def _suggest(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


# --------------------------------------------------------------------------- keys per section

_TOP_KEYS = ("version", "hostname", "spool_dir", "log_file", "pid_file", "control_socket", "tls",
             "credentials", "retry", "delivery", "metrics", "listeners", "transports", "tenants",
             "tenants_file", "audit_log", "spool_limits", "log_format", "json_log_file", "webhooks")
_MANAGED_TOP_KEYS = ("version", "tenants")
_TLS_KEYS = ("cert", "key")
_CREDENTIALS_KEYS = ("store", "master_key_file")
_DELIVERY_KEYS = ("max_parallel", "queue_run_interval", "shutdown_grace")
_METRICS_KEYS = ("address", "port")
_SPOOL_LIMITS_KEYS = ("min_free", "tenant_max_bytes", "tenant_max_messages")
_LISTENER_KEYS = ("name", "address", "port", "tls", "allow_plaintext_auth", "max_message_size",
                  "max_recipients", "command_timeout", "data_timeout", "max_line_length",
                  "max_header_size", "max_received_headers",
                  "auth_failures_before_delay", "auth_failures_before_disconnect",
                  "auth_failure_window", "max_connections", "max_connections_per_ip",
                  "per_ip_limit_on_loopback", "max_commands_before_auth", "hard_error_limit",
                  "min_data_rate", "auth_failures_per_source", "auth_lockout",
                  "auth_lockout_max", "unix", "mode", "group")
# What a Unix-socket listener cannot have: it has no address, and nothing crosses a wire.
_NETWORK_ONLY_KEYS = ("address", "port", "tls", "allow_plaintext_auth")
_SMTP_KEYS = ("type", "preset", "host", "port", "tls", "credential", "verify_certificate",
              "ca_file", "helo_name", "connect_timeout", "command_timeout", "retry",
              "max_connections", "max_messages_per_connection", "idle_timeout", "region",
              "max_parallel", "auth_mechanism")
_CAPTURE_KEYS = ("type", "maildir", "retry", "max_parallel")
_TENANT_KEYS = ("password_hash", "senders", "bind_addresses", "trust_every_local_user",
                "local_users", "max_recipients", "max_message_size", "enabled", "routes")
_ROUTE_KEYS = ("name", "domains", "via")
_WEBHOOKS_KEYS = ("endpoints", "outbox_dir", "max_pending", "retry_min", "retry_max")
_ENDPOINT_KEYS = ("name", "url", "credential", "events", "tenant", "timeout", "max_in_flight", "ca_file")

# Bounds: (minimum, maximum). Each is repeated in the comments of config/relay.yaml.
_PORT = (1, 65535)
_RECIPIENTS = (1, 10000)
_MESSAGE_SIZE = (1024, 1024**3)  # 1K-1G
_TIMEOUT = (1.0, 3600.0)  # 1s-1h
_LINE_LENGTH = (998, 65536)  # RFC 5322 allows 998; refusing less would refuse valid mail
_HEADER_SIZE = (8 * 1024, 1024**2)  # 8K-1M: enough for real headers, bounded memory per session
_RECEIVED_HEADERS = (10, 1000)  # a message rarely crosses more than a dozen relays
_AUTH_FAILURES = (1, 10000)
_AUTH_WINDOW = (60.0, 86400.0)  # 1m-1d
_CLIENT_CONNECTIONS = (1, 100000)  # descriptors: see relayd.smtp.fdlimit
_COMMANDS_BEFORE_AUTH = (4, 10000)  # EHLO, STARTTLS, EHLO, AUTH
_ERROR_LIMIT = (1, 10000)
_DATA_RATE = (1, 1024**3)  # bytes per second
_AUTH_SOURCE_BUDGET = (1, 100000)
_AUTH_LOCKOUT = (1.0, 86400.0)  # 1s-1d
_UID = (0, 2**32 - 2)  # (uid_t)-1 means "no user"
_PARALLEL = (1, 1000)
_QUEUE_RUN = (1.0, 3600.0)
_SHUTDOWN_GRACE = (0.0, 3600.0)
_CONNECTIONS = (1, 1000)
_MESSAGES_PER_CONNECTION = (1, 100000)
_IDLE = (0.0, 3600.0)  # 0: close the upstream connection after each message
_SPOOL_BYTES = (0, 1024**4)  # 0-1024G
_TENANT_MESSAGES = (1, 10_000_000)
_WEBHOOK_PENDING = (10, 10_000_000)  # events waiting per endpoint before the oldest is dropped
_WEBHOOK_RETRY = (0.1, 86400.0)  # 0.1s-1d
_WEBHOOK_TIMEOUT = (0.5, 300.0)
_WEBHOOK_IN_FLIGHT = (1, 100)
_URL_LENGTH = 2048

Conv = Callable[[_Node, str], T | None]


# --------------------------------------------------------------------------- the reader


class _Reader:
    """Checks the tree section by section, collecting problems and building config values.

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

    def add(self, pos: _Pos, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, pos.line, pos.col, message))

    # -- shape ---------------------------------------------------------------

    def section(self, m: _Map, name: str, keys: Sequence[str]) -> _Map | None:
        """The optional top-level mapping `name` with its keys checked; None when absent or not a mapping."""
        node = m.value(name)
        s = self.as_map(node, name) if node is not None else None
        if s is not None:
            self.check_keys(s, keys, name)
        return s

    def as_map(self, node: _Node, what: str) -> _Map | None:
        if isinstance(node, _Map):
            return node
        self.add(node.pos, f"{what} must be a mapping of 'key: value' lines, but this is {_kind(node)}")
        return None

    def as_list(self, node: _Node, what: str) -> tuple[_Node, ...] | None:
        """A list; a single scalar is taken as a list of one (senders: "*@acme.example")."""
        if isinstance(node, _Seq):
            return node.items
        if isinstance(node, _Scalar) and isinstance(node.value, str):
            return (node,)
        self.add(node.pos, f"{what} must be a list, but this is {_kind(node)}")
        return None

    def check_keys(self, m: _Map, allowed: Sequence[str], where: str) -> None:
        for e in m.entries:
            if e.key in allowed or e.key.lower() in _SECRET_KEYS:
                continue  # secrets are reported by scan_secrets, wherever they are
            guess = _suggest(e.key, allowed)
            hint = f"did you mean '{guess}'?" if guess else "allowed keys are " + ", ".join(allowed)
            self.add(e.key_pos, f"unknown key '{e.key}' in {where}; {hint}")

    def scan_secrets(self, node: _Node, under_tenants: bool = False,
                     seen: set[int] | None = None) -> None:
        """Report every password-like key anywhere, without repeating its value."""
        seen = set() if seen is None else seen
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, _Seq):
            for item in node.items:
                self.scan_secrets(item, under_tenants, seen)
        elif isinstance(node, _Map):
            for e in node.entries:
                if e.key.lower() in _SECRET_KEYS:
                    hint = ""
                    if under_tenants:
                        hint = (" (a tenant's own login belongs in password_hash, set with "
                                "`relayctl tenant passwd`)")
                    self.add(e.key_pos, f"'{e.key}': {_SECRET_MESSAGE}{hint}")
                self.scan_secrets(e.value, under_tenants or e.key == "tenants", seen)

    def get(self, m: _Map, key: str, conv: Conv[T], default: D) -> T | D:
        node = m.value(key)
        if node is None or _is_broken(node):
            return default
        value = conv(node, key)
        return default if value is None else value

    def need(self, m: _Map, key: str, conv: Conv[T], default: D, hint: str = "") -> T | D:
        e = m.entry(key)
        if e is None:
            self.add(m.pos, f"required key '{key}' is missing{hint}")
            return default
        if _is_broken(e.value):
            return default
        if _is_null(e.value):
            self.add(e.key_pos, f"'{key}' is empty; it needs a value{hint}")
            return default
        value = conv(e.value, key)
        return default if value is None else value

    # -- scalar converters: (node, key) -> value, or None after reporting ----

    def text(self, node: _Node, key: str) -> str | None:
        if isinstance(node, _Scalar) and isinstance(node.value, str) and node.value.strip():
            return node.value.strip()
        if isinstance(node, _Scalar) and isinstance(node.value, str):
            self.add(node.pos, f"{key} must not be empty")
        else:
            self.add(node.pos, f"{key} must be text, but this is {_kind(node)}")
        return None

    def boolean(self, node: _Node, key: str) -> bool | None:
        if isinstance(node, _Scalar) and isinstance(node.value, bool):
            return node.value
        self.add(node.pos, f"{key} must be true or false, but this is {_kind(node)}")
        return None

    def integer(self, bounds: tuple[int, int]) -> Conv[int]:
        lo, hi = bounds

        def conv(node: _Node, key: str) -> int | None:
            v = node.value if isinstance(node, _Scalar) else None
            if not isinstance(v, int) or isinstance(v, bool):
                self.add(node.pos, f"{key} must be a whole number, but this is {_kind(node)}")
                return None
            if isinstance(node, _Scalar) and not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", node.raw):
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

        def conv(node: _Node, key: str) -> int | None:
            v = node.value if isinstance(node, _Scalar) else None
            if not isinstance(node, _Scalar) or not isinstance(v, (str, int)) or isinstance(v, bool):
                self.add(node.pos, f"{key} must be a size such as 25M, but this is {_kind(node)}")
                return None
            try:
                # The text as written: YAML would read 0512 as an octal number.
                n = parse_size(v if isinstance(v, str) else node.raw)
            except SizeSyntaxError as exc:
                self.add(node.pos, f"{key}: {exc}")
                return None
            if not lo <= n <= hi:
                self.add(node.pos, f"{key} must be from {_format_size(lo)} to {_format_size(hi)}; "
                                   f"{v} is out of range")
                return None
            return n

        return conv

    def duration(self, bounds: tuple[float, float]) -> Conv[float]:
        lo, hi = bounds

        def conv(node: _Node, key: str) -> float | None:
            v = node.value if isinstance(node, _Scalar) else None
            if not isinstance(node, _Scalar) or not isinstance(v, (str, int, float)) or isinstance(v, bool):
                self.add(node.pos, f"{key} must be a duration such as 30s or 5m, but this is {_kind(node)}")
                return None
            try:
                seconds = parse_duration(v if isinstance(v, str) else node.raw)
            except RetrySyntaxError as exc:
                self.add(node.pos, f"{key}: {exc}")
                return None
            if not lo <= seconds <= hi:
                self.add(node.pos, f"{key} must be from {_format_seconds(lo)} to "
                                   f"{_format_seconds(hi)}; {v} is out of range")
                return None
            return seconds

        return conv

    def schedule(self, node: _Node, key: str) -> RetrySchedule | None:
        v = node.value if isinstance(node, _Scalar) else None
        if not isinstance(v, str):
            self.add(node.pos, f"{key} must be a retry schedule such as \"F,2h,15m; F,4d,6h\", "
                               f"but this is {_kind(node)}")
            return None
        try:
            return parse_retry_schedule(v)
        except RetrySyntaxError as exc:
            self.add(node.pos, f"{key}: {exc}")
            return None

    def choice(self, enum_type: type[enum.Enum]) -> Conv[enum.Enum]:
        allowed = [str(m.value) for m in enum_type]

        def conv(node: _Node, key: str) -> enum.Enum | None:
            v = node.value if isinstance(node, _Scalar) else None
            if isinstance(v, str) and v.strip().lower() in allowed:
                return enum_type(v.strip().lower())
            shown = f"'{v}'" if isinstance(v, str) else _kind(node)
            self.add(node.pos, f"{key} must be one of {', '.join(allowed)}; {shown} is not")
            return None

        return conv

    def auth_mechanism(self, node: _Node, key: str) -> str | None:
        v = node.value if isinstance(node, _Scalar) else None
        if isinstance(v, str) and v.strip().upper() in UPSTREAM_AUTH_MECHANISMS:
            return v.strip().upper()
        shown = f"'{v}'" if isinstance(v, str) else _kind(node)
        allowed = ", ".join(m.lower() for m in UPSTREAM_AUTH_MECHANISMS)
        self.add(node.pos, f"{key} must be one of {allowed}; {shown} is not")
        return None

    def tls_mode(self, node: _Node, key: str) -> TlsMode | None:
        mode = self.choice(TlsMode)(node, key)
        return mode if isinstance(mode, TlsMode) else None

    def path(self, node: _Node, key: str) -> Path | None:
        s = self.text(node, key)
        if s is None:
            return None
        if s.startswith("~"):
            self.add(node.pos, f"{key}: '~' is not expanded; write the full path")
            return None
        return Path(os.path.normpath(self.base / s))

    def existing_file(self, node: _Node, key: str) -> Path | None:
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

    def ip_literal(self, node: _Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if _ip(s) is None:
            self.add(node.pos, f"{key} must be an IP address such as 127.0.0.1 or ::1; "
                               f"'{s}' is not (host names are not looked up here)")
            return None
        return s

    def hostname(self, node: _Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if _HOSTNAME.fullmatch(s.rstrip(".")) is None:
            self.add(node.pos, f"{key} must be a host name such as relay.example.com; '{s}' is not")
            return None
        return s

    def host(self, node: _Node, key: str) -> str | None:
        """A host to connect to: a host name or an IP literal."""
        s = self.text(node, key)
        if s is None:
            return None
        if _ip(s) is None and _HOSTNAME.fullmatch(s.rstrip(".")) is None:
            self.add(node.pos, f"{key} must be a host name or an IP address; '{s}' is neither")
            return None
        return s

    def credential_name(self, node: _Node, key: str) -> str | None:
        # The value is never repeated: a password pasted here by mistake stays out of logs.
        v = node.value if isinstance(node, _Scalar) else None
        if isinstance(v, str) and _CREDENTIAL.fullmatch(v.strip()):
            return v.strip()
        self.add(node.pos, f"{key} must be the name of a stored credential (letters, digits and "
                           "_ . @ + -), as given to `relayctl secret set NAME`")
        return None

    def password_hash(self, node: _Node, key: str) -> str | None:
        # Not repeated either: it may be a plaintext password written in the wrong place.
        v = node.value if isinstance(node, _Scalar) else None
        if isinstance(v, str) and _password_hash_ok(v.strip()):
            return v.strip()
        self.add(node.pos, f"{key} must have the form scrypt$<log2n>$<r>$<p>$<salt>$<hash>, as "
                           "written by `relayctl tenant passwd`; this value does not (it is not "
                           "shown here in case it is a password)")
        return None

    def text_list(self, item: Callable[[_Node, str], str | None], what: str) -> Conv[tuple[str, ...]]:
        def conv(node: _Node, key: str) -> tuple[str, ...] | None:
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

    def sender_pattern(self, node: _Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if not _sender_pattern_ok(s):
            self.add(node.pos, f"'{s}' is not a sender pattern; write an address (billing@acme.example) "
                               "or *@domain (*@acme.example)")
            return None
        return s

    def domain_pattern(self, node: _Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if not _domain_pattern_ok(s):
            self.add(node.pos, f"'{s}' is not a domain pattern; write a domain (example.com), "
                               "*.example.com for its subdomains, or * for every domain")
            return None
        return s.lower()

    def loopback(self, node: _Node, key: str) -> str | None:
        s = self.ip_literal(node, key)
        if s is None:
            return None
        if not _is_loopback(s):
            self.add(node.pos, f"{s} is not a loopback address; only 127.0.0.0/8 and ::1 may stand "
                               "in for a login, because other addresses can be reached from the network")
            return None
        return s

    # -- sections ------------------------------------------------------------

    def relay_config(self, root: _Node, source: Path) -> RelayConfig | None:
        m = self.as_map(root, "relay.yaml")
        if m is None:
            return None
        self.scan_secrets(m)
        self.check_keys(m, _TOP_KEYS, "the top level")
        self.version(m)
        hostname = self.need(m, "hostname", self.hostname, "localhost",
                             " (the name relayd gives in its greeting and EHLO)")
        spool_dir = self.need(m, "spool_dir", self.path, Path("."))
        tls = self.tls_files(m)
        transports, transport_names = self.transports(m)
        own_tenants = self.tenants(m, transport_names)
        credentials = self.credentials(m)
        tenants_file = self.get(m, "tenants_file", self.path, None)
        managed_path = tenants_file or credentials.store.parent / "tenants.yaml"
        managed = self.managed_tenants(managed_path, source, transport_names, own_tenants)
        return RelayConfig(
            source=source,
            hostname=hostname,
            spool_dir=spool_dir,
            log_file=self.log_file(m),
            credentials=credentials,
            listeners=self.listeners(m, has_tls_files=m.value("tls") is not None),
            transports=transports,
            tenants=MappingProxyType({**own_tenants, **managed}),
            tls=tls,
            retry=self.get(m, "retry", self.schedule, parse_retry_schedule(DEFAULT_RETRY)),
            delivery=self.delivery(m),
            spool_limits=self.spool_limits(m),
            metrics=self.metrics(m),
            control_socket=self.get(m, "control_socket", self.path, None),
            pid_file=self.get(m, "pid_file", self.path, None),
            tenants_file=tenants_file,
            audit_log=self.get(m, "audit_log", self.path, None),
            log_format=self.get(m, "log_format", self.log_format, LogFormat.TEXT),
            json_log_file=self.get(m, "json_log_file", self.path, None),
            webhooks=self.webhooks(m, frozenset(own_tenants) | frozenset(managed)),
        )

    def managed_tenants(self, path: Path, source: Path, transport_names: frozenset[str],
                        defined: Mapping[str, TenantConfig]) -> Mapping[str, TenantConfig]:
        """The tenants of the managed file (none if it does not exist yet); its problems are
        reported under its own name."""
        if not path.exists():
            return MappingProxyType({})
        shown = shown_path(self.file, source, path)
        sub = _Reader(shown, path.parent, self.check_files, managed=True, bind_owner=self._bind_owner)
        sub._uid_owner = self._uid_owner
        sub.transports_file = self.file
        try:
            tenants = sub.managed_file(_read_text(path, shown), transport_names, defined)
        except ConfigError as error:
            self.problems.extend(error.problems)
            return MappingProxyType({})
        self.problems.extend(sub.problems)
        return tenants

    def managed_file(self, text: str, transport_names: frozenset[str],
                     defined: Mapping[str, TenantConfig]) -> Mapping[str, TenantConfig]:
        """A managed tenants file: `version: 1` and a `tenants:` section, nothing else."""
        node = _compose(text, self.file)
        if node is None:
            return MappingProxyType({})
        root = self.as_map(_TreeBuilder(self.add).build(node), "the tenants file")
        if root is None:
            return MappingProxyType({})
        self.scan_secrets(root, under_tenants=True)
        self.check_keys(root, _MANAGED_TOP_KEYS, "the tenants file")
        self.version(root)
        return self.tenants(root, transport_names, defined)

    def version(self, m: _Map) -> None:
        e = m.entry("version")
        if e is None:
            self.add(m.pos, "required key 'version' is missing; start the file with 'version: 1'")
        elif _is_broken(e.value):
            return
        elif not (isinstance(e.value, _Scalar) and e.value.value == 1
                  and not isinstance(e.value.value, bool)):
            self.add(e.value.pos, "version must be 1, the only relay.yaml format this relayd reads")

    def log_file(self, m: _Map) -> Path | None:
        node = m.value("log_file")
        if isinstance(node, _Scalar) and node.value == "-":
            return None
        return self.get(m, "log_file", self.path, None)

    def log_format(self, node: _Node, key: str) -> LogFormat | None:
        found = self.choice(LogFormat)(node, key)
        return found if isinstance(found, LogFormat) else None

    def webhooks(self, m: _Map, tenant_names: frozenset[str]) -> WebhooksConfig:
        d = WebhooksConfig()
        s = self.section(m, "webhooks", _WEBHOOKS_KEYS)
        if s is None:
            return d
        retry_min = self.get(s, "retry_min", self.duration(_WEBHOOK_RETRY), d.retry_min)
        retry_max = self.get(s, "retry_max", self.duration(_WEBHOOK_RETRY), d.retry_max)
        if retry_max < retry_min:
            self.add(self.pos_of(s, "retry_max"), "retry_max must not be shorter than retry_min")
        endpoints: list[WebhookEndpoint] = []
        names: set[str] = set()
        for item in self.get(s, "endpoints", lambda n, k: self.as_list(n, k), ()):
            em = self.as_map(item, "a webhook endpoint")
            if em is None:
                continue
            endpoint = self.webhook_endpoint(em, tenant_names)
            name = em.value("name")
            if isinstance(name, _Scalar) and isinstance(name.value, str) and name.value.strip() in names:
                self.add(name.pos, f"webhook endpoint '{name.value.strip()}' is defined twice; each "
                                   "needs its own name (it names the endpoint's outbox)")
                continue
            if isinstance(name, _Scalar) and isinstance(name.value, str):
                names.add(name.value.strip())
            if endpoint is not None:
                endpoints.append(endpoint)
        return WebhooksConfig(
            endpoints=tuple(endpoints),
            outbox_dir=self.get(s, "outbox_dir", self.path, None),
            max_pending=self.get(s, "max_pending", self.integer(_WEBHOOK_PENDING), d.max_pending),
            retry_min=retry_min,
            retry_max=retry_max,
        )

    def webhook_endpoint(self, em: _Map, tenant_names: frozenset[str]) -> WebhookEndpoint | None:
        self.check_keys(em, _ENDPOINT_KEYS, "a webhook endpoint")
        d = WebhookEndpoint(name="", url="", credential="")
        name = self.need(em, "name", self.name("webhook endpoint"), None)
        url = self.need(em, "url", self.webhook_url, None, " (http:// or https://)")
        credential = self.need(em, "credential", self.credential_name, None,
                               " (the signing secret, stored with `relayctl webhook secret NAME`)")
        tenant = self.get(em, "tenant", self.text, None)
        if tenant is not None and tenant not in tenant_names:
            self.add(self.pos_of(em, "tenant"), f"tenant '{tenant}' is not defined")
        endpoint = WebhookEndpoint(
            name=name or "", url=url or "", credential=credential or "", tenant=tenant,
            events=self.get(em, "events", self.text_list(self.webhook_kind, "event kind"), d.events),
            timeout=self.get(em, "timeout", self.duration(_WEBHOOK_TIMEOUT), d.timeout),
            max_in_flight=self.get(em, "max_in_flight", self.integer(_WEBHOOK_IN_FLIGHT), d.max_in_flight),
            ca_file=self.get(em, "ca_file", self.existing_file, None),
        )
        return endpoint if name and url and credential else None

    def webhook_url(self, node: _Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        try:
            parts = urllib.parse.urlsplit(s)
            parts.port  # raises ValueError for a port out of range
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.add(node.pos, f"{key} must be an http:// or https:// URL with a host, such as "
                               "https://hooks.example.com/relayd")
            return None
        if parts.username is not None or parts.password is not None:
            self.add(node.pos, f"{key}: a user or password in the URL is a plaintext secret; relayd "
                               "signs each request with the endpoint's credential instead")
            return None
        if len(s) > _URL_LENGTH or not s.isprintable() or " " in s:
            self.add(node.pos, f"{key} must be at most {_URL_LENGTH} printable characters without spaces")
            return None
        return s

    def webhook_kind(self, node: _Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if WEBHOOK_KIND_PATTERN.fullmatch(s) is None:
            self.add(node.pos, f"'{s}' is not an event kind; write a word such as delivered, deferred, "
                               "bounced or bounce_created")
            return None
        return s

    def tls_files(self, m: _Map) -> TlsFiles | None:
        t = self.section(m, "tls", _TLS_KEYS)
        if t is None:
            return None
        cert = self.need(t, "cert", self.existing_file, None, " (the certificate chain, PEM)")
        key = self.need(t, "key", self.existing_file, None, " (the private key, PEM)")
        return TlsFiles(cert, key) if cert is not None and key is not None else None

    def credentials(self, m: _Map) -> CredentialsConfig:
        placeholder = CredentialsConfig(store=Path("."))
        e = m.entry("credentials")
        if e is None:
            self.add(m.pos, "required key 'credentials' is missing; it says where the encrypted "
                            "upstream credentials live (credentials: {store: ...})")
            return placeholder
        c = self.as_map(e.value, "credentials")
        if c is None:
            return placeholder
        self.check_keys(c, _CREDENTIALS_KEYS, "credentials")
        return CredentialsConfig(
            store=self.need(c, "store", self.path, Path(".")),
            master_key_file=self.get(c, "master_key_file", self.existing_file, None),
        )

    def delivery(self, m: _Map) -> DeliveryConfig:
        d = DeliveryConfig()
        s = self.section(m, "delivery", _DELIVERY_KEYS)
        if s is None:
            return d
        return DeliveryConfig(
            max_parallel=self.get(s, "max_parallel", self.integer(_PARALLEL), d.max_parallel),
            queue_run_interval=self.get(s, "queue_run_interval", self.duration(_QUEUE_RUN),
                                        d.queue_run_interval),
            shutdown_grace=self.get(s, "shutdown_grace", self.duration(_SHUTDOWN_GRACE),
                                    d.shutdown_grace),
        )

    def spool_limits(self, m: _Map) -> SpoolLimits:
        d = SpoolLimits()
        s = self.section(m, "spool_limits", _SPOOL_LIMITS_KEYS)
        if s is None:
            return d
        return SpoolLimits(
            min_free=self.get(s, "min_free", self.size(_SPOOL_BYTES), d.min_free),
            tenant_max_bytes=self.get(s, "tenant_max_bytes", self.size(_SPOOL_BYTES), d.tenant_max_bytes),
            tenant_max_messages=self.get(s, "tenant_max_messages", self.integer(_TENANT_MESSAGES),
                                         d.tenant_max_messages),
        )

    def metrics(self, m: _Map) -> MetricsConfig:
        d = MetricsConfig()
        s = self.section(m, "metrics", _METRICS_KEYS)
        if s is None:
            return d
        return MetricsConfig(
            address=self.get(s, "address", self.ip_literal, d.address),
            port=self.get(s, "port", self.integer(_PORT), d.port),
        )

    # -- listeners -----------------------------------------------------------

    def listeners(self, m: _Map, has_tls_files: bool) -> tuple[ListenerConfig, ...]:
        e = m.entry("listeners")
        if e is None:
            self.add(m.pos, "required key 'listeners' is missing; add at least one listener")
            return ()
        items = self.as_list(e.value, "listeners") if not _is_null(e.value) else ()
        if items is not None and not items:
            self.add(e.key_pos, "listeners must list at least one listener")
        result: list[ListenerConfig] = []
        names: dict[str, _Pos] = {}
        bound: list[tuple[str, int, _Pos]] = []
        for node in items or ():
            lm = self.as_map(node, "a listener")
            if lm is None:
                continue
            listener = self.listener(lm, has_tls_files)
            if listener.unix_path is not None and not result:
                self.add(self.pos_of(lm, "unix"),
                         "the first listener must be a network listener (address and port: "
                         "relayctl uses it); list the unix listener after it")
            self.check_unique_listener(lm, listener, names, bound)
            result.append(listener)
        return tuple(result)

    def listener(self, lm: _Map, has_tls_files: bool) -> ListenerConfig:
        d = ListenerConfig()
        raw_name = lm.value("name")
        shown = raw_name.value if isinstance(raw_name, _Scalar) else d.name
        self.check_keys(lm, _LISTENER_KEYS, f"listener '{shown}'")
        name = self.get(lm, "name", self.name("listener"), d.name)
        address = self.get(lm, "address", self.ip_literal, d.address)
        unix_path = self.get(lm, "unix", self.path, None)
        tls = self.get(lm, "tls", self.tls_mode, d.tls) if unix_path is None else TlsMode.NONE
        plain = self.get(lm, "allow_plaintext_auth", self.boolean, d.allow_plaintext_auth)
        if plain and not _is_loopback(address) and _ip(address) is not None:
            self.add(self.pos_of(lm, "allow_plaintext_auth"),
                     f"allow_plaintext_auth: true is only allowed on a loopback address "
                     f"(127.0.0.0/8 or ::1); on {address} passwords would cross the network in clear")
        if tls is not TlsMode.NONE and not has_tls_files:
            self.add(self.pos_of(lm, "tls"),
                     f"listener '{name}' uses tls: {tls.value}, which needs the top-level tls: "
                     "section with cert and key; add it, or use tls: none on a loopback listener")
        delay = self.get(lm, "auth_failures_before_delay", self.integer(_AUTH_FAILURES),
                         d.auth_failures_before_delay)
        drop = self.get(lm, "auth_failures_before_disconnect", self.integer(_AUTH_FAILURES),
                        d.auth_failures_before_disconnect)
        if drop < delay:
            self.add(self.pos_of(lm, "auth_failures_before_disconnect"),
                     f"auth_failures_before_disconnect ({drop}) must not be below "
                     f"auth_failures_before_delay ({delay})")
        lockout = self.get(lm, "auth_lockout", self.duration(_AUTH_LOCKOUT), d.auth_lockout)
        lockout_max = self.get(lm, "auth_lockout_max", self.duration(_AUTH_LOCKOUT), d.auth_lockout_max)
        if lockout_max < lockout:
            self.add(self.pos_of(lm, "auth_lockout_max"),
                     f"auth_lockout_max ({_format_seconds(lockout_max)}) must not be below "
                     f"auth_lockout ({_format_seconds(lockout)})")
        if unix_path is not None:
            for key in _NETWORK_ONLY_KEYS:
                if lm.entry(key) is not None:
                    self.add(self.pos_of(lm, key), f"{key} does not apply to a unix listener (it has a "
                                                   "socket path instead of an address, and no TLS)")
        else:
            for key in ("mode", "group"):
                if lm.entry(key) is not None:
                    self.add(self.pos_of(lm, key), f"{key} only applies to a unix listener "
                                                   "(unix: /run/relayd/submit.sock)")
        listener = ListenerConfig(
            name=name,
            address=address,
            port=self.get(lm, "port", self.integer(_PORT), d.port),
            tls=tls,
            allow_plaintext_auth=plain,
            max_message_size=self.get(lm, "max_message_size", self.size(_MESSAGE_SIZE),
                                      d.max_message_size),
            max_recipients=self.get(lm, "max_recipients", self.integer(_RECIPIENTS), d.max_recipients),
            command_timeout=self.get(lm, "command_timeout", self.duration(_TIMEOUT), d.command_timeout),
            data_timeout=self.get(lm, "data_timeout", self.duration(_TIMEOUT), d.data_timeout),
            max_line_length=self.get(lm, "max_line_length", self.integer(_LINE_LENGTH),
                                     d.max_line_length),
            max_header_size=self.get(lm, "max_header_size", self.size(_HEADER_SIZE), d.max_header_size),
            max_received_headers=self.get(lm, "max_received_headers", self.integer(_RECEIVED_HEADERS),
                                          d.max_received_headers),
            auth_failures_before_delay=delay,
            auth_failures_before_disconnect=drop,
            auth_failure_window=self.get(lm, "auth_failure_window", self.duration(_AUTH_WINDOW),
                                         d.auth_failure_window),
            auth_failures_per_source=self.get(lm, "auth_failures_per_source",
                                              self.integer(_AUTH_SOURCE_BUDGET), d.auth_failures_per_source),
            auth_lockout=lockout,
            auth_lockout_max=lockout_max,
            unix_path=unix_path,
            unix_mode=self.get(lm, "mode", self.file_mode, d.unix_mode),
            unix_group=self.get(lm, "group", self.group, d.unix_group),
        )
        return self.listener_limits(lm, listener)

    def listener_limits(self, lm: _Map, d: ListenerConfig) -> ListenerConfig:
        """`d` with the connection, command, error and data-rate bounds read from `lm`."""
        total = self.get(lm, "max_connections", self.integer(_CLIENT_CONNECTIONS), d.max_connections)
        per_ip = self.get(lm, "max_connections_per_ip", self.integer(_CLIENT_CONNECTIONS),
                          min(d.max_connections_per_ip, total))
        if per_ip > total:
            self.add(self.pos_of(lm, "max_connections_per_ip"),
                     f"max_connections_per_ip ({per_ip}) must not be above max_connections ({total})")
        return dataclasses.replace(
            d,
            max_connections=total,
            max_connections_per_ip=per_ip,
            per_ip_limit_on_loopback=self.get(lm, "per_ip_limit_on_loopback", self.boolean,
                                              d.per_ip_limit_on_loopback),
            max_commands_before_auth=self.get(lm, "max_commands_before_auth",
                                              self.integer(_COMMANDS_BEFORE_AUTH),
                                              d.max_commands_before_auth),
            hard_error_limit=self.get(lm, "hard_error_limit", self.integer(_ERROR_LIMIT),
                                      d.hard_error_limit),
            min_data_rate=self.get(lm, "min_data_rate", self.integer(_DATA_RATE), d.min_data_rate),
        )

    def file_mode(self, node: _Node, key: str) -> int | None:
        """Permission bits in octal, as chmod takes them ("0660"; YAML's own 0660 is fine too)."""
        text = node.raw if isinstance(node, _Scalar) else ""
        if re.fullmatch(r"0?[0-7]{3}", text.strip()) is None:
            self.add(node.pos, f"{key} must be permission bits in octal such as \"0660\" "
                               f"(owner, group, others), but this is {_kind(node)}")
            return None
        return int(text.strip(), 8)

    def group(self, node: _Node, key: str) -> int | None:
        """A gid, written as a number or a group name of this machine."""
        return self.system_id(node, key, lambda name: grp.getgrnam(name).gr_gid,
                              "group named", "getent group", "an existing group or a gid number")

    def system_id(self, node: _Node, key: str, lookup: Callable[[str], int], what: str, command: str,
                  advice: str) -> int | None:
        """A uid or gid written as a number, or a name `lookup` resolves on this machine."""
        v = node.value if isinstance(node, _Scalar) else None
        if isinstance(v, int) and not isinstance(v, bool):
            return self.integer(_UID)(node, key)
        name = self.text(node, key)
        if name is None:
            return None
        try:
            return lookup(name)
        except KeyError:
            self.add(node.pos, f"{key}: there is no {what} '{name}' on this machine ({command}); write {advice}")
            return None

    def check_unique_listener(self, lm: _Map, listener: ListenerConfig, names: dict[str, _Pos],
                              bound: list[tuple[str, int, _Pos]]) -> None:
        """Two listeners may share neither a name nor an address and port."""
        if listener.name in names:
            self.add(self.pos_of(lm, "name"), f"listener name '{listener.name}' is already used "
                                              f"by the listener at line {names[listener.name].line}")
        else:
            names[listener.name] = lm.pos
        if listener.unix_path is not None:
            return
        for address, port, pos in bound:
            if port == listener.port and _addresses_overlap(address, listener.address):
                also = f" on {address}" if address != listener.address else ""
                self.add(self.pos_of(lm, "port"),
                         f"port {port} on {listener.address} is already taken by the listener "
                         f"at line {pos.line}{also}")
                return
        bound.append((listener.address, listener.port, lm.pos))

    def pos_of(self, m: _Map, key: str) -> _Pos:
        """Where `key`'s value is, or the mapping itself when the key was left out."""
        e = m.entry(key)
        return e.value.pos if e is not None else m.pos

    def name(self, what: str) -> Conv[str]:
        def conv(node: _Node, key: str) -> str | None:
            s = self.text(node, key)
            if s is not None and _NAME.fullmatch(s) is None:
                self.add(node.pos, f"{what} name '{s}' may only hold letters, digits, _ . - "
                                   "(at most 64, starting with a letter or digit)")
                return None
            return s

        return conv

    # -- transports ----------------------------------------------------------

    def transports(self, m: _Map) -> tuple[Mapping[str, TransportConfig], frozenset[str]]:
        """The valid transports, and the names of all declared ones (for `via` checks)."""
        node = m.value("transports")
        t = self.as_map(node, "transports") if node is not None else None
        if t is None:
            return MappingProxyType({}), frozenset()
        result: dict[str, TransportConfig] = {}
        for e in t.entries:
            if _NAME.fullmatch(e.key) is None:
                self.add(e.key_pos, f"transport name '{e.key}' may only hold letters, digits, _ . - "
                                    "(at most 64, starting with a letter or digit)")
            tm = self.as_map(e.value, f"transport '{e.key}'")
            if tm is None:
                continue
            kind = self.get(tm, "type", self.transport_type, "smtp")
            if kind == "capture":
                result[e.key] = self.capture_transport(e.key, tm)
            else:
                result[e.key] = self.smtp_transport(e.key, tm)
        return MappingProxyType(result), frozenset(e.key for e in t.entries)

    def transport_type(self, node: _Node, key: str) -> str | None:
        v = node.value if isinstance(node, _Scalar) else None
        if v in ("smtp", "capture"):
            return str(v)
        shown = f"'{v}'" if isinstance(v, str) else _kind(node)
        self.add(node.pos, f"type must be one of smtp, capture; {shown} is not")
        return None

    def capture_transport(self, name: str, tm: _Map) -> CaptureTransportConfig:
        self.check_keys(tm, _CAPTURE_KEYS, f"capture transport '{name}'")
        return CaptureTransportConfig(
            name=name,
            maildir=self.need(tm, "maildir", self.path, Path(".")),
            retry=self.get(tm, "retry", self.schedule, None),
            max_parallel=self.get(tm, "max_parallel", self.integer(_PARALLEL), None),
        )

    def smtp_transport(self, name: str, tm: _Map) -> SmtpTransportConfig:
        d = SmtpTransportConfig(name=name, host="", port=0)
        self.check_keys(tm, _SMTP_KEYS, f"transport '{name}'")
        preset_name = self.get(tm, "preset", self.text, None)
        region = self.get(tm, "region", self.text, None)
        preset = None
        if preset_name is not None:
            try:
                preset = resolve_preset(preset_name, region)
            except PresetError as exc:
                bad_region = region is not None and preset_name in PROVIDER_PRESETS
                where = "region" if bad_region else "preset"
                self.add(self.pos_of(tm, where), str(exc))
        elif region is not None:
            self.add(self.pos_of(tm, "region"), "region is only used with preset: ses")
        if preset is None and preset_name is None:
            host = self.need(tm, "host", self.host, "", " (or a preset such as preset: gmail)")
        else:
            host = self.get(tm, "host", self.host, preset.host if preset else "")
        tls = self.get(tm, "tls", self.tls_mode, preset.tls if preset else d.tls)
        default_port = preset.port if preset else (465 if tls is TlsMode.IMPLICIT else 587)
        credential = self.get(tm, "credential", self.credential_name, None)
        verify = self.get(tm, "verify_certificate", self.boolean, d.verify_certificate)
        self.check_transport_safety(tm, host, tls, credential, verify)
        mechanism = self.get(tm, "auth_mechanism", self.auth_mechanism, None)
        if mechanism is not None and credential is None:
            self.add(self.pos_of(tm, "auth_mechanism"),
                     "auth_mechanism is only used with a credential: without one relayd does not log in")
        return SmtpTransportConfig(
            name=name,
            host=host,
            port=self.get(tm, "port", self.integer(_PORT), default_port),
            tls=tls,
            credential=credential,
            verify_certificate=verify,
            ca_file=self.get(tm, "ca_file", self.existing_file, None),
            helo_name=self.get(tm, "helo_name", self.hostname, None),
            connect_timeout=self.get(tm, "connect_timeout", self.duration(_TIMEOUT), d.connect_timeout),
            command_timeout=self.get(tm, "command_timeout", self.duration(_TIMEOUT), d.command_timeout),
            retry=self.get(tm, "retry", self.schedule, None),
            max_connections=self.get(tm, "max_connections", self.integer(_CONNECTIONS),
                                     d.max_connections),
            max_messages_per_connection=self.get(
                tm, "max_messages_per_connection", self.integer(_MESSAGES_PER_CONNECTION),
                d.max_messages_per_connection),
            idle_timeout=self.get(tm, "idle_timeout", self.duration(_IDLE), d.idle_timeout),
            provider=preset.name if preset else None,
            max_parallel=self.get(tm, "max_parallel", self.integer(_PARALLEL), None),
            auth_mechanism=mechanism,
        )

    def check_transport_safety(self, tm: _Map, host: str, tls: TlsMode, credential: str | None,
                               verify: bool) -> None:
        """Mail may go in clear only to this machine; a login never goes unverified."""
        if tls is TlsMode.NONE and host and not (_is_loopback(host) or host.lower() == "localhost"):
            self.add(self.pos_of(tm, "tls"),
                     f"tls: none is only allowed towards a loopback host (127.0.0.0/8, ::1 or "
                     f"localhost); mail to {host} would cross the network in clear")
        if credential is not None and tls is TlsMode.NONE:
            self.add(self.pos_of(tm, "credential"),
                     "a credential cannot be used with tls: none: credentials are never sent over "
                     "an unencrypted connection; use tls: starttls or implicit (with ca_file for a "
                     "private CA)")
        if credential is not None and not verify:
            self.add(self.pos_of(tm, "verify_certificate"),
                     "verify_certificate: false cannot be combined with a credential: credentials "
                     "are never sent over a connection whose certificate is not verified; to trust "
                     "a private or self-signed certificate, use ca_file instead")

    # -- tenants -------------------------------------------------------------

    def tenants(self, m: _Map, transport_names: frozenset[str],
                defined: Mapping[str, TenantConfig] | None = None) -> Mapping[str, TenantConfig]:
        """The tenants section; `defined` are tenants another file already holds."""
        node = m.value("tenants")
        t = self.as_map(node, "tenants") if node is not None else None
        if t is None:
            return MappingProxyType({})
        result: dict[str, TenantConfig] = {}
        for e in t.entries:
            if _LOGIN.fullmatch(e.key) is None:
                self.add(e.key_pos, f"tenant name '{e.key}' is its SMTP login and may only hold "
                                    "letters, digits and _ . @ + - (at most 64)")
            other = (defined or {}).get(e.key)
            if other is not None:
                self.add(e.key_pos, f"tenant '{e.key}' is also defined at {other.origin}; a tenant "
                                    "can be defined in only one place, so remove one of the two")
                continue
            tm = self.as_map(e.value, f"tenant '{e.key}'")
            if tm is not None:
                result[e.key] = self.tenant(e.key, tm, transport_names, e.key_pos)
        return MappingProxyType(result)

    def tenant(self, name: str, tm: _Map, transport_names: frozenset[str],
               key_pos: _Pos) -> TenantConfig:
        self.check_keys(tm, _TENANT_KEYS, f"tenant '{name}'")
        binds = self.get(tm, "bind_addresses", self.text_list(self.loopback, "address"), ())
        self.check_bind_owners(name, tm, binds)
        trusting = self.get(tm, "trust_every_local_user", self.boolean, False)
        self.check_bind_trust(name, tm, binds, trusting)
        uids = self.get(tm, "local_users", self.local_users, ())
        self.check_uid_owners(name, tm, uids)
        return TenantConfig(
            name=name,
            password_hash=self.get(tm, "password_hash", self.password_hash, None),
            senders=self.need(tm, "senders", self.text_list(self.sender_pattern, "sender pattern"), (),
                              " (the From addresses this tenant may use, e.g. [\"*@acme.example\"])"),
            routes=self.routes(name, tm, transport_names),
            bind_addresses=binds,
            trust_every_local_user=trusting,
            local_uids=uids,
            max_recipients=self.get(tm, "max_recipients", self.integer(_RECIPIENTS), None),
            max_message_size=self.get(tm, "max_message_size", self.size(_MESSAGE_SIZE), None),
            enabled=self.get(tm, "enabled", self.boolean, True),
            origin=f"{self.file}:{key_pos.line}",
            managed=self.managed,
        )

    def check_bind_owners(self, tenant: str, tm: _Map, binds: tuple[str, ...]) -> None:
        """A bind address stands for one tenant only, or the tenant would be a guess."""
        node = tm.value("bind_addresses")
        nodes = node.items if isinstance(node, _Seq) else (node,)
        for address, item in zip(binds, nodes):
            owner = self._bind_owner.setdefault(address, tenant)
            if owner != tenant and item is not None:
                self.add(item.pos, f"{address} already stands for tenant '{owner}'; one address "
                                   "can only stand for one tenant")

    def check_bind_trust(self, tenant: str, tm: _Map, binds: tuple[str, ...], trusting: bool) -> None:
        """bind_addresses lets any local program be the tenant: only when the operator says so."""
        if binds and not trusting:
            self.add(self.pos_of(tm, "bind_addresses"),
                     f"bind_addresses trusts every local user: any program on this machine can "
                     f"connect from {binds[0]} and submit as tenant '{tenant}'. Prefer local_users "
                     f"(the uids relayd-sendmail may submit as this tenant over a unix listener); "
                     f"to keep bind_addresses, add `trust_every_local_user: true` to the tenant")
        elif trusting and not binds:
            self.add(self.pos_of(tm, "trust_every_local_user"),
                     "trust_every_local_user only applies to bind_addresses, which this tenant "
                     "does not have")

    def check_uid_owners(self, tenant: str, tm: _Map, uids: tuple[int, ...]) -> None:
        """A local user submits as one tenant only, or its mail would be a guess."""
        node = tm.value("local_users")
        nodes = node.items if isinstance(node, _Seq) else (node,)
        for uid, item in zip(uids, nodes):
            owner = self._uid_owner.setdefault(uid, tenant)
            if owner != tenant and item is not None:
                self.add(item.pos, f"local user {uid} already submits as tenant '{owner}'; a local "
                                   "user can only stand for one tenant")

    def local_users(self, node: _Node, key: str) -> tuple[int, ...] | None:
        """User names (looked up now) or uid numbers."""
        items = self.as_list(node, key) if not (isinstance(node, _Scalar) and isinstance(node.value, int)) else (node,)
        if items is None:
            return None
        if not items:
            self.add(node.pos, f"{key} must list at least one user name or uid")
            return None
        uids = [self.local_user(item, key) for item in items]
        good = tuple(u for u in uids if u is not None)
        return good if len(good) == len(uids) else None

    def local_user(self, node: _Node, key: str) -> int | None:
        """A uid, written as a number or a user name of this machine."""
        return self.system_id(node, key, lambda name: pwd.getpwnam(name).pw_uid,
                              "local user named", "getent passwd", "an existing user name or a uid number")

    def routes(self, tenant: str, tm: _Map, transport_names: frozenset[str]) -> tuple[RouteRule, ...]:
        e = tm.entry("routes")
        if e is None:
            self.add(tm.pos, f"required key 'routes' is missing; tenant '{tenant}' needs at least "
                             "one route (domains: [\"*\"], via: [...])")
            return ()
        items = self.as_list(e.value, "routes") if not _is_null(e.value) else ()
        if items is not None and not items:
            self.add(e.key_pos, f"routes must list at least one route for tenant '{tenant}'")
        rules: list[RouteRule] = []
        seen: set[str] = set()
        for n, node in enumerate(items or (), start=1):
            rm = self.as_map(node, "a route")
            if rm is None:
                continue
            rule = self.route(tenant, n, rm, transport_names)
            if rule.name in seen:
                self.add(self.pos_of(rm, "name"), f"route name '{rule.name}' is used twice in "
                                                  f"tenant '{tenant}'")
            seen.add(rule.name)
            rules.append(rule)
        return tuple(rules)

    def route(self, tenant: str, n: int, rm: _Map, transport_names: frozenset[str]) -> RouteRule:
        self.check_keys(rm, _ROUTE_KEYS, "a route")
        via = self.via(rm, transport_names)
        return RouteRule(
            name=self.get(rm, "name", self.name("route"), f"{tenant}-{n}"),
            domains=self.need(rm, "domains", self.text_list(self.domain_pattern, "domain pattern"),
                              (), " (use domains: [\"*\"] for every domain)"),
            transports=via,
        )

    def via(self, rm: _Map, transport_names: frozenset[str]) -> tuple[str, ...]:
        """The route's transport chain; each unknown name is reported at its own list item."""
        e = rm.entry("via")
        if e is None or _is_null(e.value):
            self.add(rm.pos if e is None else e.key_pos,
                     "required key 'via' is missing; name the transports to try, in order")
            return ()
        items = self.as_list(e.value, "via")
        if items is not None and not items:
            self.add(e.value.pos, "via must name at least one transport")
        chain: list[str] = []
        for node in items or ():
            name = self.text(node, "via")
            if name is None:
                continue
            if name not in transport_names:
                guess = _suggest(name, sorted(transport_names))
                hint = f"; did you mean '{guess}'?" if guess else ""
                where = f"in {self.transports_file}" if self.managed else "in this file"
                self.add(node.pos, f"via names '{name}', which is not a transport defined "
                                   f"{where}{hint}")
            elif name in chain:
                self.add(node.pos, f"transport '{name}' is listed twice in this route")
            chain.append(name)
        return tuple(chain)


def _addresses_overlap(a: str, b: str) -> bool:
    """Whether binding both a and b on one port would clash (same, or one is a wildcard)."""
    ia, ib = _ip(a), _ip(b)
    if ia is None or ib is None:
        return a == b
    if ia == ib:
        return True
    return ia.version == ib.version and (ia.is_unspecified or ib.is_unspecified)


# --------------------------------------------------------------------------- entry point


def _read_text(path: Path, file: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, 0, 0, f"cannot read the file: {exc.strerror}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(file, 0, 0, f"the file is larger than "
                                                     f"{MAX_CONFIG_BYTES // 1024 // 1024} MiB")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigProblem(file, line, 1, "the file is not valid UTF-8")]) from None


def _compose(text: str, file: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        pos = _pos(exc.problem_mark or exc.context_mark)
        what = exc.problem or "the YAML cannot be read"
        if exc.context:
            at = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
            if what.startswith("but "):  # "expected a single document ..., but found another"
                what = f"{exc.context}{at}, {what}"
            else:
                what = f"{what} ({exc.context}{at})"
        if "block" in what or "indentation" in what:
            what += "; check the indentation"
        raise ConfigError([ConfigProblem(file, pos.line, pos.col, f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(file, 0, 0, f"YAML syntax error: {exc}")]) from None


def load_config(path: Path, *, check_files: bool = True) -> RelayConfig:
    """Read and check relay.yaml; raise ConfigError listing every problem found.

    Problems are reported against `path` as given. With `check_files`, the TLS
    certificate and key, every ca_file and the master key file must exist.
    """
    file = str(path)
    node = _compose(_read_text(path, file), file)
    if node is None:
        raise ConfigError([ConfigProblem(file, 0, 0, "the file is empty; see config/relay.yaml "
                                                     "for a complete example")])
    source = Path(os.path.abspath(path))
    reader = _Reader(file, source.parent, check_files)
    tree = _TreeBuilder(reader.add).build(node)
    config = reader.relay_config(tree, source)
    if reader.problems or config is None:
        # relay.yaml's problems first, then the managed tenants file's, each in file order.
        raise ConfigError(sorted(reader.problems, key=lambda p: (p.file != file, p.line, p.col)))
    return config


def shown_path(config_file: str, source: Path, target: Path) -> str:
    """How to name `target` in messages: beside relay.yaml as it was given, else absolute."""
    try:
        relative = target.relative_to(source.parent)
    except ValueError:
        return str(target)
    return os.path.join(os.path.dirname(config_file), str(relative))


def parse_managed_tenants(
    text: str,
    *,
    file: str,
    base: Path,
    transport_names: frozenset[str],
    defined: Mapping[str, TenantConfig],
    config_file: str = "relay.yaml",
) -> Mapping[str, TenantConfig]:
    """Check the text of a managed tenants file against relay.yaml's transports and tenants.

    `relayctl tenant` checks what it is about to write with this, so the file it
    leaves behind always loads. Raises ConfigError listing every problem.
    """
    owners = {address: t.name for t in defined.values() for address in t.bind_addresses}
    reader = _Reader(file, base, False, managed=True, bind_owner=owners)
    reader._uid_owner = {uid: t.name for t in defined.values() for uid in t.local_uids}
    reader.transports_file = config_file
    tenants = reader.managed_file(text, transport_names, defined)
    if reader.problems:
        raise ConfigError(sorted(reader.problems, key=lambda p: (p.line, p.col)))
    return tenants
