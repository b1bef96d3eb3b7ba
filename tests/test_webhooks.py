"""Webhooks piece by piece: the body and signature, the outbox journal, the sender against a
real loopback HTTP receiver, relayctl's verb, and the README's verification snippets."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from relayd.config.webhookconfig import WEBHOOK_EVENT_KINDS, WebhookEndpoint, WebhooksConfig
from relayd.observe import events as ev
from relayd.observe import webhookbody
from relayd.observe.outbox import Outbox, PendingEvent
from relayd.observe.webhooks import WebhookSink, backoff
from relayd.ops import cli
from relayd.values import AttemptOutcome, DeliveryReport, SmtpReply
from tests.relayenv import ROOT, RelayFiles, TenantSpec, UpstreamSpec
from tests.webhookreceiver import Received, WebhookReceiver

SECRET = b"whsec-unit-0123456789abcdef"


def delivered(queue_id: str = "1abc-000001", *, tenant: str = "acme", rcpt: str = "you@example.com",
              attempt: int = 1) -> ev.RecipientDelivered:
    report = DeliveryReport(address=rcpt, outcome=AttemptOutcome.DELIVERED, rule="all", transport="gmail",
                            host="smtp.gmail.com", ip="127.0.0.1", port=587, tls="TLSv1.3",
                            reply=SmtpReply(250, "2.0.0 OK queued"))
    return ev.RecipientDelivered(queue_id=queue_id, tenant=tenant, sender="app@acme.example",
                                 message_id="<m1@app.test>", report=report, attempt=attempt, at=1764610222.5)


# ------------------------------------------------------------------ body and signature


def test_the_named_kinds_are_the_ones_relay_yaml_documents() -> None:
    assert tuple(webhookbody.KINDS.values()) == WEBHOOK_EVENT_KINDS


def test_an_event_type_without_a_name_of_its_own_is_subscribed_to_by_its_class_name() -> None:
    assert webhookbody.kind_of(ev.MessageCompleted(queue_id="x")) == "message_completed"
    assert webhookbody.snake_case("QuotaAlert") == "quota_alert"
    assert {"delivered", "bounced", "message_arrived", "notice"} <= webhookbody.known_kinds()


def test_the_body_has_every_schema_key_and_the_delivery_facts() -> None:
    body = json.loads(webhookbody.encode(webhookbody.payload(delivered(), "e1")))
    assert body == {
        "schema": 1, "id": "e1", "event": "delivered", "time": "2025-12-01T17:30:22.500Z",
        "queue_id": "1abc-000001", "message_id": "<m1@app.test>", "tenant": "acme",
        "sender": "app@acme.example", "recipient": "you@example.com", "transport": "gmail",
        "host": "smtp.gmail.com", "upstream_reply": "250 2.0.0 OK queued", "reason": None,
        "attempt": 1, "next_attempt": None, "bounce_id": None,
    }


def test_a_hostile_reply_stays_one_bounded_json_string() -> None:
    report = DeliveryReport(address="x@y", outcome=AttemptOutcome.FAIL, rule="r",
                            reply=SmtpReply(550, "no\r\n{\"event\":\"delivered\"}" + "A" * 5000))
    event = ev.RecipientFailed(queue_id="q", tenant="t", sender="s@t", message_id="", report=report, attempt=1)
    raw = webhookbody.encode(webhookbody.payload(event, "e"))
    assert b"\r" not in raw and b"\n" not in raw
    body = json.loads(raw)
    assert body["event"] == "bounced" and len(body["upstream_reply"]) == webhookbody.MAX_FIELD
    assert body["message_id"] is None


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(SECRET, b"1764610222." + body, hashlib.sha256).hexdigest()
    assert webhookbody.signature(SECRET, 1764610222, body) == "v1=" + expected
    assert webhookbody.signature(SECRET, 1764610223, body) != "v1=" + expected


def test_backoff_doubles_up_to_its_ceiling_with_jitter() -> None:
    rng = random.Random(7)
    delays = [backoff(n, first=1.0, longest=60.0, rng=rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(60.0, 2.0 ** (n - 1))
        assert ceiling * 0.5 <= delay <= ceiling
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not in step


# ------------------------------------------------------------------ the outbox


def pending(i: int) -> PendingEvent:
    return PendingEvent(id=f"id{i}", kind="delivered", body=f'{{"n":{i}}}'.encode(), queued_at=float(i))


def test_the_outbox_replays_what_was_added_and_not_done(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app", max_pending=100)
    assert box.open().pending == 0
    for i in range(5):
        box.add(pending(i))
    box.done("id1")
    box.done("id3")
    # no close: as after a kill -9, the journal is all there is
    again = Outbox(tmp_path / "app", max_pending=100)
    assert again.open().pending == 3
    ids = []
    while (event := again.next_due(0)) is not None:
        ids.append(event.id)
        again.done(event.id)
    assert ids == ["id0", "id2", "id4"]
    assert Outbox(tmp_path / "app", max_pending=100).open().pending == 0


def test_a_torn_last_journal_line_is_skipped_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app", max_pending=100)
    box.open()
    box.add(pending(1))
    box.add(pending(2))
    journal = next((tmp_path / "app").glob("journal.*.jsonl"))
    with journal.open("ab") as f:
        f.write(b'{"op":"add","id":"id3","kind":"deliv')  # the crash came mid-write
    replayed = Outbox(tmp_path / "app", max_pending=100).open()
    assert (replayed.pending, replayed.damaged_lines) == (2, 1)


def test_a_full_outbox_drops_the_oldest_and_counts_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app", max_pending=10)
    box.open()
    dropped = [box.add(pending(i)) for i in range(13)]
    assert [d.id for d in dropped if d is not None] == ["id0", "id1", "id2"]
    assert box.dropped == 3 and len(box) == 10
    again = Outbox(tmp_path / "app", max_pending=10)
    again.open()
    oldest = again.next_due(0)
    assert oldest is not None and oldest.id == "id3"


def test_compaction_keeps_the_pending_events_and_removes_old_journals(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app", max_pending=100_000)
    box.open()
    for i in range(3000):
        box.add(pending(i))
        if i % 3:
            box.done(f"id{i}")
    assert box.wants_compaction()
    box.compact(box.rotate())
    files = sorted(p.name for p in (tmp_path / "app").iterdir())
    assert files == ["base.jsonl", "journal.2.jsonl"]
    box.add(pending(5000))
    again = Outbox(tmp_path / "app", max_pending=100_000)
    assert again.open().pending == 1000 + 1


def test_a_crash_between_rotation_and_compaction_loses_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app", max_pending=1000)
    box.open()
    for i in range(10):
        box.add(pending(i))
    box.done("id0")
    box.rotate()  # the new journal exists; the base was never rewritten
    box.done("id1")
    box.add(pending(10))
    again = Outbox(tmp_path / "app", max_pending=1000)
    assert again.open().pending == 9


# ------------------------------------------------------------------ the sink and its sender


def sink_for(tmp_path: Path, url: str, notes: list[str], *, events: tuple[str, ...] = ("delivered",),
             tenant: str | None = None, max_pending: int = 1000, timeout: float = 2.0,
             secret: bytes | None = SECRET) -> WebhookSink:
    config = WebhooksConfig(
        endpoints=(WebhookEndpoint(name="app", url=url, credential="hook", events=events, tenant=tenant,
                                   timeout=timeout, max_in_flight=2),),
        max_pending=max_pending, retry_min=0.1, retry_max=0.5,
    )
    return WebhookSink(config, tmp_path / "outbox", secret=lambda name: secret if name == "hook" else None,
                       notify=lambda text, level: notes.append(f"{level}: {text}"))


def test_emit_only_journals_and_a_hanging_receiver_costs_the_caller_nothing(tmp_path: Path) -> None:
    notes: list[str] = []

    async def scenario(receiver: WebhookReceiver) -> tuple[float, int]:
        sink = sink_for(tmp_path, receiver.url, notes, timeout=1.0)
        await sink.start()
        started = time.perf_counter()
        for i in range(200):
            sink.emit(delivered(f"q{i}"))
        emitting = time.perf_counter() - started
        await asyncio.sleep(1.5)
        waiting = len(sink.senders[0].outbox)
        await sink.stop()
        return emitting, waiting

    with WebhookReceiver() as receiver:
        receiver.hang_seconds = 5.0
        emitting, waiting = asyncio.run(scenario(receiver))
    print(f"\n200 events emitted in {emitting * 1000:.1f} ms while the receiver hung")
    assert emitting < 0.5
    assert waiting == 200
    assert any("not accepted: " in note for note in notes)


def test_only_subscribed_kinds_of_the_endpoints_tenant_are_sent(tmp_path: Path) -> None:
    notes: list[str] = []

    async def scenario(receiver: WebhookReceiver) -> None:
        sink = sink_for(tmp_path, receiver.url, notes, events=("delivered", "message_completed"), tenant="acme")
        await sink.start()
        sink.emit(delivered("mine", tenant="acme"))
        sink.emit(delivered("other", tenant="globex"))
        sink.emit(ev.MessageCompleted(queue_id="no-tenant"))  # daemon-wide: global endpoints only
        sink.emit(ev.RecipientDeferred(queue_id="deferred", tenant="acme", sender="s@acme.example",
                                       message_id="", report=delivered().report, attempt=1))
        await asyncio.sleep(1.0)
        await sink.stop()

    with WebhookReceiver() as receiver:
        asyncio.run(scenario(receiver))
        assert [r.json["queue_id"] for r in receiver.received] == ["mine"]


def test_an_error_status_is_retried_until_accepted_with_the_same_event_id(tmp_path: Path) -> None:
    notes: list[str] = []

    async def scenario(receiver: WebhookReceiver) -> None:
        sink = sink_for(tmp_path, receiver.url, notes)
        await sink.start()
        sink.emit(delivered("q1"))
        await asyncio.sleep(1.0)
        receiver.status = 200
        deadline = time.monotonic() + 10
        while not sink.senders[0].sent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sink.stop()

    with WebhookReceiver() as receiver:
        receiver.status = 503
        asyncio.run(scenario(receiver))
        assert receiver.requests >= 3 and len(receiver.received) == 1
    assert receiver.received[0].signature_valid(SECRET)
    warnings = [n for n in notes if "not accepted" in n]
    assert len(warnings) == 1 and "HTTP status 503" in warnings[0]  # the first failure, not every retry
    assert any("answers again" in n for n in notes)


def test_without_its_secret_an_endpoint_sends_nothing_and_keeps_the_events(tmp_path: Path) -> None:
    notes: list[str] = []

    async def scenario(receiver: WebhookReceiver) -> int:
        sink = sink_for(tmp_path, receiver.url, notes, secret=None)
        await sink.start()
        sink.emit(delivered("q1"))
        await asyncio.sleep(0.8)
        waiting = len(sink.senders[0].outbox)
        await sink.stop()
        return waiting

    with WebhookReceiver() as receiver:
        assert asyncio.run(scenario(receiver)) == 1
        assert receiver.requests == 0
    assert sum("is not in the credential store" in n for n in notes) == 1


def test_events_waiting_at_a_clean_stop_are_sent_after_the_next_start(tmp_path: Path) -> None:
    notes: list[str] = []

    async def first_run() -> int:
        sink = sink_for(tmp_path, "http://127.0.0.1:9/hook", notes)  # discard port: refused
        await sink.start()
        for i in range(3):
            sink.emit(delivered(f"q{i}"))
        await sink.stop()
        return len(sink.senders[0].outbox)

    async def second_run(receiver: WebhookReceiver) -> None:
        sink = sink_for(tmp_path, receiver.url, notes)
        await sink.start()
        deadline = time.monotonic() + 10
        while sink.senders[0].sent < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sink.stop()

    assert asyncio.run(first_run()) == 3
    with WebhookReceiver() as receiver:
        asyncio.run(second_run(receiver))
        assert sorted(r.json["queue_id"] for r in receiver.received) == ["q0", "q1", "q2"]
    assert any("3 event(s) waiting from before the start" in n for n in notes)


def test_https_receivers_certificates_are_verified(tmp_path: Path, ca: Any) -> None:
    import ssl

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def run(url: str, ca_path: Path | None, notes: list[str]) -> int:
        config = WebhooksConfig(endpoints=(WebhookEndpoint(
            name="tls", url=url, credential="hook", events=("delivered",), timeout=2.0, ca_file=ca_path),),
            retry_min=0.1, retry_max=0.2)
        sink = WebhookSink(config, tmp_path / f"outbox-{ca_path is not None}", secret=lambda name: SECRET,
                           notify=lambda text, level: notes.append(text))
        await sink.start()
        sink.emit(delivered("q-tls"))
        deadline = time.monotonic() + 5
        while sink.senders[0].sent == 0 and sink.senders[0].failed_requests == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sink.stop()
        return sink.senders[0].sent

    with WebhookReceiver(tls=server_tls) as receiver:
        untrusted: list[str] = []
        assert asyncio.run(run(receiver.url, None, untrusted)) == 0  # the system's CAs do not know the test CA
        assert any("CERTIFICATE_VERIFY_FAILED" in n for n in untrusted), untrusted
        assert receiver.received == []
        assert asyncio.run(run(receiver.url, ca_file, [])) == 1
        assert len(receiver.received) == 1 and receiver.received[0].signature_valid(SECRET)


def test_start_warns_of_an_unknown_kind_and_of_events_left_for_a_removed_endpoint(tmp_path: Path) -> None:
    notes: list[str] = []

    async def run(name: str, events: tuple[str, ...]) -> None:
        config = WebhooksConfig(endpoints=(WebhookEndpoint(
            name=name, url="http://127.0.0.1:9/hook", credential="hook", events=events),))
        sink = WebhookSink(config, tmp_path / "outbox", secret=lambda n: SECRET,
                           notify=lambda text, level: notes.append(f"{level}: {text}"))
        await sink.start()
        sink.emit(delivered())
        await sink.stop()

    asyncio.run(run("old", ("delivered",)))
    asyncio.run(run("new", ("delivered", "deliverd")))
    assert any(n.startswith("warning: webhooks: this relayd never sends event kind(s) deliverd;") for n in notes)
    assert any(n.startswith(f"warning: webhooks: {tmp_path / 'outbox' / 'old'} holds 1 event(s) of an "
                            "endpoint no longer in relay.yaml") for n in notes)
    shutil.rmtree(tmp_path / "outbox" / "old")
    asyncio.run(run("gone", ("delivered",)))
    (tmp_path / "outbox" / "gone" / "base.jsonl").write_text("")  # as if every event had been sent
    for journal in (tmp_path / "outbox" / "gone").glob("journal.*"):
        journal.unlink()
    notes.clear()
    asyncio.run(run("new", ("delivered",)))
    assert not any("no longer in relay.yaml" in n for n in notes)


def test_the_sinks_own_notices_are_not_journalled_into_a_loop(tmp_path: Path) -> None:
    """An endpoint subscribed to notices, whose outbox is full: the drop notice comes back through
    the fan-out into the sink while it is journalling; it must not recurse or be journalled."""
    logged: list[str] = []

    async def scenario() -> tuple[int, list[str]]:
        config = WebhooksConfig(endpoints=(WebhookEndpoint(
            name="app", url="http://127.0.0.1:9/hook", credential="hook", events=("delivered", "notice")),),
            max_pending=10)
        holder: list[WebhookSink] = []

        def notify(text: str, level: str) -> None:  # as the daemon does: back through the fan-out
            logged.append(text)
            holder[0].emit(ev.Notice(text=text, level=level))

        sink = WebhookSink(config, tmp_path / "outbox", secret=lambda n: SECRET, notify=notify)
        holder.append(sink)
        await sink.start()
        for i in range(25):
            sink.emit(delivered(f"q{i}"))
        await sink.stop()
        return sink.senders[0].outbox.dropped

    assert asyncio.run(scenario()) == 15
    assert sum(text.startswith("webhook app: outbox full") for text in logged) == 1
    journalled = b"".join(p.read_bytes() for p in (tmp_path / "outbox" / "app").glob("*.jsonl"))
    assert journalled.count(b'"kind":"delivered"') == 25 and b'"kind":"notice"' not in journalled


def test_a_full_outbox_logs_its_losses_with_a_count(tmp_path: Path) -> None:
    notes: list[str] = []
    statuses: list[list[dict[str, object]]] = []

    async def scenario() -> int:
        sink = sink_for(tmp_path, "http://127.0.0.1:9/hook", notes, max_pending=10)
        await sink.start()
        for i in range(25):
            sink.emit(delivered(f"q{i}"))
        statuses.append(sink.status())
        await sink.stop()
        return sink.senders[0].outbox.dropped

    assert asyncio.run(scenario()) == 15
    assert statuses[0][0]["waiting"] == 10 and statuses[0][0]["dropped"] == 15
    drops = [n for n in notes if "dropped" in n]
    assert drops[0].startswith("error: webhook app: outbox full (10 events waiting), dropped the oldest 1")
    assert "15 dropped since start" in drops[-1]  # the rest summed up at stop, not one line per event


def test_a_big_or_endless_response_body_is_not_read_past_its_bound(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Endless(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()  # no length: the body goes on until the connection closes
            try:
                for _ in range(10_000):
                    self.wfile.write(b"x" * 65536)
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notes: list[str] = []

    async def scenario() -> tuple[int, float]:
        sink = sink_for(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/", notes)
        await sink.start()
        started = time.monotonic()
        sink.emit(delivered("q"))
        while sink.senders[0].sent == 0 and time.monotonic() - started < 10:
            await asyncio.sleep(0.02)
        seconds = time.monotonic() - started
        await sink.stop()
        return sink.senders[0].sent, seconds

    try:
        sent, seconds = asyncio.run(scenario())
    finally:
        server.shutdown()
        server.server_close()
    assert sent == 1 and seconds < 5


# ------------------------------------------------------------------ relayctl webhook secret


def write_config(files: RelayFiles) -> None:
    files.write(upstreams=[UpstreamSpec("gmail", 2525)],
                tenants=[TenantSpec("acme", "pw-acme-123456", ["*@acme.example"], [(["*"], ["gmail"])])])
    with files.config.open("a") as f:
        f.write("webhooks:\n  endpoints:\n    - name: app\n      url: https://hooks.example.com/x\n"
                "      credential: hook-app\n")


def test_relayctl_webhook_secret_generate_stores_it_and_shows_it_once(
    relay_files: RelayFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    from relayd.config.credentials import CredentialStore, read_key_file

    write_config(relay_files)
    code = cli.main(["--config", str(relay_files.config), "webhook", "secret", "hook-app", "--generate"],
                    environ={}, stdin=io.StringIO(""))
    out = capsys.readouterr().out
    assert code == 0
    secret = out.strip().splitlines()[-2]
    assert "(endpoint app)" in out and len(secret) >= 40
    store = CredentialStore.open(relay_files.root / "credentials.enc", list(read_key_file(relay_files.key_file)))
    stored = store.get("hook-app")
    assert stored is not None and stored.user == "webhook" and stored.password.reveal() == secret
    audit = (relay_files.root / "audit.log").read_text()
    assert "webhook.secret" in audit and secret not in audit


def test_relayctl_webhook_secret_refuses_a_short_secret_without_showing_it(
    relay_files: RelayFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(relay_files)
    code = cli.main(["--config", str(relay_files.config), "webhook", "secret", "hook-app", "--secret-stdin"],
                    environ={}, stdin=io.StringIO("short-guess\n"))
    captured = capsys.readouterr()
    assert code == 1
    assert "at least 16 characters" in captured.err and "short-guess" not in captured.err + captured.out


def test_relayctl_config_check_names_a_webhook_secret_missing_from_the_store(
    relay_files: RelayFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(relay_files)
    assert cli.main(["--config", str(relay_files.config), "config", "check"], environ={}) == 1
    out = capsys.readouterr().out
    assert ": webhook endpoint app: credential hook-app is not in " in out
    assert "add it with `relayctl webhook secret hook-app --generate`" in out
    cli.main(["--config", str(relay_files.config), "webhook", "secret", "hook-app", "--generate"],
             environ={}, stdin=io.StringIO(""))
    capsys.readouterr()
    cli.main(["--config", str(relay_files.config), "config", "check"], environ={})
    assert "webhook endpoint" not in capsys.readouterr().out


# ------------------------------------------------------------------ README snippets, run for real


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w+\n(.*?)```", text, re.S)
    assert match is not None, marker
    return match.group(1)


def a_signed_request(tmp_path: Path) -> Received:
    async def scenario(receiver: WebhookReceiver) -> None:
        sink = sink_for(tmp_path, receiver.url, [])
        await sink.start()
        sink.emit(delivered("q-readme"))
        deadline = time.monotonic() + 10
        while not receiver.received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sink.stop()

    with WebhookReceiver() as receiver:
        asyncio.run(scenario(receiver))
    return receiver.received[0]


def test_the_readme_python_verification_snippet_accepts_relayds_signature(tmp_path: Path) -> None:
    request = a_signed_request(tmp_path)
    namespace: dict[str, Any] = {}
    exec(readme_block("webhook-verify-python"), namespace)  # noqa: S102 (the README's own code)
    verify = namespace["verify"]
    headers = {"Relayd-Timestamp": request.headers["relayd-timestamp"],
               "Relayd-Signature": request.headers["relayd-signature"]}
    assert verify(SECRET, headers, request.body) is True
    assert verify(b"wrong secret", headers, request.body) is False
    assert verify(SECRET, headers, request.body.replace(b"q-readme", b"q-forged")) is False
    stale = dict(headers, **{"Relayd-Timestamp": str(int(headers["Relayd-Timestamp"]) - 3600)})
    assert verify(SECRET, stale, request.body) is False


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (scripts/install-test-clients)")
def test_the_readme_node_verification_snippet_accepts_relayds_signature(tmp_path: Path) -> None:
    request = a_signed_request(tmp_path)
    script = tmp_path / "verify.js"
    script.write_text(readme_block("webhook-verify-node") + """
const [secret, timestamp, signature, bodyFile] = process.argv.slice(2);
const body = require('fs').readFileSync(bodyFile);
const headers = {'relayd-timestamp': timestamp, 'relayd-signature': signature};
console.log(verify(secret, headers, body) ? 'valid' : 'invalid');
""")
    body_file = tmp_path / "body.json"
    body_file.write_bytes(request.body)

    def run(secret: str, timestamp: str) -> str:
        result = subprocess.run(
            ["node", str(script), secret, timestamp, request.headers["relayd-signature"], str(body_file)],
            capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    timestamp = request.headers["relayd-timestamp"]
    assert run(SECRET.decode(), timestamp) == "valid"
    assert run("wrong secret", timestamp) == "invalid"
    assert run(SECRET.decode(), str(int(timestamp) - 3600)) == "invalid"


def test_a_json_log_message_is_the_main_log_line_whatever_the_time_zone() -> None:
    from relayd.observe.jsonlog import json_record
    from relayd.observe.logline import format_event

    event = ev.RecipientDeferred(queue_id="q", tenant="t", sender="s@t", message_id="", attempt=1,
                                 report=delivered().report, next_attempt=1764610222.0)
    for utc in (False, True):
        record = json_record(event, utc=utc)
        assert record is not None and record["message"] == format_event(event, utc=utc)
        assert record["next_attempt"] == "2025-12-01T17:30:22.000Z"
    assert json_record(ev.SessionOpened()) is None  # the main log shows no line for it either


def test_a_hostile_reply_cannot_split_a_json_log_line() -> None:
    from relayd.observe.jsonlog import json_line

    report = DeliveryReport(address="x@y", outcome=AttemptOutcome.FAIL, rule="r",
                            reply=SmtpReply(550, "no\r\n2026-01-01 fake line\u2028\u0085\x00 more"))
    event = ev.RecipientFailed(queue_id="q", tenant="t", sender="s@t", message_id="", report=report, attempt=1)
    line = json_line(event)
    assert line is not None and line.endswith("\n")
    assert len(line.splitlines()) == 1 and line.isascii()
    assert json.loads(line)["reply"] == "550 no\r\n2026-01-01 fake line\u2028\u0085\x00 more"
