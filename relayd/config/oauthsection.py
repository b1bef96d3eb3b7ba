"""A transport's `auth:` block in relay.yaml: where its XOAUTH2 access tokens come from.

Takes: one SMTP transport's `Map`, its preset, credential name and
`auth_mechanism`. Emits: an `OAuthConfig` with the provider's endpoints and
scope filled in (relayd.config.oauthpresets), or None without an `auth:`
block. Untrusted input: every key and value of the block. Fails: records a
problem and carries on; a secret written in the block is reported (by the
reader's secret scan) and never repeated, and a token endpoint must be https
(http only to this machine).
"""

from __future__ import annotations

import urllib.parse

from relayd.config import bounds
from relayd.config.fields import FieldReader
from relayd.config.model import OAuthConfig, OAuthGrant
from relayd.config.oauthpresets import PRESET_PROVIDER, OAuthEndpoints, OAuthPresetError, oauth_endpoints
from relayd.config.yamltree import Map, Node
from relayd.netaddr import is_loopback

OAUTH_KEYS = ("grant", "provider", "client_id", "tenant", "user", "token_url", "authorize_url",
              "device_url", "scope", "refresh_margin", "timeout")


class OAuthSection(FieldReader):
    """Reads the `auth:` block of an SMTP transport."""

    def oauth(self, tm: Map, preset: str | None, credential: str | None,
              mechanism: str | None) -> OAuthConfig | None:
        """A transport's `auth:` block (its secrets stay in the store)."""
        node = tm.value("auth")
        am = self.as_map(node, "auth") if node is not None else None
        if am is None:
            if mechanism == "XOAUTH2":
                self.add(self.pos_of(tm, "auth_mechanism"),
                         "auth_mechanism: xoauth2 needs an auth: block saying where tokens come from")
            return None
        self.check_keys(am, OAUTH_KEYS, "auth")
        if credential is None:
            self.add(self.pos_of(tm, "auth"), "auth: needs credential: naming where the store keeps its "
                                              "secrets (set them with `relayctl oauth authorize NAME`)")
        if mechanism is not None and mechanism != "XOAUTH2":
            self.add(self.pos_of(tm, "auth_mechanism"), "an auth: block logs in with XOAUTH2 only")
        grant = self.need(am, "grant", self.choice(OAuthGrant), OAuthGrant.REFRESH_TOKEN)
        grant = grant if isinstance(grant, OAuthGrant) else OAuthGrant.REFRESH_TOKEN
        implied = PRESET_PROVIDER.get(preset or "")
        if implied is None:
            provider = self.need(am, "provider", self.text, "google", " (google or microsoft)")
        else:
            provider = self.get(am, "provider", self.text, implied)
        tenant = self.get(am, "tenant", self.text, None)
        try:
            found = oauth_endpoints(provider.lower(), grant, tenant)
        except OAuthPresetError as exc:
            self.add(self.pos_of(am, "tenant" if "tenant" in str(exc) and tenant else "grant"), str(exc))
            found = OAuthEndpoints("", "", "", "")
        user = self.get(am, "user", self.text, None)
        if user is None and grant is OAuthGrant.SERVICE_ACCOUNT:
            self.add(am.pos, "grant: service_account needs user: (the Workspace mailbox to send as)")
        if user is not None and ("\x01" in user or not user.isprintable()):
            self.add(self.pos_of(am, "user"), "user must be printable text")
        return OAuthConfig(
            grant=grant,
            provider=provider.lower(),
            client_id=self.need(am, "client_id", self.text, ""),
            token_url=self.get(am, "token_url", self.token_endpoint, found.token_url),
            scope=self.get(am, "scope", self.text, found.scope),
            authorize_url=self.get(am, "authorize_url", self.token_endpoint, found.authorize_url),
            device_url=self.get(am, "device_url", self.token_endpoint, found.device_url),
            user=user,
            tenant=tenant,
            refresh_margin=self.get(am, "refresh_margin", self.duration(bounds.REFRESH_MARGIN), 300.0),
            timeout=self.get(am, "timeout", self.duration(bounds.TOKEN_TIMEOUT), 30.0),
        )

    def token_endpoint(self, node: Node, key: str) -> str | None:
        """An https URL, or http only to this machine (a test's or a local proxy's endpoint)."""
        text = self.text(node, key)
        if text is None:
            return None
        parts = urllib.parse.urlsplit(text)
        host = parts.hostname or ""
        if parts.scheme == "https" and host or parts.scheme == "http" and is_loopback(host):
            return text
        self.add(node.pos, f"{key} must be an https:// URL (http:// only to a loopback host); "
                           f"'{text}' is not")
        return None
