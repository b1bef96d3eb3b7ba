"""relay.yaml's `webhooks:` section and the log format keys (`log_format:`, `json_log_file:`).

Takes: the top-level `Map` and the names of the tenants defined. Emits: a
`WebhooksConfig` (relayd.config.webhookconfig) and a `LogFormat`. Untrusted
input: every key and value of the section. Fails: records a problem and
carries on. A URL must be http:// or https:// with a host and no user or
password in it (that would be a plaintext secret: the signing secret lives in
the credential store, named by `credential:`); endpoint names are unique
because each names its outbox directory.
"""

from __future__ import annotations

import urllib.parse

from relayd.config import bounds
from relayd.config.fields import FieldReader
from relayd.config.webhookconfig import WEBHOOK_KIND_PATTERN, LogFormat, WebhookEndpoint, WebhooksConfig
from relayd.config.yamltree import Map, Node, Scalar

_WEBHOOKS_KEYS = ("endpoints", "outbox_dir", "max_pending", "retry_min", "retry_max")
_ENDPOINT_KEYS = ("name", "url", "credential", "events", "tenant", "timeout", "max_in_flight", "ca_file")
_URL_LENGTH = 2048


class WebhookSections(FieldReader):
    """Reads the `webhooks:` section and `log_format:`."""

    def log_format(self, node: Node, key: str) -> LogFormat | None:
        found = self.choice(LogFormat)(node, key)
        return found if isinstance(found, LogFormat) else None

    def webhooks(self, m: Map, tenant_names: frozenset[str]) -> WebhooksConfig:
        d = WebhooksConfig()
        s = self.section(m, "webhooks", _WEBHOOKS_KEYS)
        if s is None:
            return d
        retry_min = self.get(s, "retry_min", self.duration(bounds.WEBHOOK_RETRY), d.retry_min)
        retry_max = self.get(s, "retry_max", self.duration(bounds.WEBHOOK_RETRY), d.retry_max)
        if retry_max < retry_min:
            self.add(self.pos_of(s, "retry_max"), "retry_max must not be shorter than retry_min")
        return WebhooksConfig(
            endpoints=self.webhook_endpoints(s, tenant_names),
            outbox_dir=self.get(s, "outbox_dir", self.path, None),
            max_pending=self.get(s, "max_pending", self.integer(bounds.WEBHOOK_PENDING), d.max_pending),
            retry_min=retry_min,
            retry_max=retry_max,
        )

    def webhook_endpoints(self, s: Map, tenant_names: frozenset[str]) -> tuple[WebhookEndpoint, ...]:
        endpoints: list[WebhookEndpoint] = []
        names: set[str] = set()
        for item in self.get(s, "endpoints", lambda n, k: self.as_list(n, k), ()):
            em = self.as_map(item, "a webhook endpoint")
            if em is None:
                continue
            endpoint = self.webhook_endpoint(em, tenant_names)
            name = em.value("name")
            shown = name.value.strip() if isinstance(name, Scalar) and isinstance(name.value, str) else None
            if name is not None and shown in names:
                self.add(name.pos, f"webhook endpoint '{shown}' is defined twice; each needs its own "
                                   "name (it names the endpoint's outbox)")
                continue
            if shown is not None:
                names.add(shown)
            if endpoint is not None:
                endpoints.append(endpoint)
        return tuple(endpoints)

    def webhook_endpoint(self, em: Map, tenant_names: frozenset[str]) -> WebhookEndpoint | None:
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
            timeout=self.get(em, "timeout", self.duration(bounds.WEBHOOK_TIMEOUT), d.timeout),
            max_in_flight=self.get(em, "max_in_flight", self.integer(bounds.WEBHOOK_IN_FLIGHT),
                                   d.max_in_flight),
            ca_file=self.get(em, "ca_file", self.existing_file, None),
        )
        return endpoint if name and url and credential else None

    def webhook_url(self, node: Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        try:
            parts: urllib.parse.SplitResult | None = urllib.parse.urlsplit(s)
            _ = parts.port if parts is not None else None  # a port out of range raises ValueError
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

    def webhook_kind(self, node: Node, key: str) -> str | None:
        s = self.text(node, key)
        if s is None:
            return None
        if WEBHOOK_KIND_PATTERN.fullmatch(s) is None:
            self.add(node.pos, f"'{s}' is not an event kind; write a word such as delivered, deferred, "
                               "bounced or bounce_created")
            return None
        return s
