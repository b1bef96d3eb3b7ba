"""Every Prometheus metric relayd exposes, declared once, with help text.

Takes: events (`relayd.observe.events`) through `emit`, as one sink of the daemon's
fan-out, beside the main log; the stages never touch a metric themselves.
Emits: the Prometheus text exposition format, from `render()` or from an HTTP
endpoint started with `start_http_server()`.
Untrusted input: none. Label values are tenant names, transport names and
fixed reason words from relayd's own tables; never addresses, logins of
unknown clients, reply texts or secrets, which would also let a client grow
the number of series without bound.
Fails: `DuplicateTimeseries` (a ValueError) when two `RelayMetrics` are put on
the same registry; ValueError for a delivery result or queue state outside
the documented set.

Reset: operators like to clear the counters at a fixed hour. `reset()` builds
a complete new set of counters and the histogram on a fresh private registry
and swaps one reference, so a scrape sees either all old or all new values and
never a half-cleared set. The gauges (queue size, upstream state, open
sessions) describe the present rather than accumulate, so they keep their
values: zeroing the sessions gauge while sessions are open would drive it
negative as they close. The registry handed to the constructor (the one
served over HTTP) stays the same object for the life of the instance: it
holds a single collector that reads the current counters and the gauges.

Queue gauges: the queue lives in the daemon's event loop, the scrape comes in
on the exporter's thread. Rather than copying counts into gauges on a timer
(always a little stale, and nobody called the setter before), a scrape asks
the loop for one `QueueGauges` through `loop_reader`, so
`relayd_queue_messages` and `relayd_queue_oldest_message_age_seconds` are
exact at the moment of the scrape. A loop too busy to answer within
`SCRAPE_WAIT` leaves the last values in place rather than stalling Prometheus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from relayd.observe import events as ev

DELIVERY_RESULTS = frozenset({"delivered", "deferred", "failed"})
QUEUE_STATES = frozenset({"active", "frozen", "deferred"})
SCRAPE_WAIT = 2.0  # seconds a scrape waits for the event loop's queue counts; Prometheus times out at 10


@dataclass(frozen=True, slots=True)
class QueueGauges:
    """The queue at one moment: messages by state, and the oldest message's age (None: empty)."""

    by_state: Mapping[str, int]
    oldest_age: float | None


QueueReader = Callable[[], "QueueGauges | None"]
T = TypeVar("T")


def loop_reader(loop: asyncio.AbstractEventLoop, compute: Callable[[], T | None],
                timeout: float = SCRAPE_WAIT) -> Callable[[], T | None]:
    """A reader that runs `compute` on `loop` (which owns the queue) and waits for it.

    Called on the loop's own thread it computes directly; from another thread
    it returns None when the loop does not answer within `timeout`.
    """
    def read() -> T | None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return compute()
        answer: concurrent.futures.Future[T | None] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                answer.set_result(compute())
            except Exception as exc:  # handed to the scrape thread, which drops it
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(on_loop)
            return answer.result(timeout)
        except Exception:  # a closed loop, a timeout, or compute() failing: no new values
            return None

    return read

# One upstream SMTP transaction: from a few tens of milliseconds on loopback to
# minutes for a slow upstream accepting a large message (RFC 5321 allows 10 min).
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True, slots=True)
class _Counts:
    """One generation of accumulating metrics, all registered on `registry`."""

    registry: CollectorRegistry
    messages_received: Counter
    bytes_received: Counter
    smtp_rejections: Counter
    auth_failures: Counter
    deliveries: Counter
    failovers: Counter
    bounces: Counter
    delivery_seconds: Histogram


@dataclass(frozen=True, slots=True)
class _Gauges:
    """Metrics that describe the present; they live as long as the instance."""

    queue_messages: Gauge
    queue_oldest_age: Gauge
    upstream_up: Gauge
    sessions: Gauge

    def collect(self) -> Iterator[Metric]:
        for gauge in (self.queue_messages, self.queue_oldest_age, self.upstream_up, self.sessions):
            yield from gauge.collect()


def _build_counts() -> _Counts:
    """Declare every accumulating metric on a fresh private registry."""
    r = CollectorRegistry()
    return _Counts(
        registry=r,
        messages_received=Counter(
            "relayd_messages_received",
            "Messages accepted and spooled (250 sent), per tenant.",
            ["tenant"],
            registry=r,
        ),
        bytes_received=Counter(
            "relayd_received_bytes",
            "Bytes of message data accepted and spooled, per tenant.",
            ["tenant"],
            registry=r,
        ),
        smtp_rejections=Counter(
            "relayd_smtp_rejections",
            "Commands refused on the submission listeners, by reason.",
            ["reason"],
            registry=r,
        ),
        auth_failures=Counter(
            "relayd_auth_failures",
            "Failed SMTP AUTH attempts on the submission listeners.",
            registry=r,
        ),
        deliveries=Counter(
            "relayd_deliveries",
            "Recipient delivery outcomes (delivered, deferred, failed) per tenant and transport.",
            ["tenant", "transport", "result"],
            registry=r,
        ),
        failovers=Counter(
            "relayd_failovers",
            "Times a transport was left for the next one in its chain, by reason.",
            ["transport", "reason"],
            registry=r,
        ),
        bounces=Counter(
            "relayd_bounces",
            "Delivery status notifications generated, per tenant.",
            ["tenant"],
            registry=r,
        ),
        delivery_seconds=Histogram(
            "relayd_delivery_seconds",
            "Duration of one upstream SMTP transaction, per transport.",
            ["transport"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        ),
    )


def _build_gauges() -> _Gauges:
    """Declare the gauges, unregistered: the public collector yields them itself."""
    return _Gauges(
        queue_messages=Gauge(
            "relayd_queue_messages",
            "Messages in the queue, by state: active (due or in delivery), deferred (waiting for "
            "a retry time), frozen.",
            ["state"],
            registry=None,
        ),
        queue_oldest_age=Gauge(
            "relayd_queue_oldest_message_age_seconds",
            "Seconds since the oldest message in the queue was received; 0 when the queue is empty.",
            registry=None,
        ),
        upstream_up=Gauge(
            "relayd_upstream_up",
            "1 when the transport's last connection worked, 0 when it failed.",
            ["transport"],
            registry=None,
        ),
        sessions=Gauge(
            "relayd_smtp_sessions",
            "Client SMTP sessions open right now.",
            registry=None,
        ),
    )


class _Current:
    """The one collector on the public registry: current counts plus the gauges."""

    def __init__(self, owner: RelayMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        self._owner.refresh_queue()
        yield from self._owner._counts.registry.collect()
        yield from self._owner._gauges.collect()

    def describe(self) -> Iterator[Metric]:
        # Lets the public registry detect two RelayMetrics registered on it.
        return self.collect()


class RelayMetrics:
    """relayd's metrics on an injected (or private) `CollectorRegistry`.

    Use the metric attributes directly (``m.deliveries.labels(tenant, transport,
    "delivered").inc()``) or the checked helpers below. Read the attributes
    at each use rather than keeping them, so a `reset()` is honoured.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._counts = _build_counts()
        self._gauges = _build_gauges()
        self._queue_reader: QueueReader | None = None
        self.registry.register(_Current(self))

    def read_queue_with(self, reader: QueueReader) -> None:
        """Have every scrape set the queue gauges from `reader` (see the module doc)."""
        self._queue_reader = reader

    def refresh_queue(self) -> None:
        """Set the queue gauges from the reader, if one is set and it answers."""
        if self._queue_reader is None:
            return
        snapshot = self._queue_reader()
        if snapshot is None:
            return
        for state in sorted(QUEUE_STATES):
            self.set_queue_size(state, snapshot.by_state.get(state, 0))
        self._gauges.queue_oldest_age.set(snapshot.oldest_age or 0.0)

    def reset(self) -> None:
        """Start every counter and the histogram again from zero (see the module doc)."""
        self._counts = _build_counts()

    def render(self) -> bytes:
        """The current values in the Prometheus text exposition format."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(self, address: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serve /metrics on `address`:`port` (0 picks a free port) from a daemon thread.

        Stop it with ``server.shutdown(); server.server_close()``. Pass an IP
        literal: the address is not looked up in DNS by relayd's callers.
        """
        return prometheus_client.start_http_server(port, addr=address, registry=self.registry)

    def emit(self, event: ev.Event) -> None:
        """Move the metrics an event moves (the `EventSink` method); other events are ignored.

        Label values come only from tenant and transport names and fixed
        words (`SmtpRefused.stage`, `HostFailed.reason_label`), never from
        addresses or reply texts.
        """
        if isinstance(event, (ev.RecipientDelivered, ev.RecipientDeferred, ev.RecipientFailed)):
            self.count_delivery(tenant=event.tenant, transport=event.transport or "none", result=_result(event))
        elif isinstance(event, ev.MessageArrived):
            self.messages_received.labels(tenant=event.tenant).inc()
            self.bytes_received.labels(tenant=event.tenant).inc(event.entry.envelope.size)
        elif isinstance(event, ev.UpstreamAttempted):
            self.delivery_seconds.labels(transport=event.transport).observe(event.seconds)
            self.upstream_up.labels(transport=event.transport).set(1 if event.reachable else 0)
        elif isinstance(event, ev.HostFailed):
            self.failovers.labels(transport=event.transport, reason=event.reason_label).inc()
        elif isinstance(event, ev.BounceCreated):
            self.bounces.labels(tenant=event.tenant).inc()
        else:
            self._emit_session(event)

    def _emit_session(self, event: ev.Event) -> None:
        if isinstance(event, ev.SmtpRefused):
            self.smtp_rejections.labels(reason=event.stage).inc()
        elif isinstance(event, ev.ConnectionRefused):
            self.smtp_rejections.labels(reason="CONNECT").inc()
        elif isinstance(event, ev.AuthFailed):
            self.auth_failures.inc()
        elif isinstance(event, ev.SessionOpened):
            self.sessions.inc()
        elif isinstance(event, ev.SessionClosed):
            self.sessions.dec()

    def count_delivery(self, *, tenant: str, transport: str, result: str) -> None:
        """Count one recipient outcome; `result` must be delivered, deferred or failed."""
        if result not in DELIVERY_RESULTS:
            raise ValueError(f"delivery result must be one of {sorted(DELIVERY_RESULTS)}")
        self._counts.deliveries.labels(tenant, transport, result).inc()

    def set_queue_size(self, state: str, count: int) -> None:
        """Set the number of queued messages in `state` (active, frozen or deferred)."""
        if state not in QUEUE_STATES:
            raise ValueError(f"queue state must be one of {sorted(QUEUE_STATES)}")
        self._gauges.queue_messages.labels(state).set(count)

    @property
    def messages_received(self) -> Counter:
        return self._counts.messages_received

    @property
    def bytes_received(self) -> Counter:
        return self._counts.bytes_received

    @property
    def smtp_rejections(self) -> Counter:
        return self._counts.smtp_rejections

    @property
    def auth_failures(self) -> Counter:
        return self._counts.auth_failures

    @property
    def deliveries(self) -> Counter:
        return self._counts.deliveries

    @property
    def failovers(self) -> Counter:
        return self._counts.failovers

    @property
    def bounces(self) -> Counter:
        return self._counts.bounces

    @property
    def queue_messages(self) -> Gauge:
        return self._gauges.queue_messages

    @property
    def upstream_up(self) -> Gauge:
        return self._gauges.upstream_up

    @property
    def delivery_seconds(self) -> Histogram:
        return self._counts.delivery_seconds

    @property
    def sessions(self) -> Gauge:
        return self._gauges.sessions


def _result(event: ev.RecipientOutcome) -> str:
    if isinstance(event, ev.RecipientDelivered):
        return "delivered"
    return "failed" if isinstance(event, ev.RecipientFailed) else "deferred"
