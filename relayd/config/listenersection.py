"""relay.yaml's `tls:` and `listeners:` sections: addresses, unix sockets and per-session limits.

Takes: the top-level `Map`. Emits: `TlsFiles` and `ListenerConfig`s. Untrusted
input: every key and value of those sections. Fails: records a problem and
carries on (relayd.config.fields); two listeners on one name or address and
port, plaintext AUTH off loopback and TLS without a certificate are problems.
"""

from __future__ import annotations

import dataclasses
import grp
import re

from relayd.config import bounds
from relayd.config.fields import FieldReader, format_seconds, ip_address_of, kind
from relayd.netaddr import is_loopback
from relayd.config.model import ListenerConfig, TlsFiles, TlsMode
from relayd.config.yamltree import Map, Node, Pos, Scalar, is_null


_TLS_KEYS = ("cert", "key")
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


class ListenerSections(FieldReader):
    """Reads the `tls:` and `listeners:` sections."""

    def tls_files(self, m: Map) -> TlsFiles | None:
        t = self.section(m, "tls", _TLS_KEYS)
        if t is None:
            return None
        cert = self.need(t, "cert", self.existing_file, None, " (the certificate chain, PEM)")
        key = self.need(t, "key", self.existing_file, None, " (the private key, PEM)")
        return TlsFiles(cert, key) if cert is not None and key is not None else None

    # -- listeners -----------------------------------------------------------

    def listeners(self, m: Map, has_tls_files: bool) -> tuple[ListenerConfig, ...]:
        e = m.entry("listeners")
        if e is None:
            self.add(m.pos, "required key 'listeners' is missing; add at least one listener")
            return ()
        items = self.as_list(e.value, "listeners") if not is_null(e.value) else ()
        if items is not None and not items:
            self.add(e.key_pos, "listeners must list at least one listener")
        result: list[ListenerConfig] = []
        names: dict[str, Pos] = {}
        bound: list[tuple[str, int, Pos]] = []
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

    def listener(self, lm: Map, has_tls_files: bool) -> ListenerConfig:
        d = ListenerConfig()
        raw_name = lm.value("name")
        shown = raw_name.value if isinstance(raw_name, Scalar) else d.name
        self.check_keys(lm, _LISTENER_KEYS, f"listener '{shown}'")
        name = self.get(lm, "name", self.name("listener"), d.name)
        address = self.get(lm, "address", self.ip_literal, d.address)
        unix_path = self.get(lm, "unix", self.path, None)
        tls = self.get(lm, "tls", self.tls_mode, d.tls) if unix_path is None else TlsMode.NONE
        plain = self.get(lm, "allow_plaintext_auth", self.boolean, d.allow_plaintext_auth)
        if plain and not is_loopback(address) and ip_address_of(address) is not None:
            self.add(self.pos_of(lm, "allow_plaintext_auth"),
                     f"allow_plaintext_auth: true is only allowed on a loopback address "
                     f"(127.0.0.0/8 or ::1); on {address} passwords would cross the network in clear")
        if tls is not TlsMode.NONE and not has_tls_files:
            self.add(self.pos_of(lm, "tls"),
                     f"listener '{name}' uses tls: {tls.value}, which needs the top-level tls: "
                     "section with cert and key; add it, or use tls: none on a loopback listener")
        delay = self.get(lm, "auth_failures_before_delay", self.integer(bounds.AUTH_FAILURES),
                         d.auth_failures_before_delay)
        drop = self.get(lm, "auth_failures_before_disconnect", self.integer(bounds.AUTH_FAILURES),
                        d.auth_failures_before_disconnect)
        if drop < delay:
            self.add(self.pos_of(lm, "auth_failures_before_disconnect"),
                     f"auth_failures_before_disconnect ({drop}) must not be below "
                     f"auth_failures_before_delay ({delay})")
        lockout = self.get(lm, "auth_lockout", self.duration(bounds.AUTH_LOCKOUT), d.auth_lockout)
        lockout_max = self.get(lm, "auth_lockout_max", self.duration(bounds.AUTH_LOCKOUT), d.auth_lockout_max)
        if lockout_max < lockout:
            self.add(self.pos_of(lm, "auth_lockout_max"),
                     f"auth_lockout_max ({format_seconds(lockout_max)}) must not be below "
                     f"auth_lockout ({format_seconds(lockout)})")
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
            port=self.get(lm, "port", self.integer(bounds.PORT), d.port),
            tls=tls,
            allow_plaintext_auth=plain,
            max_message_size=self.get(lm, "max_message_size", self.size(bounds.MESSAGE_SIZE),
                                      d.max_message_size),
            max_recipients=self.get(lm, "max_recipients", self.integer(bounds.RECIPIENTS), d.max_recipients),
            command_timeout=self.get(lm, "command_timeout", self.duration(bounds.TIMEOUT), d.command_timeout),
            data_timeout=self.get(lm, "data_timeout", self.duration(bounds.TIMEOUT), d.data_timeout),
            max_line_length=self.get(lm, "max_line_length", self.integer(bounds.LINE_LENGTH),
                                     d.max_line_length),
            max_header_size=self.get(lm, "max_header_size", self.size(bounds.HEADER_SIZE), d.max_header_size),
            max_received_headers=self.get(lm, "max_received_headers", self.integer(bounds.RECEIVED_HEADERS),
                                          d.max_received_headers),
            auth_failures_before_delay=delay,
            auth_failures_before_disconnect=drop,
            auth_failure_window=self.get(lm, "auth_failure_window", self.duration(bounds.AUTH_WINDOW),
                                         d.auth_failure_window),
            auth_failures_per_source=self.get(lm, "auth_failures_per_source",
                                              self.integer(bounds.AUTH_SOURCE_BUDGET), d.auth_failures_per_source),
            auth_lockout=lockout,
            auth_lockout_max=lockout_max,
            unix_path=unix_path,
            unix_mode=self.get(lm, "mode", self.file_mode, d.unix_mode),
            unix_group=self.get(lm, "group", self.group, d.unix_group),
        )
        return self.listener_limits(lm, listener)

    def listener_limits(self, lm: Map, d: ListenerConfig) -> ListenerConfig:
        """`d` with the connection, command, error and data-rate bounds read from `lm`."""
        total = self.get(lm, "max_connections", self.integer(bounds.CLIENT_CONNECTIONS), d.max_connections)
        per_ip = self.get(lm, "max_connections_per_ip", self.integer(bounds.CLIENT_CONNECTIONS),
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
                                              self.integer(bounds.COMMANDS_BEFORE_AUTH),
                                              d.max_commands_before_auth),
            hard_error_limit=self.get(lm, "hard_error_limit", self.integer(bounds.ERROR_LIMIT),
                                      d.hard_error_limit),
            min_data_rate=self.get(lm, "min_data_rate", self.integer(bounds.DATA_RATE), d.min_data_rate),
        )

    def file_mode(self, node: Node, key: str) -> int | None:
        """Permission bits in octal, as chmod takes them ("0660"; YAML's own 0660 is fine too)."""
        text = node.raw if isinstance(node, Scalar) else ""
        if re.fullmatch(r"0?[0-7]{3}", text.strip()) is None:
            self.add(node.pos, f"{key} must be permission bits in octal such as \"0660\" "
                               f"(owner, group, others), but this is {kind(node)}")
            return None
        return int(text.strip(), 8)

    def group(self, node: Node, key: str) -> int | None:
        """A gid, written as a number or a group name of this machine."""
        return self.system_id(node, key, lambda name: grp.getgrnam(name).gr_gid,
                              "group named", "getent group", "an existing group or a gid number")

    def check_unique_listener(self, lm: Map, listener: ListenerConfig, names: dict[str, Pos],
                              bound: list[tuple[str, int, Pos]]) -> None:
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


def _addresses_overlap(a: str, b: str) -> bool:
    """Whether binding both a and b on one port would clash (same, or one is a wildcard)."""
    ia, ib = ip_address_of(a), ip_address_of(b)
    if ia is None or ib is None:
        return a == b
    if ia == ib:
        return True
    return ia.version == ib.version and (ia.is_unspecified or ib.is_unspecified)
