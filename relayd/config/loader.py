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

Relative paths are resolved against the YAML file's directory. The file is
read as a tree that keeps positions (relayd.config.yamltree); the generic checks
are in relayd.config.fields; each section group has its own module
(listenersection, transportsection, tenantsection, webhooksection), and this one composes them
with the small top-level sections (credentials, spool limits, delivery, metrics).
"""


from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from relayd.config import bounds
from relayd.config.fields import SizeSyntaxError, parse_size
from relayd.config.listenersection import ListenerSections
from relayd.config.model import (
    CredentialsConfig,
    DeliveryConfig,
    MetricsConfig,
    RelayConfig,
    SpoolLimits,
    TenantConfig,
)
from relayd.config.retry import DEFAULT_RETRY, parse_retry_schedule
from relayd.config.tenantsection import TenantSections
from relayd.config.transportsection import TransportSections
from relayd.config.usagesection import UsageSections
from relayd.config.webhookconfig import LogFormat
from relayd.config.webhooksection import WebhookSections
from relayd.config.yamltree import (
    MAX_CONFIG_BYTES,
    ConfigError,
    ConfigProblem,
    Map,
    Node,
    Scalar,
    TreeBuilder,
    compose,
    is_broken,
    read_text,
)

# The names other modules take from here: the loader is the config package's front door.
__all__ = ["MAX_CONFIG_BYTES", "ConfigError", "ConfigProblem", "SizeSyntaxError", "load_config",
           "parse_managed_tenants", "parse_size", "shown_path"]

_TOP_KEYS = ("version", "hostname", "spool_dir", "log_file", "pid_file", "control_socket", "tls",
             "credentials", "retry", "delivery", "metrics", "listeners", "transports", "tenants",
             "tenants_file", "audit_log", "spool_limits", "usage", "log_format", "json_log_file", "webhooks")
_MANAGED_TOP_KEYS = ("version", "tenants")
_CREDENTIALS_KEYS = ("store", "master_key_file")
_DELIVERY_KEYS = ("max_parallel", "queue_run_interval", "shutdown_grace")
_METRICS_KEYS = ("address", "port", "status_auth")
_SPOOL_LIMITS_KEYS = ("min_free", "tenant_max_bytes", "tenant_max_messages")


class Reader(ListenerSections, TransportSections, TenantSections, UsageSections, WebhookSections):
    """Checks the whole file section by section, collecting problems and building config values.

    Each getter returns a usable value even after reporting a problem (the
    default), so checking carries on and finds the next problem; the caller
    raises if any problem was collected.
    """

    def relay_config(self, root: Node, source: Path) -> RelayConfig | None:
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
            usage=self.usage(m),
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
        sub = Reader(shown, path.parent, self.check_files, managed=True, bind_owner=self._bind_owner)
        sub._uid_owner = self._uid_owner
        sub.transports_file = self.file
        try:
            tenants = sub.managed_file(read_text(path, shown), transport_names, defined)
        except ConfigError as error:
            self.problems.extend(error.problems)
            return MappingProxyType({})
        self.problems.extend(sub.problems)
        return tenants

    def managed_file(self, text: str, transport_names: frozenset[str],
                     defined: Mapping[str, TenantConfig]) -> Mapping[str, TenantConfig]:
        """A managed tenants file: `version: 1` and a `tenants:` section, nothing else."""
        node = compose(text, self.file)
        if node is None:
            return MappingProxyType({})
        root = self.as_map(TreeBuilder(self.add).build(node), "the tenants file")
        if root is None:
            return MappingProxyType({})
        self.scan_secrets(root, under_tenants=True)
        self.check_keys(root, _MANAGED_TOP_KEYS, "the tenants file")
        self.version(root)
        return self.tenants(root, transport_names, defined)

    def version(self, m: Map) -> None:
        e = m.entry("version")
        if e is None:
            self.add(m.pos, "required key 'version' is missing; start the file with 'version: 1'")
        elif is_broken(e.value):
            return
        elif not (isinstance(e.value, Scalar) and e.value.value == 1
                  and not isinstance(e.value.value, bool)):
            self.add(e.value.pos, "version must be 1, the only relay.yaml format this relayd reads")

    def log_file(self, m: Map) -> Path | None:
        node = m.value("log_file")
        if isinstance(node, Scalar) and node.value == "-":
            return None
        return self.get(m, "log_file", self.path, None)

    def credentials(self, m: Map) -> CredentialsConfig:
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

    def delivery(self, m: Map) -> DeliveryConfig:
        d = DeliveryConfig()
        s = self.section(m, "delivery", _DELIVERY_KEYS)
        if s is None:
            return d
        return DeliveryConfig(
            max_parallel=self.get(s, "max_parallel", self.integer(bounds.PARALLEL), d.max_parallel),
            queue_run_interval=self.get(s, "queue_run_interval", self.duration(bounds.QUEUE_RUN),
                                        d.queue_run_interval),
            shutdown_grace=self.get(s, "shutdown_grace", self.duration(bounds.SHUTDOWN_GRACE),
                                    d.shutdown_grace),
        )

    def spool_limits(self, m: Map) -> SpoolLimits:
        d = SpoolLimits()
        s = self.section(m, "spool_limits", _SPOOL_LIMITS_KEYS)
        if s is None:
            return d
        return SpoolLimits(
            min_free=self.get(s, "min_free", self.size(bounds.SPOOL_BYTES), d.min_free),
            tenant_max_bytes=self.get(s, "tenant_max_bytes", self.size(bounds.SPOOL_BYTES), d.tenant_max_bytes),
            tenant_max_messages=self.get(s, "tenant_max_messages", self.integer(bounds.TENANT_MESSAGES),
                                         d.tenant_max_messages),
        )

    def metrics(self, m: Map) -> MetricsConfig:
        d = MetricsConfig()
        s = self.section(m, "metrics", _METRICS_KEYS)
        if s is None:
            return d
        return MetricsConfig(
            address=self.get(s, "address", self.ip_literal, d.address),
            port=self.get(s, "port", self.integer(bounds.PORT), d.port),
            status_auth=self.get(s, "status_auth", self.credential_name, d.status_auth),
        )


# --------------------------------------------------------------------------- entry point


def load_config(path: Path, *, check_files: bool = True) -> RelayConfig:
    """Read and check relay.yaml; raise ConfigError listing every problem found.

    Problems are reported against `path` as given. With `check_files`, the TLS
    certificate and key, every ca_file and the master key file must exist.
    """
    file = str(path)
    node = compose(read_text(path, file), file)
    if node is None:
        raise ConfigError([ConfigProblem(file, 0, 0, "the file is empty; see config/relay.yaml "
                                                     "for a complete example")])
    source = Path(os.path.abspath(path))
    reader = Reader(file, source.parent, check_files)
    tree = TreeBuilder(reader.add).build(node)
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
    reader = Reader(file, base, False, managed=True, bind_owner=owners)
    reader._uid_owner = {uid: t.name for t in defined.values() for uid in t.local_uids}
    reader.transports_file = config_file
    tenants = reader.managed_file(text, transport_names, defined)
    if reader.problems:
        raise ConfigError(sorted(reader.problems, key=lambda p: (p.line, p.col)))
    return tenants
