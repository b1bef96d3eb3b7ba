"""Hostile and faulty clients: idle and slow clients, bad EHLO names, connection floods, error floods.

Every test drives relayd through real sockets on loopback, on uvloop (the
in-process relay through tests/conftest.py, the daemon tests as a real
`relayd` process).
"""

from __future__ import annotations

import base64
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import pytest

from tests.relayenv import (
    ACME, ROOT, RelaydProcess, RelayFiles, RelayThread, capture_files, captured, connect, make_message,
)


def raw_connect(files: RelayFiles, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", files.port), timeout=timeout, source_address=(source, 0))


def reply(reader: object) -> bytes:
    """One whole SMTP reply (the last line of a multi-line one)."""
    line: bytes = reader.readline()  # type: ignore[attr-defined]
    while line[3:4] == b"-":
        line = reader.readline()  # type: ignore[attr-defined]
    return line


def wait_closed(sock: socket.socket, within: float) -> list[bytes]:
    """The lines the server sends until it closes, failing if it stays open past `within`."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        raise AssertionError(f"still open after {within}s; got {data!r}") from None
    except ConnectionResetError:
        pass
    return data.splitlines()


def authenticated_tls(files: RelayFiles, source: str = "127.0.0.1") -> tuple[ssl.SSLSocket, object]:
    """EHLO, STARTTLS, EHLO, AUTH PLAIN over a raw socket; returns the TLS socket and its reader."""
    raw = raw_connect(files, source)
    reader = raw.makefile("rb")
    assert reader.readline().startswith(b"220")
    raw.sendall(b"EHLO app.test\r\n")
    reply(reader)
    raw.sendall(b"STARTTLS\r\n")
    assert reply(reader).startswith(b"220")
    tls = files.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    tls_reader = tls.makefile("rb")
    tls.sendall(b"EHLO app.test\r\n")
    reply(tls_reader)
    tls.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0acme\0" + ACME[1].encode()) + b"\r\n")
    assert reply(tls_reader).startswith(b"235")
    return tls, tls_reader


@pytest.fixture
def relay(relay_files: RelayFiles) -> Iterator[RelayFiles]:
    capture_files(relay_files)
    with RelayThread(relay_files.config):
        yield relay_files


# -- 1. idle clients ----------------------------------------------------------


def test_client_that_connects_and_never_sends_gets_421_and_is_closed(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="command_timeout: 1s")
    with RelayThread(relay_files.config), raw_connect(relay_files) as sock:
        started = time.monotonic()
        lines = wait_closed(sock, within=5)
        assert time.monotonic() - started < 3
    assert lines[0].startswith(b"220 ")
    assert lines[1].startswith(b"421 4.4.2 relay.test Timeout exceeded")


def test_client_that_stalls_before_starttls_gets_421_and_is_closed(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="command_timeout: 1s")
    with RelayThread(relay_files.config), raw_connect(relay_files) as sock:
        sock.sendall(b"EHLO app.test\r\n")
        lines = wait_closed(sock, within=5)
    assert lines[-2].startswith(b"250 ")  # the EHLO reply, then nothing from the client
    assert lines[-1].startswith(b"421 4.4.2")


def test_client_that_stalls_in_the_tls_handshake_is_disconnected(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="command_timeout: 1s")
    with RelayThread(relay_files.config), raw_connect(relay_files) as sock:
        sock.sendall(b"EHLO app.test\r\nSTARTTLS\r\n")
        started = time.monotonic()
        lines = wait_closed(sock, within=5)  # no 421 in clear text once TLS has begun
        assert time.monotonic() - started < 4
    assert lines[-1].startswith(b"220 2.0.0 Ready to start TLS")


def test_client_that_trickles_a_command_line_is_cut_off_at_the_command_timeout(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="command_timeout: 1s")
    with RelayThread(relay_files.config), raw_connect(relay_files) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        started = time.monotonic()
        for byte in b"EHLO a-very-slow-client.example":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert time.monotonic() - started < 2.5
        assert reader.readline().startswith(b"421 4.4.2")


def test_implicit_tls_client_that_never_starts_the_handshake_is_disconnected(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="tls: implicit\ncommand_timeout: 1s")
    with RelayThread(relay_files.config), raw_connect(relay_files) as sock:
        started = time.monotonic()
        assert wait_closed(sock, within=10) == []
        assert time.monotonic() - started < 3


def test_sigterm_tells_connected_clients_421_before_the_daemon_exits(relay_files: RelayFiles) -> None:
    capture_files(relay_files)
    with RelaydProcess(relay_files) as relayd:
        with raw_connect(relay_files) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            sock.sendall(b"EHLO app.test\r\n")
            reply(reader)
            relayd.signal(signal.SIGTERM)
            lines = wait_closed(sock, within=15)
        assert relayd.stop() == 0
    assert lines == [b"421 4.3.2 relay.test Service shutting down; try again later"]


# -- 2. slow clients inside DATA ------------------------------------------------


def start_data(files: RelayFiles) -> tuple[ssl.SSLSocket, object]:
    tls, reader = authenticated_tls(files)
    for command in (b"MAIL FROM:<billing@acme.example>", b"RCPT TO:<c@customer.test>", b"DATA"):
        tls.sendall(command + b"\r\n")
        assert reply(reader)[:1] in (b"2", b"3")
    return tls, reader


def trickle(sock: ssl.SSLSocket, pieces: list[bytes], interval: float) -> float:
    """Send one piece per interval until the server closes; how long it took to be cut off."""
    started = time.monotonic()
    for piece in pieces:
        try:
            sock.sendall(piece)
        except OSError:
            return time.monotonic() - started
        time.sleep(interval)
    return time.monotonic() - started


def test_one_byte_at_a_time_inside_a_line_is_cut_off_with_421(relay_files: RelayFiles) -> None:
    # Every byte comes well within data_timeout; the line never ends.
    capture_files(relay_files, listener_extra="data_timeout: 1s")
    with RelayThread(relay_files.config):
        tls, reader = start_data(relay_files)
        tls.sendall(b"Subject: slow\r\n\r\n")
        started = time.monotonic()
        trickle(tls, [b"x"] * 40, interval=0.1)
        answer = reply(reader)
        assert time.monotonic() - started < 3.5
        tls.close()
    assert answer.startswith(b"421 4.4.2 relay.test Message data arriving too slowly")
    assert "dropped: data timeout" in relay_files.mainlog()


def test_short_lines_below_the_minimum_data_rate_are_cut_off_with_421(relay_files: RelayFiles) -> None:
    # Each line ends in time, but 30 bytes/s is below the 200 bytes/s minimum.
    capture_files(relay_files, listener_extra="data_timeout: 1s\nmin_data_rate: 200")
    with RelayThread(relay_files.config):
        tls, reader = start_data(relay_files)
        started = time.monotonic()
        trickle(tls, [b"abc\r\n"] * 40, interval=0.1)
        answer = reply(reader)
        assert time.monotonic() - started < 3.5
        tls.close()
    assert answer.startswith(b"421 4.4.2")


def test_slow_but_steady_sender_is_not_cut_off(relay_files: RelayFiles) -> None:
    # 3 seconds of data at about 800 bytes/s, above min_data_rate 200, one line per 0.1s.
    capture_files(relay_files, listener_extra="data_timeout: 1s\nmin_data_rate: 200")
    with RelayThread(relay_files.config):
        tls, reader = start_data(relay_files)
        head = b"From: billing@acme.example\r\nTo: c@customer.test\r\nSubject: slow\r\n\r\n"
        assert trickle(tls, [head] + [b"y" * 78 + b"\r\n"] * 30, interval=0.1) >= 3
        tls.sendall(b".\r\n")
        answer = reply(reader)
        tls.close()
        assert answer.startswith(b"250 2.0.0 OK id=")
        assert len(captured(relay_files, 1)) == 1


# -- 3. EHLO / HELO names -------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [b"EHLO h\xe9llo.example", b"EHLO \xff\xfe", b"EHLO caf\xc3\xa9.example", b"EHLO a\x01b", b"HELO h\xe9llo"],
    ids=["latin1", "not-utf8", "utf8", "control", "helo-8bit"],
)
def test_ehlo_with_8bit_or_control_bytes_gets_501_and_the_name_is_not_kept(relay: RelayFiles, command: bytes) -> None:
    with raw_connect(relay) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(command + b"\r\n")
        answer = reply(reader)
        sock.sendall(b"MAIL FROM:<billing@acme.example>\r\n")
        after = reply(reader)
    assert answer.startswith(b"501 5.5.2 Invalid ")
    assert answer.isascii() and command.split(b" ", 1)[1] not in answer
    assert after.startswith(b"503")  # no EHLO name was kept: EHLO is still needed


# -- 5. connection limits ---------------------------------------------------------


def test_connections_over_max_connections_get_421_before_the_banner(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_connections: 5\nmax_connections_per_ip: 5")
    with RelayThread(relay_files.config), ExitStack() as stack:
        held = [stack.enter_context(connect(relay_files, login=ACME)) for _ in range(5)]  # logged in: never evicted
        with raw_connect(relay_files) as extra:
            lines = wait_closed(extra, within=5)
        assert lines == [b"421 4.7.0 relay.test Too many connections; try again later"]
        held.pop().quit()
        time.sleep(0.2)
        with raw_connect(relay_files) as again:
            assert again.makefile("rb").readline().startswith(b"220")
    assert "refused: too many connections (max_connections 5 on submission)" in relay_files.mainlog()


def test_a_full_listener_closes_its_longest_idle_unauthenticated_connection_for_a_new_client(
    relay_files: RelayFiles,
) -> None:
    capture_files(relay_files, listener_extra="max_connections: 10")
    with RelayThread(relay_files.config), ExitStack() as stack:
        idle = [stack.enter_context(raw_connect(relay_files)) for _ in range(10)]
        for sock in idle:
            assert sock.makefile("rb").readline().startswith(b"220")
            time.sleep(0.01)
        with connect(relay_files, login=ACME) as client:  # also from 127.0.0.1
            assert client.sendmail("billing@acme.example", ["c@customer.test"],
                                   make_message("billing@acme.example", ["c@customer.test"])) == {}
        assert wait_closed(idle[0], within=5) == [
            b"421 4.7.0 relay.test Too many connections; closing this idle unauthenticated one"]
        for sock in idle[1:]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(100)  # still open, nothing said
        assert len(captured(relay_files, 1)) == 1


def test_twelve_hundred_idle_connections_do_not_keep_a_legitimate_client_out_of_the_daemon(
    relay_files: RelayFiles,
) -> None:
    # The real daemon with the defaults (max_connections 1000, loopback held only
    # to the total) and 1200 open files: before the limits, the idle connections
    # used up every descriptor and the next client was never answered.
    capture_files(relay_files)
    proc = daemon_with_nofile(relay_files, 1200, 1200)
    try:
        wait_for_banner(relay_files, proc)
        with ExitStack() as stack:
            idle = [stack.enter_context(raw_connect(relay_files, timeout=5)) for _ in range(1200)]
            for sock in idle:
                assert sock.recv(4) == b"220 "
            started = time.monotonic()
            with connect(relay_files, login=ACME, timeout=5) as client:
                assert client.sendmail("billing@acme.example", ["c@customer.test"],
                                       make_message("billing@acme.example", ["c@customer.test"])) == {}
            took = time.monotonic() - started
            rss = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{proc.pid}/status").read_text())
            print(f"legitimate client served in {took:.3f}s beside 1,200 idle connections; "
                  f"relayd RSS {int(rss.group(1)) // 1024 if rss else '?'} MB")
            assert took < 1.0
        assert len(captured(relay_files, 1)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_idle_unauthenticated_connections_from_one_address_do_not_stop_another_client(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_connections_per_ip: 3\nper_ip_limit_on_loopback: true")
    with RelayThread(relay_files.config), ExitStack() as stack:
        flood = [stack.enter_context(raw_connect(relay_files, source="127.0.0.2")) for _ in range(30)]
        first_lines = [sock.makefile("rb").readline() for sock in flood]
        assert sum(line.startswith(b"220") for line in first_lines) == 3
        refused = [line for line in first_lines if not line.startswith(b"220")]
        assert refused and all(
            line == b"421 4.7.0 relay.test Too many connections from your address; try again later\r\n" for line in refused
        )
        with connect(relay_files, login=ACME) as client:  # from 127.0.0.1
            errors = client.sendmail("billing@acme.example", ["c@customer.test"],
                                     make_message("billing@acme.example", ["c@customer.test"]))
        assert errors == {}
        assert len(captured(relay_files, 1)) == 1


def test_loopback_clients_are_not_held_to_the_per_address_limit_by_default(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_connections: 8\nmax_connections_per_ip: 2")
    with RelayThread(relay_files.config), ExitStack() as stack:
        held = [stack.enter_context(raw_connect(relay_files)) for _ in range(8)]
        assert all(sock.makefile("rb").readline().startswith(b"220") for sock in held)


def test_a_flood_of_refused_connections_is_summarised_in_the_log(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_connections: 1\nmax_connections_per_ip: 1")
    with RelayThread(relay_files.config), connect(relay_files, login=ACME):
        for _ in range(200):
            with raw_connect(relay_files) as extra:
                assert wait_closed(extra, within=5)[0].startswith(b"421 4.7.0")
    log = relay_files.mainlog()
    assert log.count("refused: too many connections") == 10


def test_commands_before_auth_are_limited(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_commands_before_auth: 10")
    with RelayThread(relay_files.config), raw_connect(relay_files) as sock:
        sock.sendall(b"NOOP\r\n" * 1000)
        lines = wait_closed(sock, within=5)
    assert lines.count(b"250 2.0.0 OK") == 10
    assert lines[-1] == b"421 4.7.0 relay.test Too many commands before authentication; closing connection"
    assert "dropped: too many commands before authentication (10)" in relay_files.mainlog()


def test_an_authenticated_client_is_not_held_to_the_pre_auth_budget(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_commands_before_auth: 5")
    with RelayThread(relay_files.config):
        with connect(relay_files, login=ACME) as client:
            for i in range(12):
                assert client.noop()[0] == 250
            assert client.sendmail("billing@acme.example", ["c@customer.test"],
                                   make_message("billing@acme.example", ["c@customer.test"])) == {}


def daemon_with_nofile(files: RelayFiles, soft: int, hard: int) -> subprocess.Popen[bytes]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.Popen(
        [sys.executable, "-m", "relayd.daemon", "--config", str(files.config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit,
    )


def wait_for_banner(files: RelayFiles, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with raw_connect(files, timeout=1) as sock:
                if sock.recv(4) == b"220 ":
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("relayd did not start listening")


def test_daemon_refuses_to_start_when_max_connections_cannot_fit_in_its_file_limit(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_connections: 2000")
    proc = daemon_with_nofile(relay_files, 256, 256)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 78
    message = err.decode()
    assert "max_connections (submission 2000)" in message and "need 2128 open files" in message
    assert "the hard limit is 256" in message and "LimitNOFILE" in message


def test_daemon_raises_its_soft_file_limit_to_fit_max_connections(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_connections: 2000")
    proc = daemon_with_nofile(relay_files, 256, 8192)
    try:
        deadline = time.monotonic() + 20
        limits = ""
        while time.monotonic() < deadline and proc.poll() is None:
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            match = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
            if match and match.group(1) != "256":
                break
            time.sleep(0.05)
        assert re.search(r"Max open files\s+2128\s+8192", limits), limits
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


# -- 8. error floods ----------------------------------------------------------------


def test_fifty_thousand_bad_commands_end_at_the_error_limit_with_a_bounded_log(relay: RelayFiles) -> None:
    log_before = len(relay.mainlog())
    with raw_connect(relay) as sock:
        sock.sendall(b"EHLO app.test\r\n")
        sent = 0
        try:
            for _ in range(50):
                sock.sendall(b"MAIL FROM:<x@y.example>\r\n" * 1000)  # 530 each: no AUTH yet
                sent += 1000
        except OSError:
            pass  # the server closed while we were still sending
        lines = wait_closed(sock, within=10)
    refusals = [line for line in lines if line.startswith(b"530 ")]
    assert len(refusals) == 20  # the default hard_error_limit; then the 421
    assert lines[-1] == b"421 4.7.0 relay.test Too many errors; closing connection"
    grown = len(relay.mainlog()) - log_before
    assert grown < 4096, relay.mainlog()[log_before:]
    assert "rejection(s) not logged" in relay.mainlog()


def test_a_delivered_message_forgives_earlier_errors(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="hard_error_limit: 3")
    with RelayThread(relay_files.config):
        with connect(relay_files, login=ACME) as client:
            for _ in range(2):
                assert client.mail("ceo@globex.example")[0] == 550  # not acme's sender: an error
            assert client.sendmail("billing@acme.example", ["c@customer.test"],
                                   make_message("billing@acme.example", ["c@customer.test"])) == {}
            for _ in range(2):
                assert client.mail("ceo@globex.example")[0] == 550  # 4 errors, but only 2 since the message
            assert client.noop()[0] == 250
            assert client.mail("ceo@globex.example")[0] == 550
            assert client.noop() == (421, b"4.7.0 relay.test Too many errors; closing connection")


def test_recipients_over_the_message_limit_are_not_counted_as_errors(relay_files: RelayFiles) -> None:
    capture_files(relay_files, listener_extra="max_recipients: 3\nhard_error_limit: 5")
    with RelayThread(relay_files.config):
        recipients = [f"r{i}@customer.test" for i in range(30)]
        with connect(relay_files, login=ACME) as client:
            refused = client.sendmail("billing@acme.example", recipients,
                                      make_message("billing@acme.example", recipients[:3]))
            assert client.noop()[0] == 250
        assert sorted(refused) == sorted(recipients[3:])
        assert {code for code, _ in refused.values()} == {452}


# -- the sessions gauge: one count per connection, STARTTLS or not -----------------------------


def sessions_gauge(thread: RelayThread) -> float:
    text = thread.relay.metrics.render().decode()
    match = re.search(r"^relayd_smtp_sessions (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_sessions_gauge_counts_starttls_sessions_once_and_returns_to_zero(relay_files: RelayFiles) -> None:
    capture_files(relay_files)
    with RelayThread(relay_files.config) as thread:
        clients = [connect(relay_files, login=ACME) for _ in range(3)]
        assert sessions_gauge(thread) == 3
        for client in clients:
            client.quit()
        deadline = time.monotonic() + 5
        while sessions_gauge(thread) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions_gauge(thread) == 0


# -- the pure pieces ------------------------------------------------------------------


def test_listener_limits_are_read_from_the_yaml_and_default_when_absent(relay_files: RelayFiles) -> None:
    from relayd.config.loader import load_config

    capture_files(relay_files, listener_extra="max_connections: 300\nmax_connections_per_ip: 7\n"
                                              "per_ip_limit_on_loopback: true\nhard_error_limit: 5")
    listener = load_config(relay_files.config).listeners[0]
    assert (listener.max_connections, listener.max_connections_per_ip) == (300, 7)
    assert listener.per_ip_limit_on_loopback and listener.hard_error_limit == 5
    assert (listener.max_commands_before_auth, listener.min_data_rate) == (30, 500)


def test_data_deadline_credits_received_bytes_at_the_minimum_rate_up_to_the_size_limit() -> None:
    from relayd.smtp.sessionlimits import DataDeadline

    deadline = DataDeadline(started=0.0, line_timeout=10.0, min_rate=100.0, max_bytes=1000)
    assert deadline.seconds_left(0.0) == 10.0
    deadline.note(b"x" * 500 + b"\n", now=5.0)  # 5 s of credit; the next line began at 5.0
    assert deadline.seconds_left(5.0) == 10.0  # both the line and the whole deadline are at 15
    deadline.note(b"y" * 5000, now=9.0)  # beyond the size limit: credit stops at 1000 bytes
    assert deadline.whole_deadline() == 20.0
    assert deadline.seconds_left(15.0) == 0.0  # the unfinished line ran out first


def test_file_limit_is_raised_only_as_far_as_needed_and_refused_past_the_hard_limit(relay_files: RelayFiles) -> None:
    from relayd.config.loader import load_config
    from relayd.smtp.fdlimit import DescriptorLimitError, ensure_descriptor_limit, needed_descriptors

    capture_files(relay_files, listener_extra="max_connections: 500")
    config = load_config(relay_files.config)
    assert needed_descriptors(config) == 500 + 128
    calls: list[tuple[int, int]] = []
    limit = ensure_descriptor_limit(config, getrlimit=lambda _: (256, 4096),
                                    setrlimit=lambda _, v: calls.append(v))
    assert limit == 628 and calls == [(628, 4096)]
    assert ensure_descriptor_limit(config, getrlimit=lambda _: (1024, 4096), setrlimit=lambda _, v: calls.append(v)) == 1024
    assert len(calls) == 1
    with pytest.raises(DescriptorLimitError, match="need 628 open files, but the hard limit is 512"):
        ensure_descriptor_limit(config, getrlimit=lambda _: (256, 512), setrlimit=lambda _, v: None)
