"""Upstream health: Exim's host retry state, as one `relayd.delivery.gates.Gate`.

Takes: the end of every attempt on a transport (`attempt_ended`): reached,
or unreachable (connect, greeting, TLS, AUTH failed, or the session broke),
with the transport's retry schedule.
Emits: per transport, closed until its own next retry time after an
unreachable attempt, open again after any attempt that reached it; the last
success and last error for `relayctl status`.
Untrusted input: error texts (already flattened by the transport).
How it fails: it does not; the state is memory only and starts empty, so
after a restart each down upstream costs one more real attempt.

A transport whose connection failed is skipped by every other message until
its retry time, instead of each message waiting for the same timeout. The
wait follows the transport's retry schedule, counted from the first failure
in a row; past the schedule's end the upstream is still only skipped for the
last interval: messages, not hosts, are what finally fail. The closure is
forceable: an operator's deliver-now or flush (Exim -M, -qff) tries anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from relayd.delivery.gates import OPEN, AttemptEnd, GateReport, GateVerdict, closed_until
from relayd.config.retry import RetrySchedule

GATE_NAME = "retry"
RETRY_WAIT = "retry wait"  # the reason a closed verdict gives


@dataclass(frozen=True, slots=True)
class UpstreamState:
    """Why and until when a transport is being skipped."""

    first_failure: float
    next_try: float
    last_interval: float
    last_error: str


@dataclass(frozen=True, slots=True)
class UpstreamRecord:
    """Last success and last error of a transport, for `relayctl status`."""

    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


class UpstreamHealth:
    """Per-transport retry state (connection-level failures only); a `Gate`.

    The gate methods take `now` from the caller; `clock` only serves the
    status views (`is_skipped`, `snapshot`) that have no time of their own.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._down: dict[str, UpstreamState] = {}
        self._records: dict[str, UpstreamRecord] = {}

    # -- the Gate ---------------------------------------------------------------

    def check(self, transport: str, now: float) -> GateVerdict:
        state = self._down.get(transport)
        if state is None or now >= state.next_try:
            return OPEN
        return closed_until(state.next_try, RETRY_WAIT, gate=GATE_NAME)

    def attempt_started(self, transport: str, now: float) -> None:
        """Nothing to count: only how an attempt ended matters here."""

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        if report.outcome is AttemptEnd.UNREACHABLE and report.retry is not None:
            self.failed(transport, report.retry, report.detail or "connection failed", now=now)
        elif report.outcome is AttemptEnd.REACHED:
            self.succeeded(transport, now=now)
        # QUOTA_REACHED: the upstream is up; its quota is another gate's business.

    # -- state changes ------------------------------------------------------------

    def failed(self, name: str, schedule: RetrySchedule, error: str, *, now: float | None = None) -> UpstreamState:
        now = self._clock() if now is None else now
        old = self._down.get(name)
        first = old.first_failure if old is not None else now
        planned = schedule.next_attempt(first, now, old.last_interval if old else None)
        last_rule = schedule.rules[-1]
        next_try, interval = planned or (now + last_rule.interval, last_rule.interval)
        state = UpstreamState(first, next_try, interval, error)
        self._down[name] = state
        record = self._records.get(name, UpstreamRecord())
        self._records[name] = UpstreamRecord(record.last_success, error, now)
        return state

    def succeeded(self, name: str, *, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        self._down.pop(name, None)
        record = self._records.get(name, UpstreamRecord())
        self._records[name] = UpstreamRecord(now, record.last_error, record.last_error_at)

    def clear(self) -> None:
        """Forget every retry wait (Exim's -qff ignores host retry state); records stay."""
        self._down.clear()

    # -- views ----------------------------------------------------------------------

    def is_skipped(self, name: str) -> UpstreamState | None:
        """The transport's retry wait if it is in one now."""
        state = self._down.get(name)
        if state is None or self._clock() >= state.next_try:
            return None
        return state

    def snapshot(self) -> dict[str, tuple[UpstreamRecord, UpstreamState | None]]:
        names = set(self._records) | set(self._down)
        return {n: (self._records.get(n, UpstreamRecord()), self.is_skipped(n)) for n in names}
