"""relay.yaml's `transports:` section: SMTP upstreams (with provider presets) and capture maildirs.

Takes: the top-level `Map`. Emits: `TransportConfig`s by name, and the names of
all declared ones for the routes' `via` checks. Untrusted input: every key and
value of the section. Fails: records a problem and carries on; mail in clear off
this machine, or a login sent in clear or unverified, is a problem. A new
transport key is one entry in `_SMTP_KEYS` and one line in `smtp_transport`.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from relayd.config import bounds
from relayd.config.fields import NAME, FieldReader, kind
from relayd.netaddr import is_loopback
from relayd.config.model import (
    UPSTREAM_AUTH_MECHANISMS,
    CaptureTransportConfig,
    SmtpTransportConfig,
    TlsMode,
    TransportConfig,
)
from relayd.config.presets import PROVIDER_PRESETS, PresetError, resolve_preset
from relayd.config.yamltree import Map, Node, Scalar


_SMTP_KEYS = ("type", "preset", "host", "port", "tls", "credential", "verify_certificate",
              "ca_file", "helo_name", "connect_timeout", "command_timeout", "retry",
              "max_connections", "max_messages_per_connection", "idle_timeout", "region",
              "max_parallel", "auth_mechanism")
_CAPTURE_KEYS = ("type", "maildir", "retry", "max_parallel")


class TransportSections(FieldReader):
    """Reads the `transports:` section."""

    def auth_mechanism(self, node: Node, key: str) -> str | None:
        v = node.value if isinstance(node, Scalar) else None
        if isinstance(v, str) and v.strip().upper() in UPSTREAM_AUTH_MECHANISMS:
            return v.strip().upper()
        shown = f"'{v}'" if isinstance(v, str) else kind(node)
        allowed = ", ".join(m.lower() for m in UPSTREAM_AUTH_MECHANISMS)
        self.add(node.pos, f"{key} must be one of {allowed}; {shown} is not")
        return None


    # -- transports ----------------------------------------------------------

    def transports(self, m: Map) -> tuple[Mapping[str, TransportConfig], frozenset[str]]:
        """The valid transports, and the names of all declared ones (for `via` checks)."""
        node = m.value("transports")
        t = self.as_map(node, "transports") if node is not None else None
        if t is None:
            return MappingProxyType({}), frozenset()
        result: dict[str, TransportConfig] = {}
        for e in t.entries:
            if NAME.fullmatch(e.key) is None:
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

    def transport_type(self, node: Node, key: str) -> str | None:
        v = node.value if isinstance(node, Scalar) else None
        if v in ("smtp", "capture"):
            return str(v)
        shown = f"'{v}'" if isinstance(v, str) else kind(node)
        self.add(node.pos, f"type must be one of smtp, capture; {shown} is not")
        return None

    def capture_transport(self, name: str, tm: Map) -> CaptureTransportConfig:
        self.check_keys(tm, _CAPTURE_KEYS, f"capture transport '{name}'")
        return CaptureTransportConfig(
            name=name,
            maildir=self.need(tm, "maildir", self.path, Path(".")),
            retry=self.get(tm, "retry", self.schedule, None),
            max_parallel=self.get(tm, "max_parallel", self.integer(bounds.PARALLEL), None),
        )

    def smtp_transport(self, name: str, tm: Map) -> SmtpTransportConfig:
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
            port=self.get(tm, "port", self.integer(bounds.PORT), default_port),
            tls=tls,
            credential=credential,
            verify_certificate=verify,
            ca_file=self.get(tm, "ca_file", self.existing_file, None),
            helo_name=self.get(tm, "helo_name", self.hostname, None),
            connect_timeout=self.get(tm, "connect_timeout", self.duration(bounds.TIMEOUT), d.connect_timeout),
            command_timeout=self.get(tm, "command_timeout", self.duration(bounds.TIMEOUT), d.command_timeout),
            retry=self.get(tm, "retry", self.schedule, None),
            max_connections=self.get(tm, "max_connections", self.integer(bounds.CONNECTIONS),
                                     d.max_connections),
            max_messages_per_connection=self.get(
                tm, "max_messages_per_connection", self.integer(bounds.MESSAGES_PER_CONNECTION),
                d.max_messages_per_connection),
            idle_timeout=self.get(tm, "idle_timeout", self.duration(bounds.IDLE), d.idle_timeout),
            provider=preset.name if preset else None,
            max_parallel=self.get(tm, "max_parallel", self.integer(bounds.PARALLEL), None),
            auth_mechanism=mechanism,
        )

    def check_transport_safety(self, tm: Map, host: str, tls: TlsMode, credential: str | None,
                               verify: bool) -> None:
        """Mail may go in clear only to this machine; a login never goes unverified."""
        if tls is TlsMode.NONE and host and not is_loopback(host):
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
