"""Failed-AUTH throttling per login name, plus a budget per source.

aiosmtpd has no limit on failed AUTH attempts. Every local application connects
from 127.0.0.1, so counting failures per address alone would let one app with a
stale password lock every tenant out, and would let a tenant that logs in
successfully between guesses (resetting the count) guess another tenant's
password at full speed. So relayd keeps two counts:

* per login name attempted (known or not: the same rules for both, so nothing
  tells whether a tenant exists): past `delay_after` failures each further 535
  is delayed (doubling, capped at MAX_DELAY); past `lockout_after` the login is
  refused with 421 and disconnected, without a password check, for a lockout
  that starts at `lockout` and doubles with each further failure up to
  `lockout_max`. The failures are forgotten once the login has been quiet for
  `window` after its lockout ended. A success does not wipe them: a tenant that
  logs in now and then must not reset the count for someone guessing it.
* per source (one IPv4 address, one IPv6 /64, all of 127.0.0.0/8 and ::1 as
  one, each local uid of the Unix socket on its own): at most `source_budget`
  failures within `window`. A source over its budget is refused (421) for any
  login that has itself failed recently, and its further failures are replied
  to slowly. A login that has not failed is still checked: a correct password
  for tenant X is never refused because of failures against tenant Y, even
  from the same shared 127.0.0.1; the guesser's reach over the budget is one
  guess per login name per window.

Attempts are counted when they start, not when their (slow, off-loop) password
check ends, so a burst of parallel AUTHs cannot all be checked before the first
failure counts: an attempt in flight counts as a failure until it succeeds.

The decisions are pure functions of the counts, the limits and the time
(`decide`, `failure_delay`, `source_key`); `AuthGuard` only keeps the counts,
bounded in number, with an injected clock. The listener does the sleeping.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from relayd.config.model import ListenerConfig

MAX_DELAY = 8.0  # seconds; long enough to make guessing slow, short enough for a typo
FIRST_DELAY = 0.5  # the first delayed 535; doubles per further failure up to MAX_DELAY
_MAX_TRACKED = 20_000  # login names and sources remembered at once each, to bound memory
_MAX_LOGIN_KEY = 128  # characters of a login name kept as its key (longer ones are no tenant)
_IPV6_SOURCE_PREFIX = 64  # one IPv6 host usually owns a whole /64
LOOPBACK_SOURCE = "loopback"  # 127.0.0.0/8 and ::1: every local program is one source


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """One listener's thresholds (relay.yaml's auth_* listener keys)."""

    delay_after: int = 3
    lockout_after: int = 10
    source_budget: int = 30
    window: float = 900.0
    lockout: float = 60.0
    lockout_max: float = 900.0


@dataclass(frozen=True, slots=True)
class LoginAttempts:
    """Failures of one login name, and attempts at it whose check has not ended."""

    failures: int = 0
    in_flight: int = 0
    last_failure: float = 0.0


@dataclass(frozen=True, slots=True)
class SourceAttempts:
    """The latest failure times of one source (at most its budget), and attempts in flight."""

    failures: tuple[float, ...] = ()
    in_flight: int = 0


class Verdict(enum.Enum):
    CHECK = "check"  # check the password
    REFUSE = "refuse"  # 421 and disconnect, without checking


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""  # for the log only; the client always gets the same 421
    retry_after: float = 0.0  # seconds until this login may be tried again (0: unknown)


CHECK = Decision(Verdict.CHECK)


def limits_of(listener: "ListenerConfig") -> ThrottleLimits:
    """A listener's thresholds, as relay.yaml set them."""
    return ThrottleLimits(
        delay_after=listener.auth_failures_before_delay,
        lockout_after=listener.auth_failures_before_disconnect,
        source_budget=listener.auth_failures_per_source,
        window=listener.auth_failure_window,
        lockout=listener.auth_lockout,
        lockout_max=listener.auth_lockout_max,
    )


# --------------------------------------------------------------------- pure decisions


def lockout_seconds(failures: int, limits: ThrottleLimits) -> float:
    """How long a login with `failures` failures is refused after the latest one."""
    if failures < limits.lockout_after:
        return 0.0
    doublings = min(failures - limits.lockout_after, 32)
    return float(min(limits.lockout_max, limits.lockout * 2.0**doublings))


def login_now(attempts: LoginAttempts, limits: ThrottleLimits, now: float) -> LoginAttempts:
    """`attempts` with its failures forgotten if the login has been quiet long enough."""
    if attempts.in_flight or not attempts.failures:
        return attempts
    quiet_since = attempts.last_failure + lockout_seconds(attempts.failures, limits)
    if now - quiet_since > limits.window:
        return replace(attempts, failures=0)
    return attempts


def source_now(attempts: SourceAttempts, limits: ThrottleLimits, now: float) -> SourceAttempts:
    """`attempts` without the failures older than the window."""
    recent = tuple(t for t in attempts.failures if now - t <= limits.window)
    return attempts if len(recent) == len(attempts.failures) else replace(attempts, failures=recent)


def decide(login: LoginAttempts, source: SourceAttempts, limits: ThrottleLimits, now: float) -> Decision:
    """Whether an AUTH attempt that is starting now may have its password checked.

    `login` and `source` are the counts before this attempt, already brought up
    to date by `login_now` and `source_now`.
    """
    pending = login.failures + login.in_flight
    if pending >= limits.lockout_after:
        until = login.last_failure + lockout_seconds(login.failures, limits)
        if login.in_flight:  # the attempts in flight decide; if they fail, the lockout is this long
            return Decision(Verdict.REFUSE, f"login locked after {pending} attempts",
                            lockout_seconds(pending, limits))
        if now < until:
            return Decision(Verdict.REFUSE, f"login locked after {login.failures} failures", until - now)
    over_budget = len(source.failures) + source.in_flight >= limits.source_budget
    if over_budget and pending > 0:
        return Decision(
            Verdict.REFUSE,
            f"source over its budget of {limits.source_budget} failures, and this login failed recently",
            limits.window,
        )
    return CHECK


def failure_delay(login: LoginAttempts, source: SourceAttempts, limits: ThrottleLimits) -> float:
    """Seconds to hold a 535 back, given the counts with that failure recorded."""
    if len(source.failures) >= limits.source_budget:
        return MAX_DELAY
    excess = login.failures - limits.delay_after
    if excess <= 0:
        return 0.0
    return float(min(MAX_DELAY, FIRST_DELAY * 2.0 ** min(excess - 1, 16)))


def with_source_failure(source: SourceAttempts, limits: ThrottleLimits, now: float) -> SourceAttempts:
    """`source` after one of its attempts in flight failed now.

    Only the latest `source_budget` failure times are kept: enough to tell
    whether the budget is spent within the window, and bounded.
    """
    recent = source_now(source, limits, now).failures + (now,)
    return SourceAttempts(recent[-limits.source_budget:], max(source.in_flight - 1, 0))


def source_key(address: str) -> str:
    """The source an address belongs to: loopback as one, IPv6 by /64, IPv4 by address.

    Anything that is not an IP address (a Unix socket peer named `uid:N` by
    the listener) is its own source.
    """
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return LOOPBACK_SOURCE
    if isinstance(ip, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((ip, _IPV6_SOURCE_PREFIX), strict=False)
        return str(network)
    return str(ip)


def login_key(login: str) -> str:
    """The name a login's failures are kept under (bounded: long names are no tenant anyway)."""
    return login[:_MAX_LOGIN_KEY]


# --------------------------------------------------------------------- the counts

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Attempt:
    """An AUTH attempt whose password check was allowed; finish it with the guard."""

    login: str
    source: str
    limits: ThrottleLimits


class AuthGuard:
    """The failure counts of logins and sources, shared by every listener.

    Each listener passes its own `ThrottleLimits`; the counts are common, so
    guesses cannot be spread over the listeners either.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_tracked: int = _MAX_TRACKED) -> None:
        self._clock = clock
        self._max_tracked = max_tracked
        self._logins: OrderedDict[str, LoginAttempts] = OrderedDict()
        self._sources: OrderedDict[str, SourceAttempts] = OrderedDict()

    def begin(self, login: str, address: str, limits: ThrottleLimits) -> Attempt | Decision:
        """Count an attempt that starts now; a refusal `Decision`, or the `Attempt` to check."""
        now = self._clock()
        key, source = login_key(login), source_key(address)
        attempts = login_now(self._logins.get(key, LoginAttempts()), limits, now)
        budget = source_now(self._sources.get(source, SourceAttempts()), limits, now)
        decision = decide(attempts, budget, limits, now)
        if decision.verdict is Verdict.REFUSE:
            self._store(self._logins, key, attempts)
            self._store(self._sources, source, budget)
            return decision
        self._store(self._logins, key, replace(attempts, in_flight=attempts.in_flight + 1))
        self._store(self._sources, source, replace(budget, in_flight=budget.in_flight + 1))
        return Attempt(key, source, limits)

    def succeeded(self, attempt: Attempt) -> None:
        """The password was right: the attempt no longer counts; earlier failures stay."""
        login = self._logins.get(attempt.login)
        if login is not None:
            self._logins[attempt.login] = replace(login, in_flight=max(login.in_flight - 1, 0))
        source = self._sources.get(attempt.source)
        if source is not None:
            self._sources[attempt.source] = replace(source, in_flight=max(source.in_flight - 1, 0))

    def failed(self, attempt: Attempt) -> float:
        """The password was wrong: record the failure; the seconds to hold the 535 back."""
        now = self._clock()
        limits = attempt.limits
        login = self._logins.get(attempt.login, LoginAttempts(in_flight=1))
        login = LoginAttempts(login.failures + 1, max(login.in_flight - 1, 0), now)
        source = with_source_failure(self._sources.get(attempt.source, SourceAttempts(in_flight=1)), limits, now)
        self._store(self._logins, attempt.login, login)
        self._store(self._sources, attempt.source, source)
        return failure_delay(login, source, limits)

    def is_refused(self, login: str, address: str, limits: ThrottleLimits) -> bool:
        """Whether an attempt at `login` from `address` would be refused now (counts nothing)."""
        now = self._clock()
        attempts = login_now(self._logins.get(login_key(login), LoginAttempts()), limits, now)
        budget = source_now(self._sources.get(source_key(address), SourceAttempts()), limits, now)
        return decide(attempts, budget, limits, now).verdict is Verdict.REFUSE

    def _store(self, table: "OrderedDict[str, V]", key: str, value: V) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._max_tracked:
            table.popitem(last=False)  # the least recently touched
