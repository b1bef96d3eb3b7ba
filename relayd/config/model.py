"""The validated, immutable configuration every stage reads.

`relayd.config.loader.load_config()` turns `relay.yaml` into a `RelayConfig`; nothing
else parses YAML. Every object here is frozen, so a reload builds a whole new
`RelayConfig` and swaps it in at once, or keeps the old one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

from relayd.config.quota import NO_QUOTA, TenantQuota, UsageConfig
from relayd.config.retry import DEFAULT_RETRY, RetrySchedule, parse_retry_schedule
from relayd.config.shaping import UNSHAPED, Shaping
from relayd.config.webhookconfig import LogFormat, WebhooksConfig


class TlsMode(enum.Enum):
    """How a connection is protected.

    STARTTLS: plaintext greeting, then a required TLS upgrade.
    IMPLICIT: TLS from the first byte (port 465).
    NONE: no TLS; only allowed towards/for loopback addresses.
    """

    STARTTLS = "starttls"
    IMPLICIT = "implicit"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One SMTP submission listener. Defaults are the production defaults."""

    name: str = "submission"
    address: str = "127.0.0.1"
    port: int = 587
    tls: TlsMode = TlsMode.STARTTLS
    # AUTH before TLS is refused unless this is true AND the listener's address
    # is loopback: on loopback nothing crosses a wire.
    allow_plaintext_auth: bool = False
    max_message_size: int = 25 * 1024 * 1024  # Gmail's limit; announced in SIZE
    max_recipients: int = 100  # Gmail's per-message limit over SMTP
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: server timeout 5 minutes
    data_timeout: float = 600.0  # idle time allowed between DATA chunks
    max_line_length: int = 998  # RFC 5322 2.1.1, excluding CRLF
    max_header_size: int = 100 * 1024  # header block held in memory for policy (Postfix header_size_limit)
    max_received_headers: int = 50  # more Received: fields is a mail loop (Postfix hopcount_limit)
    # Login throttling (relayd.smtp.authguard): per login name attempted, plus a
    # budget per source (loopback counts as one source).
    auth_failures_before_delay: int = 3  # failures of one login before its 535s slow down
    auth_failures_before_disconnect: int = 10  # failures of one login before it is locked out
    auth_failure_window: float = 900.0  # "back off 15-30 minutes"
    # Open connections on this listener: each holds a descriptor and memory.
    max_connections: int = 1000
    # Per client address (Postfix's smtpd_client_connection_count_limit). Not
    # applied to loopback clients unless per_ip_limit_on_loopback: every local
    # application connects from 127.0.0.1, and one must not lock out the others.
    max_connections_per_ip: int = 50
    per_ip_limit_on_loopback: bool = False
    max_commands_before_auth: int = 30  # EHLO, STARTTLS, EHLO, AUTH need 4
    hard_error_limit: int = 20  # refused commands per connection (Postfix's default)
    min_data_rate: int = 500  # bytes/s averaged over DATA (Postfix's smtpd_min_data_rate)
    auth_failures_per_source: int = 30  # failures from one source within the window
    auth_lockout: float = 60.0  # first lockout of a login; doubles per further failure
    auth_lockout_max: float = 900.0
    # A Unix-socket listener (relayd-sendmail): the path, instead of address
    # and port; the peer's uid (SO_PEERCRED) picks the tenant (local_users).
    unix_path: Path | None = None
    unix_mode: int = 0o666  # who may connect; relayd still refuses uids no tenant lists
    unix_group: int | None = None  # gid to give the socket; None: relayd's own


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The certificate and key the listeners present."""

    cert_file: Path
    key_file: Path


# The upstream AUTH mechanisms relayd implements (relayd.delivery.upstreamauth.MECHANISMS;
# a test keeps the two equal), for `auth_mechanism:` in a transport.
UPSTREAM_AUTH_MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2")


class OAuthGrant(enum.Enum):
    """How a transport's OAuth 2.0 access tokens are obtained (`auth: grant:`)."""

    REFRESH_TOKEN = "refresh_token"  # delegated: a mailbox's owner consented once (Google, Microsoft)
    CLIENT_CREDENTIALS = "client_credentials"  # Microsoft 365 app-only (SMTP.SendAsApp)
    SERVICE_ACCOUNT = "service_account"  # Google Workspace domain-wide delegation (JWT assertion)


@dataclass(frozen=True, slots=True)
class OAuthConfig:
    """A transport's `auth:` block: where its XOAUTH2 access tokens come from.

    Only public settings live here; the client secret, refresh token, private
    key and cached access token are in the encrypted credential store under
    the transport's `credential:` name (relayd.config.credentials).
    Defaults for the URLs and scope come from `relayd.config.oauthpresets`.
    """

    grant: OAuthGrant
    provider: str  # "google" or "microsoft"
    client_id: str
    token_url: str
    scope: str
    authorize_url: str  # for `relayctl oauth authorize` (authorization code with PKCE)
    device_url: str  # for `relayctl oauth authorize --device` ("" when the provider has none)
    user: str | None = None  # the XOAUTH2 user; None: the account stored by `oauth authorize`
    tenant: str | None = None  # Microsoft Entra tenant (id or domain)
    refresh_margin: float = 300.0  # refresh this long before the token expires
    timeout: float = 30.0  # one token request, connect to last byte


@dataclass(frozen=True, slots=True)
class SmtpTransportConfig:
    """An upstream SMTP server (Gmail, SendGrid, Mailgun, SES, ...)."""

    name: str
    host: str
    port: int
    tls: TlsMode = TlsMode.STARTTLS
    credential: str | None = None  # name in the encrypted credential store
    verify_certificate: bool = True
    ca_file: Path | None = None
    helo_name: str | None = None  # defaults to RelayConfig.hostname
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    retry: RetrySchedule | None = None  # defaults to RelayConfig.retry
    max_connections: int = 10
    max_messages_per_connection: int = 100
    idle_timeout: float = 10.0  # keep an idle upstream connection this long for reuse
    # The provider (a preset name: gmail, sendgrid, ...; from the preset, else
    # from a well-known host) whose reply texts and hints apply.
    provider: str | None = None
    # The SASL mechanism to log in with (one of UPSTREAM_AUTH_MECHANISMS);
    # None: the first of relayd.delivery.upstreamauth.PREFERENCE the upstream offers.
    auth_mechanism: str | None = None
    # Deliveries the scheduler starts at once on this transport (None: see
    # RelayConfig.transport_max_parallel), so one slow provider cannot take
    # every delivery slot.
    max_parallel: int | None = None
    # Where XOAUTH2 access tokens come from (`auth:`); None: a password credential.
    oauth: OAuthConfig | None = None
    # Send limits (relayd.config.shaping): the preset's, overridden by relay.yaml.
    shaping: Shaping = UNSHAPED


@dataclass(frozen=True, slots=True)
class CaptureTransportConfig:
    """A transport that writes each message into a Maildir (development)."""

    name: str
    maildir: Path
    retry: RetrySchedule | None = None
    max_parallel: int | None = None  # as SmtpTransportConfig.max_parallel
    shaping: Shaping = UNSHAPED  # as SmtpTransportConfig.shaping


TransportConfig = Union[SmtpTransportConfig, CaptureTransportConfig]


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Recipients whose domain matches `domains` go through `transports`, in order.

    A domain pattern is an exact domain, `*.example.com` (any subdomain, not
    example.com itself), or `*` (anything). Matching is case-insensitive.
    """

    name: str
    domains: tuple[str, ...]
    transports: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """An organisation or application allowed to submit mail."""

    name: str  # also the SMTP AUTH login
    password_hash: str | None
    senders: tuple[str, ...]  # addresses or *@domain
    routes: tuple[RouteRule, ...]
    # Loopback addresses whose connections count as this tenant without AUTH;
    # only with trust_every_local_user (any local program can use them).
    bind_addresses: tuple[str, ...] = ()
    trust_every_local_user: bool = False
    # Local uids whose submissions on a Unix-socket listener are this tenant.
    local_uids: tuple[int, ...] = ()
    max_recipients: int | None = None
    max_message_size: int | None = None
    enabled: bool = True
    quota: TenantQuota = NO_QUOTA  # messages per day / month (relayd.config.quota)
    # Where the tenant is defined ("relay.yaml:42"), and whether that is the
    # managed tenants file that `relayctl tenant` rewrites (relay.yaml never is).
    origin: str = ""
    managed: bool = False


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """Where the encrypted upstream credentials and their master key live.

    The key is looked for in $CREDENTIALS_DIRECTORY/relayd-master-key (systemd
    LoadCredential), then $RELAYD_MASTER_KEY, then `master_key_file`.
    """

    store: Path
    master_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """How hard the scheduler works."""

    max_parallel: int = 20  # messages in delivery at once
    queue_run_interval: float = 60.0  # longest sleep between looks at the due heap (clock jumps)
    shutdown_grace: float = 10.0  # seconds to let in-flight deliveries finish on SIGTERM


@dataclass(frozen=True, slots=True)
class SpoolLimits:
    """How much of the spool's disk new mail may use (relayd.queue.spoolroom)."""

    # Free space under which new mail is refused (452 4.3.1), so outcomes and
    # bounces can always be recorded. None: 4 x the largest max_message_size + 64 MiB.
    min_free: int | None = None
    tenant_max_bytes: int | None = None  # one tenant's queued bytes; None: half the file system
    tenant_max_messages: int = 50_000  # one tenant's queued messages


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    address: str = "127.0.0.1"
    port: int | None = None  # None: no HTTP exporter (and no status page)
    # A credential store entry (user and password) for HTTP basic auth on /metrics and the
    # status page; None: no authentication (the listener is loopback by default).
    status_auth: str | None = None


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The whole configuration, as one immutable value."""

    source: Path
    hostname: str
    spool_dir: Path
    log_file: Path | None  # None: log to stderr
    credentials: CredentialsConfig
    listeners: tuple[ListenerConfig, ...]
    transports: Mapping[str, TransportConfig]
    tenants: Mapping[str, TenantConfig]
    tls: TlsFiles | None = None
    retry: RetrySchedule = field(default_factory=lambda: parse_retry_schedule(DEFAULT_RETRY))
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    spool_limits: SpoolLimits = field(default_factory=SpoolLimits)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control_socket: Path | None = None  # defaults to <spool_dir>/control.sock
    pid_file: Path | None = None
    tenants_file: Path | None = None  # defaults to tenants.yaml next to the credential store
    audit_log: Path | None = None  # defaults to audit.log next to log_file (else the store)
    usage: UsageConfig = field(default_factory=UsageConfig)  # counting time zone and counter store
    log_format: LogFormat = LogFormat.TEXT  # what log_file holds (relayd.observe.jsonlog for json)
    json_log_file: Path | None = None  # a second log with one JSON object per event
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)

    @property
    def webhook_outbox(self) -> Path:
        return self.webhooks.outbox_dir or self.spool_dir / "webhooks"

    def tenant_for_uid(self, uid: int) -> TenantConfig | None:
        """The tenant a local user submits as on a Unix-socket listener (enabled or not)."""
        for tenant in self.tenants.values():
            if uid in tenant.local_uids:
                return tenant
        return None

    def retry_for(self, transport_name: str) -> RetrySchedule:
        t = self.transports.get(transport_name)
        return (t.retry if t is not None and t.retry is not None else self.retry)

    def transport_shaping(self, transport_name: str) -> Shaping:
        """A transport's send limits (UNSHAPED for a name no transport has)."""
        t = self.transports.get(transport_name)
        return t.shaping if t is not None else UNSHAPED

    def transport_max_parallel(self, transport_name: str) -> int:
        """How many deliveries may start on one transport at once.

        Default: half of `delivery.max_parallel` (at least 1), and for SMTP no
        more than the transport's `max_connections` (more would only wait for
        a connection while holding a delivery slot). So a slow upstream holds
        at most half the slots and every other upstream keeps the rest.
        """
        t = self.transports.get(transport_name)
        if t is not None and t.max_parallel is not None:
            return t.max_parallel
        limit = max(1, self.delivery.max_parallel // 2)
        if isinstance(t, SmtpTransportConfig):
            limit = min(limit, t.max_connections)
        return limit

    @property
    def control_path(self) -> Path:
        return self.control_socket or self.spool_dir / "control.sock"

    @property
    def tenants_path(self) -> Path:
        """The managed tenants file: relayctl's own, so relay.yaml is never rewritten."""
        return self.tenants_file or self.credentials.store.parent / "tenants.yaml"

    @property
    def audit_path(self) -> Path:
        """Where relayctl appends one JSON line per admin action."""
        if self.audit_log is not None:
            return self.audit_log
        return (self.log_file or self.credentials.store).parent / "audit.log"
