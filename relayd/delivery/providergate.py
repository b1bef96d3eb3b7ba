"""Provider limits: a transport whose provider said "quota" or "slow down" stays closed until it is worth trying.

Takes: the end of every attempt on a transport (`attempt_ended`); a
`QUOTA_REACHED` report carries the provider's reply class as its detail and
`reset_at`, the time the provider's window should have room again
(`relayd.delivery.providerreplies`); any report may carry an operator hint.
Emits: per transport, closed until `reset_at` (not forceable: forcing mail
into a used-up quota can lock the account for the day), and for `relayctl
status` the closure and the last hint (`snapshot`).
Untrusted input: none (reports come from relayd's own walk; the reply text in
a detail was sanitised by the transport).
How it fails: it does not; the state is memory only, so after a restart each
closed transport costs one more refused attempt, which closes it again.

A `relayd.delivery.gates.Gate`, composed in the daemon's `GateSet` next to
the host retry state (`UpstreamHealth`, which leaves quota reports alone).
While it is closed the chain walk skips the transport, so mail goes on down
the chain; a message whose every transport is closed waits without an
attempt until the earliest reopening, and its retry schedule does not move.
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.delivery.gates import OPEN, AttemptEnd, GateReport, GateVerdict, closed_until

GATE_NAME = "provider"


@dataclass(frozen=True, slots=True)
class ProviderClosure:
    """Until when a transport is closed, and the provider's words for why."""

    until: float
    reason: str


class ProviderLimits:
    """The provider-limit gate; see the module docstring."""

    def __init__(self) -> None:
        # Keyed by transport name only: bounded by the configured transports.
        self._closed: dict[str, ProviderClosure] = {}
        self._hints: dict[str, str] = {}

    # -- the Gate ---------------------------------------------------------------

    def check(self, transport: str, now: float) -> GateVerdict:
        closure = self._closed.get(transport)
        if closure is None or now >= closure.until:
            return OPEN
        return closed_until(closure.until, closure.reason, gate=GATE_NAME, forceable=False)

    def attempt_started(self, transport: str, now: float) -> None:
        """Nothing to count: only what the provider answered matters here."""

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        if report.hint:
            self._hints[transport] = report.hint
        elif report.outcome is AttemptEnd.REACHED and report.messages:
            self._hints.pop(transport, None)  # it delivers again: the advice is stale
        if report.outcome is not AttemptEnd.QUOTA_REACHED or report.reset_at is None:
            return
        if report.reset_at <= now:
            return
        old = self._closed.get(transport)
        until = max(report.reset_at, old.until) if old is not None and old.until > now else report.reset_at
        self._closed[transport] = ProviderClosure(until, report.detail or "provider limit reached")

    # -- views ------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, dict[str, str | float]]:
        """Per transport with something to say: the closure (if still closed) and the last hint."""
        view: dict[str, dict[str, str | float]] = {}
        for name, closure in self._closed.items():
            if closure.until > now:
                view[name] = {"closed_until": closure.until, "closed_reason": closure.reason}
        for name, hint in self._hints.items():
            view.setdefault(name, {})["hint"] = hint
        return view
