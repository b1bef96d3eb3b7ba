"""relayctl tenant add, passwd, disable, enable, remove and list: the managed tenants.

Takes: the command line (through relayd.ops.cli), relay.yaml and the managed
tenants file it names (relayd.config.tenants), the running relayd's control
socket (to have it reload after a change).
Emits: the managed tenants file, rewritten under its lock; a tenant's
generated password exactly once, on stdout, with connection details and
client snippets (relayd.ops.clienthelp); one audit-log line per change
(relayd.observe.audit); `tenant list` as a table or `--json`.
Untrusted input: arguments (tenant names, route rules, addresses) and the
files; relay.yaml's own tenants are the admin's and are never rewritten.
How it fails: `CliError` with one sentence; never a password or hash in an
error or the audit log.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from cryptography import x509

from relayd.config.loader import ConfigError, shown_path
from relayd.config.model import RelayConfig, RouteRule, TenantConfig, TlsMode
from relayd.config.passwords import generate_password, hash_password
from relayd.config.tenants import ManagedTenants, TenantRejected, TenantsFileLocked
from relayd.observe.audit import audited
from relayd.ops.clicommon import (
    CONTROL_TIMEOUT,
    EXIT_OK,
    PROG,
    CliError,
    UsageError,
    audit_failure,
    config_path,
    load_relay_config,
    print_json,
    print_table,
    read_password,
)
from relayd.ops.clienthelp import PASSWORD_ENV, SubmissionAccess, client_snippets, sender_for
from relayd.ops.controlclient import ControlClient, ControlUnavailable


def _shown(config: RelayConfig, args: argparse.Namespace, path: Path) -> str:
    return shown_path(str(config_path(args)), config.source, path)


def _managed(config: RelayConfig, args: argparse.Namespace) -> ManagedTenants:
    own = {name: t for name, t in config.tenants.items() if not t.managed}
    return ManagedTenants(
        config.tenants_path,
        shown=_shown(config, args, config.tenants_path),
        transport_names=frozenset(config.transports),
        defined=own,
    )


def _edit_managed(config: RelayConfig, args: argparse.Namespace,
                  change: Callable[[dict[str, TenantConfig]], None]) -> ManagedTenants:
    """Apply `change` to the managed file under its lock; problems become CliError."""
    managed = _managed(config, args)
    try:
        managed.update(change)
    except TenantsFileLocked as exc:
        raise CliError(str(exc)) from None
    except TenantRejected as exc:
        raise CliError(f"not changed: {exc}") from None
    except ConfigError as exc:
        raise CliError(f"{managed.shown} has problems, so relayctl leaves it alone; fix them "
                       f"first (`{PROG} config check`):\n{exc}") from None
    return managed


def _refuse_if_in_relay_yaml(config: RelayConfig, name: str) -> None:
    tenant = config.tenants.get(name)
    if tenant is not None and not tenant.managed:
        raise CliError(f"tenant {name} is defined in {tenant.origin}; edit it there")


def _managed_tenant(tenants: Mapping[str, TenantConfig], name: str) -> TenantConfig:
    tenant = tenants.get(name)
    if tenant is None:
        raise CliError(f"no tenant named {name!r} (see `{PROG} tenant list`)")
    return tenant


def reload_daemon(config: RelayConfig) -> str:
    """Ask the running relayd to reload; returns one sentence saying what happened."""
    fallback = f"run `{PROG} reload` (or systemctl reload relayd) so relayd reads the change"
    try:
        reply = ControlClient(config.control_path, timeout=CONTROL_TIMEOUT).request("reload")
    except ControlUnavailable:
        return "relayd is not running; it reads the change when it starts"
    except OSError as exc:
        return f"could not reach relayd ({exc.strerror or type(exc).__name__}); {fallback}"
    if reply.get("ok"):
        return "relayd reloaded its configuration"
    problems = str(reply.get("error") or "no reason given").splitlines()
    return "relayd kept its running configuration; the reload failed:\n" + "\n".join(
        f"  {line}" for line in problems)


def _audit_log_of(args: argparse.Namespace) -> Path:
    return load_relay_config(args).audit_path


def _tenant_audited(action: str) -> Callable[[Callable[[argparse.Namespace], int]],
                                             Callable[[argparse.Namespace], int]]:
    return audited(action, locate=_audit_log_of, target=lambda a: str(a.name),
                   describe=audit_failure)


# ------------------------------------------------------------- tenant add


def _parse_route(text: str, n: int, tenant: str) -> RouteRule:
    domains, eq, via = text.partition("=")
    if not eq or not domains.strip() or not via.strip():
        raise UsageError(f"--route {text!r}: write DOMAINS=TRANSPORTS, e.g. '*.test,example.com=capture'")
    return RouteRule(
        name=f"{tenant}-{n}",
        domains=tuple(d.strip().lower() for d in domains.split(",") if d.strip()),
        transports=tuple(t.strip() for t in via.split(",") if t.strip()),
    )


def routes_from_args(tenant: str, route_args: Sequence[str], via: str | None) -> tuple[RouteRule, ...]:
    """--route rules in order, then `*` via --via as the last rule; pure."""
    rules = [_parse_route(text, n, tenant) for n, text in enumerate(route_args, start=1)]
    if via is not None:
        chain = tuple(t.strip() for t in via.split(",") if t.strip())
        rules.append(RouteRule(name=f"{tenant}-{len(rules) + 1}", domains=("*",), transports=chain))
    if not rules:
        raise UsageError("give --via T1,T2 (the transports for every domain) or --route DOMAINS=T1,T2")
    return tuple(rules)


def _check_transports_known(config: RelayConfig, rules: Iterable[RouteRule]) -> None:
    known = sorted(config.transports)
    for rule in rules:
        for name in rule.transports:
            if name not in config.transports:
                raise CliError(f"unknown transport {name!r}; relay.yaml defines: {', '.join(known) or 'none'}")


def _listener_access(config: RelayConfig, user: str, senders: Sequence[str] = ()) -> SubmissionAccess:
    """How an application reaches the first listener as `user`, sending from one of `senders`."""
    listener = config.listeners[0]
    host = listener.address
    if ipaddress.ip_address(host).is_unspecified:
        host = config.hostname
    trust = None
    if listener.tls is not TlsMode.NONE and config.tls is not None and _is_self_signed(config.tls.cert_file):
        trust = config.tls.cert_file
    return SubmissionAccess(host, listener.port, listener.tls, user, trust, sender=sender_for(tuple(senders)))


def _is_self_signed(cert_file: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return False
    return cert.issuer == cert.subject


_TLS_WORDS = {TlsMode.STARTTLS: "STARTTLS (port 587 style: connect in plain text, then upgrade)",
              TlsMode.IMPLICIT: "implicit TLS (port 465 style: secure: true)",
              TlsMode.NONE: "none (loopback only)"}


def connection_details(access: SubmissionAccess, password: str) -> str:
    """What an application needs: the settings, the password once, and the snippets."""
    trust = f"\n  trust:    {access.trust_file} (self-signed certificate)" if access.trust_file else ""
    return (
        "Connection settings for the application (the password is shown only this once):\n"
        f"  host:     {access.host}\n"
        f"  port:     {access.port}\n"
        f"  TLS:      {_TLS_WORDS[access.tls]}{trust}\n"
        f"  user:     {access.user}\n"
        f"  password: {password}\n\n"
        f"Put the password in the application's environment as {PASSWORD_ENV}, then:\n\n"
        f"{client_snippets(access)}"
    )


@_tenant_audited("tenant.add")
def cmd_tenant_add(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    _refuse_if_in_relay_yaml(config, args.name)
    rules = routes_from_args(args.name, args.route or (), args.via)
    _check_transports_known(config, rules)
    password = generate_password()
    tenant = TenantConfig(name=args.name, password_hash=hash_password(password),
                          senders=tuple(args.sender), routes=rules, managed=True)

    def add(tenants: dict[str, TenantConfig]) -> None:
        if args.name in tenants:
            raise CliError(f"tenant {args.name} already exists; `{PROG} tenant passwd {args.name}` "
                           "gives it a new password")
        tenants[args.name] = tenant

    managed = _edit_managed(config, args, add)
    print(f"created tenant {args.name} in {managed.shown}")
    print(f"  senders: {', '.join(tenant.senders)}")
    for rule in rules:
        print(f"  route {rule.name}: {', '.join(rule.domains)} via {', '.join(rule.transports)}")
    print()
    print(connection_details(_listener_access(config, args.name, tenant.senders), password))
    print(reload_daemon(config))
    return EXIT_OK


# ------------------------------------------------------- tenant passwd / enable / remove


@_tenant_audited("tenant.passwd")
def cmd_tenant_passwd(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    given = args.password_stdin
    password = read_password(args, f"New password for {args.name}: ", confirm=True) if given \
        else generate_password()
    new_hash = hash_password(password)
    tenant = config.tenants.get(args.name)
    if tenant is not None and not tenant.managed:
        print(f"tenant {args.name} is defined in {tenant.origin}; relayctl does not rewrite that file.")
        print("Replace its password_hash there with this line, then reload relayd:")
        print(f'    password_hash: "{new_hash}"')
        if not given:
            print(f"The new password (shown only this once): {password}")
        return EXIT_OK

    def change(tenants: dict[str, TenantConfig]) -> None:
        old = _managed_tenant(tenants, args.name)
        tenants[args.name] = replace(old, password_hash=new_hash)

    _edit_managed(config, args, change)
    if given:
        print(f"changed the password of tenant {args.name}")
    else:
        print(f"new password for tenant {args.name} (shown only this once): {password}")
    print(reload_daemon(config))
    return EXIT_OK


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    config = load_relay_config(args)
    tenant = config.tenants.get(args.name)
    if tenant is not None and not tenant.managed:
        raise CliError(
            f"tenant {args.name} is defined in {tenant.origin}, which relayctl does not rewrite; there, "
            f"under `{args.name}:`, write\n    enabled: {'true' if enabled else 'false'}\n"
            f"then run `{PROG} reload`"
        )
    word = "enabled" if enabled else "disabled"
    changed: list[bool] = []

    def change(tenants: dict[str, TenantConfig]) -> None:
        old = _managed_tenant(tenants, args.name)
        changed.append(old.enabled != enabled)
        tenants[args.name] = replace(old, enabled=enabled)

    _edit_managed(config, args, change)
    if not changed[0]:
        print(f"tenant {args.name} was already {word}")
        return EXIT_OK
    print(f"tenant {args.name} is now {word}" + ("" if enabled else "; its logins are refused (535)"))
    print(reload_daemon(config))
    return EXIT_OK


@_tenant_audited("tenant.disable")
def cmd_tenant_disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


@_tenant_audited("tenant.enable")
def cmd_tenant_enable(args: argparse.Namespace) -> int:
    return _set_enabled(args, True)


@_tenant_audited("tenant.remove")
def cmd_tenant_remove(args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError(f"removing tenant {args.name} stops its logins at once; add --yes to confirm")
    config = load_relay_config(args)
    _refuse_if_in_relay_yaml(config, args.name)

    def change(tenants: dict[str, TenantConfig]) -> None:
        _managed_tenant(tenants, args.name)
        del tenants[args.name]

    managed = _edit_managed(config, args, change)
    print(f"removed tenant {args.name} from {managed.shown}")
    print(reload_daemon(config))
    return EXIT_OK


# ------------------------------------------------------------------ tenant list


def tenant_summary(tenant: TenantConfig) -> dict[str, object]:
    """What `tenant list` shows of a tenant: never its hash; pure."""
    return {
        "name": tenant.name,
        "enabled": tenant.enabled,
        "senders": list(tenant.senders),
        "routes": [{"name": r.name, "domains": list(r.domains), "via": list(r.transports)}
                   for r in tenant.routes],
        "defined_in": tenant.origin,
        "managed": tenant.managed,
    }


def cmd_tenant_list(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    tenants = sorted(config.tenants.values(), key=lambda t: t.name)
    if args.json:
        print_json([tenant_summary(t) for t in tenants])
        return EXIT_OK
    if not tenants:
        print(f"no tenants; add one with `{PROG} tenant add NAME --sender ADDR --via TRANSPORT`")
        return EXIT_OK
    rows = [
        [t.name, "yes" if t.enabled else "no", ", ".join(t.senders),
         "; ".join(f"{', '.join(r.domains)} -> {', '.join(r.transports)}" for r in t.routes),
         t.origin]
        for t in tenants
    ]
    print_table(["NAME", "ENABLED", "SENDERS", "ROUTES", "DEFINED IN"], rows)
    return EXIT_OK


def add_tenant_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tenant add|passwd|enable|disable|list|remove`, next to relayd.ops.cli's hash-password."""
    p = verbs.add_parser("add", help="create a tenant with a generated password (managed file)")
    p.add_argument("name", help="the tenant's name, which is its SMTP login")
    p.add_argument("--sender", action="append", required=True, metavar="PATTERN",
                   help="an allowed sender: an address or *@domain (repeat for more)")
    p.add_argument("--route", action="append", metavar="DOMAINS=T1,T2",
                   help="a route rule, tried in the order given (repeat for more)")
    p.add_argument("--via", metavar="T1,T2",
                   help="transports for every other domain: a last rule for '*'")
    p.set_defaults(func=cmd_tenant_add)

    p = verbs.add_parser("passwd", help="give a tenant a new password (generated unless --password-stdin)")
    p.add_argument("name", help="the tenant's name (its SMTP login)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the new password from stdin (or a no-echo prompt) instead of generating one")
    p.set_defaults(func=cmd_tenant_passwd)

    for verb, func, text in (("disable", cmd_tenant_disable, "refuse a tenant's logins"),
                             ("enable", cmd_tenant_enable, "accept a disabled tenant's logins again")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("name", help="the tenant's name (its SMTP login)")
        p.set_defaults(func=func)

    p = verbs.add_parser("list", help="tenants, their senders and routes (never hashes)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_tenant_list)

    p = verbs.add_parser("remove", help="delete a managed tenant")
    p.add_argument("name", help="the tenant's name (its SMTP login)")
    p.add_argument("--yes", action="store_true", help="really remove it")
    p.set_defaults(func=cmd_tenant_remove)
