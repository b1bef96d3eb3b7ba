"""relayctl for administrators: config check, route test, transport verify.

Takes: the command line (through relayd.ops.cli), relay.yaml and the files it
names (managed tenants file, credential store, certificates, spool), the
running relayd's control socket when there is one, and, for `transport
verify`, an upstream SMTP server.
Emits: human-readable reports on stdout (`--json` for scripts where it
helps); a tenant's generated password exactly once, on stdout, when it is
created or changed; one audit-log line per change (relayd.observe.audit).
Untrusted input: arguments, the files, the daemon's answers and the upstream's
replies (flattened by relayd.delivery.transport before they get here).
How it fails: `CliError` with one sentence, as every relayctl command; never a
password, hash or key in an error, the audit log or a report.

Verbs an Exim/Postfix operator knows: `config check` is `exim -bV`/`postfix
check`, `route test` is `exim -bt`, `transport verify` is nodemailer's
`verify()`. The managed tenants' verbs are in relayd.ops.cli_tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relayd.config.credentials import CredentialError, CredentialStore, locate_master_keys
from relayd.config.loader import ConfigError, load_config
from relayd.config.model import (
    CaptureTransportConfig,
    RelayConfig,
    RouteRule,
    SmtpTransportConfig,
    TenantConfig,
    TlsMode,
    TransportConfig,
)
from relayd.config.passwords import describe_hash_problem
from relayd.delivery import router, verifyrecord
from relayd.delivery.oauthsources import standalone_lookup
from relayd.delivery.transport import CredentialLike, VerifyStep, verify_transport
from relayd.ops.clicommon import (
    CONTROL_TIMEOUT,
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    CliError,
    UsageError,
    config_path,
    load_relay_config,
    print_json,
)
from relayd.ops.controlclient import ControlClient, ControlUnavailable

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers


# ------------------------------------------------------------------ config check


def unreachable_rules(tenant: TenantConfig) -> list[tuple[RouteRule, tuple[str, ...]]]:
    """Rules that can never match because earlier rules catch all their domains; pure.

    Returns each such rule with the names of the earlier rules that catch its domains.
    """
    found: list[tuple[RouteRule, tuple[str, ...]]] = []
    for i, rule in enumerate(tenant.routes):
        earlier = tenant.routes[:i]
        catchers = [next((e.name for e in earlier if any(_pattern_covers(p, q) for p in e.domains)), None)
                    for q in rule.domains]
        if rule.domains and all(c is not None for c in catchers):
            found.append((rule, tuple(dict.fromkeys(c for c in catchers if c is not None))))
    return found


def _pattern_covers(p: str, q: str) -> bool:
    """Whether every domain matching pattern q also matches pattern p."""
    if p == "*":
        return True
    if q == "*":
        return False
    if p.startswith("*."):
        bare = q[2:] if q.startswith("*.") else q
        return bare.endswith(p[1:])
    return p == q


def _check_routes(config: RelayConfig) -> list[str]:
    return [
        f"{t.origin}: tenant {t.name}: route {rule.name} can never match: {', '.join(rule.domains)} "
        f"already matched by route {', '.join(by)} before it"
        for t in config.tenants.values() for rule, by in unreachable_rules(t)
    ]


def _check_hashes(config: RelayConfig) -> list[str]:
    problems = []
    for t in config.tenants.values():
        if t.password_hash is not None:
            problem = describe_hash_problem(t.password_hash)
            if problem is not None:
                problems.append(f"{t.origin}: tenant {t.name}: password_hash is {problem}")
    return problems


def _open_store(config: RelayConfig, environ: Mapping[str, str]) -> CredentialStore:
    keys = locate_master_keys(config.credentials, environ).keys
    return CredentialStore.open(config.credentials.store, keys)


def _check_credentials(config: RelayConfig, environ: Mapping[str, str], file: str) -> list[str]:
    needed = {t.name: t.credential for t in config.transports.values()
              if isinstance(t, SmtpTransportConfig) and t.credential is not None}
    status_auth = config.metrics.status_auth
    hooks = {e.name: e.credential for e in config.webhooks.endpoints}
    if not needed and status_auth is None and not hooks:
        return []
    try:
        store = _open_store(config, environ)
    except CredentialError as exc:
        return [f"{file}: cannot check the credentials named by transports: {exc}"]
    problems = [
        f"{_where(file, ('transports', transport, 'credential'))}: transport {transport}: credential {name} "
        f"is not in {config.credentials.store}; add it with `{PROG} secret set {name} --user USER`"
        for transport, name in sorted(needed.items()) if store.get(name) is None
    ] + [
        f"{_where(file, ('webhooks', 'endpoints'))}: webhook endpoint {endpoint}: credential {name} is not "
        f"in {config.credentials.store}; add it with `{PROG} webhook secret {name} --generate`"
        for endpoint, name in sorted(hooks.items()) if store.get(name) is None
    ]
    if status_auth is not None and store.get(status_auth) is None:
        problems.append(f"{_where(file, ('metrics', 'status_auth'))}: metrics: status_auth: credential {status_auth} "
                        f"is not in {config.credentials.store}; add it with `{PROG} secret set {status_auth} --user USER`")
    return problems


def _where(file: str, keys: Sequence[str]) -> str:
    """`file:LINE:COL` of the value at `keys` in the YAML file (as far as the keys go), else `file`."""
    try:
        node = yaml.compose(Path(file).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeError, yaml.YAMLError):
        return file
    mark = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        if found is None:
            break
        mark, node = found[1].start_mark, found[1]  # the value, as relay.yaml's own errors point
    if mark is None:
        return file
    return f"{file}:{mark.line + 1}:{mark.column + 1}"


def _check_tls_files(config: RelayConfig, file: str) -> list[str]:
    if config.tls is None:
        return []
    cert_path, key_path = config.tls.cert_file, config.tls.key_file
    problems: list[str] = []
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except OSError as exc:
        return [f"{file}: tls.cert: cannot read {cert_path}: {exc.strerror}"]
    except ValueError:
        return [f"{file}: tls.cert: {cert_path} holds no PEM certificate"]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        return [f"{file}: tls.key: cannot read {key_path}: {exc.strerror}"]
    except (ValueError, TypeError):
        return [f"{file}: tls.key: {key_path} holds no unencrypted PEM private key"]
    if key.public_key() != certs[0].public_key():
        problems.append(f"{file}: tls: the key in {key_path} does not belong to the certificate "
                        f"in {cert_path}")
    if certs[0].not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        problems.append(f"{file}: tls.cert: the certificate in {cert_path} expired on "
                        f"{certs[0].not_valid_after_utc:%Y-%m-%d}")
    return problems


def _check_ca_files(config: RelayConfig, file: str) -> list[str]:
    problems = []
    for t in config.transports.values():
        if isinstance(t, SmtpTransportConfig) and t.ca_file is not None:
            try:
                x509.load_pem_x509_certificates(t.ca_file.read_bytes())
            except OSError as exc:
                problems.append(f"{file}: transport {t.name}: cannot read ca_file {t.ca_file}: {exc.strerror}")
            except ValueError:
                problems.append(f"{file}: transport {t.name}: ca_file {t.ca_file} holds no PEM certificate")
    return problems


def _check_writable_dir(path: Path, what: str, file: str) -> list[str]:
    """A directory that exists and is writable, or whose nearest existing parent is."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return [f"{file}: {what}: {probe} is not a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        return [f"{file}: {what}: {path} {verb}"]
    return []


def check_config(config: RelayConfig, environ: Mapping[str, str], file: str, *, files: bool = True) -> list[str]:
    """Everything `config check` looks at beyond the YAML itself; each entry one problem.

    Without `files`, only what the YAML says is checked (routes, password
    hashes): no credential store, certificate, key or directory is opened.
    """
    problems = [*_check_routes(config), *_check_hashes(config)]
    if files:
        problems += [
            *_check_credentials(config, environ, file),
            *_check_tls_files(config, file),
            *_check_ca_files(config, file),
            *_check_writable_dir(config.spool_dir, "spool_dir", file),
        ]
    return problems


def counted(n: int, noun: str) -> str:
    """"1 transport", "2 transports"; pure."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file is not None else config_path(args)
    file = str(path)
    files = not args.no_files
    try:
        config = load_config(path, check_files=files)
    except ConfigError as exc:
        problems = [str(p) for p in exc.problems]
    else:
        problems = check_config(config, args.environ, file, files=files)
    if problems:
        for line in problems:
            print(line)
        print(f"{file}: {counted(len(problems), 'problem')}")
        return EXIT_FAILURE
    scope = "" if files else "; files not checked (--no-files)"
    print(f"{file}: OK ({counted(len(config.tenants), 'tenant')}, {counted(len(config.transports), 'transport')}, "
          f"{counted(len(config.listeners), 'listener')}{scope})")
    for line in shaping_lines(config):
        print(line)
    return EXIT_OK


def shaping_lines(config: RelayConfig) -> list[str]:
    """The effective send limits of every shaped transport (preset values overridden by relay.yaml); pure."""
    lines = []
    for name in sorted(config.transports):
        t = config.transports[name]
        if not t.shaping.is_limited:
            continue
        line = f"  transport {name}: {t.shaping.describe()}"
        if isinstance(t, SmtpTransportConfig):
            line += (f"; max_connections {t.max_connections}, "
                     f"max_messages_per_connection {t.max_messages_per_connection}")
            if t.provider:
                line += f"; preset {t.provider}"
        lines.append(line)
    return lines


# ------------------------------------------------------------------ route test


@dataclass(frozen=True, slots=True)
class RetryView:
    """What the running relayd says of one transport's retry state."""

    known: bool
    skipped: bool = False
    next_try: float | None = None
    last_error: str | None = None


def retry_view(health: Mapping[str, object] | None, transport: str) -> RetryView:
    """One transport's state from the daemon's `health` answer (None: daemon not running); pure.

    The answer (relayd.ops.control) is `{"ok": true, "transports": {NAME:
    {"skipped_until": epoch seconds, or null when not skipped, "last_error":
    text or null, ...}}}`; a transport missing from it has never failed.
    """
    if health is None:
        return RetryView(known=False)
    transports = health.get("transports")
    entry = transports.get(transport) if isinstance(transports, dict) else None
    if not isinstance(entry, dict):
        return RetryView(known=True)
    until = entry.get("skipped_until")
    error = entry.get("last_error")
    next_try = float(until) if isinstance(until, (int, float)) and not isinstance(until, bool) else None
    return RetryView(
        known=True,
        skipped=next_try is not None,
        next_try=next_try,
        last_error=str(error) if error is not None else None,
    )


def _ask_health(config: RelayConfig) -> Mapping[str, object] | None:
    try:
        reply = ControlClient(config.control_path, timeout=CONTROL_TIMEOUT).request("health")
    except (ControlUnavailable, OSError):
        return None
    return reply if isinstance(reply, dict) and reply.get("ok") else None


def _credential_status(store: CredentialStore | None, name: str | None) -> bool | None:
    if name is None or store is None:
        return None
    return store.get(name) is not None


def route_report(
    tenant: TenantConfig,
    address: str,
    transports: Mapping[str, TransportConfig],
    *,
    store: CredentialStore | None,
    health: Mapping[str, object] | None,
) -> dict[str, object]:
    """Where one address of one tenant would go, as a JSON-ready mapping; pure but for
    the store lookup. Uses relayd.delivery.router, so this is exactly what relayd does."""
    domain = router.domain_of(address)
    rule = router.match_rule(tenant.routes, address)
    if rule is None:
        return {"address": address, "tenant": tenant.name, "routed": False, "rule": None,
                "pattern": None, "domain": domain, "transports": [],
                "refusal": "550 5.7.1 at RCPT"}
    pattern = next(p for p in rule.domains if router.domain_matches(p, domain))
    chain = [_transport_entry(transports[name], store, health) for name in rule.transports
             if name in transports]
    return {"address": address, "tenant": tenant.name, "routed": True, "rule": rule.name,
            "pattern": pattern, "domain": domain, "transports": chain, "refusal": None}


def _transport_entry(t: TransportConfig, store: CredentialStore | None,
                     health: Mapping[str, object] | None) -> dict[str, object]:
    view = retry_view(health, t.name)
    retry: dict[str, object] = {"known": view.known, "skipped": view.skipped if view.known else None,
                                "next_try": view.next_try, "last_error": view.last_error}
    if isinstance(t, CaptureTransportConfig):
        return {"name": t.name, "type": "capture", "maildir": str(t.maildir), "retry": retry}
    return {"name": t.name, "type": "smtp", "host": t.host, "port": t.port, "tls": t.tls.value,
            "verify_certificate": t.verify_certificate, "credential": t.credential,
            "credential_in_store": _credential_status(store, t.credential), "retry": retry}


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%SZ")


def format_route_report(report: Mapping[str, object]) -> str:
    """The human-readable form of `route_report`; pure."""
    lines = [str(report["address"])]
    if not report["routed"]:
        lines.append(f"  no route: would be refused with 550 5.7.1 at RCPT (tenant {report['tenant']} "
                     f"has no rule for {report['domain'] or 'an address without a domain'})")
        return "\n".join(lines)
    lines.append(f"  rule {report['rule']}: domain {report['domain']} matches '{report['pattern']}'")
    entries = report["transports"]
    assert isinstance(entries, list)
    for n, entry in enumerate(entries, start=1):
        lines.append(f"  {n}. {entry['name']}: {_describe_transport(entry)}")
        lines.append(f"     {_describe_retry(entry['retry'])}")
    return "\n".join(lines)


def _describe_transport(entry: Mapping[str, object]) -> str:
    if entry["type"] == "capture":
        return f"capture into the Maildir {entry['maildir']}"
    tls = {"starttls": "STARTTLS", "implicit": "implicit TLS", "none": "no TLS"}[str(entry["tls"])]
    cert = "certificate verified" if entry["verify_certificate"] else "certificate NOT verified"
    text = f"{entry['host']}:{entry['port']}, {tls}, {cert}, "
    name, present = entry["credential"], entry["credential_in_store"]
    if name is None:
        return text + "no credential"
    state = {True: "in the store", False: "MISSING from the store", None: "store not readable"}[
        present if isinstance(present, bool) else None]
    return text + f"credential {name} ({state})"


def _describe_retry(retry: object) -> str:
    assert isinstance(retry, dict)
    if not retry["known"]:
        return "retry state unknown (relayd not running)"
    if retry["skipped"]:
        return (f"SKIPPED by its retry state until {_when(retry['next_try'])}"
                f" (last error: {retry['last_error'] or 'not recorded'})")
    return "retry state: usable"


def cmd_route_test(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    tenant = config.tenants.get(args.tenant)
    if tenant is None:
        raise CliError(f"no tenant named {args.tenant!r} (see `{PROG} tenant list`)")
    try:
        store: CredentialStore | None = _open_store(config, args.environ)
    except CredentialError:
        store = None
    health = _ask_health(config)
    reports = [route_report(tenant, a, config.transports, store=store, health=health)
               for a in args.addresses]
    if args.json:
        print_json(reports)
    else:
        if not tenant.enabled:
            print(f"note: tenant {tenant.name} is disabled; its logins are refused")
        print("\n".join(format_route_report(r) for r in reports))
    return EXIT_OK if all(r["routed"] for r in reports) else EXIT_FAILURE


# ------------------------------------------------------------------ transport verify


def _marks(encoding: str | None) -> tuple[str, str]:
    if (encoding or "").lower().replace("-", "") in ("utf8", "utf_8"):
        return "\u2713", "\u2717"
    return "ok", "FAIL"


def format_verify(steps: Sequence[VerifyStep], encoding: str | None, width: int | None = None) -> str:
    """One line per step with a mark; a failed step's hint under it; pure.

    `width` pads the step names (default: the longest among `steps`), so lines
    printed one at a time as steps finish line up too.
    """
    good, bad = _marks(encoding)
    mark_width = max(len(good), len(bad))
    width = max((len(s.name) for s in steps), default=0) if width is None else width
    lines = []
    for step in steps:
        mark = (good if step.ok else bad).ljust(mark_width)
        lines.append(f"  {mark} {step.name.ljust(width)}  {step.detail}")
        if not step.ok and step.hint:
            lines.append(f"    hint: {step.hint}")
    return "\n".join(lines)


VERIFY_TIMEOUT = 15.0  # seconds per step; a transport's own command timeout (5 min) would look like a hang
VERIFY_STEP_WIDTH = len("certificate")  # the longest step name


def _verify_timeouts(transport: SmtpTransportConfig, timeout: float) -> SmtpTransportConfig:
    if not 0 < timeout <= 600:
        raise UsageError(f"--timeout {timeout:g}: give seconds between 0 and 600")
    return replace(transport, connect_timeout=timeout, command_timeout=timeout)


def cmd_transport_verify(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    transport = config.transports.get(args.name)
    if transport is None:
        raise CliError(f"no transport named {args.name!r}; relay.yaml defines: "
                       f"{', '.join(sorted(config.transports)) or 'none'}")
    if isinstance(transport, CaptureTransportConfig):
        print(f"{args.name} is a capture transport (Maildir {transport.maildir}); nothing to connect to")
        return EXIT_OK
    transport = _verify_timeouts(transport, args.timeout)
    lookup = _credential_lookup(config, args.environ, transport)
    tls = {TlsMode.STARTTLS: "STARTTLS", TlsMode.IMPLICIT: "implicit TLS", TlsMode.NONE: "no TLS"}
    print(f"verifying transport {transport.name} ({transport.host}:{transport.port}, "
          f"{tls[transport.tls]}); no mail is sent; each step waits up to {args.timeout:g}s", flush=True)
    encoding = getattr(sys.stdout, "encoding", None)

    def show(step: VerifyStep) -> None:
        print(format_verify([step], encoding, VERIFY_STEP_WIDTH), flush=True)

    # Connecting and the greeting are one wait; say so before it starts, so a silent
    # upstream is seen as one and not as a hung command.
    print(f"  ... connecting to {transport.host}:{transport.port} and waiting for its greeting", flush=True)
    steps = asyncio.run(verify_transport(transport, credentials=lookup, helo_name=config.hostname, on_step=show))
    ok = bool(steps) and all(s.ok for s in steps)
    print(f"{transport.name}: {'OK' if ok else 'FAILED'}")
    deciding = next((s for s in steps if not s.ok), steps[-1] if steps else None)
    problem = verifyrecord.record(config.spool_dir, transport.name, ok,
                                  f"{deciding.name}: {deciding.detail}" if deciding else "no step ran")
    if problem is not None:
        print(f"note: {problem}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def _credential_lookup(config: RelayConfig, environ: Mapping[str, str],
                       transport: SmtpTransportConfig) -> Callable[[str], CredentialLike | None]:
    if transport.credential is None:
        return lambda name: None
    try:
        store = _open_store(config, environ)
    except CredentialError as exc:
        print(f"cannot open the credential store: {exc}")
        error = exc

        def unreadable(name: str) -> CredentialLike | None:
            raise error

        return unreadable
    return standalone_lookup(config.transports, store)


# ------------------------------------------------------------------ registration


def add_admin_commands(subparsers: Subparsers) -> None:
    """`config check`, `route test`, `transport verify`."""
    group = subparsers.add_parser("config", help="the configuration file")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("check", help="check relay.yaml and every file it names (like postfix check)",
                         description="Exit status 0 when there is no problem, else 1; each problem is "
                         "one line starting with FILE:LINE:COL where the line is known.")
    p.add_argument("file", nargs="?", help="the file to check (default: --config)")
    p.add_argument("--no-files", action="store_true",
                   help="check only the YAML (syntax, schema, references between transports, tenants and "
                   "routes, credential names), not the files it names: for CI and code review, where "
                   "/etc/relayd, the key and the credential store do not exist")
    p.set_defaults(func=cmd_config_check)

    group = subparsers.add_parser("route", help="where mail would go")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("test", help="show the rule and transport chain for addresses (like exim -bt)",
                         description="Exit status 0 when every address has a route, else 1.")
    p.add_argument("--tenant", required=True, help="the tenant whose routes to use")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS", help="recipient addresses to route")
    p.set_defaults(func=cmd_route_test)

    group = subparsers.add_parser("transport", help="upstream transports")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("verify", help="connect, TLS and log in to an upstream without sending mail",
                         description="Each step is printed as soon as it is done; exit status 0 when all "
                         "passed, else 1. The result is kept for `relayctl status`.")
    p.add_argument("name", help="the transport's name in relay.yaml")
    p.add_argument("--timeout", type=float, default=VERIFY_TIMEOUT, metavar="SECONDS",
                   help=f"how long each step may wait for the upstream (default {VERIFY_TIMEOUT:g}s)")
    p.set_defaults(func=cmd_transport_verify)
