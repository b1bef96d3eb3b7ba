"""Login throttling decisions (relayd.smtp.authguard): pure functions and the counts, with a fake clock."""

from __future__ import annotations

import pytest

from relayd.smtp.authguard import (
    LOOPBACK_SOURCE,
    MAX_DELAY,
    Attempt,
    AuthGuard,
    Decision,
    LoginAttempts,
    SourceAttempts,
    ThrottleLimits,
    Verdict,
    decide,
    lockout_seconds,
    login_now,
    source_key,
)

LIMITS = ThrottleLimits(delay_after=2, lockout_after=4, source_budget=6, window=600.0, lockout=60.0, lockout_max=300.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(guard: AuthGuard, login: str, address: str = "192.0.2.1", limits: ThrottleLimits = LIMITS) -> float:
    attempt = guard.begin(login, address, limits)
    assert isinstance(attempt, Attempt), attempt
    return guard.failed(attempt)


def test_a_failing_login_is_slowed_then_locked_out_with_a_doubling_capped_lockout() -> None:
    clock = Clock()
    guard = AuthGuard(clock=clock)
    delays = [fail(guard, "acme") for _ in range(4)]
    assert delays == [0.0, 0.0, 0.5, 1.0]
    refused = guard.begin("acme", "192.0.2.1", LIMITS)
    assert isinstance(refused, Decision) and refused.verdict is Verdict.REFUSE
    assert refused.retry_after == pytest.approx(60.0)
    clock.now += 61  # the first lockout is over: one more try, which fails
    assert fail(guard, "acme") == 2.0
    clock.now += 61
    assert guard.is_refused("acme", "192.0.2.1", LIMITS)  # now locked for 120 s
    clock.now += 60
    assert not guard.is_refused("acme", "192.0.2.1", LIMITS)
    assert [lockout_seconds(n, LIMITS) for n in (3, 4, 5, 6, 7, 8)] == [0, 60, 120, 240, 300, 300]


def test_a_login_is_forgotten_only_after_a_quiet_window_after_its_lockout() -> None:
    locked = LoginAttempts(failures=4, last_failure=0.0)
    assert login_now(locked, LIMITS, 60.0 + 600.0).failures == 4  # lockout 60 s, then the window
    assert login_now(locked, LIMITS, 60.0 + 600.5).failures == 0
    assert login_now(LoginAttempts(failures=1, last_failure=0.0), LIMITS, 600.5).failures == 0


def test_a_success_for_another_login_does_not_reset_anything() -> None:
    clock = Clock()
    guard = AuthGuard(clock=clock)
    for _ in range(4):
        fail(guard, "globex", "127.0.0.1")
        ok = guard.begin("acme", "127.0.0.1", LIMITS)
        assert isinstance(ok, Attempt)
        guard.succeeded(ok)
    assert guard.is_refused("globex", "127.0.0.1", LIMITS)
    assert not guard.is_refused("acme", "127.0.0.1", LIMITS)


def test_a_success_does_not_wipe_the_logins_own_failures() -> None:
    guard = AuthGuard(clock=Clock())
    for _ in range(3):
        fail(guard, "acme")
    ok = guard.begin("acme", "192.0.2.1", LIMITS)
    assert isinstance(ok, Attempt)
    guard.succeeded(ok)
    fail(guard, "acme")  # the fourth failure locks it, success or not in between
    assert guard.is_refused("acme", "192.0.2.1", LIMITS)


def test_attempts_count_when_they_start_so_parallel_ones_cannot_all_be_checked() -> None:
    guard = AuthGuard(clock=Clock())
    started = [guard.begin("acme", "192.0.2.1", LIMITS) for _ in range(10)]
    checked = [a for a in started if isinstance(a, Attempt)]
    assert len(checked) == LIMITS.lockout_after
    assert all(isinstance(a, Decision) and a.verdict is Verdict.REFUSE for a in started[4:])


def test_one_app_with_a_wrong_password_locks_only_its_own_login() -> None:
    guard = AuthGuard(clock=Clock())
    for _ in range(4):
        fail(guard, "shop", "127.0.0.1")
    assert guard.is_refused("shop", "127.0.0.1", LIMITS)
    assert not guard.is_refused("acme", "127.0.0.1", LIMITS)


def test_a_source_over_budget_is_refused_for_failed_logins_but_never_for_a_clean_one() -> None:
    guard = AuthGuard(clock=Clock())
    for n in range(6):  # six logins, one failure each: each below its own thresholds
        fail(guard, f"guess{n}", f"127.0.0.{n + 2}")
    assert guard.is_refused("guess0", "127.0.0.99", LIMITS)  # loopback is one source
    assert not guard.is_refused("guess0", "192.0.2.1", LIMITS)  # another source is not affected
    clean = guard.begin("acme", "127.0.0.1", LIMITS)
    assert isinstance(clean, Attempt)  # a correct password of acme would be checked
    assert guard.failed(clean) == MAX_DELAY  # a failure from an over-budget source is slow


def test_decide_is_a_pure_function_of_counts_limits_and_time() -> None:
    over = SourceAttempts(failures=(1.0,) * 6)
    assert decide(LoginAttempts(), over, LIMITS, 2.0).verdict is Verdict.CHECK
    assert decide(LoginAttempts(failures=1, last_failure=1.0), over, LIMITS, 2.0).verdict is Verdict.REFUSE
    assert decide(LoginAttempts(in_flight=1), over, LIMITS, 2.0).verdict is Verdict.REFUSE
    assert decide(LoginAttempts(failures=3, in_flight=1), SourceAttempts(), LIMITS, 2.0).verdict is Verdict.REFUSE


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("127.0.0.1", LOOPBACK_SOURCE), ("127.4.5.6", LOOPBACK_SOURCE), ("::1", LOOPBACK_SOURCE),
        ("::ffff:127.0.0.2", LOOPBACK_SOURCE), ("192.0.2.7", "192.0.2.7"), ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("uid:33", "uid:33"),
    ],
)
def test_sources_aggregate_loopback_and_ipv6_prefixes(address: str, key: str) -> None:
    assert source_key(address) == key


def test_the_counts_kept_are_bounded() -> None:
    guard = AuthGuard(clock=Clock(), max_tracked=100)
    for n in range(1000):
        fail(guard, f"user{n}", f"198.51.100.{n % 250}")
    assert len(guard._logins) <= 100 and len(guard._sources) <= 100


def test_each_listener_brings_its_own_limits_to_shared_counts() -> None:
    from relayd.smtp.authguard import limits_of
    from relayd.config.model import ListenerConfig

    strict = limits_of(ListenerConfig(auth_failures_before_delay=1, auth_failures_before_disconnect=2,
                                      auth_failures_per_source=50, auth_lockout=5.0, auth_lockout_max=10.0))
    assert strict == ThrottleLimits(delay_after=1, lockout_after=2, source_budget=50, window=900.0,
                                    lockout=5.0, lockout_max=10.0)
    lenient = limits_of(ListenerConfig())
    guard = AuthGuard(clock=Clock())
    fail(guard, "acme", limits=lenient)  # on the 587 listener
    fail(guard, "acme", limits=strict)  # on another listener: the same count
    assert guard.is_refused("acme", "192.0.2.1", strict)
    assert not guard.is_refused("acme", "192.0.2.1", lenient)
