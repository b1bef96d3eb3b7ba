"""OAuth access tokens as Prometheus gauges: how long each has left, how many refreshes failed in a row.

Takes: a reader returning one `TokenLife` per credential with a token source
(`relayd.delivery.oauthsources.OAuthSources.token_lives`), asked on the event
loop at each scrape (`relayd.observe.metrics.loop_reader`), and a clock.
Emits: `relayd_oauth_token_seconds_to_expiry` (absent until a token was had;
negative once it has expired) and `relayd_oauth_token_refresh_failures`
(refreshes failed in a row, 0 after a success), labelled by credential name.
Untrusted input: none; no token or secret reaches this module.
Fails: a reader that does not answer (a busy loop) yields no samples for
that scrape rather than stale ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric


@dataclass(frozen=True, slots=True)
class TokenLife:
    """What the metrics know of one credential's access token: no secret, only times and counts."""

    credential: str
    expires_at: float | None
    failures_in_a_row: int


TokenReader = Callable[[], "Sequence[TokenLife] | None"]


class OAuthCollector:
    """A collector for the public registry; see the module docstring."""

    def __init__(self, reader: TokenReader, clock: Callable[[], float] = time.time) -> None:
        self._reader = reader
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "relayd_oauth_token_seconds_to_expiry",
            "Seconds until the credential's current access token expires (negative: expired)",
            labels=["credential"])
        failures = GaugeMetricFamily(
            "relayd_oauth_token_refresh_failures",
            "Token refreshes of the credential that failed in a row (0 after a success)",
            labels=["credential"])
        now = self._clock()
        seen: set[str] = set()
        for life in sorted(self._reader() or (), key=lambda t: t.credential):
            if life.credential in seen:  # two transports sharing one credential: one series
                continue
            seen.add(life.credential)
            if life.expires_at is not None:
                expiry.add_metric([life.credential], life.expires_at - now)
            failures.add_metric([life.credential], float(life.failures_in_a_row))
        yield from (expiry, failures)

    def describe(self) -> Iterator[Metric]:
        return iter(())
