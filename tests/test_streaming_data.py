"""DATA streamed to the spool, the bounded header check and the trace fields, over real sockets.

relayd runs here on uvloop, the event loop it ships with.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.eventloop import run_on_test_loop
from tests.relayenv import RelayFiles, RelayThread, TenantSpec, UpstreamSpec, connect, wait_until

ACME = ("acme", "acme-relay-password")
SENDER = "billing@acme.example"
RCPT = "client@customer.test"


def write_files(files: RelayFiles, *, listener_extra: str = "", upstream_port: int | None = None) -> RelayFiles:
    upstreams = [] if upstream_port is None else [UpstreamSpec("up", upstream_port, "up-cred", "relay", "up-pw")]
    via = ["up"] if upstream_port is not None else ["capture"]
    files.write(
        upstreams=upstreams,
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], via)])],
        capture=upstream_port is None,
        listener_extra=listener_extra,
    )
    return files


@pytest.fixture
def relay(relay_files: RelayFiles) -> Iterator[RelayFiles]:
    write_files(relay_files)
    with RelayThread(relay_files.config):
        yield relay_files


def incoming(files: RelayFiles) -> list[Path]:
    directory = files.root / "spool" / "incoming"
    return sorted(directory.iterdir()) if directory.exists() else []


def queued(files: RelayFiles) -> list[Path]:
    return sorted(p for p in (files.root / "spool" / "queue").glob("*/*"))


def open_data(files: RelayFiles) -> smtplib.SMTP:
    client = connect(files, login=ACME)
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt(RCPT)[0] == 250
    code, _ = client.docmd("DATA")
    assert code == 354
    return client


def final_reply(client: smtplib.SMTP) -> tuple[int, bytes]:
    return client.getreply()


HEAD = b"From: Billing <billing@acme.example>\r\nTo: client@customer.test\r\nSubject: big\r\n\r\n"
LINE = b"x" * 78 + b"\r\n"


def test_data_is_written_to_the_spool_as_it_arrives_and_a_disconnect_removes_it(relay: RelayFiles) -> None:
    client = open_data(relay)
    client.sock.sendall(HEAD + LINE * (3 * 1024 * 1024 // len(LINE)))
    wait_until(lambda: any(p.stat().st_size > 2 * 1024 * 1024 for p in incoming(relay)))
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    wait_until(lambda: incoming(relay) == [])
    assert queued(relay) == []


def test_a_message_over_the_size_limit_mid_data_is_refused_and_its_partial_file_removed(
    relay_files: RelayFiles,
) -> None:
    write_files(relay_files, listener_extra="max_message_size: 1M")
    with RelayThread(relay_files.config):
        client = open_data(relay_files)
        client.sock.sendall(HEAD + LINE * (2 * 1024 * 1024 // len(LINE)) + b".\r\n")
        code, text = final_reply(client)
        assert code == 552 and text.startswith(b"5.3.4 Message exceeds the maximum size")
        assert incoming(relay_files) == [] and queued(relay_files) == []
        assert client.noop()[0] == 250
        client.close()


@pytest.mark.parametrize("obsolete", [b"From :", b"From\t:", b"from  \t:"])
def test_a_foreign_author_in_the_obsolete_from_form_is_refused(relay: RelayFiles, obsolete: bytes) -> None:
    message = (b"From: Billing <billing@acme.example>\r\n" + obsolete + b" Boss <ceo@globex.example>\r\n"
               b"Subject: x\r\n\r\nbody\r\n")
    with connect(relay, login=ACME) as client:
        client.mail(SENDER)
        client.rcpt(RCPT)
        code, text = client.data(message)
    assert code == 550
    assert text == b"5.7.1 Header From: <ceo@globex.example> is not an allowed sender for tenant acme"
    assert incoming(relay) == [] and queued(relay) == []


def test_a_message_without_an_empty_line_is_refused_at_the_header_bound_and_others_stay_served(
    relay: RelayFiles,
) -> None:
    client = open_data(relay)
    headers_only = b"From: billing@acme.example\r\n" + b"X-Filler: " + b"y" * 60 + b"\r\n"
    payload = headers_only + (b"X-Filler: " + b"y" * 60 + b"\r\n") * (20 * 1024 * 1024 // 72) + b".\r\n"
    sender = threading.Thread(target=client.sock.sendall, args=(payload,))
    sender.start()
    slowest = 0.0
    with connect(relay) as other:
        while sender.is_alive():
            started = time.monotonic()
            assert other.noop()[0] == 250
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    sender.join()
    code, text = final_reply(client)
    client.close()
    assert code == 552 and text == b"5.3.4 Message header exceeds the maximum size of 102400 bytes"
    assert slowest < 1.0
    assert incoming(relay) == [] and queued(relay) == []


def test_more_received_headers_than_the_limit_is_refused_as_a_loop(relay: RelayFiles) -> None:
    def message(hops: int) -> bytes:
        trace = b"".join(b"Received: from hop%d.test by hop%d.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                         % (i, i + 1) for i in range(hops))
        return trace + b"From: billing@acme.example\r\nSubject: loop\r\n\r\nbody\r\n"

    with connect(relay, login=ACME) as client:
        client.mail(SENDER)
        client.rcpt(RCPT)
        code, text = client.data(message(51))
        assert code == 554 and text.startswith(b"5.4.6 Too many Received: headers (51, more than 50)")
        client.mail(SENDER)
        client.rcpt(RCPT)
        assert client.data(message(50))[0] == 250


def drop_first_field(message: bytes, name: bytes) -> tuple[bytes, bytes]:
    """(the first field, folded lines included; the message without it), asserting it starts the message."""
    assert message.startswith(name + b": ")
    match = re.match(rb"[^\r]*\r\n(?:[ \t][^\r]*\r\n)*", message)
    assert match is not None
    return match.group(0), message[match.end():]


def test_trace_fields_reach_the_upstream_and_the_original_bytes_are_otherwise_identical(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    upstream = upstreams(users={"relay": "up-pw"})
    write_files(relay_files, upstream_port=upstream.port)
    original = (b"From: Billing <billing@acme.example>\r\nTo: client@customer.test\r\n"
                b"Subject: =?utf-8?q?r=C3=A9sum=C3=A9?=\r\nX-Folded: one\r\n two\r\n\r\n"
                b"Body line 1\r\n.leading dot\r\n\r\nlast\r\n")
    with_ids = b"Date: Mon, 30 Nov 2026 09:00:00 +0100\r\nMessage-ID: <kept@app.test>\r\n" + original
    with RelayThread(relay_files.config):
        with connect(relay_files, login=ACME) as client:
            ids = []
            for message, rcpts in ((original, [RCPT]), (with_ids, [RCPT, "other@customer.test"])):
                client.mail(SENDER)
                for rcpt in rcpts:
                    client.rcpt(rcpt)
                code, text = client.data(message)
                assert code == 250, text
                ids.append(text.decode().rsplit("id=", 1)[1])
        first, second = sorted(upstream.wait_for_messages(2), key=lambda m: len(m.rcpt_tos))

    received, rest = drop_first_field(first.data, b"Received")
    assert re.fullmatch(
        rb"Received: from app\.test \(\[127\.0\.0\.1\]\)\r\n\tby relay\.test \(relayd\) with ESMTPSA \(TLSv1\.[23]\)\r\n"
        rb"\tid " + ids[0].encode() + rb"\r\n\tfor <client@customer\.test>;\r\n"
        rb"\t\w{3}, \d{2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n", received), received
    head, _, body = rest.partition(b"\r\n\r\n")
    added = re.search(rb"\r\nDate: [^\r]+\r\nMessage-ID: <E" + ids[0].encode() + rb"@relay\.test>\Z", head)
    assert added is not None, head
    assert head[: added.start()] + b"\r\n\r\n" + body == original

    received, rest = drop_first_field(second.data, b"Received")
    assert b"\tfor <" not in received  # two recipients: neither is disclosed
    assert b"id " + ids[1].encode() + b";" in received
    assert rest == with_ids


def test_data_sessions_take_turns_so_a_loop_round_checks_at_most_the_slot_count() -> None:
    from collections import Counter

    from relayd.smtp.intake import DataTurns

    async def scenario() -> Counter[int]:
        loop = asyncio.get_running_loop()
        rounds = 0

        def tick() -> None:  # runs once per loop round
            nonlocal rounds
            rounds += 1
            loop.call_soon(tick)

        loop.call_soon(tick)
        turns = DataTurns(2)
        seen: Counter[int] = Counter()

        async def session() -> None:
            for _ in range(5):
                async with turns:
                    seen[rounds] += 1

        await asyncio.gather(*(session() for _ in range(10)))
        return seen

    seen = run_on_test_loop(scenario())
    assert sum(seen.values()) == 50
    assert max(seen.values()) <= 2


def test_a_session_timed_out_mid_data_leaves_no_partial_file(relay_files: RelayFiles) -> None:
    # On the default asyncio loop: the 421 on timeout depends on the listener's
    # close path, which on uvloop is the subject of a separate fix. The session
    # ends when the TLS connection is closed; then its partial file goes.
    write_files(relay_files, listener_extra="data_timeout: 1s")
    with RelayThread(relay_files.config):
        client = open_data(relay_files)
        client.sock.sendall(HEAD + LINE * 20_000)
        wait_until(lambda: any(p.stat().st_size > 1_000_000 for p in incoming(relay_files)))
        assert client.getreply()[0] == 421  # nothing more sent: the data timeout fires
        client.close()
        wait_until(lambda: incoming(relay_files) == [])
        assert queued(relay_files) == []
