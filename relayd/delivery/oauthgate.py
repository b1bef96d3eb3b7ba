"""The OAuth gate: a transport whose credential cannot get a token takes no mail until it can.

Takes: the token sources by transport name (relayd.delivery.tokensource) and
a way to tell whether the credential store changed since a failure.
Emits: a closed `GateVerdict` for a transport whose last token request failed,
with the reason the operator needs ("needs re-authorisation: relayctl oauth
authorize NAME", or the endpoint that is down); open otherwise.
Untrusted input: none.
How it fails: never; a transport it does not know is open.

A token problem never fails a recipient by itself: the transport's messages
go on down the chain or wait, exactly as for a down upstream (and, like any
deferral, within the retry schedule's maximum age). The gate opens again by
itself when the transport's retry schedule says (as the host retry state
does for an upstream that is down), whether the endpoint was down or the
grant refused: each reopening costs one token request, and a refused grant
is tried again in case the provider only hiccupped or the operator has run
`relayctl oauth authorize` meanwhile (its new refresh token is read from the
store at that request). A check made after the store changed finds the gate
open at once (an operator's `relayctl queue deliver` after authorising).
"""

from __future__ import annotations

from typing import Callable, Mapping

from relayd.config.retry import RetrySchedule
from relayd.delivery.gates import OPEN, GateReport, GateVerdict, closed_until
from relayd.delivery.tokensource import TokenSource, TokenState, reauthorise_command

def reopens_at(state: TokenState, retry: RetrySchedule) -> float | None:
    """When the gate opens after the failure `state` records (None: not failed)."""
    if state.failed_at is None:
        return None
    planned = retry.next_attempt(state.first_failed_at or state.failed_at, state.failed_at, None)
    return planned[0] if planned is not None else state.failed_at + retry.rules[-1].interval


def closed_reason(state: TokenState) -> str:
    if state.needs_reauthorisation:
        return f"credential {state.credential} needs re-authorisation: {reauthorise_command(state.credential)}"
    return state.last_error  # "credential NAME: token endpoint ... (why)"; retried on schedule


class OAuthGate:
    """A `Gate` over every transport that logs in with XOAUTH2."""

    def __init__(
        self,
        sources: Callable[[], Mapping[str, TokenSource]],
        retry_for: Callable[[str], RetrySchedule],
        *,
        store_changed: Callable[[TokenState], bool] = lambda state: False,
    ) -> None:
        self._sources = sources
        self._retry_for = retry_for
        self._store_changed = store_changed  # since the failure `state` records

    def check(self, transport: str, now: float) -> GateVerdict:
        source = self._sources().get(transport)
        if source is None:
            return OPEN
        state = source.state
        until = reopens_at(state, self._retry_for(transport))
        if until is None or now >= until:
            return OPEN
        if self._store_changed(state):
            return OPEN
        return closed_until(until, closed_reason(state), gate="oauth")

    def attempt_started(self, transport: str, now: float) -> None:
        """Nothing to count: the token source itself keeps one request in flight."""

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        """The state changes through the token source, not through attempt reports."""
