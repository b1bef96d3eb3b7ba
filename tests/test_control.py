"""The control socket against a real running relayd: queue actions, health, status, reload.

relayd runs in-process (`RelayThread`) or as a process; upstreams are real
SMTP servers on 127.0.0.1; requests go through `ControlClient` over the real
Unix socket, as relayctl sends them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from relayd.ops.controlclient import ControlClient, DaemonNotRunning
from relayd.queue.msgid import new_message_id
from relayd.queue.spool import Spool
from relayd.queue.spoolformat import format_message
from relayd.values import Envelope
from tests.relayenv import (
    RelayFiles, RelayThread, TenantSpec, UpstreamSpec, free_port, make_message, submit, wait_until,
)

ACME = ("acme", "acme-relay-password")
SENDER = "billing@acme.example"


def one_upstream(files: RelayFiles, upstreams: Callable[..., Any], *, retry: str = "F,1h,10m") -> Any:
    gmail = upstreams(users={"acme@gmail.com": "acme-app-password"})
    files.write(
        upstreams=[UpstreamSpec("gmail_acme", gmail.port, "acme-gmail", "acme@gmail.com", "acme-app-password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme"])])],
        retry=retry,
    )
    return gmail


def client(files: RelayFiles) -> ControlClient:
    return ControlClient(files.root / "spool" / "control.sock", timeout=60)


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("done") is True and reply.get("ok") is True, reply
    return reply


def listed(files: RelayFiles) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {}
    for message in client(files).stream("queue.list"):
        for row in message.get("rows", []):
            rows[row[0]] = row
    return rows


def result_of(reply: dict[str, Any], message_id: str) -> str:
    return next(str(r["result"]) for r in ok(reply)["results"] if r["id"] == message_id)


def write_queued(spool_dir: Path, count: int, *, received_at: float) -> list[str]:
    """Queue files written with the spool's own format helpers (no daemon, no fsync)."""
    ids = []
    for i in range(count):
        mid = new_message_id(received_at)
        env = Envelope(mid, "acme", SENDER, (f"r{i}@customer.test",), received_at, 120, protocol="local")
        shard = spool_dir / "queue" / mid[5]
        shard.mkdir(mode=0o700, parents=True, exist_ok=True)
        (shard / mid).write_bytes(format_message(env, make_message(SENDER, [f"r{i}@customer.test"])))
        ids.append(mid)
    return ids


# ----------------------------------------------------------- the socket


def test_control_socket_is_owner_only_while_running_and_gone_after_stop(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    one_upstream(relay_files, upstreams)
    path = relay_files.root / "spool" / "control.sock"
    with RelayThread(relay_files.config):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert ok(client(relay_files).request("health"))["transports"]["gmail_acme"]["skipped_until"] is None
    assert not path.exists()
    with pytest.raises(DaemonNotRunning, match="relayd is not running"):
        client(relay_files).request("status")


def test_bad_requests_get_one_error_line_and_the_connection_stays_usable(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    one_upstream(relay_files, upstreams)
    with RelayThread(relay_files.config):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(relay_files.root / "spool" / "control.sock"))
            reader = sock.makefile("rb")
            for line, error in [
                (b"not json\n", "JSON object"),
                (b'{"cmd": "rm -rf"}\n', "unknown command"),
                (b'{"cmd": "freeze", "ids": ["../../etc/passwd"]}\n', "not a message id"),
                (b'{"cmd": "queue.show", "id": "1abcde-000001-00"}\n', "not in the queue"),
            ]:
                sock.sendall(line)
                answer = json.loads(reader.readline())
                assert answer["done"] is True and answer["ok"] is False and error in answer["error"]
            sock.sendall(b'{"cmd": "queue.count"}\n')
            assert json.loads(reader.readline())["total"] == 0


def test_a_second_relayd_on_the_same_spool_refuses_to_start(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    one_upstream(relay_files, upstreams)
    second = relay_files.root / "second.yaml"
    second.write_text(relay_files.config.read_text().replace(
        f"\n    port: {relay_files.port}\n", f"\n    port: {free_port()}\n"))
    with RelayThread(relay_files.config):
        proc = subprocess.run(
            [sys.executable, "-m", "relayd.daemon", "--config", str(second)],
            capture_output=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
        )
    assert proc.returncode != 0
    assert b"in use by another relayd" in proc.stderr


# ------------------------------------------------------ health / status / reload


def test_health_and_status_report_the_retry_wait_listeners_and_queue(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config) as relay:
        submit(relay_files, ACME, SENDER, ["client@customer.test"])
        wait_until(lambda: ok(client(relay_files).request("queue.count"))["deferred"] == 1)
        health = ok(client(relay_files).request("health"))["transports"]["gmail_acme"]
        assert health["skipped_until"] > time.time() + 500
        assert "refused" in health["last_error"] and health["last_error_at"] <= time.time()
        assert health["last_success"] is None
        status = ok(client(relay_files).request("status"))
    assert status["pid"] == os.getpid()
    assert status["listeners"] == [{"name": "submission", "address": "127.0.0.1", "port": relay_files.port}]
    assert status["queue"]["total"] == 1 and status["queue"]["deferred"] == 1
    assert status["queue"]["active"] == 0 and status["queue"]["frozen"] == 0
    assert 0 <= status["queue"]["oldest_age"] < 60 and 0 <= status["uptime"] < 60
    assert status["transports"]["gmail_acme"]["skipped_until"] == health["skipped_until"]
    assert status["config"] == str(relay.config.source)


def test_reload_answers_ok_or_the_file_and_line_of_the_error(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    one_upstream(relay_files, upstreams)
    good = relay_files.config.read_text()
    with RelayThread(relay_files.config):
        assert ok(client(relay_files).request("reload"))["config"] == str(relay_files.config)
        relay_files.config.write_text(good.replace("tenants:\n", "tenants:\n  broken: [unclosed\n", 1))
        reply = client(relay_files).request("reload")
        assert reply["done"] is True and reply["ok"] is False
        assert reply["error"].startswith(f"{relay_files.config}:34:")  # file:line:col
        assert reply["problems"] == reply["error"].splitlines()
        relay_files.config.write_text(good)
        ok(client(relay_files).request("reload"))
    assert relay_files.mainlog().count("configuration reloaded") == 2


# -------------------------------------------------------------- actions


def test_deliver_after_a_deferral_delivers_now_despite_retry_times(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test"])
        relay_files.wait_for_log("== client@customer.test")
        gmail.accept_connections()  # both the message and the host wait 10 minutes now
        reply = client(relay_files).request("deliver", ids=[mid])
        (msg,) = gmail.wait_for_messages(1)
    assert result_of(reply, mid) == "completed"
    (entry,) = ok(reply)["results"]
    assert any("=> client@customer.test" in line for line in entry["log"])
    assert msg.rcpt_tos == ["client@customer.test"]


def test_flush_delivers_everything_now_ignoring_message_and_host_retry_times(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        ids = [submit(relay_files, ACME, SENDER, [f"r{i}@customer.test"]) for i in range(4)]
        wait_until(lambda: ok(client(relay_files).request("queue.count"))["deferred"] == 4)
        gmail.accept_connections()
        time.sleep(0.5)
        assert gmail.messages == []  # nothing is due for ten minutes
        reply = ok(client(relay_files).request("flush"))
        assert reply["forced"] == 4
        gmail.wait_for_messages(4)
        wait_until(lambda: not listed(relay_files))
    assert sorted(r for m in gmail.messages for r in m.rcpt_tos) == [f"r{i}@customer.test" for i in range(4)]
    assert all(f"{mid} Completed" in relay_files.mainlog() for mid in ids)


def test_frozen_message_is_not_delivered_when_due_stays_frozen_across_restart_and_thaw_delivers(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams, retry="F,1h,1s")
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test"])
        relay_files.wait_for_log("== client@customer.test")
        assert result_of(client(relay_files).request("freeze", ids=[mid]), mid) == "frozen"
        assert result_of(client(relay_files).request("freeze", ids=[mid]), mid) == "already frozen"
        gmail.accept_connections()
        time.sleep(2.5)  # the retry time (1 s) has passed: a thawed message would have gone
        assert gmail.received == []
        assert listed(relay_files)[mid][5] == 1
    with RelayThread(relay_files.config):
        assert listed(relay_files)[mid][5] == 1  # written to the spool, not only in memory
        time.sleep(1.5)
        assert gmail.received == []
        assert result_of(client(relay_files).request("thaw", ids=[mid]), mid) == "thawed"
        (msg,) = gmail.wait_for_messages(1)
    assert msg.rcpt_tos == ["client@customer.test"]
    log = relay_files.mainlog()
    assert f"{mid} frozen by " in log and f"{mid} unfrozen by " in log


def wait_in_flight(files: RelayFiles, mid: str) -> None:
    wait_until(lambda: bool(ok(client(files).request("queue.show", id=mid))["in_flight"]))


def test_remove_during_an_accepted_delivery_leaves_one_delivery_and_nothing_queued(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.reply_to("DATA", "250 2.0.0 OK slow", delay=1.5)
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test"])
        wait_in_flight(relay_files, mid)
        started = time.monotonic()
        reply = client(relay_files).request("remove", ids=[mid])
        assert time.monotonic() - started >= 0.5  # it waited for the attempt to end
        assert result_of(reply, mid) == "not in queue"  # delivered meanwhile: nothing left to remove
    with RelayThread(relay_files.config):
        time.sleep(1)
        assert listed(relay_files) == {}
    assert len(gmail.received) == 1 and len(gmail.messages) == 1
    assert f"{mid} removed by" not in relay_files.mainlog()


def test_remove_during_a_deferred_attempt_removes_it_for_good(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams, retry="F,1h,1s")
    gmail.reply_to("DATA", "451 4.3.0 try later", delay=1.5, times=1)
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test"])
        wait_in_flight(relay_files, mid)
        assert result_of(client(relay_files).request("remove", ids=[mid]), mid) == "removed"
        assert mid not in listed(relay_files)
        time.sleep(2)  # past the 1 s retry time: a resurrected message would be sent now
    with RelayThread(relay_files.config):
        time.sleep(1.5)
        assert listed(relay_files) == {}
    assert len(gmail.received) == 1 and gmail.messages == []
    assert not (relay_files.root / "spool" / "queue" / mid[5] / mid).exists()
    log = relay_files.mainlog()
    assert f"{mid} removed by " in log and f"{mid} Completed" in log


def test_remove_gives_up_waiting_for_a_long_attempt_and_changes_nothing(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.reply_to("DATA", "250 2.0.0 OK slow", delay=2.5)
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test"])
        wait_in_flight(relay_files, mid)
        assert result_of(client(relay_files).request("remove", ids=[mid], wait=0.3), mid) == "busy"
        gmail.wait_for_messages(1)
        relay_files.wait_for_log(f"{mid} Completed")
    assert f"{mid} removed by" not in relay_files.mainlog()


def test_giveup_fails_open_recipients_and_bounces_to_the_sender(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.reply_to("RCPT", "451 4.2.0 mailbox busy", for_address="client@customer.test")
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test", "ok@customer.test"])
        relay_files.wait_for_log("== client@customer.test")
        reply = client(relay_files).request("giveup", ids=[mid])
        assert result_of(reply, mid) == "cancelled and bounced"
        (original, bounce) = gmail.wait_for_messages(2)
        wait_until(lambda: not listed(relay_files))
    assert original.rcpt_tos == ["ok@customer.test"]
    assert bounce.mail_from == "" and bounce.rcpt_tos == [SENDER]
    assert b"delivery cancelled by administrator" in bounce.data
    assert b"client@customer.test" in bounce.data
    log = relay_files.mainlog()
    assert f"{mid} ** client@customer.test" in log and "delivery cancelled by administrator" in log
    assert f"{mid} Completed" in log


def test_giveup_on_a_bounce_removes_it_without_a_new_bounce(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.reply_to("RCPT", "550 5.1.1 no such user", for_address="client@customer.test")
    gmail.reply_to("RCPT", "451 4.2.0 sender mailbox busy", for_address=SENDER)
    with RelayThread(relay_files.config):
        mid = submit(relay_files, ACME, SENDER, ["client@customer.test"])
        relay_files.wait_for_log(f"== {SENDER}")
        (bounce_id,) = [i for i in listed(relay_files) if i != mid]
        assert listed(relay_files)[bounce_id][2] == ""
        assert result_of(client(relay_files).request("giveup", ids=[bounce_id]), bounce_id) == "bounce removed"
        wait_until(lambda: not listed(relay_files))
        time.sleep(0.5)
        assert listed(relay_files) == {}
    assert gmail.messages == []
    assert "(null sender: bounce discarded)" in relay_files.mainlog()


def test_operators_and_deliveries_racing_leave_no_damaged_spool_file(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams, retry="F,1h,1s")
    gmail.reply_to("DATA", "451 4.3.0 later", delay=0.05)
    with RelayThread(relay_files.config):
        ids = [submit(relay_files, ACME, SENDER, [f"r{i}@customer.test"]) for i in range(12)]
        removed: set[str] = set()
        errors: list[BaseException] = []

        def operator(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(25):
                    verb = rng.choice(["freeze", "thaw", "thaw", "deliver", "remove"])
                    pick = rng.sample(ids, 3)
                    reply = ok(client(relay_files).request(verb, ids=pick, attempt_wait=5))
                    if verb == "remove":
                        removed.update(r["id"] for r in reply["results"] if r["result"] == "removed")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=operator, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        left = listed(relay_files)
    assert removed and not removed & set(left)
    loaded = Spool(relay_files.root / "spool").load()
    assert loaded.problems == [] and loaded.corrupt_files == 0
    assert {e.id for e in loaded.entries} == set(left)
    assert not removed & {e.id for e in loaded.entries}


def test_startup_behind_a_down_upstream_tries_it_a_few_times_not_once_per_message(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.refuse_connections()
    ids = write_queued(relay_files.root / "spool", 300, received_at=time.time() - 60)
    with RelayThread(relay_files.config):
        wait_until(lambda: ok(client(relay_files).request("queue.count"))["deferred"] == 300)
        time.sleep(0.5)
        count = ok(client(relay_files).request("queue.count"))
    log = relay_files.mainlog()
    refused = log.count("connection refused (next try")
    assert 1 <= refused <= 20  # at most one wave of max_parallel (20) attempts
    assert count["total"] == 300 and count["active"] == 0
    assert all(i in log for i in ids[:1])
