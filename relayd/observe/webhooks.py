"""Webhooks: the event sink that tells applications what became of their mail, over HTTP.

Takes: events through `WebhookSink.emit` (one sink of the daemon's fan-out),
the endpoints of relay.yaml (`relayd.config.webhookconfig`), a way to look up
each endpoint's signing secret in the credential store, and an operator-
notice callable.
Emits: one signed JSON POST per event and subscribed endpoint
(`relayd.observe.webhookbody`), at least once: each event is journalled in the
endpoint's outbox (`relayd.observe.outbox`) before `emit` returns, and
forgotten only when the receiver answered 2xx.
Untrusted input: the receivers' answers. Only the status code counts; at most
`MAX_RESPONSE_BYTES` of a body are read and the whole request is bounded by
the endpoint's `timeout`; redirects are not followed; https certificates are
verified (the system's CAs, or the endpoint's `ca_file`).
Fails: never into the caller. `emit` only appends to the outbox; the
requests go out from this module's own tasks, at most `max_in_flight` at a
time per endpoint, so a receiver that is down or hangs never slows SMTP or
delivery. A failed request is retried with exponential backoff and jitter
(`retry_min` doubling up to `retry_max`); while an endpoint fails, one request
at a time probes it. An outbox past `max_pending` drops its oldest event,
counted and logged (at most once a minute per endpoint).
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
import uuid
from pathlib import Path
from typing import Callable

import httpx

from relayd.config.webhookconfig import WebhookEndpoint, WebhooksConfig
from relayd.observe import events as ev
from relayd.observe import webhookbody
from relayd.observe.outbox import SYNC_INTERVAL, Outbox, PendingEvent

MAX_RESPONSE_BYTES = 64 * 1024  # read of a receiver's answer; the rest is discarded
DROP_LOG_INTERVAL = 60.0  # seconds between two "outbox full" lines for one endpoint

SecretLookup = Callable[[str], "bytes | None"]
Notify = Callable[[str, str], None]  # (text, level "" | "warning" | "error")


def backoff(failures: int, *, first: float, longest: float, rng: random.Random) -> float:
    """Seconds to wait after `failures` failures in a row: `first` doubling up to `longest`,
    then a random 50-100 % of that, so many relays (or events) do not retry in step."""
    delay = min(longest, first * float(1 << min(max(failures - 1, 0), 32)))
    return delay * rng.uniform(0.5, 1.0)


def _client_for(endpoint: WebhookEndpoint) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if endpoint.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(endpoint.ca_file))
    return httpx.AsyncClient(
        verify=verify,
        follow_redirects=False,
        trust_env=False,  # no proxy or CA picked up from the environment: relay.yaml says it all
        timeout=httpx.Timeout(endpoint.timeout),
        limits=httpx.Limits(max_connections=endpoint.max_in_flight,
                            max_keepalive_connections=endpoint.max_in_flight),
    )


class EndpointSender:
    """Sends one endpoint's outbox: `max_in_flight` workers, one backoff for the endpoint."""

    def __init__(
        self,
        endpoint: WebhookEndpoint,
        outbox: Outbox,
        *,
        config: WebhooksConfig,
        secret: SecretLookup,
        notify: Notify,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.outbox = outbox
        self._config = config
        self._secret = secret
        self._notify = notify
        self._client = client
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._failures = 0  # requests failed in a row; >0: the endpoint is probed one at a time
        self._down_until = 0.0
        self._dropped_logged = 0
        self._drop_logged_at = 0.0
        self._missing_secret_told = False
        self.sent = 0
        self.failed_requests = 0

    @property
    def failing(self) -> bool:
        """The last request failed (the endpoint is being probed with backoff)."""
        return self._failures > 0

    def add(self, event: PendingEvent) -> None:
        dropped = self.outbox.add(event)
        if dropped is not None:
            self._tell_dropped(dropped)
        self._wake.set()

    def tell_unlogged_drops(self) -> None:
        """At stop: the drops the once-a-minute limit kept out of the log so far."""
        newly = self.outbox.dropped - self._dropped_logged
        if newly:
            self._dropped_logged = self.outbox.dropped
            self._notify(f"webhook {self.endpoint.name}: {newly} more event(s) dropped (outbox full); "
                         f"{self.outbox.dropped} dropped since start", "error")

    def _tell_dropped(self, dropped: PendingEvent) -> None:
        now = time.monotonic()
        if self._dropped_logged and now - self._drop_logged_at < DROP_LOG_INTERVAL:
            return
        newly = self.outbox.dropped - self._dropped_logged
        self._dropped_logged = self.outbox.dropped
        self._drop_logged_at = now
        self._notify(
            f"webhook {self.endpoint.name}: outbox full ({self.outbox.max_pending} events waiting), "
            f"dropped the oldest {newly} event(s), last {dropped.id} ({dropped.kind}); "
            f"{self.outbox.dropped} dropped since start", "error",
        )

    async def run(self) -> None:
        workers = [asyncio.create_task(self._worker()) for _ in range(self.endpoint.max_in_flight)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            event = self._take()
            if event is None:
                await self._sleep()
                continue
            event.in_flight = True
            self._in_flight += 1
            try:
                ok = await self._send(event)
            except Exception as error:  # a bug or an error nobody foresaw: keep the event, keep sending
                self._notify(f"webhook {self.endpoint.name}: sending event {event.id} failed: "
                             f"{type(error).__name__}", "error")
                ok = False
            finally:
                event.in_flight = False
                self._in_flight -= 1
            self._settle(event, ok)

    def _take(self) -> PendingEvent | None:
        now = self._clock()
        if now < self._down_until or (self._failures and self._in_flight):
            return None  # backing off, or one probe is already out
        return self.outbox.next_due(now)

    async def _sleep(self) -> None:
        now = self._clock()
        wake_at: float | None
        if self._failures and self._in_flight:
            wake_at = None  # the probe's answer wakes everyone
        elif self._down_until > now:
            wake_at = self._down_until  # no scan of a long outbox while the endpoint is down
        else:
            wake_at = self.outbox.next_try()
        timeout = None if wake_at is None else max(0.01, wake_at - now)
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _settle(self, event: PendingEvent, ok: bool) -> None:
        now = self._clock()
        if ok:
            self.sent += 1
            try:
                self.outbox.done(event.id)
            except OSError as error:  # not journalled: it is sent once more after a restart
                self._notify(f"webhook {self.endpoint.name}: cannot journal event {event.id} as sent: "
                             f"{error}", "error")
            if self._failures:
                self._notify(f"webhook {self.endpoint.name}: the receiver answers again after "
                             f"{self._failures} failed request(s); {len(self.outbox)} event(s) waiting", "")
            self._failures = 0
            self._down_until = 0.0
        else:
            self.failed_requests += 1
            self._failures += 1
            event.attempts += 1
            first, longest = self._config.retry_min, self._config.retry_max
            event.next_try = now + backoff(event.attempts, first=first, longest=longest, rng=self._rng)
            self._down_until = now + backoff(self._failures, first=first, longest=longest, rng=self._rng)
        self._wake.set()

    async def _send(self, event: PendingEvent) -> bool:
        secret = self._secret(self.endpoint.credential)
        if secret is None:
            if not self._missing_secret_told:
                self._missing_secret_told = True
                self._notify(
                    f"webhook {self.endpoint.name}: credential '{self.endpoint.credential}' is not in the "
                    f"credential store; events are kept until it is (relayctl webhook secret "
                    f"{self.endpoint.credential}, then relayctl reload)", "error",
                )
            return False
        self._missing_secret_told = False
        timestamp = int(self._clock())
        head = webhookbody.headers(
            kind=event.kind, event_id=event.id, timestamp=timestamp,
            signed=webhookbody.signature(secret, timestamp, event.body),
        )
        try:
            async with asyncio.timeout(self.endpoint.timeout):
                status = await self._post(event.body, head)
        except (httpx.HTTPError, OSError, TimeoutError, ssl.SSLError) as error:
            self._tell_failure(event, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
            return False
        if 200 <= status < 300:
            return True
        self._tell_failure(event, f"HTTP status {status}")
        return False

    async def _post(self, body: bytes, head: dict[str, str]) -> int:
        async with self._client.stream("POST", self.endpoint.url, content=body, headers=head) as response:
            seen = 0
            async for chunk in response.aiter_raw():
                seen += len(chunk)
                if seen >= MAX_RESPONSE_BYTES:
                    break  # the status is all that counts; the connection is closed, not drained
            return response.status_code

    def _tell_failure(self, event: PendingEvent, why: str) -> None:
        if self._failures == 0:  # the first failure in a row is logged, the retries are not
            self._notify(
                f"webhook {self.endpoint.name}: event {event.id} ({event.kind}) not accepted: {why}; "
                f"retrying with backoff, {len(self.outbox)} event(s) waiting", "warning",
            )


class WebhookSink:
    """The `EventSink` for all webhook endpoints: journals each subscribed event, sends it later.

    Events emitted before `start` are held in memory and journalled when the
    outboxes are open (the daemon starts the sink before its listeners, so
    that is only the start-up notices).
    """

    def __init__(
        self,
        config: WebhooksConfig,
        outbox_dir: Path,
        *,
        secret: SecretLookup,
        notify: Notify,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._outbox_dir = outbox_dir
        self._secret = secret
        self._notify = notify
        self._clock = clock
        self.senders: list[EndpointSender] = []
        self._early: list[ev.Event] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._maintainer: asyncio.Task[None] | None = None
        self._clients: list[httpx.AsyncClient] = []
        self._stopping = False
        self._emitting = False
        self._unjournalled: dict[str, int] = {}  # endpoint -> events the disk refused since it last worked
        self.emit_errors = 0

    def status(self) -> list[dict[str, object]]:
        """Per endpoint, for an operator's view or metrics: events waiting, sent, failed requests,
        dropped, and whether it is failing now. Never the URL's query or the secret."""
        return [
            {"name": s.endpoint.name, "tenant": s.endpoint.tenant, "waiting": len(s.outbox), "sent": s.sent,
             "failed_requests": s.failed_requests, "dropped": s.outbox.dropped, "failing": s.failing}
            for s in self.senders
        ]

    def emit(self, event: ev.Event) -> None:
        # Not re-entered: the notices this sink gives while journalling (outbox
        # full, disk refused) reach the log, but are not themselves journalled.
        if self._stopping or self._emitting:
            return
        self._emitting = True
        try:
            self._journal(event)
        finally:
            self._emitting = False

    def _journal(self, event: ev.Event) -> None:
        if not self.senders:
            if self._config.endpoints and len(self._early) < self._config.max_pending:
                self._early.append(event)  # until start(): bounded like an outbox
            return
        kind = webhookbody.kind_of(event)
        targets = [s for s in self.senders if _wants(s.endpoint, kind, event)]
        if not targets:
            return
        event_id = uuid.uuid4().hex
        body = webhookbody.encode(webhookbody.payload(event, event_id))
        for sender in targets:
            name = sender.endpoint.name
            try:
                sender.add(PendingEvent(id=event_id, kind=kind, body=body, queued_at=event.at))
            except OSError as error:  # the disk refused: say so once, and carry on with mail
                self.emit_errors += 1
                lost = self._unjournalled.get(name, 0)
                self._unjournalled[name] = lost + 1
                if not lost:
                    self._notify(f"webhook {name}: cannot journal event {event_id} ({kind}): {error}; "
                                 "events are lost until the outbox can be written", "error")
            else:
                lost = self._unjournalled.pop(name, 0)
                if lost:
                    self._notify(f"webhook {name}: the outbox can be written again; {lost} event(s) "
                                 "were lost", "error")

    async def start(self) -> None:
        """Open every endpoint's outbox (replaying what a previous run left) and start sending."""
        for endpoint in self._config.endpoints:
            outbox = Outbox(self._outbox_dir / endpoint.name, max_pending=self._config.max_pending)
            replayed = await asyncio.to_thread(outbox.open)
            if replayed.pending or replayed.damaged_lines or outbox.dropped:
                self._notify(
                    f"webhook {endpoint.name}: {replayed.pending} event(s) waiting from before the start"
                    + (f", {replayed.damaged_lines} damaged journal line(s) skipped" if replayed.damaged_lines else "")
                    + (f", {outbox.dropped} dropped (over max_pending)" if outbox.dropped else ""),
                    "warning" if replayed.damaged_lines or outbox.dropped else "",
                )
            client = _client_for(endpoint)
            self._clients.append(client)
            self.senders.append(EndpointSender(
                endpoint, outbox, config=self._config, secret=self._secret, notify=self._notify,
                client=client, clock=self._clock,
            ))
        await self._tell_orphaned_outboxes()
        unknown = {k for e in self._config.endpoints for k in e.events} - webhookbody.known_kinds()
        if unknown:
            self._notify(f"webhooks: this relayd never sends event kind(s) {', '.join(sorted(unknown))}; "
                         f"it sends {', '.join(webhookbody.KINDS.values())}", "warning")
        early, self._early = self._early, []
        for event in early:
            self.emit(event)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(s.run()) for s in self.senders]
        self._maintainer = loop.create_task(self._maintain())

    async def _tell_orphaned_outboxes(self) -> None:
        """Events kept for an endpoint no longer configured (renamed or removed) are not sent, nor
        deleted behind the operator's back: say where they are."""
        names = {e.name for e in self._config.endpoints}
        try:
            orphans = await asyncio.to_thread(_outboxes_with_files, self._outbox_dir, names)
        except OSError:
            return
        for path, waiting in orphans:
            self._notify(f"webhooks: {path} holds {waiting} event(s) of an endpoint no longer in relay.yaml; "
                         "they are not sent (name an endpoint after it to send them, or remove the directory)",
                         "warning")

    async def _maintain(self) -> None:
        """fsync each journal shortly after it was written; compact a journal grown long."""
        while not self._stopping:
            await asyncio.sleep(SYNC_INTERVAL)
            for sender in self.senders:
                await self._maintain_one(sender.outbox)

    async def _maintain_one(self, outbox: Outbox) -> None:
        try:
            fd = outbox.take_dirty()
            if fd is not None:
                await asyncio.to_thread(os.fsync, fd)
            if outbox.wants_compaction():
                await asyncio.to_thread(outbox.compact, outbox.rotate())
        except OSError as error:
            self._notify(f"webhook outbox {outbox.directory}: {error}", "error")

    async def stop(self) -> None:
        """Stop sending; sync and close the journals (what is pending is sent after the restart)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._maintainer is not None:
            # It ends its round: no fsync or compaction is left running in a thread.
            await asyncio.gather(self._maintainer, return_exceptions=True)
        for client in self._clients:
            await client.aclose()
        for sender in self.senders:
            sender.tell_unlogged_drops()
            try:
                await asyncio.to_thread(sender.outbox.close)
            except OSError as error:
                self._notify(f"webhook {sender.endpoint.name}: closing the outbox: {error}", "error")


def _wants(endpoint: WebhookEndpoint, kind: str, event: ev.Event) -> bool:
    if kind not in endpoint.events:
        return False
    return endpoint.tenant is None or endpoint.tenant == webhookbody.tenant_of(event)


def _outboxes_with_files(root: Path, configured: set[str]) -> list[tuple[Path, int]]:
    """The outbox directories of endpoints not configured that still hold events, with their counts."""
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and path.name not in configured:
            waiting = Outbox.waiting_in(path)
            if waiting:
                found.append((path, waiting))
    return found
