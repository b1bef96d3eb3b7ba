"""The OAuth gate: a transport whose credential cannot get a token takes no mail until it can.

Takes: the token sources by transport name (relayd.delivery.tokensource) and
a way to tell whether the credential store changed since a failure.
Emits: a closed `GateVerdict` for a transport whose last token request failed,
with the reason the operator needs ("needs re-authorisation: relayctl oauth
authorize NAME", or the endpoint that is down); open otherwise.
Untrusted input: none.
How it fails: never; a transport it does not know is open.

Mail is never bounced for a token problem: the transport's messages go on
down the chain or wait, exactly as for a down upstream. The gate opens again
by itself: after a backoff (a minute, doubling to `MAX_BACKOFF`, for an
endpoint that is down; `REAUTHORISE_RECHECK` for a refused grant, in case the
provider only hiccupped), and at once when the credential store changed since
the failure (`relayctl oauth authorize` wrote a new refresh token).
"""

from __future__ import annotations

from typing import Callable, Mapping

from relayd.delivery.gates import OPEN, GateReport, GateVerdict, closed_until
from relayd.delivery.tokensource import TokenSource, TokenState, reauthorise_command

FIRST_BACKOFF = 60.0  # seconds after a first failed token request
MAX_BACKOFF = 900.0  # an endpoint down for long is still asked every 15 minutes
REAUTHORISE_RECHECK = 900.0  # a refused grant is tried again this often (or when the store changes)


def reopens_at(state: TokenState) -> float | None:
    """When the gate opens after the failure `state` records (None: not failed)."""
    if state.failed_at is None:
        return None
    if state.needs_reauthorisation:
        return state.failed_at + REAUTHORISE_RECHECK
    backoff: float = min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** min(10, max(0, state.failures - 1)))
    return state.failed_at + backoff


def closed_reason(state: TokenState) -> str:
    if state.needs_reauthorisation:
        return f"credential {state.credential} needs re-authorisation: {reauthorise_command(state.credential)}"
    return f"credential {state.credential} cannot get an OAuth token: {state.last_error}"


class OAuthGate:
    """A `Gate` over every transport that logs in with XOAUTH2."""

    def __init__(
        self,
        sources: Callable[[], Mapping[str, TokenSource]],
        *,
        store_changed_since: Callable[[float], bool] = lambda when: False,
    ) -> None:
        self._sources = sources
        self._store_changed_since = store_changed_since

    def check(self, transport: str, now: float) -> GateVerdict:
        source = self._sources().get(transport)
        if source is None:
            return OPEN
        state = source.state
        until = reopens_at(state)
        if until is None or now >= until:
            return OPEN
        if state.failed_at is not None and self._store_changed_since(state.failed_at):
            return OPEN
        return closed_until(until, closed_reason(state), gate="oauth")

    def attempt_started(self, transport: str, now: float) -> None:
        """Nothing to count: the token source itself keeps one request in flight."""

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        """The state changes through the token source, not through attempt reports."""
