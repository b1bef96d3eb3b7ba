"""Tenant quotas: count what each tenant submits per day and month, refuse or hold past its caps, alert before.

Takes: the tenant of every MAIL FROM (`refusal`, a quick look at the
counts this node knows) and every message the queue opens (`charge`, the
authoritative claim); the queue ids the scheduler asks about (`held_until`).
Emits: a 450 4.7.1 reply naming the reset time for a tenant with
`on_quota: refuse` at its cap; a hold (`QuotaHeld`) for one with
`on_quota: hold`, released when a later window has room, or failed and
bounced past the maximum age of its retry schedule (relayd.queue.quotaage,
warned at half of it); one `QuotaAlert` per tenant and window when its
usage reaches `alert_percent` of a cap;
`UsageStoreChanged` when the shared store goes away or comes back; per
tenant usage against quota for `relayctl usage`, `status` and the metrics.
Untrusted input: none (tenants are authenticated; counts come from relayd's
own stores).
How it fails: a shared store (Redis) that cannot be reached is never taken
as "no limit": the node claims against its local share of each cap
(`usage.redis.local_share`) in its own embedded store, says so once, tries
the shared store again every `probe_every` seconds and, once it answers,
adds what it counted meanwhile. A local store that fails refuses the
message with 451 4.3.0, as a spool write error would.

What counts: a message once, when the queue opens it for a tenant (at the
end of the header block, before its 250), and its recipients. A message
refused later (a full disk, a client that hangs up) still counts: the
quota errs on the provider's side. The claim is all or nothing over the day
and month windows, so concurrent sessions, and nodes sharing Redis, never
let more through than the cap. A held message is counted when it is
released, against the window that releases it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

from relayd import replies
from relayd.config.model import RelayConfig, TenantConfig
from relayd.config.quota import NO_QUOTA, QuotaAction, TenantQuota
from relayd.observe import events as ev
from relayd.observe.claims import Claim, ClaimCounters, Taken
from relayd.observe.counters import CounterError, Span, Window
from relayd.queue.quotaage import HeldQueue, HoldAges, look_interval
from relayd.queue.quotaholds import HoldStore, HoldStoreError, QuotaHold

SPANS = (Span.DAY, Span.MONTH)
_WORD = {Span.DAY: "Daily", Span.MONTH: "Monthly"}
_PROBE_EVERY = 5.0  # seconds between two tries of an unreachable shared store
_RELEASE_LOOK = 30.0  # the release loop looks at least this often (a clock may jump)


def message_key(tenant: str) -> str:
    return f"tenant:{tenant}"


def recipient_key(tenant: str) -> str:
    return f"tenant:{tenant}:rcpt"


def node_key(tenant: str) -> str:
    """This node's own messages, in the embedded store: its local share while the shared store is away."""
    return f"tenant:{tenant}:node"


def alert_key(tenant: str) -> str:
    return f"tenant:{tenant}:alerted"


def cap_of(quota: TenantQuota, span: Span) -> int | None:
    return quota.max_per_day if span is Span.DAY else quota.max_per_month


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """One window of one tenant: messages and recipients counted, the cap, when it resets."""

    span: str  # day, month
    messages: int
    recipients: int
    limit: int | None
    resets_at: float
    resets: str  # "2026-12-02 00:00 UTC"


@dataclass(frozen=True, slots=True)
class TenantUsage:
    tenant: str
    on_quota: str  # refuse, hold, "" without a quota
    alert_percent: int
    windows: tuple[WindowUsage, ...]
    held: int  # messages this node holds for the quota


class TenantQuotas:
    """See the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], RelayConfig],
        local: ClaimCounters,
        shared: ClaimCounters | None,
        shared_name: str,
        holds: HoldStore,
        events: ev.EventSink,
        clock: Callable[[], float] = time.time,
        on_release: Callable[[], None] = lambda: None,
        exists: Callable[[str], bool] = lambda _queue_id: True,
        aging: HeldQueue | None = None,
        probe_every: float = _PROBE_EVERY,
    ) -> None:
        self._config = config
        self._local = local
        self._shared = shared
        self._shared_name = shared_name
        self._holds = holds
        self._events = events
        self._clock = clock
        self._on_release = on_release
        self._exists = exists
        self._probe_every = probe_every
        self._counts: dict[tuple[str, str], int] = {}  # (key, window slot) -> last count seen
        self._held: dict[str, QuotaHold] = {}
        self._degraded_since: float | None = None  # the shared store is unreachable since then
        self._last_probe = 0.0
        self._pending: dict[tuple[str, Span, float], int] = {}  # counted locally while degraded
        self._releasing = asyncio.Lock()
        self._alerts: set[asyncio.Task[None]] = set()
        # Without the queue's view (some tests) a hold has no maximum age.
        self._ages = HoldAges(aging, events, time_text=self._clock_text) if aging is not None else None

    # -- start ------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the holds and the current windows' counts (start, reload). Raises CounterError/HoldStoreError."""
        self._held = {h.queue_id: h for h in await asyncio.to_thread(self._holds.load)}
        if self._ages is not None:
            self._ages.reset(self._held)
        now = self._clock()
        for tenant in self._config().tenants:
            for span in SPANS:
                window = self._window(span)
                for key in (message_key(tenant), recipient_key(tenant)):
                    await self._refresh(key, window, now)

    async def _refresh(self, key: str, window: Window, now: float) -> None:
        store = self._active()
        try:
            count = await store.count(key, window, now)
        except CounterError as error:
            if store is self._local:
                raise
            self._degrade(str(error), now)
            return
        self._remember(key, window, now, count)

    # -- at MAIL FROM: the quick look -------------------------------------------------

    def refusal(self, tenant_name: str) -> str | None:
        """450 4.7.1 for a tenant with `on_quota: refuse` whose counts known here reached a cap."""
        tenant = self._config().tenants.get(tenant_name)
        quota = tenant.quota if tenant is not None else NO_QUOTA
        if not quota.is_limited or quota.on_quota is not QuotaAction.REFUSE:
            return None
        now = self._clock()
        if self._degraded() and not self._skip_shared(now):
            return None  # the shared store is due another try: the claim decides
        for span in SPANS:
            cap = self._effective_cap(quota, span)
            key = node_key(tenant_name) if self._degraded() else message_key(tenant_name)
            if cap is not None and self._known(key, self._window(span), now) >= cap:
                return self._reply(tenant_name, quota, span, now)
        return None

    # -- when the queue opens a message: the claim ------------------------------------

    async def charge(self, queue_id: str, tenant_name: str, recipients: int) -> str | None:
        """Count a message the queue opened; the refusal reply, or None when it may be accepted.

        With `on_quota: hold` past a cap the message is accepted and held
        (None); with `refuse` the reply is the 450 naming the reset.
        """
        tenant = self._config().tenants.get(tenant_name)
        quota = tenant.quota if tenant is not None else NO_QUOTA
        now = self._clock()
        try:
            taken, claims = await self._claim(tenant_name, quota, now)
        except CounterError as error:
            self._events.emit(ev.Notice(text=f"{queue_id} usage counters failed: {error}", level="error"))
            return replies.INTERNAL_ERROR
        if taken.ok:
            await self._count_recipients(tenant_name, recipients, now)
            self._alert(tenant_name, quota, claims, taken, now)
            return None
        span = self._refused_span(claims, taken)
        if quota.on_quota is QuotaAction.REFUSE:
            return self._reply(tenant_name, quota, span, now)
        return await self._hold(queue_id, tenant_name, quota, span, now)

    async def _claim(self, tenant: str, quota: TenantQuota, now: float) -> tuple[Taken, list[Claim]]:
        if self._shared is not None and self._degraded() and not self._skip_shared(now):
            await self._recovered(now)  # the shared store is due another try
        if self._shared is not None and not self._degraded():
            claims = [Claim(message_key(tenant), self._window(s), cap_of(quota, s)) for s in SPANS]
            try:
                taken = await self._shared.take(claims, 1, now)
            except CounterError as error:
                self._degrade(str(error), now)
            else:
                self._remember_all(claims, taken, now)
                if taken.ok:  # this node's own count, its budget if the shared store goes away
                    await asyncio.gather(*(self._local.add(node_key(tenant), self._window(s), 1, now) for s in SPANS))
                return taken, claims
        key = node_key(tenant) if self._shared is not None else message_key(tenant)
        claims = [Claim(key, self._window(s), self._effective_cap(quota, s)) for s in SPANS]
        taken = await self._local.take(claims, 1, now)
        self._remember_all(claims, taken, now)
        if taken.ok and self._shared is not None:
            for span in SPANS:
                slot = (message_key(tenant), span, self._window(span).start(now))
                self._pending[slot] = self._pending.get(slot, 0) + 1
        return taken, claims

    async def _count_recipients(self, tenant: str, recipients: int, now: float) -> None:
        store, windows = self._active(), [self._window(span) for span in SPANS]
        counts = await asyncio.gather(
            *(store.add(recipient_key(tenant), w, recipients, now) for w in windows), return_exceptions=True)
        for window, count in zip(windows, counts):
            if isinstance(count, int):  # a failed recipient count is only not shown; the message counted
                self._remember(recipient_key(tenant), window, now, count)

    # -- the alert ---------------------------------------------------------------------

    def _alert(self, tenant: str, quota: TenantQuota, claims: Sequence[Claim], taken: Taken, now: float) -> None:
        if claims and claims[0].key != message_key(tenant):
            return  # counted against the local share: the tenant's total is not known here
        for span, claim, count in zip(SPANS, claims, taken.counts):
            cap = claim.cap
            if cap is None:
                continue
            threshold = max(1, math.ceil(cap * quota.alert_percent / 100))
            if count - 1 < threshold <= count:
                task = asyncio.get_running_loop().create_task(self._send_alert(tenant, quota, span, count, cap, now))
                self._alerts.add(task)
                task.add_done_callback(self._alerts.discard)

    async def _send_alert(self, tenant: str, quota: TenantQuota, span: Span, used: int, cap: int, now: float) -> None:
        """Emit the alert unless another node (or this one, before a restart) did in this window."""
        try:
            first = await self._active().add(alert_key(tenant), self._window(span), 1, now) == 1
        except CounterError:
            first = True  # a lost dedup record may repeat an alert; a lost alert is worse
        if first:
            self._events.emit(ev.QuotaAlert(
                tenant=tenant, window=span.value, used=used, limit=cap, percent=quota.alert_percent,
                resets=self._clock_text(self._window(span).end(now)),
            ))

    # -- holding -----------------------------------------------------------------------

    async def _hold(self, queue_id: str, tenant: str, quota: TenantQuota, span: Span, now: float) -> str | None:
        until = self._window(span).end(now)
        reason = self._reply(tenant, quota, span, now).split(" ", 2)[2].replace("; resets", ", resets")
        held = QuotaHold(queue_id, tenant, now, until, reason[0].lower() + reason[1:])
        try:
            await asyncio.to_thread(self._holds.hold, held)
        except HoldStoreError as error:
            self._events.emit(ev.Notice(text=f"{queue_id} {error}", level="error"))
            return replies.SPOOL_ERROR
        self._held[queue_id] = held
        self._events.emit(ev.QuotaHeld(queue_id=queue_id, tenant=tenant, reason=held.reason))
        return None

    def held_until(self, queue_id: str) -> float | None:
        """For the scheduler: a time to look again at a message the quota holds; None when not held."""
        held = self._held.get(queue_id)
        if held is None:
            return None
        now = self._clock()
        return held.until if held.until > now else now + 1.0  # the release loop decides, not the clock

    def hold_reasons(self) -> dict[str, str]:
        """Every message a tenant quota holds, with its reason (for `mailq`)."""
        return {queue_id: f"held: {h.reason}" for queue_id, h in self._held.items()}

    async def release_due(self) -> list[str]:
        """Release, oldest first, the held messages whose window ended, as far as the new window has room."""
        released: list[str] = []
        async with self._releasing:
            now = self._clock()
            for held in sorted(self._held.values(), key=lambda h: (h.held_at, h.queue_id)):
                if held.until > now:
                    continue
                if not self._exists(held.queue_id):
                    await self._unhold(held.queue_id)
                    continue
                tenant = self._config().tenants.get(held.tenant)
                quota = tenant.quota if tenant is not None else NO_QUOTA
                try:
                    taken, claims = await self._claim(held.tenant, quota, now)
                except CounterError:
                    break
                if not taken.ok:
                    span = self._refused_span(claims, taken)
                    await self._hold(held.queue_id, held.tenant, quota, span, now)
                    continue
                self._alert(held.tenant, quota, claims, taken, now)
                await self._unhold(held.queue_id)
                released.append(held.queue_id)
        if released:
            self._on_release()
        return released

    async def _unhold(self, queue_id: str) -> None:
        try:
            await asyncio.to_thread(self._holds.release, queue_id)
        except HoldStoreError as error:
            self._events.emit(ev.Notice(text=f"{queue_id} {error}", level="error"))
        self._held.pop(queue_id, None)
        if self._ages is not None:
            self._ages.forget(queue_id)

    async def expire_old(self) -> list[str]:
        """Warn about held messages at half their maximum age; fail and bounce those past it (the ids)."""
        if self._ages is None:
            return []
        async with self._releasing:
            expired = await self._ages.check(list(self._held.values()), self._clock())
            for queue_id in expired:
                await self._unhold(queue_id)
        return expired

    def next_age_look(self) -> float | None:
        """When a held message is next due its half-age warning or its expiry; None: none known."""
        return self._ages.next_look(self._held.values()) if self._ages is not None else None

    async def run_releases(self) -> None:
        """Release held messages as their windows end, and age them (a task of the daemon, cancelled at stop)."""
        while True:
            now = self._clock()
            first = min((h.until for h in self._held.values()), default=now + _RELEASE_LOOK)
            aging = self.next_age_look()
            due = min(first, aging) if aging is not None else first
            look = self._probe_every if self._degraded() else _RELEASE_LOOK
            look = look_interval(self._config(), look) if self._ages is not None else look
            await asyncio.sleep(min(max(due - now, 0.05), look))
            try:
                await self.release_due()
                await self.expire_old()
                if self._shared is not None and self._degraded():
                    await self._probe()
            except Exception as error:  # a bug here must not end the releases for good
                self._events.emit(ev.Notice(
                    text=f"quota releases: {type(error).__name__}: {error}; trying again", level="error"))

    async def _probe(self) -> None:
        if not self._skip_shared(self._clock()):
            await self._recovered(self._clock())

    # -- views -------------------------------------------------------------------------

    def usage(self, tenants: Sequence[TenantConfig]) -> list[TenantUsage]:
        """Per tenant: messages and recipients today and this month, against its quota."""
        now = self._clock()
        held: dict[str, int] = {}
        for h in self._held.values():
            held[h.tenant] = held.get(h.tenant, 0) + 1
        result = []
        for tenant in tenants:
            quota = tenant.quota
            windows = tuple(
                WindowUsage(
                    span=span.value,
                    messages=self._known(message_key(tenant.name), self._window(span), now),
                    recipients=self._known(recipient_key(tenant.name), self._window(span), now),
                    limit=cap_of(quota, span),
                    resets_at=self._window(span).end(now),
                    resets=self._clock_text(self._window(span).end(now)),
                )
                for span in SPANS
            )
            result.append(TenantUsage(
                tenant=tenant.name, on_quota=quota.on_quota.value if quota.is_limited else "",
                alert_percent=quota.alert_percent, windows=windows, held=held.get(tenant.name, 0),
            ))
        return result

    def store_status(self) -> dict[str, str | bool | float | None]:
        """Where the counts live and whether the shared store is in use (for `relayctl status`)."""
        if self._shared is None:
            return {"store": "sqlite", "shared": False}
        return {
            "store": self._shared_name, "shared": not self._degraded(),
            "local_share_since": self._degraded_since,
        }

    # -- inside --------------------------------------------------------------------------

    def _window(self, span: Span) -> Window:
        return Window(span, self._config().usage.zone)

    def _active(self) -> ClaimCounters:
        return self._shared if self._shared is not None and not self._degraded() else self._local

    def _degraded(self) -> bool:
        return self._degraded_since is not None

    def _skip_shared(self, now: float) -> bool:
        return self._degraded() and now - self._last_probe < self._probe_every

    def _degrade(self, detail: str, now: float) -> None:
        self._last_probe = now
        if self._degraded_since is None:
            self._degraded_since = now
            self._events.emit(ev.UsageStoreChanged(store=self._shared_name, shared=False, detail=detail))

    async def _recovered(self, now: float) -> None:
        """The shared store answers again: hand it what this node counted meanwhile, then use it."""
        if self._degraded_since is None or self._shared is None:
            return
        try:
            for slot, n in list(self._pending.items()):
                key, span, start = slot
                window = self._window(span)
                if start == window.start(now):  # only windows still open are worth adding to
                    self._remember(key, window, now, await self._shared.add(key, window, n, now))
                del self._pending[slot]
            for tenant in self._config().tenants:  # the shared counts now (and proof the store answers)
                for key in (message_key(tenant), recipient_key(tenant)):
                    for span in SPANS:
                        window = self._window(span)
                        self._remember(key, window, now, await self._shared.count(key, window, now))
        except CounterError as error:
            self._degrade(str(error), now)
            return
        self._degraded_since = None
        self._events.emit(ev.UsageStoreChanged(store=self._shared_name, shared=True))

    def _effective_cap(self, quota: TenantQuota, span: Span) -> int | None:
        cap = cap_of(quota, span)
        if cap is None or self._shared is None or not self._degraded():
            return cap
        share = self._config().usage.redis
        return math.floor(cap * (share.local_share if share is not None else 0.0))

    def _known(self, key: str, window: Window, now: float) -> int:
        return self._counts.get((key, window.slot(now)), 0)

    def _remember(self, key: str, window: Window, now: float, count: int) -> None:
        slot = window.slot(now)
        for old in [k for k in self._counts if k[0] == key and k[1].startswith(window.span.value + ":")]:
            if old[1] != slot:
                del self._counts[old]
        self._counts[(key, slot)] = count

    def _remember_all(self, claims: Sequence[Claim], taken: Taken, now: float) -> None:
        for claim, count in zip(claims, taken.counts):
            self._remember(claim.key, claim.window, now, count)

    def _refused_span(self, claims: Sequence[Claim], taken: Taken) -> Span:
        """The window whose cap refused the claim (the month when both did: it resets later)."""
        full = [s for s, c, n in zip(SPANS, claims, taken.counts) if c.cap is not None and n + 1 > c.cap]
        return full[-1] if full else Span.DAY

    def _reply(self, tenant: str, quota: TenantQuota, span: Span, now: float) -> str:
        cap = cap_of(quota, span) or 0
        return replies.quota_reached(tenant, _WORD[span], cap, self._clock_text(self._window(span).end(now)))

    def _clock_text(self, when: float) -> str:
        moment = datetime.fromtimestamp(when, self._config().usage.zone)
        return f"{moment:%Y-%m-%d %H:%M} {moment.tzname() or 'UTC'}"
