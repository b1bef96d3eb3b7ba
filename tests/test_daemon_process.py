"""relayd as a real process: crash safety, reload and shutdown signals."""

from __future__ import annotations

import concurrent.futures
import email
import signal
import smtplib
import time
from typing import Any, Callable

from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, connect, make_message, submit

ACME = ("acme", "acme-relay-password")


def one_upstream(files: RelayFiles, upstreams: Callable[..., Any], *, retry: str = "F,1m,1s") -> Any:
    gmail = upstreams(users={"acme@gmail.com": "acme-app-password"})
    files.write(
        upstreams=[UpstreamSpec("gmail_acme", gmail.port, "acme-gmail", "acme@gmail.com", "acme-app-password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme"])])],
        retry=retry,
    )
    return gmail


def message_ids(messages: list[Any]) -> set[str]:
    return {str(email.message_from_bytes(m.data)["Message-ID"]) for m in messages}


def test_kill_9_right_after_250_loses_no_message(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.refuse_connections()  # nothing leaves before the crash: everything must come from the spool
    accepted: list[str] = []
    with RelaydProcess(relay_files) as relayd:

        def send(i: int) -> str:
            msg = make_message("billing@acme.example", [f"r{i}@customer.test"], subject=f"crash {i}")
            submit(relay_files, ACME, "billing@acme.example", [f"r{i}@customer.test"], msg)
            return str(email.message_from_bytes(msg)["Message-ID"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            accepted = list(pool.map(send, range(24)))
        relayd.kill()  # SIGKILL immediately after the last 250
    gmail.accept_connections()
    with RelaydProcess(relay_files):
        delivered = gmail.wait_for_messages(len(accepted), timeout=30)
    assert set(accepted) <= message_ids(delivered)


def test_kill_9_during_deliveries_delivers_everything_at_least_once(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    with RelaydProcess(relay_files) as relayd:
        accepted = []
        for i in range(15):
            msg = make_message("billing@acme.example", [f"r{i}@customer.test"], subject=f"race {i}")
            submit(relay_files, ACME, "billing@acme.example", [f"r{i}@customer.test"], msg)
            accepted.append(str(email.message_from_bytes(msg)["Message-ID"]))
        relayd.kill()
    with RelaydProcess(relay_files):
        deadline = time.monotonic() + 30
        while not set(accepted) <= message_ids(gmail.messages) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert set(accepted) <= message_ids(gmail.messages)


def test_sighup_with_a_broken_yaml_keeps_the_running_config(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    good = relay_files.config.read_text()
    with RelaydProcess(relay_files) as relayd:
        broken = good.replace("tenants:\n", "tenants:\n  broken: [unclosed\n", 1)
        relay_files.config.write_text(broken)
        relayd.signal(signal.SIGHUP)
        log = relay_files.wait_for_log("reload failed")
        assert "relay.yaml:" in log  # the error names the file and line
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        gmail.wait_for_messages(1)
        # a valid change is taken: a new tenant can log in after the next SIGHUP
        relay_files.config.write_text(good.replace("@acme.example\"]", "@acme.example\", \"*@acme-eu.example\"]"))
        relayd.signal(signal.SIGHUP)
        relay_files.wait_for_log("configuration reloaded")
        submit(relay_files, ACME, "ops@acme-eu.example", ["client@customer.test"])
        gmail.wait_for_messages(2)
        assert relayd.stop() == 0


def test_sigterm_stops_cleanly_with_exit_0_and_keeps_the_queue(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.refuse_connections()
    with RelaydProcess(relay_files) as relayd:
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        assert relayd.stop() == 0
    assert "relayd stopped" in relay_files.mainlog()
    gmail.accept_connections()
    with RelaydProcess(relay_files):
        (msg,) = gmail.wait_for_messages(1, timeout=20)
    assert msg.rcpt_tos == ["client@customer.test"]


def test_nothing_secret_reaches_the_log_or_the_terminal(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = one_upstream(relay_files, upstreams)
    gmail.reply_to("AUTH", "535 5.7.8 Username and Password not accepted")
    with RelaydProcess(relay_files) as relayd:
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        with connect(relay_files) as client:
            try:
                client.login("acme", "a-wrong-guess-password")
            except smtplib.SMTPAuthenticationError:
                pass
        relay_files.wait_for_log("== client@customer.test")
        assert relayd.stop() == 0
    everything = relay_files.mainlog().encode() + relayd.output
    for secret in (b"acme-app-password", ACME[1].encode(), b"a-wrong-guess-password"):
        assert secret not in everything
    assert b"535" in everything
