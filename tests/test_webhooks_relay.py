"""Webhooks end to end: a real relayd (in a thread and as a process), real SMTP on loopback,
and a real HTTP receiver on 127.0.0.1 that checks every signature."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from relayd.ops import cli
from tests.relayenv import (
    ROOT, RelaydProcess, RelayFiles, RelayThread, TenantSpec, UpstreamSpec, free_port, submit,
)
from tests.webhookreceiver import WebhookReceiver

ACME = ("acme", "acme-relay-password")
SECRET = "whsec-test-3f9a1c0b7d2e4f6a8b9c"


def write_relay(files: RelayFiles, upstream_port: int, receiver_url: str, *,
                events: str = "[delivered, deferred, bounced, bounce_created]",
                tenant: str | None = "acme", extra: str = "", retry: str = "F,1m,1s",
                webhook_extra: str = "") -> None:
    files.write(
        upstreams=[UpstreamSpec("gmail", upstream_port, "gmail-login", "acme@gmail.com", "upstream-app-password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example", "app@acme.example"], [(["*"], ["gmail"])])],
        retry=retry,
    )
    lines = [
        "webhooks:",
        f"  outbox_dir: {files.root / 'outbox'}",
        "  retry_min: 0.2s",
        "  retry_max: 1s",
        *[f"  {line}" for line in webhook_extra.splitlines() if line.strip()],
        "  endpoints:",
        "    - name: app",
        f"      url: {receiver_url}",
        "      credential: hook-app",
        f"      events: {events}",
        "      timeout: 2s",
    ]
    if tenant is not None:
        lines.append(f"      tenant: {tenant}")
    with files.config.open("a") as config:
        config.write("\n".join(lines) + "\n" + extra)
    store_secret(files)


def store_secret(files: RelayFiles) -> None:
    out = io.StringIO()
    code = cli.main(["--config", str(files.config), "webhook", "secret", "hook-app", "--secret-stdin"],
                    environ={}, stdin=io.StringIO(SECRET + "\n"))
    assert code == 0, out.getvalue()


def gmail(upstreams: Callable[..., Any]) -> Any:
    return upstreams(users={"acme@gmail.com": "upstream-app-password"})


def running(files: RelayFiles, how: str) -> Any:
    """relayd in a thread of the test (the production event loop) or as its own process."""
    return RelayThread(files.config) if how == "thread" else RelaydProcess(files)


@pytest.mark.parametrize("how", ["thread", "process"])
def test_delivered_bounced_and_deferred_then_delivered_arrive_signed(
    relay_files: RelayFiles, upstreams: Callable[..., Any], how: str
) -> None:
    upstream = gmail(upstreams)
    upstream.reply_to("RCPT", "550 5.1.1 No such user here", for_address="gone@customer.test")
    upstream.reply_to("RCPT", "451 4.7.1 Greylisted, try again", for_address="later@customer.test", times=1)
    with WebhookReceiver() as receiver:
        write_relay(relay_files, upstream.port, receiver.url)
        with running(relay_files, how):
            ok_id = submit(relay_files, ACME, "app@acme.example", ["ok@customer.test"])
            gone_id = submit(relay_files, ACME, "app@acme.example", ["gone@customer.test"])
            later_id = submit(relay_files, ACME, "app@acme.example", ["later@customer.test"])
            delivered = receiver.wait_for(1, event="delivered", queue_id=ok_id)
            bounced = receiver.wait_for(1, event="bounced", queue_id=gone_id)
            bounce = receiver.wait_for(1, event="bounce_created", queue_id=gone_id)
            deferred = receiver.wait_for(1, event="deferred", queue_id=later_id)
            later = receiver.wait_for(1, timeout=30, event="delivered", queue_id=later_id)
    secret = SECRET.encode()
    for request in delivered + bounced + bounce + deferred + later:
        assert request.signature_valid(secret)
        assert request.headers["relayd-event-id"] == request.json["id"]
        assert request.headers["relayd-event"] == request.json["event"]
        assert abs(int(request.headers["relayd-timestamp"]) - time.time()) < 120
        assert not request.signature_valid(b"some other secret")
    body = delivered[0].json
    assert set(body) == {"schema", "id", "event", "time", "queue_id", "message_id", "tenant", "sender",
                         "recipient", "transport", "host", "upstream_reply", "reason", "attempt",
                         "next_attempt", "bounce_id"}
    assert body["schema"] == 1 and body["tenant"] == "acme" and body["sender"] == "app@acme.example"
    assert body["recipient"] == "ok@customer.test" and body["transport"] == "gmail"
    assert body["message_id"].endswith("@app.test>") and body["attempt"] == 1
    assert body["upstream_reply"].startswith("250")
    assert bounced[0].json["upstream_reply"].startswith("550 5.1.1")
    assert bounce[0].json["bounce_id"] and bounce[0].json["sender"] == "app@acme.example"
    assert deferred[0].json["upstream_reply"].startswith("451 4.7.1") and deferred[0].json["next_attempt"]
    assert later[0].json["attempt"] == 2
    ids = [r.json["id"] for r in receiver.received]
    assert len(ids) == len(set(ids)), "every event has its own id"


def test_a_tenant_endpoint_gets_only_its_tenant_and_kinds(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    with WebhookReceiver() as receiver:
        write_relay(relay_files, upstream.port, receiver.url, events="[bounced]")
        with RelayThread(relay_files.config) as relay:
            submit(relay_files, ACME, "app@acme.example", ["ok@customer.test"])
            upstream.wait_for_messages(1)
            time.sleep(1.0)
            assert len(relay.relay.extra_sinks.webhooks.senders[0].outbox) == 0
    assert receiver.received == []


def test_receiver_down_then_up_gets_every_event_and_smtp_does_not_wait(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    port = free_port()  # nothing listens there yet: connections are refused
    write_relay(relay_files, upstream.port, f"http://127.0.0.1:{port}/hook", events="[delivered]")
    count = 30
    with RelayThread(relay_files.config):
        started = time.monotonic()
        ids = [submit(relay_files, ACME, "app@acme.example", [f"r{i}@customer.test"]) for i in range(count)]
        upstream.wait_for_messages(count, timeout=60)
        down_seconds = time.monotonic() - started
        time.sleep(1.5)  # several retries fail meanwhile
        back = WebhookReceiver(port).start()
        try:
            got = back.wait_for(count, timeout=30, event="delivered")
        finally:
            back.stop()
    assert {r.json["queue_id"] for r in got} == set(ids)
    assert all(r.signature_valid(SECRET.encode()) for r in got)
    print(f"\n{count} messages submitted and delivered in {down_seconds:.2f}s with the receiver down")
    # The baseline, with the same relay and a receiver that answers at once.
    with WebhookReceiver() as up:
        write_relay(relay_files, upstream.port, up.url, events="[delivered]")
        with RelayThread(relay_files.config):
            started = time.monotonic()
            for i in range(count):
                submit(relay_files, ACME, "app@acme.example", [f"s{i}@customer.test"])
            upstream.wait_for_messages(2 * count, timeout=60)
            up_seconds = time.monotonic() - started
            up.wait_for(count, event="delivered")
    print(f"{count} messages submitted and delivered in {up_seconds:.2f}s with the receiver up")
    assert down_seconds < 2 * up_seconds + 1.0


def test_a_hanging_receiver_does_not_slow_delivery(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    with WebhookReceiver() as receiver:
        receiver.hang_seconds = 30.0  # longer than the endpoint's 2s timeout
        write_relay(relay_files, upstream.port, receiver.url, events="[delivered]")
        with RelayThread(relay_files.config) as relay:
            started = time.monotonic()
            for i in range(10):
                submit(relay_files, ACME, "app@acme.example", [f"h{i}@customer.test"])
            upstream.wait_for_messages(10, timeout=30)
            seconds = time.monotonic() - started
            sender = relay.relay.extra_sinks.webhooks.senders[0]
            deadline = time.monotonic() + 10
            while sender.failed_requests == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sender.failed_requests >= 1  # the request timed out: counted as a failure
            assert len(sender.outbox) == 10  # and every event is still waiting
            receiver.hang_seconds = 0.0
        print(f"\n10 messages delivered in {seconds:.2f}s while the receiver hung")
        assert seconds < 10


def test_kill_9_with_pending_events_delivers_them_after_restart(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    port = free_port()  # nothing listens there yet
    write_relay(relay_files, upstream.port, f"http://127.0.0.1:{port}/hook", events="[delivered]")
    with RelaydProcess(relay_files) as relayd:
        ids = [submit(relay_files, ACME, "app@acme.example", [f"k{i}@customer.test"]) for i in range(5)]
        upstream.wait_for_messages(5, timeout=30)
        relay_files.wait_for_log("Completed", count=5)
        relayd.kill()
    assert relayd.output.count(b"Traceback") == 0
    with WebhookReceiver(port) as back:
        with RelaydProcess(relay_files):
            got = back.wait_for(5, timeout=30, event="delivered")
    assert {r.json["queue_id"] for r in got} == set(ids)
    assert len(upstream.messages) == 5  # the restart sent the events, not the mail, again
    assert "5 event(s) waiting from before the start" in relay_files.mainlog()


def test_the_signing_secret_never_reaches_logs_output_or_the_outbox(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    with WebhookReceiver() as receiver:
        receiver.status = 500  # failures get logged: the secret must not be in those lines either
        write_relay(relay_files, upstream.port, receiver.url, events="[delivered]",
                    extra=f"json_log_file: {relay_files.root / 'events.json'}\n")
        with RelaydProcess(relay_files) as relayd:
            submit(relay_files, ACME, "app@acme.example", ["x@customer.test"])
            relay_files.wait_for_log("webhook app: event")
            receiver.status = 200
            receiver.wait_for(1, event="delivered")
            relayd.stop()
    texts = [relay_files.mainlog().encode(), relayd.output, (relay_files.root / "events.json").read_bytes()]
    for path in (relay_files.root / "outbox").rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes())
    assert all(SECRET.encode() not in text for text in texts)
    assert "HTTP status 500" in relay_files.mainlog()
    assert (relay_files.root / "credentials.enc").read_bytes().count(SECRET.encode()) == 0


def test_outbox_files_are_private(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    upstream = gmail(upstreams)
    with WebhookReceiver() as receiver:
        write_relay(relay_files, upstream.port, receiver.url)
        with RelayThread(relay_files.config):
            submit(relay_files, ACME, "app@acme.example", ["x@customer.test"])
            receiver.wait_for(1, event="delivered")
    outbox = relay_files.root / "outbox" / "app"
    assert os.stat(outbox).st_mode & 0o777 == 0o700
    for path in outbox.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_json_log_lines_match_the_text_log_event_for_event(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    upstream.reply_to("RCPT", "550 5.1.1 No such user here", for_address="gone@customer.test")
    json_path = relay_files.root / "events.json"
    with WebhookReceiver() as receiver:
        write_relay(relay_files, upstream.port, receiver.url, extra=f"json_log_file: {json_path}\n")
        with RelaydProcess(relay_files) as relayd:
            queue_id = submit(relay_files, ACME, "app@acme.example", ["ok@customer.test", "gone@customer.test"])
            relay_files.wait_for_log("Completed", count=2)  # the message and its bounce
            relayd.stop()
    text_lines = [line for line in relay_files.mainlog().splitlines() if line]
    records = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert len(records) == len(text_lines)
    for line, record in zip(text_lines, records):
        assert line[20:] == record["message"]  # after the "YYYY-MM-DD HH:MM:SS " stamp
        assert record["time"].endswith("Z")
    by_kind = {r["event"]: r for r in records if r.get("queue_id") == queue_id}
    assert by_kind["delivered"]["recipient"] == "ok@customer.test"
    assert by_kind["delivered"]["transport"] == "gmail" and by_kind["delivered"]["reply"].startswith("250")
    assert by_kind["bounced"]["recipient"] == "gone@customer.test"
    assert by_kind["bounced"]["reply"].startswith("550 5.1.1")
    assert by_kind["message_arrived"]["tenant"] == "acme"
    assert by_kind["message_arrived"]["recipients"] == ["ok@customer.test", "gone@customer.test"]
    assert by_kind["bounce_created"]["bounce_id"]
    for record in records:
        if "queue_id" in record and record["event"] != "notice":
            assert record["queue_id"] in record["message"]


def test_log_format_json_writes_json_to_log_file_and_reopens_on_sigusr1(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    with WebhookReceiver() as receiver:
        write_relay(relay_files, upstream.port, receiver.url, extra="log_format: json\n")
        log = relay_files.root / "mainlog"
        with RelaydProcess(relay_files) as relayd:
            submit(relay_files, ACME, "app@acme.example", ["ok@customer.test"])
            relay_files.wait_for_log('"event":"message_completed"')
            log.rename(relay_files.root / "mainlog.1")
            relayd.signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not log.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            submit(relay_files, ACME, "app@acme.example", ["two@customer.test"])
            relay_files.wait_for_log('"event":"message_completed"')
            relayd.stop()
    old = [json.loads(line) for line in (relay_files.root / "mainlog.1").read_text().splitlines()]
    new = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["event"] == "delivered" and r["recipient"] == "ok@customer.test" for r in old)
    assert any(r["event"] == "delivered" and r["recipient"] == "two@customer.test" for r in new)
    assert not any(r.get("recipient") == "two@customer.test" for r in old)


def test_a_journalled_event_is_fsynced_within_moments_not_only_at_stop(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    """A kill -9 cannot show a missing fsync (the page cache outlives the process): strace can."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/bootstrap test installs it on Debian)")
    upstream = gmail(upstreams)
    port = free_port()  # nothing listens there: the event stays in the outbox
    write_relay(relay_files, upstream.port, f"http://127.0.0.1:{port}/hook", events="[delivered]",
                extra=f"pid_file: {relay_files.root / 'relayd.pid'}\n")
    trace = tmp_path / "strace.txt"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "signal=none", "-s", "200", "-o", str(trace),
         "-e", "trace=openat,write,fsync,fdatasync",
         sys.executable, "-m", "relayd.daemon", "--config", str(relay_files.config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pid_file = relay_files.root / "relayd.pid"
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), "relayd did not start under strace"
        submit(relay_files, ACME, "app@acme.example", ["traced@customer.test"])
        relay_files.wait_for_log("Completed")
        time.sleep(1.0)  # several sync intervals
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # no stop path: only the periodic fsync counts
    finally:
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    journal_fd: str | None = None
    wrote_at: int | None = None
    synced_after = False
    unfinished: dict[str, str] = {}  # pid -> the start of a call another thread interrupted
    for n, line in enumerate(trace.read_text(errors="replace").splitlines()):
        pid, _, call = line.partition(" ")
        call = call.strip()
        if call.endswith("<unfinished ...>"):
            unfinished[pid] = call.removesuffix("<unfinished ...>").strip()
            continue
        if call.startswith("<... "):
            call = unfinished.pop(pid, "") + ")" + call.split(")", 1)[-1]
        if call.startswith("openat(") and "/outbox/app/journal." in call and "= " in call:
            journal_fd = call.rsplit("= ", 1)[-1].strip()
        elif journal_fd and call.startswith(f"write({journal_fd},") and '\\"kind\\":\\"delivered\\"' in call:
            wrote_at = n
        elif journal_fd and wrote_at is not None and call.startswith(f"fsync({journal_fd})"):
            synced_after = synced_after or call.rstrip().endswith("= 0")
    assert wrote_at is not None, "the event was not written to the outbox journal"
    assert synced_after, "the outbox journal was not fsync'd after the event was written"


def test_a_reload_moves_an_endpoint_to_its_new_url_with_the_events_waiting(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = gmail(upstreams)
    old_port = free_port()  # the old URL is dead: the event waits
    write_relay(relay_files, upstream.port, f"http://127.0.0.1:{old_port}/hook", events="[delivered]")
    with WebhookReceiver() as new, RelayThread(relay_files.config) as relay:
        first = submit(relay_files, ACME, "app@acme.example", ["one@customer.test"])
        upstream.wait_for_messages(1)
        time.sleep(0.5)
        relay_files.config.write_text(relay_files.config.read_text().replace(
            f"http://127.0.0.1:{old_port}/hook", new.url))
        assert relay.call(relay.relay.reload()) is True
        second = submit(relay_files, ACME, "app@acme.example", ["two@customer.test"])
        got = new.wait_for(2, event="delivered")
    assert {r.json["queue_id"] for r in got} == {first, second}
