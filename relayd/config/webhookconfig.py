"""Webhook endpoints and the JSON log, as frozen configuration values.

`relayd.config.loader` builds these from the `webhooks:` section and the
`log_format:` / `json_log_file:` keys of relay.yaml; `relayd.observe.webhooks`
and `relayd.observe.jsonlog` read them. Every number has its default here and
its bounds in the loader (repeated in the comments of config/relay.yaml).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path


class LogFormat(enum.Enum):
    """What `log_file` holds: Exim-shaped lines (text) or one JSON object per event."""

    TEXT = "text"
    JSON = "json"


# The event kinds relayd sends to webhooks today (relayd.observe.webhookbody.KINDS;
# a test keeps the two equal). A kind not listed here is still accepted if it
# is spelled like one: a later relayd may emit it, and a relay.yaml written for
# it should not stop this one from starting (the daemon logs a warning instead).
WEBHOOK_EVENT_KINDS = ("delivered", "deferred", "bounced", "bounce_created")
DEFAULT_WEBHOOK_EVENTS = WEBHOOK_EVENT_KINDS
WEBHOOK_KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """One receiver: where events go, which ones, and the store entry holding its signing secret."""

    name: str  # names its outbox and its log lines
    url: str  # http:// or https:// only; https verifies the certificate
    credential: str  # the HMAC-SHA256 secret's name in the encrypted credential store
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    tenant: str | None = None  # None: every tenant's events (a global endpoint)
    timeout: float = 10.0  # one request, connect to last byte of the answer
    max_in_flight: int = 4  # requests open at once to this endpoint
    ca_file: Path | None = None  # a private CA for an https receiver; None: the system's


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """All endpoints and the outbox they share."""

    endpoints: tuple[WebhookEndpoint, ...] = ()
    outbox_dir: Path | None = None  # None: <spool_dir>/webhooks
    # Events waiting per endpoint; past it the oldest is dropped (counted and logged).
    max_pending: int = 20_000
    retry_min: float = 5.0  # first delay after a failed request
    retry_max: float = 600.0  # the exponential backoff stops growing here
