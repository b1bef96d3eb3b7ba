"""The main log: golden Exim-shaped lines, escaping of hostile input, the file itself."""

from __future__ import annotations

import io
import os
import smtplib
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from relayd.observe.mainlog import (
    MAX_FIELD,
    MainLog,
    format_delivered,
    format_timestamp,
    sanitize,
)
from relayd.values import (
    AttemptOutcome,
    DeliveryReport,
    Envelope,
    QueueEntry,
    Recipient,
    SmtpReply,
)

T0 = 1767268800.0  # 2026-01-01 12:00:00 UTC
QID = "1abc-000001"


def fixed_clock() -> float:
    return T0


def log_to_buffer() -> tuple[MainLog, io.StringIO]:
    buf = io.StringIO()
    return MainLog(None, clock=fixed_clock, stream=buf, utc=True), buf


def entry(sender: str = "app@acme.test", helo_id: str = "<booking-42@acme.test>") -> QueueEntry:
    env = Envelope(
        id=QID,
        tenant="acme",
        sender=sender,
        recipients=("someone@gmail.com", "other@example.test"),
        received_at=T0,
        size=2048,
        header_message_id=helo_id,
    )
    return QueueEntry(env, tuple(Recipient(a) for a in env.recipients))


def gmail_report(**changes: object) -> DeliveryReport:
    fields: dict[str, object] = dict(
        address="someone@gmail.com",
        outcome=AttemptOutcome.DELIVERED,
        rule="acme",
        transport="gmail",
        host="smtp.gmail.com",
        ip="192.0.2.10",
        port=587,
        tls="TLS1.3",
        reply=SmtpReply(250, "2.0.0 OK  1767268800 a1-20020a"),
    )
    fields.update(changes)
    return DeliveryReport(**fields)  # type: ignore[arg-type]


def test_arrival_line_has_exims_token_order() -> None:
    log, buf = log_to_buffer()
    log.arrival(
        entry(),
        client_ip="127.0.0.1",
        client_port=40312,
        helo="app.local",
        protocol="esmtpsa",
        tls="TLS1.3",
        auth="acme",
    )
    assert buf.getvalue() == (
        "2026-01-01 12:00:00 1abc-000001 <= app@acme.test H=(app.local) [127.0.0.1]:40312 "
        "P=esmtpsa X=TLS1.3 A=acme S=2048 id=booking-42@acme.test "
        "for someone@gmail.com other@example.test\n"
    )


def test_arrival_of_a_bounce_shows_null_sender_and_omits_absent_fields() -> None:
    log, buf = log_to_buffer()
    log.arrival(
        entry(sender="", helo_id=""),
        client_ip="127.0.0.1",
        client_port=0,
        helo="",
        protocol="esmtp",
        tls=None,
        auth=None,
    )
    assert buf.getvalue() == (
        "2026-01-01 12:00:00 1abc-000001 <= <> H=[127.0.0.1] P=esmtp S=2048 "
        "for someone@gmail.com other@example.test\n"
    )


def test_delivery_line_matches_what_operators_grep_for() -> None:
    log, buf = log_to_buffer()
    log.delivered(QID, gmail_report(), first=True)
    log.delivered(QID, gmail_report(address="second@gmail.com"), first=False)
    assert buf.getvalue().splitlines() == [
        "2026-01-01 12:00:00 1abc-000001 => someone@gmail.com R=acme T=gmail "
        'H=smtp.gmail.com [192.0.2.10]:587 X=TLS1.3 C="250 2.0.0 OK  1767268800 a1-20020a"',
        "2026-01-01 12:00:00 1abc-000001 -> second@gmail.com R=acme T=gmail "
        'H=smtp.gmail.com [192.0.2.10]:587 X=TLS1.3 C="250 2.0.0 OK  1767268800 a1-20020a"',
    ]


def test_deferral_line_names_host_reason_and_next_try() -> None:
    log, buf = log_to_buffer()
    report = gmail_report(
        outcome=AttemptOutcome.DEFER,
        tls="",
        reply=SmtpReply(451, "4.7.1 Greylisted"),
        reason="SMTP error from remote mail server after RCPT TO: 451 4.7.1 Greylisted",
    )
    log.deferred(QID, report, next_attempt=T0 + 900)
    log.deferred(QID, gmail_report(host="", ip="", port=0, reason="Connection refused"),
                 next_attempt=None)
    assert buf.getvalue().splitlines() == [
        "2026-01-01 12:00:00 1abc-000001 == someone@gmail.com R=acme T=gmail defer (-1) "
        "H=smtp.gmail.com [192.0.2.10]:587: SMTP error from remote mail server after "
        "RCPT TO: 451 4.7.1 Greylisted (next try 2026-01-01 12:15:00)",
        "2026-01-01 12:00:00 1abc-000001 == someone@gmail.com R=acme T=gmail defer (-1): "
        "Connection refused",
    ]


def test_host_failed_line_for_a_transport_left_in_failover() -> None:
    log, buf = log_to_buffer()
    log.host_failed(
        QID, transport="gmail", host="smtp.gmail.com", ip="192.0.2.10", port=587,
        reason="Connection refused",
    )
    assert buf.getvalue() == (
        "2026-01-01 12:00:00 1abc-000001 H=smtp.gmail.com [192.0.2.10]:587 T=gmail: "
        "Connection refused\n"
    )


def test_failure_completion_and_bounce_lines() -> None:
    log, buf = log_to_buffer()
    failed = gmail_report(
        outcome=AttemptOutcome.FAIL,
        reply=SmtpReply(550, "5.1.1 No such user"),
        reason="SMTP error from remote mail server after RCPT TO:<someone@gmail.com>: "
        "550 5.1.1 No such user",
    )
    log.failed(QID, failed)
    log.bounce_created(QID, bounce_id="1abc-000002", sender="app@acme.test", size=1800)
    log.completed(QID)
    log.bounce_dropped("1abc-000002", gmail_report(
        address="app@acme.test", outcome=AttemptOutcome.FAIL, host="", ip="", port=0,
        reply=None, reason="retry timeout exceeded",
    ))
    assert buf.getvalue().splitlines() == [
        "2026-01-01 12:00:00 1abc-000001 ** someone@gmail.com R=acme T=gmail "
        "H=smtp.gmail.com [192.0.2.10]:587: SMTP error from remote mail server after "
        "RCPT TO:<someone@gmail.com>: 550 5.1.1 No such user",
        "2026-01-01 12:00:00 1abc-000002 <= <> R=1abc-000001 U=relayd P=local S=1800 "
        "for app@acme.test",
        "2026-01-01 12:00:00 1abc-000001 Completed",
        "2026-01-01 12:00:00 1abc-000002 ** app@acme.test R=acme T=gmail: "
        "retry timeout exceeded (null sender: bounce discarded)",
    ]


def test_rejection_and_auth_failure_lines() -> None:
    log, buf = log_to_buffer()
    log.rejected(
        client_ip="127.0.0.1", stage="RCPT", address="x@example.test",
        reply="550 5.7.1 Relaying denied", detail="tenant acme has no route for example.test",
    )
    log.rejected(client_ip="127.0.0.1", stage="MAIL", reply="530 5.7.0 Authentication required")
    log.auth_failed(client_ip="203.0.113.9", login="acme")
    log.auth_failed(client_ip="203.0.113.9", login=None, helo="bot", mechanism="PLAIN")
    assert buf.getvalue().splitlines() == [
        "2026-01-01 12:00:00 H=[127.0.0.1] rejected RCPT <x@example.test>: "
        "550 5.7.1 Relaying denied: tenant acme has no route for example.test",
        "2026-01-01 12:00:00 H=[127.0.0.1] rejected MAIL: 530 5.7.0 Authentication required",
        "2026-01-01 12:00:00 authenticator failed for ([203.0.113.9]) [203.0.113.9]: "
        "535 Incorrect authentication data (set_id=acme)",
        "2026-01-01 12:00:00 PLAIN authenticator failed for (bot) [203.0.113.9]: "
        "535 Incorrect authentication data",
    ]


def test_daemon_events() -> None:
    log, buf = log_to_buffer()
    log.info("relayd 0.1.0 daemon started: pid=1234")
    log.warning("transport gmail has no credentials")
    log.error("relay.yaml:3:5: unknown key 'prot'")
    assert buf.getvalue().splitlines() == [
        "2026-01-01 12:00:00 relayd 0.1.0 daemon started: pid=1234",
        "2026-01-01 12:00:00 warning: transport gmail has no credentials",
        "2026-01-01 12:00:00 error: relay.yaml:3:5: unknown key 'prot'",
    ]


def test_forged_log_line_in_a_helo_name_stays_on_one_line() -> None:
    log, buf = log_to_buffer()
    hostile = "x\r\n2026-01-01 00:00:00 fake => line"
    log.arrival(
        entry(), client_ip="127.0.0.1", client_port=1, helo=hostile, protocol="esmtp",
        tls=None, auth=None,
    )
    text = buf.getvalue()
    assert text.count("\n") == 1
    assert "H=(x\\r\\n2026-01-01 00:00:00 fake => line) [127.0.0.1]:1" in text


def test_upstream_reply_cannot_split_a_delivery_line() -> None:
    reply = SmtpReply(250, "OK\n2026-01-01 00:00:00 1abc-000009 => victim@x")
    line = format_delivered(QID, gmail_report(reply=reply), first=True)
    assert "\n" not in line
    assert 'C="250 OK\\n2026-01-01 00:00:00 1abc-000009 => victim@x"' in line


def test_sanitize_escapes_controls_and_unicode_separators() -> None:
    assert sanitize("a\tb\x00c\x1bd\x7fe") == "a\\tb\\x00c\\x1bd\\x7fe"
    assert sanitize("back\\slash") == "back\\\\slash"
    assert sanitize("para\u2029line\u2028nel\x85") == "para\\u2029line\\u2028nel\\x85"
    assert sanitize("bidi\u202eevil") == "bidi\\u202eevil"
    assert sanitize("lone \udce9 surrogate") == "lone \\udce9 surrogate"
    assert sanitize("josé@exemple.fr") == "josé@exemple.fr"


def test_long_fields_are_truncated() -> None:
    out = sanitize("a" * 10_000)
    assert out == "a" * MAX_FIELD + "..."
    escaped = sanitize("\n" * 10_000)
    assert len(escaped) <= MAX_FIELD + 3
    assert escaped.endswith("\\n...")


def test_timestamps_use_local_time_unless_utc() -> None:
    assert format_timestamp(T0, utc=True) == "2026-01-01 12:00:00"
    assert format_timestamp(T0, utc=False) == time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(T0)
    )


def test_log_file_is_created_0640_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "mainlog"
    path_log = MainLog(path, clock=fixed_clock, utc=True)
    path_log.completed(QID)
    path_log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    again = MainLog(path, clock=fixed_clock, utc=True)
    again.completed("1abc-000002")
    again.close()
    assert path.read_text() == (
        "2026-01-01 12:00:00 1abc-000001 Completed\n2026-01-01 12:00:00 1abc-000002 Completed\n"
    )


def test_each_line_reaches_the_file_before_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "mainlog"
    log = MainLog(path, clock=fixed_clock, utc=True)
    log.completed(QID)
    assert path.read_text() == "2026-01-01 12:00:00 1abc-000001 Completed\n"
    log.close()


def test_reopen_after_logrotate_writes_to_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "mainlog"
    log = MainLog(path, clock=fixed_clock, utc=True)
    log.completed("1abc-000001")
    path.rename(tmp_path / "mainlog.1")
    log.completed("1abc-000002")  # still the old, renamed file
    log.reopen()
    log.completed("1abc-000003")
    log.close()
    assert (tmp_path / "mainlog.1").read_text().count("Completed") == 2
    assert path.read_text() == "2026-01-01 12:00:00 1abc-000003 Completed\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "mainlog"
    log = MainLog(path, clock=fixed_clock, utc=True)

    def write(n: int) -> None:
        for i in range(200):
            log.completed(f"{n:04d}-{i:06d}-" + "x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 8 * 200
    assert all(ln.startswith("2026-01-01 12:00:00 ") and ln.endswith("x Completed") for ln in lines)


def test_write_error_is_counted_not_raised() -> None:
    class BrokenStream(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError(28, "No space left on device")

    log = MainLog(None, clock=fixed_clock, stream=BrokenStream(), utc=True)
    log.completed(QID)
    assert log.write_errors == 1


def test_a_throttled_login_is_logged_sanitised_and_without_a_password() -> None:
    from relayd.observe.mainlog import format_auth_throttled

    line = format_auth_throttled(client_ip="127.0.0.1", login="acme\r\n2026-01-01 fake line",
                                 reason="login locked after 10 failures", retry_after=60.4)
    assert line == ("H=[127.0.0.1] AUTH refused (set_id=acme\\r\\n2026-01-01 fake line): login locked after "
                    "10 failures; retry in 60s: 421 4.7.0 Too many failed authentication attempts")


# ------------------------------------------------------- a real relayd's log, read by Exim's tools

if TYPE_CHECKING:
    from tests.relayenv import RelayFiles

EXIMSTATS = Path(__file__).resolve().parent.parent / ".test-clients" / "exim" / "usr" / "sbin" / "eximstats"


def test_a_running_relayds_log_says_tls_and_logins_as_exim_and_eximstats_names_the_failover(
    relay_files: RelayFiles, upstreams: Callable[..., object]
) -> None:
    import re
    import shutil
    import subprocess

    import pytest

    from tests.relayenv import RelaydProcess, TenantSpec, UpstreamSpec, free_port, make_message

    live = upstreams(users={"relay@provider.test": "pw"})
    dead_port = free_port()  # nothing listens there: every connection is refused
    relay_files.write(
        upstreams=[UpstreamSpec("dead", dead_port, "dead", "relay@provider.test", "pw"),
                   UpstreamSpec("live", live.port, "live", "relay@provider.test", "pw")],
        tenants=[TenantSpec("acme", "acme-pw", ["*@acme.example"], [(["*"], ["dead", "live"])])],
    )
    with RelaydProcess(relay_files):
        for n, mechanism in enumerate(("PLAIN", "LOGIN")):
            with smtplib.SMTP("127.0.0.1", relay_files.port, timeout=30) as client:
                client.starttls(context=relay_files.client_context())
                client.ehlo("app.test")
                client.user, client.password = "acme", "acme-pw"
                code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
                assert code == 235
                client.sendmail("app@acme.example", [f"r{n}@customer.test"],
                                make_message("app@acme.example", [f"r{n}@customer.test"]))
        log = relay_files.wait_for_log("Completed", count=2, timeout=30)
    arrivals = [line for line in log.splitlines() if " <= " in line]
    assert " X=TLS1.3 A=plain:acme " in arrivals[0] and " X=TLS1.3 A=login:acme " in arrivals[1]
    deliveries = [line for line in log.splitlines() if " => " in line]
    assert len(deliveries) == 2 and all(" T=live " in d and " X=TLS1.3 " in d for d in deliveries)
    failover = f"H=127.0.0.1 [127.0.0.1]:{dead_port} T=dead: connect to 127.0.0.1 port {dead_port}: Connection refused"
    assert failover in log

    if not EXIMSTATS.exists() or shutil.which("perl") is None:
        pytest.skip(f"eximstats is not unpacked at {EXIMSTATS}; scripts/install-test-clients unpacks it")
    report = subprocess.run(["perl", str(EXIMSTATS), "-nt", "-t5", str(relay_files.root / "mainlog")],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert re.search(r"^\s+Received\s+\d+\s+2\s", report.stdout, re.M), report.stdout
    assert re.search(r"^\s+Delivered\s+\d+\s+2\s+2\s", report.stdout, re.M), report.stdout
    # eximstats files a host-failure line with "refused" under rejects, Exim's own lines
    # included; in Exim's shape it at least names the reason.
    reasons = report.stdout.partition("Mail rejection reason")[2]
    assert "Connection refused" in reasons and "Unknown" not in reasons
