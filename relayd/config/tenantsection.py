"""relay.yaml's and the managed tenants file's `tenants:` section, with each tenant's routes.

Takes: a `Map` holding `tenants:` and the declared transport names. Emits:
`TenantConfig`s by name, each with its ordered `RouteRule`s. Untrusted input:
every key and value; the managed file is rewritten by `relayctl tenant`. Fails:
records a problem and carries on; a bind address or local user standing for two
tenants, or a route naming an unknown transport, is a problem.
"""

from __future__ import annotations

import pwd
from types import MappingProxyType
from typing import Mapping

from relayd.config import bounds
from relayd.config.fields import LOGIN, FieldReader, suggest
from relayd.config.model import RouteRule, TenantConfig
from relayd.config.yamltree import Map, Node, Pos, Scalar, Seq, is_null


_TENANT_KEYS = ("password_hash", "senders", "bind_addresses", "trust_every_local_user",
                "local_users", "max_recipients", "max_message_size", "enabled", "routes")
_ROUTE_KEYS = ("name", "domains", "via")


class TenantSections(FieldReader):
    """Reads a `tenants:` section and each tenant's routes."""

    def tenants(self, m: Map, transport_names: frozenset[str],
                defined: Mapping[str, TenantConfig] | None = None) -> Mapping[str, TenantConfig]:
        """The tenants section; `defined` are tenants another file already holds."""
        node = m.value("tenants")
        t = self.as_map(node, "tenants") if node is not None else None
        if t is None:
            return MappingProxyType({})
        result: dict[str, TenantConfig] = {}
        for e in t.entries:
            if LOGIN.fullmatch(e.key) is None:
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

    def tenant(self, name: str, tm: Map, transport_names: frozenset[str],
               key_pos: Pos) -> TenantConfig:
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
            max_recipients=self.get(tm, "max_recipients", self.integer(bounds.RECIPIENTS), None),
            max_message_size=self.get(tm, "max_message_size", self.size(bounds.MESSAGE_SIZE), None),
            enabled=self.get(tm, "enabled", self.boolean, True),
            origin=f"{self.file}:{key_pos.line}",
            managed=self.managed,
        )

    def check_bind_owners(self, tenant: str, tm: Map, binds: tuple[str, ...]) -> None:
        """A bind address stands for one tenant only, or the tenant would be a guess."""
        node = tm.value("bind_addresses")
        nodes = node.items if isinstance(node, Seq) else (node,)
        for address, item in zip(binds, nodes):
            owner = self._bind_owner.setdefault(address, tenant)
            if owner != tenant and item is not None:
                self.add(item.pos, f"{address} already stands for tenant '{owner}'; one address "
                                   "can only stand for one tenant")

    def check_bind_trust(self, tenant: str, tm: Map, binds: tuple[str, ...], trusting: bool) -> None:
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

    def check_uid_owners(self, tenant: str, tm: Map, uids: tuple[int, ...]) -> None:
        """A local user submits as one tenant only, or its mail would be a guess."""
        node = tm.value("local_users")
        nodes = node.items if isinstance(node, Seq) else (node,)
        for uid, item in zip(uids, nodes):
            owner = self._uid_owner.setdefault(uid, tenant)
            if owner != tenant and item is not None:
                self.add(item.pos, f"local user {uid} already submits as tenant '{owner}'; a local "
                                   "user can only stand for one tenant")

    def local_users(self, node: Node, key: str) -> tuple[int, ...] | None:
        """User names (looked up now) or uid numbers."""
        items = self.as_list(node, key) if not (isinstance(node, Scalar) and isinstance(node.value, int)) else (node,)
        if items is None:
            return None
        if not items:
            self.add(node.pos, f"{key} must list at least one user name or uid")
            return None
        uids = [self.local_user(item, key) for item in items]
        good = tuple(u for u in uids if u is not None)
        return good if len(good) == len(uids) else None

    def local_user(self, node: Node, key: str) -> int | None:
        """A uid, written as a number or a user name of this machine."""
        return self.system_id(node, key, lambda name: pwd.getpwnam(name).pw_uid,
                              "local user named", "getent passwd", "an existing user name or a uid number")

    def routes(self, tenant: str, tm: Map, transport_names: frozenset[str]) -> tuple[RouteRule, ...]:
        e = tm.entry("routes")
        if e is None:
            self.add(tm.pos, f"required key 'routes' is missing; tenant '{tenant}' needs at least "
                             "one route (domains: [\"*\"], via: [...])")
            return ()
        items = self.as_list(e.value, "routes") if not is_null(e.value) else ()
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

    def route(self, tenant: str, n: int, rm: Map, transport_names: frozenset[str]) -> RouteRule:
        self.check_keys(rm, _ROUTE_KEYS, "a route")
        via = self.via(rm, transport_names)
        return RouteRule(
            name=self.get(rm, "name", self.name("route"), f"{tenant}-{n}"),
            domains=self.need(rm, "domains", self.text_list(self.domain_pattern, "domain pattern"),
                              (), " (use domains: [\"*\"] for every domain)"),
            transports=via,
        )

    def via(self, rm: Map, transport_names: frozenset[str]) -> tuple[str, ...]:
        """The route's transport chain; each unknown name is reported at its own list item."""
        e = rm.entry("via")
        if e is None or is_null(e.value):
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
                guess = suggest(name, sorted(transport_names))
                hint = f"; did you mean '{guess}'?" if guess else ""
                where = f"in {self.transports_file}" if self.managed else "in this file"
                self.add(node.pos, f"via names '{name}', which is not a transport defined "
                                   f"{where}{hint}")
            elif name in chain:
                self.add(node.pos, f"transport '{name}' is listed twice in this route")
            chain.append(name)
        return tuple(chain)
