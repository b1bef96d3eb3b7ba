"""XOAUTH2 upstream with OAuth token sources, on real sockets (the test loop: uvloop): a fake OAuth token
server and a fake upstream that accepts only valid, unexpired bearer tokens it issued."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Iterator, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry, generate_latest

from relayd.config.credentials import CredentialStore, generate_master_key
from relayd.config.retry import parse_retry_schedule
from relayd.config.model import OAuthConfig, OAuthGrant, SmtpTransportConfig, TlsMode
from relayd.delivery.oauthsources import STATE_FILE, OAuthSources, read_token_states
from relayd.delivery.smtptransport import SmtpTransport
from relayd.delivery.tokengrants import MAX_TOKEN_RESPONSE, TokenRequestFailed, request_token
from relayd.delivery.upstreamauth import MECHANISMS, AuthRefused
from relayd.delivery.tokensource import Bearer, TokenSource, TokenUnavailable
from relayd.config.secret import Secret
from relayd.observe import events as ev
from relayd.observe.oauthmetrics import OAuthCollector
from relayd.observe.mainlog import format_event
from relayd.values import AttemptOutcome, AttemptResult, Delivery
from tests.eventloop import run_on_test_loop
from tests.fakeoauth import FakeOAuth
from tests.fakeupstream import FakeUpstream

T = TypeVar("T")

MAILBOX = "billing@acme.example"
CLIENT_ID = "1234.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-client-secret-value"
REFRESH_TOKEN = "1//0refresh-token-value"
NAME = "acme-oauth"


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60.0)

    return run_on_test_loop(bounded())


class Recorder:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [line for line in (format_event(e) for e in self.events) if line]


class World:
    """A fake OAuth server, a fake upstream checking its tokens, and a real encrypted store."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.oauth = FakeOAuth().start()
        self.oauth.add_client(CLIENT_ID, CLIENT_SECRET)
        self.oauth.add_refresh_token(REFRESH_TOKEN, MAILBOX)
        self.upstream = FakeUpstream(users={}, bearer_check=self.oauth.valid).start()
        self.keys = [generate_master_key()]
        self.store_path = tmp / "credentials.enc"
        self.events = Recorder()

    def store(self) -> CredentialStore:
        return CredentialStore.open(self.store_path, self.keys)

    def put(self, **fields: str | float | None) -> None:
        store = self.store()
        store.set_oauth(NAME, "", fields)
        store.save()

    def config(self, grant: OAuthGrant = OAuthGrant.REFRESH_TOKEN, **changes: Any) -> SmtpTransportConfig:
        oauth = OAuthConfig(
            grant=grant, provider="google", client_id=CLIENT_ID, token_url=self.oauth.token_url,
            scope="https://mail.google.com/", authorize_url="", device_url="",
            user=changes.pop("user", None), refresh_margin=300.0, timeout=5.0,
        )
        return SmtpTransportConfig(
            name="gmail_oauth", host=self.upstream.host, port=self.upstream.port, tls=TlsMode.STARTTLS,
            credential=NAME, ca_file=self.upstream.ca_file, connect_timeout=5.0, command_timeout=5.0,
            provider="gmail", oauth=oauth, **changes,
        )

    def sources(self, config: SmtpTransportConfig) -> OAuthSources:
        sources = OAuthSources(self.tmp / STATE_FILE, self.events, lambda name: parse_retry_schedule("F,1h,1m"))
        sources.rebuild({config.name: config}, self.store())
        return sources

    def transport(self, config: SmtpTransportConfig, sources: OAuthSources) -> SmtpTransport:
        store = self.store()
        return SmtpTransport(config, credentials=lambda name: sources.lookup(name, store), helo_name="relay.test")

    def stop(self) -> None:
        self.upstream.stop()
        self.oauth.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.stop()


def delivery(n: int = 1) -> Delivery:
    body = f"From: {MAILBOX}\r\nSubject: n{n}\r\n\r\nhello {n}\r\n".encode()
    return Delivery(f"1rAbCd-00000{n}-XY", MAILBOX, ("client@customer.test",), body)


async def send(transport: SmtpTransport, *deliveries: Delivery) -> list[AttemptResult]:
    try:
        return list(await asyncio.gather(*(transport.send(d) for d in deliveries)))
    finally:
        await transport.close()


def outcomes(results: list[AttemptResult]) -> list[AttemptOutcome]:
    return [r.outcome for result in results for r in result.results]


# -- the mechanism ------------------------------------------------------------------------


def test_xoauth2_is_a_mechanism_for_bearer_logins_only() -> None:
    assert MECHANISMS["XOAUTH2"].kinds == frozenset({"bearer"})
    assert "bearer" not in MECHANISMS["PLAIN"].kinds | MECHANISMS["LOGIN"].kinds


def test_a_refused_token_gets_the_empty_line_and_the_final_535(world: World) -> None:
    """The fake answers a bad token with a 334 JSON challenge; the exchange must answer it."""
    import aiosmtplib
    from relayd.delivery.smtpsession import client_tls_context

    config = world.config()

    async def go() -> AuthRefused:
        smtp = aiosmtplib.SMTP(hostname=world.upstream.host, port=world.upstream.port, timeout=5.0, start_tls=False)
        await smtp.connect()
        try:
            await smtp.starttls(server_hostname=world.upstream.host, tls_context=client_tls_context(config))
            await smtp.ehlo()
            with pytest.raises(AuthRefused) as refused:
                await MECHANISMS["XOAUTH2"].exchange(smtp, Bearer(MAILBOX, Secret("at-not-issued")), 5.0)
            return refused.value
        finally:
            smtp.close()

    refusal = run(go())
    assert (refusal.code, refusal.mechanism) == (535, "XOAUTH2")
    assert "at-not-issued" not in str(refusal)


# -- each grant delivers -------------------------------------------------------------------


def test_a_refresh_token_grant_delivers_through_xoauth2(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    config = world.config(user=MAILBOX)
    sources = world.sources(config)
    results = run(send(world.transport(config, sources), delivery()))
    assert outcomes(results) == [AttemptOutcome.DELIVERED]
    assert world.upstream.mechanisms == ["XOAUTH2"] and world.upstream.logins == [MAILBOX]
    assert world.oauth.requests("refresh_token") == 1


def test_a_client_credentials_grant_delivers_as_the_configured_mailbox(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET)
    config = world.config(OAuthGrant.CLIENT_CREDENTIALS, user=f"app:{CLIENT_ID}")
    results = run(send(world.transport(config, world.sources(config)), delivery()))
    assert outcomes(results) == [AttemptOutcome.DELIVERED]
    assert world.oauth.requests("client_credentials") == 1


def test_a_service_account_grant_signs_a_jwt_for_the_delegated_mailbox(world: World) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    issuer = "relay@acme-project.iam.gserviceaccount.com"
    world.oauth.add_service_account(issuer, key.public_key())
    world.put(private_key=pem, issuer=issuer)
    config = world.config(OAuthGrant.SERVICE_ACCOUNT, user=MAILBOX)
    results = run(send(world.transport(config, world.sources(config)), delivery()))
    assert outcomes(results) == [AttemptOutcome.DELIVERED]
    assert world.oauth.subjects == [MAILBOX]


def test_the_account_comes_from_the_store_when_the_config_names_no_user(world: World) -> None:
    store = world.store()
    store.set_oauth(NAME, MAILBOX, {"client_secret": CLIENT_SECRET, "refresh_token": REFRESH_TOKEN})
    store.save()
    config = world.config()
    results = run(send(world.transport(config, world.sources(config)), delivery()))
    assert outcomes(results) == [AttemptOutcome.DELIVERED] and world.upstream.logins == [MAILBOX]


# -- one refresh per token life ------------------------------------------------------------


def test_ten_concurrent_deliveries_make_exactly_one_token_request(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    world.oauth.set_delay(0.3)  # every delivery asks while the one request is in flight
    config = world.config(user=MAILBOX, max_connections=10)
    results = run(send(world.transport(config, world.sources(config)), *(delivery(n) for n in range(10))))
    assert outcomes(results) == [AttemptOutcome.DELIVERED] * 10
    assert world.oauth.requests() == 1
    assert len(world.upstream.messages) == 10


def test_a_cached_token_in_the_store_spares_a_request_after_a_restart(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    config = world.config(user=MAILBOX)
    run(send(world.transport(config, world.sources(config)), delivery(1)))
    results = run(send(world.transport(config, world.sources(config)), delivery(2)))  # a new daemon
    assert outcomes(results) == [AttemptOutcome.DELIVERED]
    assert world.oauth.requests() == 1


def test_a_token_that_expires_mid_stream_is_refreshed_and_the_message_delivered(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    config = world.config(user=MAILBOX, max_messages_per_connection=1)
    sources = world.sources(config)

    async def go() -> list[AttemptOutcome]:
        transport = world.transport(config, sources)
        first = await transport.send(delivery(1))
        world.oauth.expire_all()  # the provider ends the token early (revoked session, clock skew)
        second = await transport.send(delivery(2))
        await transport.close()
        return outcomes([first, second])

    assert run(go()) == [AttemptOutcome.DELIVERED, AttemptOutcome.DELIVERED]
    assert world.oauth.requests() == 2
    assert world.upstream.mechanisms == ["XOAUTH2"] * 3  # the refused token, then the new one
    assert len(world.upstream.messages) == 2


def test_a_token_is_refreshed_a_margin_before_it_ends_and_not_before(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    config = world.config(user=MAILBOX)
    assert config.oauth is not None
    clock = [1_000_000.0]

    async def load() -> Any:
        return world.store().get(NAME)

    async def save(fields: Any) -> None:
        """The cache in the store is not what this test is about."""

    async def request(url: str, form: Any, timeout: float) -> Any:
        return await request_token(url, form, timeout=timeout)

    source = TokenSource(NAME, config.oauth, load=load, save=save, request=request, clock=lambda: clock[0])

    async def go() -> list[int]:
        seen = []
        for at in (0.0, 3600 - 301, 3600 - 299, 3600 - 298):  # the fake's tokens live 3600 s
            clock[0] = 1_000_000.0 + at
            await source.bearer()
            seen.append(world.oauth.requests())
        return seen

    assert run(go()) == [1, 1, 2, 2]


def test_a_rotated_refresh_token_is_written_back_to_the_store(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    world.oauth.set_rotate(True)
    config = world.config(user=MAILBOX)
    run(send(world.transport(config, world.sources(config)), delivery()))
    stored = world.store().get(NAME)
    assert stored is not None and stored.kind == "oauth"
    assert stored.refresh_token is not None
    assert stored.refresh_token.reveal() != REFRESH_TOKEN
    assert stored.refresh_token.reveal() in world.oauth.refresh_tokens()


# -- failures never lose mail ---------------------------------------------------------------


def test_invalid_grant_closes_the_gate_with_the_command_that_fixes_it_then_reopens(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token="1//revoked")
    config = world.config(user=MAILBOX)
    sources = world.sources(config)
    results = run(send(world.transport(config, sources), delivery()))
    assert outcomes(results) == [AttemptOutcome.NEXT_TRANSPORT]  # on down the chain, or deferred
    assert f"needs re-authorisation: relayctl oauth authorize {NAME}" in results[0].detail
    verdict = sources.gate.check(config.name, time.time())
    assert not verdict.is_open and verdict.gate == "oauth"
    assert verdict.reason == f"credential {NAME} needs re-authorisation: relayctl oauth authorize {NAME}"
    failed = [e for e in world.events.events if isinstance(e, ev.OAuthTokenFailed)]
    assert len(failed) == 1 and failed[0].needs_reauthorisation
    assert any(f"relayctl oauth authorize {NAME}" in line for line in world.events.lines())
    assert world.upstream.auth_attempts == 0  # nothing was sent upstream without a token

    world.put(refresh_token=REFRESH_TOKEN)  # what `relayctl oauth authorize` writes
    assert sources.gate.check(config.name, time.time()).is_open
    results = run(send(world.transport(config, sources), delivery()))
    assert outcomes(results) == [AttemptOutcome.DELIVERED]
    assert sources.gate.check(config.name, time.time()).is_open


def test_a_token_endpoint_that_is_down_defers_then_recovers_by_itself(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    world.oauth.set_mode("down")
    config = world.config(user=MAILBOX)
    sources = world.sources(config)
    results = run(send(world.transport(config, sources), delivery()))
    assert outcomes(results) == [AttemptOutcome.NEXT_TRANSPORT]
    source = sources.by_transport[config.name]
    assert not source.state.needs_reauthorisation and "HTTP 503" in source.state.last_error
    now = time.time()
    closed = sources.gate.check(config.name, now)
    assert not closed.is_open and closed.until is not None and closed.until - now <= 61
    world.oauth.set_mode("ok")
    assert sources.gate.check(config.name, now + 61).is_open  # the backoff ends by itself
    results = run(send(world.transport(config, sources), delivery()))
    assert outcomes(results) == [AttemptOutcome.DELIVERED]
    states = read_token_states(world.tmp / STATE_FILE)
    assert states[NAME].last_error == "" and states[NAME].last_refresh is not None


def test_a_token_endpoint_that_never_answers_times_out(world: World) -> None:
    async def go() -> TokenRequestFailed:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(TokenRequestFailed) as failed:
                await request_token(f"http://127.0.0.1:{port}/token", {"grant_type": "x"}, timeout=1.0)
            return failed.value
        finally:
            server.close()

    failure = run(go())
    assert not failure.needs_reauthorisation and "did not answer within 1s" in failure.detail


def test_a_token_answer_larger_than_the_bound_is_refused_unread(world: World) -> None:
    async def go() -> TokenRequestFailed:
        async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100):  # 100 x 8 KiB, far past the bound
                writer.write(b"2000\r\n" + b" " * 0x2000 + b"\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(huge, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(TokenRequestFailed) as failed:
                await request_token(f"http://127.0.0.1:{port}/token", {"grant_type": "x"}, timeout=5.0)
            return failed.value
        finally:
            server.close()

    assert f"more than {MAX_TOKEN_RESPONSE} bytes" in run(go()).detail


# -- no secret anywhere ----------------------------------------------------------------------


def test_no_token_or_secret_appears_in_results_events_state_or_the_store_file(
    world: World, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    world.oauth.set_rotate(True)
    config = world.config(user=MAILBOX)
    sources = world.sources(config)
    results = run(send(world.transport(config, sources), delivery(1)))
    world.oauth.set_mode("invalid_grant")
    world.oauth.expire_all()
    failed = run(send(world.transport(config, sources), delivery(2), delivery(3)))
    secrets = {CLIENT_SECRET, REFRESH_TOKEN, *world.oauth.access_tokens(), *world.oauth.refresh_tokens()}
    seen = "\n".join([
        repr(results), repr(failed), *world.events.lines(), repr(world.events.events),
        (world.tmp / STATE_FILE).read_text(), world.store_path.read_text(),
        repr(world.store().get(NAME)), repr(sources.by_transport),
        capsys.readouterr().out, capsys.readouterr().err, caplog.text,
    ])
    leaked = [s for s in secrets if s in seen or base64.b64encode(s.encode()).decode() in seen]
    assert leaked == []
    assert json.loads(world.store_path.read_text())["version"] == 2


def test_token_events_are_counted_per_credential_and_result() -> None:
    from relayd.observe.metrics import RelayMetrics

    metrics = RelayMetrics()
    metrics.emit(ev.OAuthTokenRefreshed(credential=NAME, account=MAILBOX, expires_in=3600))
    for reauthorise in (True, False, False):
        metrics.emit(ev.OAuthTokenFailed(credential=NAME, reason="r", needs_reauthorisation=reauthorise,
                                         command="c"))
    rendered = metrics.render().decode()
    assert f'relayd_oauth_token_requests_total{{credential="{NAME}",result="ok"}} 1.0' in rendered
    assert f'relayd_oauth_token_requests_total{{credential="{NAME}",result="reauthorise"}} 1.0' in rendered
    assert f'relayd_oauth_token_requests_total{{credential="{NAME}",result="retry"}} 2.0' in rendered


def test_an_unreadable_store_is_a_failed_refresh_never_a_crash(world: World) -> None:
    config = world.config(user=MAILBOX)
    assert config.oauth is not None

    async def load() -> Any:
        raise PermissionError("store")

    async def save(fields: Any) -> None:
        raise AssertionError("nothing to save")

    async def request(url: str, form: Any, timeout: float) -> Any:
        raise AssertionError("no request without secrets")

    source = TokenSource(NAME, config.oauth, load=load, save=save, request=request)

    async def go() -> TokenUnavailable:
        with pytest.raises(TokenUnavailable) as failed:
            await source.bearer()
        return failed.value

    failure = run(go())
    assert failure.detail == f"credential {NAME}: the credential store could not be read (PermissionError)"
    assert not failure.needs_reauthorisation and source.state.failures == 1


def test_the_token_lifetime_and_refreshes_failed_in_a_row_are_exported_per_credential(world: World) -> None:
    world.put(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    config = world.config(user=MAILBOX)
    sources = world.sources(config)
    registry = CollectorRegistry()
    registry.register(OAuthCollector(sources.token_lives))

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"credential": NAME})

    assert sample("relayd_oauth_token_seconds_to_expiry") is None  # no token had yet: no lifetime to show
    assert sample("relayd_oauth_token_refresh_failures") == 0.0
    run(send(world.transport(config, sources), delivery(1)))
    left = sample("relayd_oauth_token_seconds_to_expiry")
    assert left is not None and 3500 < left <= 3600  # the fake server's tokens live an hour
    world.oauth.set_mode("invalid_grant")
    world.oauth.expire_all()
    for n in (2, 3):
        sources.by_transport[next(iter(sources.by_transport))].refused()  # the upstream refused the token
        run(send(world.transport(config, sources), delivery(n)))
    assert sample("relayd_oauth_token_refresh_failures") == 2.0
    assert CLIENT_SECRET not in generate_latest(registry).decode()
