"""Login throttling against the real relayd process (uvloop), with real clients on loopback.

Every local application connects from 127.0.0.1, so these pin that one app's
failures only slow down and lock out its own login, that successes of one
tenant do not reset the count against another, that parallel AUTHs are
counted, and that 127.0.0.0/8 is one source whatever address a guesser binds.
"""

from __future__ import annotations

import base64
import smtplib
import threading
import time
from typing import Iterator

import pytest

from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, make_message

ACME = ("acme", "acme-relay-password")
GLOBEX = ("globex", "globex-relay-password")
SHOP = ("shop", "shop-relay-password")


def throttled_relay(files: RelayFiles, **limits: object) -> RelaydProcess:
    settings = {"tls": "none", "allow_plaintext_auth": "true", **limits}
    files.write(
        upstreams=[],
        tenants=[
            TenantSpec(name, password, [f"*@{name}.example"], [(["*"], ["capture"])])
            for name, password in (ACME, GLOBEX, SHOP)
        ],
        capture=True,
        listener_extra="\n".join(f"{key}: {value}" for key, value in settings.items()),
    )
    return RelaydProcess(files)


@pytest.fixture
def relay(relay_files: RelayFiles, request: pytest.FixtureRequest) -> Iterator[RelayFiles]:
    limits = getattr(request, "param", {})
    with throttled_relay(relay_files, **limits):
        yield relay_files


def client(files: RelayFiles, source: str = "127.0.0.1") -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", files.port, timeout=20, source_address=(source, 0), local_hostname="app.test")
    smtp.ehlo("app.test")
    return smtp


def auth_plain(smtp: smtplib.SMTP, login: str, password: str) -> int:
    """The reply code to AUTH PLAIN; -1 if relayd hung up without one."""
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    try:
        code, _ = smtp.docmd("AUTH", "PLAIN " + blob)
    except smtplib.SMTPServerDisconnected:
        return -1
    return code


def try_login(files: RelayFiles, login: str, password: str, source: str = "127.0.0.1") -> int:
    smtp = client(files, source)
    try:
        return auth_plain(smtp, login, password)
    finally:
        smtp.close()


def send_as(files: RelayFiles, login: tuple[str, str], source: str = "127.0.0.1") -> None:
    smtp = client(files, source)
    try:
        assert auth_plain(smtp, *login) == 235
        sender = f"app@{login[0]}.example"
        assert smtp.sendmail(sender, ["c@customer.test"], make_message(sender, ["c@customer.test"])) == {}
    finally:
        smtp.close()


LOCK_AFTER_3 = {"auth_failures_before_delay": 1, "auth_failures_before_disconnect": 3}


@pytest.mark.parametrize("relay", [LOCK_AFTER_3], indirect=True)
def test_one_app_with_a_wrong_password_does_not_lock_out_the_others(relay: RelayFiles) -> None:
    codes = [try_login(relay, SHOP[0], "stale-password") for _ in range(4)]
    assert codes == [535, 535, 535, 421]  # slowed down, then locked out
    assert try_login(relay, *SHOP) == 421  # its own correct password waits for the lockout
    send_as(relay, ACME)  # every other tenant on 127.0.0.1 goes on sending
    send_as(relay, GLOBEX)
    log = relay.wait_for_log(" <= app@globex.example")
    assert "AUTH refused (set_id=shop): login locked after 3 failures; retry in " in log
    assert "stale-password" not in log


@pytest.mark.parametrize("relay", [LOCK_AFTER_3], indirect=True)
def test_tenant_logging_in_between_guesses_cannot_brute_force_another(relay: RelayFiles) -> None:
    codes: list[int] = []
    started = time.monotonic()
    for n in range(6):
        assert try_login(relay, *ACME) == 235  # a success of acme resets nothing for globex
        codes.append(try_login(relay, GLOBEX[0], f"guess-{n}"))
    elapsed = time.monotonic() - started
    assert codes == [535, 535, 535, 421, 421, 421]
    assert elapsed >= 0.5 + 1.0  # the second and third guesses were held back
    log = relay.mainlog()
    assert log.count("(set_id=globex)") == 3 + 3  # three checked (authenticator failed), three refused
    assert log.count("authenticator failed") == 3


@pytest.mark.parametrize("relay", [LOCK_AFTER_3], indirect=True)
def test_parallel_auth_attempts_are_all_counted(relay: RelayFiles) -> None:
    clients = [client(relay) for _ in range(12)]
    gate = threading.Barrier(len(clients))
    codes: list[int] = []

    def guess(smtp: smtplib.SMTP, n: int) -> None:
        gate.wait(10)
        codes.append(auth_plain(smtp, GLOBEX[0], f"parallel-guess-{n}"))

    threads = [threading.Thread(target=guess, args=(smtp, n)) for n, smtp in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for smtp in clients:
        smtp.close()
    assert sorted(codes) == [421] * 9 + [535] * 3  # only three passwords were ever checked
    assert relay.mainlog().count("authenticator failed") == 3


@pytest.mark.parametrize("relay", [{"auth_failures_per_source": 4, "auth_failures_before_delay": 5}], indirect=True)
def test_spreading_guesses_over_loopback_addresses_does_not_escape_the_budget(relay: RelayFiles) -> None:
    for n in range(4):  # one guess per login and per address: nothing a per-address count would see
        assert try_login(relay, f"guess{n}", "password", source=f"127.0.0.{n + 2}") == 535
    assert try_login(relay, "guess0", "password", source="127.0.0.6") == 421
    assert try_login(relay, "guess3", "password", source="127.0.0.200") == 421
    send_as(relay, ACME, source="127.0.0.7")  # a correct password of a login that never failed still works
    log = relay.wait_for_log(" <= app@acme.example")
    assert "AUTH refused (set_id=guess0): source over its budget of 4 failures" in log


@pytest.mark.parametrize("relay", [LOCK_AFTER_3], indirect=True)
def test_unknown_login_and_wrong_password_are_throttled_alike(relay: RelayFiles) -> None:
    def run(login: str) -> tuple[list[int], list[float]]:
        codes, times = [], []
        for _ in range(4):
            started = time.monotonic()
            codes.append(try_login(relay, login, "wrong"))
            times.append(time.monotonic() - started)
        return codes, times

    known, known_times = run(ACME[0])
    unknown, unknown_times = run("nosuchtenant")
    assert known == unknown == [535, 535, 535, 421]
    for a, b in zip(known_times, unknown_times):
        assert abs(a - b) < 0.4  # the same delays (0, 0.5, 1.0) and the same scrypt cost
