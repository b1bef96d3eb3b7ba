"""Tenant quotas and where usage is counted: the frozen values relay.yaml's `quota:` and `usage:` become.

A tenant's `quota:` caps the messages it may submit per day and per month
(calendar windows in `usage.time_zone`, UTC unless set) and says what
happens at the cap: `refuse` answers the next MAIL FROM with a temporary
refusal naming the reset time, `hold` accepts and keeps the message queued
until the window opens. An alert goes out once per window when the usage
crosses `alert_percent` of a cap.

The top-level `usage:` section says where the counts live: the embedded
SQLite store in the spool directory (default), or a Redis server shared by
several relayd nodes that send through one provider account. With Redis,
`local_share` is the part of each cap this node may use on its own while
Redis cannot be reached (never unlimited).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Bounds of the settings (relay.yaml errors name them).
PER_DAY = (1, 100_000_000)
PER_MONTH = (1, 3_000_000_000)
ALERT_PERCENT = (1, 100)
DEFAULT_ALERT_PERCENT = 80  # the figure operators of provider accounts ask for
LOCAL_SHARE = (0.0, 1.0)
DEFAULT_LOCAL_SHARE = 0.5  # two nodes: each may use half a cap while Redis is away
REDIS_TIMEOUT = (0.05, 30.0)
DEFAULT_REDIS_TIMEOUT = 1.0  # seconds per Redis call before the node uses its local share
REDIS_DB = (0, 1023)
QUOTA_KEYS = ("max_per_day", "max_per_month", "on_quota", "alert_percent")
USAGE_KEYS = ("time_zone", "store", "redis")
REDIS_KEYS = ("host", "port", "db", "key_prefix", "timeout", "local_share")


class QuotaAction(enum.Enum):
    """What a tenant at its quota gets."""

    REFUSE = "refuse"  # a 4xx at MAIL FROM (and RCPT) naming the reset time
    HOLD = "hold"  # accepted, held in the queue until the window opens


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """A tenant's caps (None: no cap), what happens at them, and the alert threshold."""

    max_per_day: int | None = None
    max_per_month: int | None = None
    on_quota: QuotaAction = QuotaAction.REFUSE
    alert_percent: int = DEFAULT_ALERT_PERCENT

    @property
    def is_limited(self) -> bool:
        return self.max_per_day is not None or self.max_per_month is not None


NO_QUOTA = TenantQuota()


class CounterStore(enum.Enum):
    SQLITE = "sqlite"
    REDIS = "redis"


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the shared counters are; `local_share` of a cap is this node's own while Redis is away."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    key_prefix: str = "relayd"
    timeout: float = DEFAULT_REDIS_TIMEOUT
    local_share: float = DEFAULT_LOCAL_SHARE


@dataclass(frozen=True, slots=True)
class UsageConfig:
    """The `usage:` section: the counting time zone and the counter store."""

    time_zone: str = "UTC"
    store: CounterStore = CounterStore.SQLITE
    redis: RedisSettings | None = None

    @property
    def zone(self) -> tzinfo:
        return zone_named(self.time_zone)


def zone_named(name: str) -> tzinfo:
    """The IANA time zone `name`; raises ValueError with a sentence when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"there is no time zone named {name!r} (use an IANA name such as UTC or Europe/Paris)") from None
