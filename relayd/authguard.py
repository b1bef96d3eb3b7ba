"""Failed-AUTH throttling per client address.

aiosmtpd has no limit on failed AUTH attempts, so a script could guess tenant
passwords as fast as scrypt allows. This guard counts failures per client IP
in a sliding window: past `delay_after` failures each further 535 is delayed
(doubling, capped), and past `disconnect_after` the client is told 421 and
disconnected, and stays refused until its failures age out of the window.
The same happens whether the login exists or not (no user enumeration).

Pure bookkeeping with an injected clock; the listener does the sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

MAX_DELAY = 8.0  # seconds; long enough to make guessing slow, short enough for a typo
_MAX_TRACKED = 10_000  # client addresses remembered at once, to bound memory


class AuthGuard:
    def __init__(
        self,
        *,
        delay_after: int,
        disconnect_after: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._delay_after = delay_after
        self._disconnect_after = disconnect_after
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        now = self._clock()
        failures = self._failures.get(client)
        if failures is None:
            return deque()
        while failures and now - failures[0] > self._window:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return failures

    def is_blocked(self, client: str) -> bool:
        """True when this client must be refused without checking a password."""
        return len(self._recent(client)) >= self._disconnect_after

    def record_failure(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= _MAX_TRACKED:
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]
        self._failures.setdefault(client, deque()).append(self._clock())

    def record_success(self, client: str) -> None:
        self._failures.pop(client, None)

    def delay_for(self, client: str) -> float:
        """Seconds to hold the 535 reply after the latest failure."""
        excess = len(self._recent(client)) - self._delay_after
        if excess <= 0:
            return 0.0
        return float(min(MAX_DELAY, 0.5 * 2.0 ** (excess - 1)))
