"""Router: tenant + recipient -> the rule that matches and its transport chain.

Takes: a `TenantConfig` (its ordered route rules) and a recipient address.
Emits: a `Route` (rule name, ordered transport names), or None when no rule
matches, which the listener turns into a 550 at RCPT time rather than a later
bounce. Untrusted input: the recipient address (only its domain is looked at,
lower-cased). Pure: no I/O, no state; first matching rule wins, as in Exim's
`route_list`.
"""

from __future__ import annotations

from typing import Iterable

from relayd.config.model import RouteRule, TenantConfig
from relayd.values import Route


def domain_of(address: str) -> str:
    """The domain part of an address, lower-cased ('' when there is none)."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


def domain_matches(pattern: str, domain: str) -> bool:
    """Exim-like domain patterns: exact, `*.example.com` (subdomains only), `*`."""
    pattern = pattern.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def match_rule(rules: Iterable[RouteRule], address: str) -> RouteRule | None:
    domain = domain_of(address)
    if not domain:
        return None
    for rule in rules:
        if any(domain_matches(p, domain) for p in rule.domains):
            return rule
    return None


def route(tenant: TenantConfig, address: str) -> Route | None:
    """The route for one recipient of one tenant, or None (no rule matches)."""
    rule = match_rule(tenant.routes, address)
    if rule is None:
        return None
    return Route(rule=rule.name, transports=rule.transports)


def group_by_route(
    tenant: TenantConfig, addresses: Iterable[str]
) -> tuple[dict[Route, list[str]], list[str]]:
    """Split recipients per matching rule (one upstream transaction each).

    Returns the groups and the addresses no rule matched (a config reload can
    remove a rule after a message was accepted; the caller fails those).
    """
    groups: dict[Route, list[str]] = {}
    unrouted: list[str] = []
    for address in addresses:
        r = route(tenant, address)
        if r is None:
            unrouted.append(address)
        else:
            groups.setdefault(r, []).append(address)
    return groups, unrouted
