"""relay.yaml's `usage:` section and each tenant's `quota:` (relayd.config.quota).

Takes: the top-level `Map` (for `usage:`) and a tenant's `Map` (for `quota:`).
Emits: a `UsageConfig` and `TenantQuota`s. Untrusted input: every key and
value. Fails: records a problem and carries on with the default.
"""

from __future__ import annotations

from relayd.config import quota as q
from relayd.config.fields import FieldReader
from relayd.config.yamltree import Map, Node, Scalar


class UsageSections(FieldReader):
    """Reads the usage counters' settings and the tenant quotas."""

    def usage(self, m: Map) -> q.UsageConfig:
        """The `usage:` section: counting time zone and counter store."""
        d = q.UsageConfig()
        s = self.section(m, "usage", q.USAGE_KEYS)
        if s is None:
            return d
        store = q.CounterStore(self.get(s, "store", self.choice(q.CounterStore), d.store).value)
        redis_node = s.value("redis")
        redis = self.redis(redis_node) if redis_node is not None else None
        if store is q.CounterStore.REDIS and redis is None and redis_node is None:
            self.add(self.pos_of(s, "store"), "store: redis needs a redis: section (host, port) below it")
        return q.UsageConfig(
            time_zone=self.get(s, "time_zone", self.time_zone, d.time_zone),
            store=store, redis=redis if store is q.CounterStore.REDIS else None,
        )

    def redis(self, node: Node) -> q.RedisSettings | None:
        r = self.as_map(node, "redis")
        if r is None:
            return None
        self.check_keys(r, q.REDIS_KEYS, "usage.redis")
        d = q.RedisSettings()
        return q.RedisSettings(
            host=self.get(r, "host", self.host, d.host),
            port=self.get(r, "port", self.integer((1, 65535)), d.port),
            db=self.get(r, "db", self.integer(q.REDIS_DB), d.db),
            key_prefix=self.get(r, "key_prefix", self.name("key_prefix"), d.key_prefix),
            timeout=self.get(r, "timeout", self.duration(q.REDIS_TIMEOUT), d.timeout),
            local_share=self.get(r, "local_share", self.fraction, d.local_share),
        )

    def fraction(self, node: Node, key: str) -> float | None:
        v = node.value if isinstance(node, Scalar) else None
        lo, hi = q.LOCAL_SHARE
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            self.add(node.pos, f"{key} must be a number from {lo:g} to {hi:g} (a share of each cap), such as 0.5")
            return None
        return float(v)

    def time_zone(self, node: Node, key: str) -> str | None:
        name = self.text(node, key)
        if name is None:
            return None
        try:
            q.zone_named(name)
        except ValueError as error:
            self.add(node.pos, f"{key}: {error}")
            return None
        return name

    def tenant_quota(self, tenant: str, tm: Map) -> q.TenantQuota:
        node = tm.value("quota")
        qm = self.as_map(node, "quota") if node is not None else None
        if node is None or qm is None:
            return q.NO_QUOTA
        self.check_keys(qm, q.QUOTA_KEYS, f"tenant '{tenant}' quota")
        d = q.TenantQuota()
        if qm.value("max_per_day") is None and qm.value("max_per_month") is None:
            self.add(node.pos, f"tenant '{tenant}' quota needs max_per_day or max_per_month (or remove quota:)")
        return q.TenantQuota(
            max_per_day=self.get(qm, "max_per_day", self.integer(q.PER_DAY), None),
            max_per_month=self.get(qm, "max_per_month", self.integer(q.PER_MONTH), None),
            on_quota=q.QuotaAction(self.get(qm, "on_quota", self.choice(q.QuotaAction), d.on_quota).value),
            alert_percent=self.get(qm, "alert_percent", self.integer(q.ALERT_PERCENT), d.alert_percent),
        )
