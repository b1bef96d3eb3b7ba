"""Holding: which due messages wait for a transport's limit, why, and when each is released.

Takes: the delivery agent's view of a due message (`gate_hold`: every
transport of its due recipients closed, until when and why), the live
config, and a transport's message spacing (relayd.delivery.shaping).
Emits: the scheduler's `hold_until` answer per message, spread so that a
released backlog is not one herd; the reason `mailq` and `relayctl queue
show` print ("held: gmail_acme daily quota 500 reached, resets 00:00 UTC");
one `MessageHeldLong` event when a held message reaches half its maximum age.
Also `held_back`, the walk's rule for a route group whose every transport a
limit closed between the scheduler's look and the attempt.
Untrusted input: none.
How it fails: it does not raise; a message it cannot route is not held.

Waiting for a limit is not a failed attempt: a held message is put back in
the scheduler without a delivery pass, so no attempt is counted, no retry
time moves and nothing is written to disk. The maximum age still applies,
counted from arrival for a message never tried (from its first failure
otherwise): past it the message is no longer held and fails in the walk with
"retry timeout exceeded", and the operator is warned at half of it.

Releases are spread two ways. A per-second limit releases the messages it
holds one spacing apart (a virtual queue per transport), rather than all at
the next token, where all but one would find the bucket empty again. A
window cap (minute, hour, day) releases each message at the window's end
plus a fixed share of a spread (a tenth of the wait, at most
`MAX_RELEASE_SPREAD`), chosen by its queue id: at 00:00 UTC a day's backlog
comes due over a quarter of an hour, not in one instant.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import replace
from typing import Callable, Mapping, Sequence

from relayd.config.model import RelayConfig
from relayd.delivery.gates import GateVerdict
from relayd.delivery.router import route
from relayd.delivery.shaping import QUOTA_GATE, RATE_GATE
from relayd.observe import events as ev
from relayd.values import AttemptOutcome, DeliveryReport, QueueEntry, Route

MAX_RELEASE_SPREAD = 900.0  # seconds over which a window's backlog is released
_SPREAD_SHARE = 0.1  # of the wait until the window's end
_RETRY_GATE = "retry"  # relayd.delivery.upstreamhealth's closures keep their own wording
_WARNED_MEMORY = 100_000  # messages remembered as warned; older ones may be warned once more
_SWEEP_EVERY = 10_000  # holds recorded between two sweeps of reasons whose release has passed


def release_share(message_id: str) -> float:
    """A stable number in [0, 1) for a message: its place in a spread release."""
    return zlib.crc32(message_id.encode()) / 2**32


class HoldBook:
    """The scheduler's `hold_until`, remembering why each message waits."""

    def __init__(
        self,
        *,
        hold_until: Callable[[QueueEntry], float | None],
        gate_hold: Callable[[QueueEntry], GateVerdict],
        unrecorded: Callable[[], Mapping[str, str]],
        spacing: Callable[[str], float],
        config: Callable[[], RelayConfig],
        events: ev.EventSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._hold_until = hold_until
        self._gate_hold = gate_hold
        self._unrecorded = unrecorded
        self._spacing = spacing
        self._config = config
        self._events = events
        self._clock = clock
        self._held: dict[str, GateVerdict] = {}
        self._cursor: dict[str, float] = {}  # transport -> next free release under its rate
        self._warned: dict[str, None] = {}
        self._since_sweep = 0

    def hold_until(self, entry: QueueEntry) -> float | None:
        if self._unrecorded():
            return self._hold_until(entry)  # the agent's own rule while the spool cannot write
        verdict = self._gate_hold(entry)
        if verdict.until is None:
            self._held.pop(entry.id, None)
            return None
        now = self._clock()
        until = self._release_time(entry.id, verdict, now)
        self._held[entry.id] = replace(verdict, until=until)
        self._since_sweep += 1
        if self._since_sweep >= _SWEEP_EVERY:  # messages removed while held leave no reason behind for long
            self._since_sweep = 0
            self.reasons()
        self._warn_when_old(entry, verdict, now)
        return until

    def reason(self, message_id: str) -> str | None:
        """`held: <transport> <why>` for a message a limit holds now; None otherwise."""
        verdict = self._held.get(message_id)
        if verdict is None or verdict.until is None or verdict.until <= self._clock():
            return None
        if verdict.gate == _RETRY_GATE:
            return None
        who = f"{verdict.transport} " if verdict.transport else ""
        return f"held: {who}{verdict.reason}"

    def reasons(self) -> dict[str, str]:
        """Every message a limit holds now, with its reason (for `mailq`)."""
        result = {}
        for message_id in list(self._held):
            text = self.reason(message_id)
            if text is None:
                self._held.pop(message_id, None)
            else:
                result[message_id] = text
        return result

    def forget(self, message_id: str) -> None:
        self._held.pop(message_id, None)

    def _release_time(self, message_id: str, verdict: GateVerdict, now: float) -> float:
        assert verdict.until is not None
        if verdict.gate == RATE_GATE and verdict.transport:
            spacing = self._spacing(verdict.transport)
            cursor = self._cursor.get(verdict.transport, 0.0)
            # The virtual queue restarts once it has run dry.
            slot = max(verdict.until, cursor if cursor > now else verdict.until)
            self._cursor[verdict.transport] = slot + spacing
            return slot
        if verdict.gate == QUOTA_GATE:
            spread = min(MAX_RELEASE_SPREAD, _SPREAD_SHARE * max(0.0, verdict.until - now))
            return verdict.until + spread * release_share(message_id)
        return verdict.until

    def _warn_when_old(self, entry: QueueEntry, verdict: GateVerdict, now: float) -> None:
        if entry.id in self._warned or verdict.gate == _RETRY_GATE:
            return
        max_age = self._max_age(entry)
        held_for = now - entry.envelope.received_at
        if max_age is None or held_for < max_age / 2:
            return
        if len(self._warned) >= _WARNED_MEMORY:
            self._warned.pop(next(iter(self._warned)))
        self._warned[entry.id] = None
        who = f"{verdict.transport} " if verdict.transport else ""
        self._events.emit(ev.MessageHeldLong(
            queue_id=entry.id, tenant=entry.envelope.tenant, held_for=held_for, max_age=max_age,
            reason=who + verdict.reason,
        ))

    def _max_age(self, entry: QueueEntry) -> float | None:
        """The maximum age of the message's first open recipient (its chain's last transport)."""
        config = self._config()
        tenant = config.tenants.get(entry.envelope.tenant)
        if tenant is None:
            return None
        for recipient in entry.undelivered:
            found = route(tenant, recipient.address)
            if found is not None and found.transports:
                return config.retry_for(found.transports[-1]).max_age
        return None


def held_back(
    entry: QueueEntry, route_: Route, addresses: Sequence[str], wait: GateVerdict, config: RelayConfig,
    *, now: float,
) -> tuple[list[DeliveryReport], list[str]]:
    """A route group whose every transport a limit closes: (verdicts now, addresses still to walk); pure.

    Only closures no operator can force (shaping, provider quotas) hold a
    group back here; a chain closed by an upstream's retry wait is walked as
    before. A held recipient gets no verdict: it stays as it is, due, and the
    scheduler puts the message back until the limit's release. One past its
    maximum age fails instead ("retry timeout exceeded"), as it would after
    one more deferral.
    """
    if wait.until is None or wait.forceable or not addresses:
        return [], list(addresses)
    schedule = config.retry_for(route_.transports[-1]) if route_.transports else config.retry
    by_address = {r.address: r for r in entry.recipients}
    expired: list[DeliveryReport] = []
    who = f"{wait.transport} " if wait.transport else ""
    for address in addresses:
        recipient = by_address.get(address)
        since = entry.envelope.received_at
        if recipient is not None and recipient.first_failure is not None:
            since = recipient.first_failure
        if now - since >= schedule.max_age:
            expired.append(DeliveryReport(
                address, AttemptOutcome.FAIL, route_.rule,
                reason=f"retry timeout exceeded: held: {who}{wait.reason}", tried=tuple(route_.transports),
            ))
    return expired, []
