"""Upstream AUTH mechanisms: the pure choice, and each exchange against a real server on loopback (uvloop)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import aiosmtplib
import pytest
import uvloop

from relayd.config.model import UPSTREAM_AUTH_MECHANISMS
from relayd.config.credentials import Secret, UpstreamCredential
from relayd.delivery.transport import SmtpTransport, client_tls_context
from relayd.delivery.upstreamauth import (
    MECHANISMS, PREFERENCE, AuthNoReply, AuthRefused, NoMechanism, choose_mechanism,
)
from relayd.values import AttemptOutcome, Stage
from tests.fakeupstream import FakeUpstream
from tests.test_transport import CREDENTIAL, HELO, PASSWORD, USER, config_for, delivery, store

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30.0)

    return uvloop.run(bounded())


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(**kwargs: Any) -> FakeUpstream:
        kwargs.setdefault("users", {USER: PASSWORD})
        fake = FakeUpstream(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


# -- the choice (pure) -------------------------------------------------------------


def test_plain_is_chosen_before_login_when_both_are_offered() -> None:
    assert choose_mechanism(["login", "plain"], kind="password", configured=None, host="h").name == "PLAIN"
    assert choose_mechanism(["LOGIN", "CRAM-MD5"], kind="password", configured=None, host="h").name == "LOGIN"


def test_a_configured_mechanism_wins_over_the_preference_when_the_upstream_offers_it() -> None:
    assert choose_mechanism(["plain", "login"], kind="password", configured="LOGIN", host="h").name == "LOGIN"
    with pytest.raises(NoMechanism, match=r"^smtp.test does not offer AUTH LOGIN \(offers PLAIN XOAUTH2\)$"):
        choose_mechanism(["plain", "xoauth2"], kind="password", configured="login", host="smtp.test")


def test_an_upstream_offering_nothing_usable_says_what_it_offers() -> None:
    with pytest.raises(NoMechanism, match=r"^smtp.test offers no AUTH PLAIN or LOGIN \(offers XOAUTH2\)$"):
        choose_mechanism(["xoauth2"], kind="password", configured=None, host="smtp.test")
    with pytest.raises(NoMechanism, match=r"\(offers nothing\)$"):
        choose_mechanism([], kind="password", configured=None, host="smtp.test")


def test_a_mechanism_never_gets_a_credential_kind_it_cannot_use() -> None:
    with pytest.raises(NoMechanism, match="offers no AUTH"):
        choose_mechanism(["plain", "login"], kind="bearer", configured=None, host="h")
    with pytest.raises(NoMechanism, match="cannot use a bearer credential"):
        choose_mechanism(["plain"], kind="bearer", configured="PLAIN", host="h")


def test_the_config_accepts_exactly_the_mechanisms_the_table_implements() -> None:
    assert set(UPSTREAM_AUTH_MECHANISMS) == set(MECHANISMS) == set(PREFERENCE)
    assert all(name == mechanism.name for name, mechanism in MECHANISMS.items())


def test_a_credential_shows_its_kind_and_user_but_never_its_password() -> None:
    credential = UpstreamCredential(name=CREDENTIAL, user=USER, password=Secret(PASSWORD))
    assert credential.kind == "password"
    assert PASSWORD not in repr(credential) and PASSWORD not in str(credential) and USER in repr(credential)


# -- through the transport, on real sockets --------------------------------------------


def attempt(fake: FakeUpstream, **changes: Any) -> Any:
    async def go() -> Any:
        transport = SmtpTransport(config_for(fake, **changes), credentials=store, helo_name=HELO)
        try:
            return await transport.send(delivery())
        finally:
            await transport.close()

    return run(go())


def test_the_transport_logs_in_with_plain_when_the_upstream_offers_plain_and_login(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes()
    result = attempt(fake)
    assert result.results[0].outcome is AttemptOutcome.DELIVERED
    assert fake.mechanisms == ["PLAIN"] and fake.logins == [USER]


def test_the_transport_logs_in_with_login_when_the_upstream_offers_only_login(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes(auth_exclude=("PLAIN",))
    result = attempt(fake)
    assert result.results[0].outcome is AttemptOutcome.DELIVERED
    assert fake.mechanisms == ["LOGIN"]


def test_the_transport_uses_its_configured_auth_mechanism(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes()
    result = attempt(fake, auth_mechanism="LOGIN")
    assert result.results[0].outcome is AttemptOutcome.DELIVERED
    assert fake.mechanisms == ["LOGIN"]


def test_a_configured_mechanism_the_upstream_does_not_offer_stops_before_any_password_is_sent(
    fakes: Callable[..., FakeUpstream],
) -> None:
    fake = fakes(auth_exclude=("LOGIN",))
    result = attempt(fake, auth_mechanism="LOGIN")
    assert result.connection_failed and result.results[0].stage is Stage.AUTH
    assert "does not offer AUTH LOGIN (offers PLAIN)" in result.detail
    assert fake.auth_attempts == 0 and fake.auth_passwords_seen == 0 and fake.messages == []


@pytest.mark.parametrize("name", sorted(n for n, m in MECHANISMS.items() if "password" in m.kinds))
def test_each_password_mechanism_reports_a_refused_login_with_the_upstream_code_and_no_secret(
    fakes: Callable[..., FakeUpstream], name: str
) -> None:
    fake = fakes(users={USER: "another password"})
    credential = UpstreamCredential(name=CREDENTIAL, user=USER, password=Secret(PASSWORD))
    config = config_for(fake)

    async def go() -> AuthRefused:
        smtp = aiosmtplib.SMTP(hostname=fake.host, port=fake.port, local_hostname=HELO, timeout=5.0, start_tls=False)
        await smtp.connect()
        try:
            await smtp.starttls(server_hostname=fake.host, tls_context=client_tls_context(config))
            await smtp.ehlo()
            with pytest.raises(AuthRefused) as refused:
                await MECHANISMS[name].exchange(smtp, credential, 5.0)
            return refused.value
        finally:
            smtp.close()

    refusal = run(go())
    assert refusal.code == 535 and refusal.mechanism == name
    assert PASSWORD not in str(refusal) and PASSWORD not in repr(refusal)
    assert fake.mechanisms == [name]


def test_an_upstream_that_hangs_up_during_auth_is_a_typed_no_reply(fakes: Callable[..., FakeUpstream]) -> None:
    fake = fakes()
    fake.drop_at("AUTH")
    credential = UpstreamCredential(name=CREDENTIAL, user=USER, password=Secret(PASSWORD))
    config = config_for(fake)

    async def go() -> AuthNoReply:
        smtp = aiosmtplib.SMTP(hostname=fake.host, port=fake.port, local_hostname=HELO, timeout=5.0, start_tls=False)
        await smtp.connect()
        try:
            await smtp.starttls(server_hostname=fake.host, tls_context=client_tls_context(config))
            await smtp.ehlo()
            with pytest.raises(AuthNoReply) as dropped:
                await MECHANISMS["PLAIN"].exchange(smtp, credential, 5.0)
            return dropped.value
        finally:
            smtp.close()

    dropped = run(go())
    assert not dropped.timed_out and dropped.mechanism == "PLAIN"
    assert PASSWORD not in str(dropped)
