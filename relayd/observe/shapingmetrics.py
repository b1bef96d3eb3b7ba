"""Per-transport shaping as Prometheus gauges: rate, window counts against limits, next release.

Takes: a reader returning the daemon's shaping status (`Relay.shaping_status`:
per transport the wire dict of `relayd.delivery.shaping.status_wire`), asked
on the event loop at each scrape (`relayd.observe.metrics.loop_reader`).
Emits: `relayd_transport_send_rate`, `relayd_transport_window_sent`,
`relayd_transport_window_limit`, `relayd_transport_held`,
`relayd_transport_next_release_timestamp_seconds` and, with caps shared
through Redis, `relayd_transport_caps_shared`, labelled by transport
(and window and unit): configured names and fixed words only.
Untrusted input: none.
Fails: a reader that does not answer (a busy loop) yields no samples for
that scrape rather than stale ones.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from relayd.jsonwire import JsonOut, JsonOutObject

ShapingReader = Callable[[], "Mapping[str, JsonOutObject] | None"]


def _number(value: JsonOut) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class ShapingCollector:
    """A collector for the public registry; see the module docstring."""

    def __init__(self, reader: ShapingReader) -> None:
        self._reader = reader

    def collect(self) -> Iterator[Metric]:
        rate = GaugeMetricFamily(
            "relayd_transport_send_rate", "Messages per second a transport sent, averaged over about a minute",
            labels=["transport"])
        sent = GaugeMetricFamily(
            "relayd_transport_window_sent",
            "Messages (unit=messages) or recipients (unit=recipients) a transport sent in the current "
            "minute, hour or UTC day", labels=["transport", "window", "unit"])
        limit = GaugeMetricFamily(
            "relayd_transport_window_limit", "The configured cap for that window (absent: no cap)",
            labels=["transport", "window", "unit"])
        held = GaugeMetricFamily(
            "relayd_transport_held", "1 while a rate limit or quota keeps the transport from taking mail",
            labels=["transport"])
        release = GaugeMetricFamily(
            "relayd_transport_next_release_timestamp_seconds",
            "When a held transport takes mail again (Unix time); absent while it is open", labels=["transport"])
        shared = GaugeMetricFamily(
            "relayd_transport_caps_shared",
            "1 while the transport's caps are shared through Redis, 0 while Redis is away and this node keeps "
            "to its local share (absent: not shared)", labels=["transport"])
        for name, status in sorted((self._reader() or {}).items()):
            where = status.get("shared")
            if isinstance(where, str):
                shared.add_metric([name], 1.0 if where.startswith("shared in") else 0.0)
            rate.add_metric([name], _number(status.get("rate")))
            caps = status.get("caps")
            for cap in caps if isinstance(caps, (list, tuple)) else ():
                if not isinstance(cap, Mapping):
                    continue
                labels = [name, str(cap.get("span")), str(cap.get("what"))]
                sent.add_metric(labels, _number(cap.get("used")))
                if cap.get("limit") is not None:
                    limit.add_metric(labels, _number(cap.get("limit")))
            closed = status.get("next_release")
            held.add_metric([name], 1.0 if closed is not None else 0.0)
            if closed is not None:
                release.add_metric([name], _number(closed))
        yield from (rate, sent, limit, held, release, shared)

    def describe(self) -> Iterator[Metric]:
        return iter(())
