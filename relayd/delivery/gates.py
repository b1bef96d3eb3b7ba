"""Gates: may transport T take a message now; if not, from when, and why.

Takes: a transport name and the current time (`Gate.check`); what happened
when the delivery walk handed a message to a transport (`attempt_started`,
then `attempt_ended` with a `GateReport`).
Emits: a `GateVerdict`: open, or closed until a time, with a reason for the
log and `mailq` and the name of the gate that closed it.
Untrusted input: none (reports come from relayd's own transports).
How it fails: a gate never raises for a transport it does not know; it is open.

A gate's decision is a pure function of its state and the `now` it is
handed; the state changes only through the reports, so a test drives a gate
(and the scheduler above it) with a fake clock in milliseconds. The delivery
walk asks one composed `GateSet` and never a gate by kind: a new limit (a
per-transport rate limit, a provider's daily quota, an OAuth credential that
needs re-authorising) is one more `Gate` handed to the set at the
composition root, and the walk does not change.

The contract between the delivery walk and every gate:

* `check(transport, now)` has no side effects: the walk asks it before each
  attempt, and the scheduler asks it as often as it likes to plan (which
  transport a message will use first, until when a message waits). A
  transport closed before an attempt is skipped exactly as a down upstream
  always was: the walk goes on to the next transport of the chain, and a
  message whose every transport is closed is put back until the earliest
  reopening (`earliest_reopening`), without an attempt, a log line or a
  disk write.
* `attempt_started(transport, now)` right after an open `check`, with no
  await in between, so a gate that counts (a token bucket, a connection cap)
  takes its token in the same step as it said yes.
* `attempt_ended(transport, report, now)` exactly once for every started
  attempt, whatever happened.
* `reserve(transport, now)`, awaited right after `attempt_started`, only for
  gates whose limits live outside this process (a provider account's caps
  shared by several nodes in Redis): it takes the attempt's place there, or
  refuses it with a closed verdict. A refused attempt ends at once
  (`attempt_ended` with `ABANDONED`) and the walk treats the transport as
  closed; a reservation's `settle` is called exactly once when its attempt
  ends.
* A closure that is `forceable` is ignored by an operator's forced delivery
  (Exim's -M and -qff ignore host retry data); a closure that is not (a
  provider quota: forcing mail into it can lock the account for the day)
  holds even then.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Protocol, Sequence

from relayd.config.retry import RetrySchedule


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """Open (`until` None), or closed until `until` because of `reason`.

    `gate` names the gate that closed it (`retry`, later `rate`, `quota`...),
    so the walk and `mailq` can say which limit holds a message; `transport`
    the transport it closes ("" when the gate did not say).
    """

    until: float | None = None
    reason: str = ""
    gate: str = ""
    forceable: bool = True
    transport: str = ""

    @property
    def is_open(self) -> bool:
        return self.until is None

    def admits(self, *, forced: bool) -> bool:
        """Whether an attempt may start: open, or closed only by forceable gates and forced."""
        return self.until is None or (forced and self.forceable)


OPEN = GateVerdict()


def closed_until(
    until: float, reason: str, *, gate: str, forceable: bool = True, transport: str = ""
) -> GateVerdict:
    """A closed verdict; `until` is the earliest time the gate may open again."""
    return GateVerdict(until, reason, gate, forceable, transport)


class AttemptEnd(enum.Enum):
    """How an attempt on a transport ended, as far as the transport's availability goes."""

    # The upstream took the session (whatever it answered per recipient).
    REACHED = "reached"
    # Connection-level failure: connect, greeting, TLS, AUTH, or the session
    # broke off. The transport, not the message, is the problem.
    UNREACHABLE = "unreachable"
    # The provider said a rate or quota of the account is used up
    # (`relayd.delivery.providerreplies`), with the time it is worth trying
    # again in `reset_at`; the provider-limit gate closes until then.
    QUOTA_REACHED = "quota reached"
    # The attempt did not finish (shutdown cancelled it, or a bug raised): it
    # says nothing about the upstream, but a gate that counts gets its slot back.
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class GateReport:
    """What one attempt on a transport told the gates.

    `retry` is the transport's retry schedule (for gates that back off, such
    as the host retry state); `reset_at` the time the provider named for its
    quota to reopen, when it named one; `messages` and `recipients` what the
    upstream accepted in this attempt (for gates that count usage).
    """

    outcome: AttemptEnd
    detail: str = ""
    retry: RetrySchedule | None = None
    reset_at: float | None = None
    messages: int = 0
    recipients: int = 0
    hint: str = ""  # what fixes it, for the operator (e.g. "switch this transport to XOAUTH2: ...")


class Gate(Protocol):
    """One reason a transport may not take a message now. See the module docstring."""

    def check(self, transport: str, now: float) -> GateVerdict: ...

    def attempt_started(self, transport: str, now: float) -> None: ...

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None: ...


def _nothing_to_settle(_report: GateReport, _now: float) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Reservation:
    """An attempt's place held (open `verdict`) or refused (closed); `settle` when a held one ends."""

    verdict: GateVerdict = OPEN
    settle: Callable[[GateReport, float], None] = _nothing_to_settle


HELD = Reservation()


class Reserving(Protocol):
    """A gate that holds an attempt's place in a store outside this process before the send."""

    async def reserve(self, transport: str, now: float) -> Reservation: ...


def combine(verdicts: Iterable[GateVerdict]) -> GateVerdict:
    """One verdict for several gates over the same transport.

    Open only when every gate is; otherwise the closure that ends last (the
    transport cannot take mail before every gate has opened), forceable only
    when every closure is.
    """
    closed = [v for v in verdicts if v.until is not None]
    if not closed:
        return OPEN
    latest = max(closed, key=lambda v: v.until or 0.0)
    return replace(latest, forceable=all(v.forceable for v in closed))


class GateSet:
    """Every gate of the relay, asked and told as one; itself a `Gate`."""

    def __init__(self, gates: Sequence[Gate], reserving: Sequence[Reserving] = ()) -> None:
        self._gates = tuple(gates)
        self._reserving = tuple(reserving)

    @property
    def reserves(self) -> bool:
        """Whether attempts need `reserve` (a shared store is configured); the walk skips the await otherwise."""
        return bool(self._reserving)

    async def reserve(self, transport: str, now: float) -> Reservation:
        """Every reserving gate's place for one attempt; refused (and the others' given back) if one refuses."""
        held: list[Reservation] = []
        for gate in self._reserving:
            reservation = await gate.reserve(transport, now)
            if not reservation.verdict.is_open:
                for earlier in held:
                    earlier.settle(GateReport(AttemptEnd.ABANDONED), now)
                return reservation
            held.append(reservation)
        if len(held) == 1:
            return held[0]

        def settle(report: GateReport, at: float) -> None:
            for reservation in held:
                reservation.settle(report, at)

        return Reservation(OPEN, settle)

    def check(self, transport: str, now: float) -> GateVerdict:
        return combine(gate.check(transport, now) for gate in self._gates)

    def attempt_started(self, transport: str, now: float) -> None:
        for gate in self._gates:
            gate.attempt_started(transport, now)

    def attempt_ended(self, transport: str, report: GateReport, now: float) -> None:
        for gate in self._gates:
            gate.attempt_ended(transport, report, now)


def earliest_reopening(gate: Gate, chain: Sequence[str], now: float) -> GateVerdict:
    """Whether any transport of a chain is open now; if none is, the one that opens first.

    OPEN when a transport of the chain is open (the message has something to
    try); otherwise the closed verdict that ends earliest, for putting the
    message back until then and telling `mailq` why.
    """
    earliest: GateVerdict | None = None
    for name in chain:
        verdict = gate.check(name, now)
        if verdict.until is None:
            return OPEN
        if earliest is None or (earliest.until is not None and verdict.until < earliest.until):
            earliest = verdict if verdict.transport else replace(verdict, transport=name)
    return earliest if earliest is not None else OPEN
