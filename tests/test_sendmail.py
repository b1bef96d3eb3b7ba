"""relayd-sendmail, run as the installed console script against a real relayd on loopback.

The relay's tenant `cron` is bound to 127.0.0.2 and routes everything to the
capture transport, so each test reads back exactly what relayd queued and
delivered: envelope (Return-Path, X-Relayd-Envelope-To) and message.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import trustme

from relayd.ops.sendmail import Stage, exit_for_reply
from relayd.ops.sendmailargs import Exit, Options, parse_arguments
from relayd.ops.sendmailmsg import build_submission, cut_at_lone_dot, split_header
from tests.relayenv import RelayFiles, RelayThread, TenantSpec, captured, free_port

SENDMAIL = Path(sys.executable).parent / "relayd-sendmail"
CRON = TenantSpec(
    name="cron",
    password="unused-because-bound",
    senders=["*@relay.test", "*@ops.test"],
    routes=[(["*"], ["capture"])],
    bind_addresses=["127.0.0.2"],
)


def sendmail(files: RelayFiles, args: Sequence[str], message: bytes, *, config: Path | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    if not SENDMAIL.exists():
        pytest.fail(f"{SENDMAIL} is missing: install the package (`.venv/bin/pip install -e .`)")
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    return subprocess.run(
        [str(SENDMAIL), "--config", str(config or files.config), *args],
        input=message, capture_output=True, timeout=timeout, env=env,
    )


def envelope_of(raw: bytes) -> tuple[str, list[str]]:
    lines = raw.split(b"\r\n")
    sender = lines[0].decode().removeprefix("Return-Path: <").removesuffix(">")
    rcpts = [ln.decode()[len("X-Relayd-Envelope-To: <"):-1] for ln in lines[1:]
             if ln.startswith(b"X-Relayd-Envelope-To:")]
    return sender, rcpts


def message_of(raw: bytes) -> bytes:
    """The message as relayd queued it, without the capture transport's envelope lines."""
    lines = raw.split(b"\r\n")
    skip = sum(1 for ln in lines if ln.startswith((b"Return-Path:", b"X-Relayd-Envelope-To:")))
    return b"\r\n".join(lines[skip:])


@pytest.fixture
def relay(relay_files: RelayFiles) -> Iterator[RelayFiles]:
    relay_files.write(upstreams=[], tenants=[CRON], capture=True)
    with RelayThread(relay_files.config):
        yield relay_files


# ------------------------------------------------------------------ end to end


def test_dash_t_delivers_to_to_cc_and_bcc_and_strips_bcc(relay: RelayFiles) -> None:
    message = (b"From: Cron <cron@relay.test>\n"
               b"To: a@customer.test, \"B\" <b@customer.test>\n"
               b"Cc: c@customer.test\n"
               b"Bcc: secret@customer.test,\n hidden@customer.test\n"
               b"Subject: nightly\n\nAll good.\n")
    result = sendmail(relay, ["-t", "-i"], message)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    raw, = captured(relay)
    sender, rcpts = envelope_of(raw)
    assert sender == "cron@relay.test"
    assert sorted(rcpts) == sorted(["a@customer.test", "b@customer.test", "c@customer.test",
                                    "secret@customer.test", "hidden@customer.test"])
    submitted = message_of(raw)
    assert b"Bcc" not in submitted and b"secret@" not in submitted and b"hidden@" not in submitted
    trace, _, rest = submitted.partition(b"\r\nFrom: ")
    assert trace.startswith(b"Received: from relay.test ([127.0.0.2])\r\n\tby relay.test (relayd)")
    assert (b"From: " + rest).startswith(b"From: Cron <cron@relay.test>\r\nTo: a@customer.test,")


def test_recipients_as_arguments_and_local_names_are_qualified(relay: RelayFiles) -> None:
    message = b"From: cron@relay.test\nSubject: args\n\nbody\n"
    result = sendmail(relay, ["x@customer.test,y@customer.test", "root"], message)
    assert result.returncode == 0, result.stderr
    _, rcpts = envelope_of(captured(relay)[0])
    assert rcpts == ["x@customer.test", "y@customer.test", "root@relay.test"]


def test_dash_f_sets_the_envelope_sender(relay: RelayFiles) -> None:
    message = b"From: Reports <reports@ops.test>\nSubject: f\n\nbody\n"
    result = sendmail(relay, ["-f", "bounces@ops.test", "to@customer.test"], message)
    assert result.returncode == 0, result.stderr
    sender, _ = envelope_of(captured(relay)[0])
    assert sender == "bounces@ops.test"


def test_missing_from_date_and_message_id_are_added_with_the_full_name(relay: RelayFiles) -> None:
    result = sendmail(relay, ["-F", "Backup Job", "-fbackup@ops.test", "to@customer.test"],
                      b"Subject: backup done\n\n42 files.\n")
    assert result.returncode == 0, result.stderr
    raw = captured(relay)[0]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "Backup Job <backup@ops.test>"
    assert msg["Date"] is not None and msg["Date"].datetime is not None
    assert msg["Message-ID"].endswith("@relay.test>")
    assert msg["Subject"] == "backup done"
    assert raw.endswith(b"\r\n\r\n42 files.\r\n")


def test_without_any_sender_the_local_user_at_hostname_is_used(relay: RelayFiles) -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    result = sendmail(relay, ["to@customer.test"], b"Subject: who\n\nme\n")
    assert result.returncode == 0, result.stderr
    raw = captured(relay)[0]
    sender, _ = envelope_of(raw)
    assert sender == f"{user}@relay.test"
    assert f"From: {user}@relay.test\r\n".encode() in raw


def test_dash_i_keeps_a_lone_dot_line_as_content(relay: RelayFiles) -> None:
    message = b"From: cron@relay.test\nSubject: dots\n\nbefore\n.\nafter\n"
    assert sendmail(relay, ["-i", "to@customer.test"], message).returncode == 0
    assert b"\r\nbefore\r\n.\r\nafter\r\n" in captured(relay)[0]


def test_without_dash_i_a_lone_dot_ends_the_message(relay: RelayFiles) -> None:
    message = b"From: cron@relay.test\nSubject: dots\n\nbefore\n.\nnot part of it\n"
    assert sendmail(relay, ["to@customer.test"], message).returncode == 0
    raw = captured(relay)[0]
    assert raw.endswith(b"\r\nbefore\r\n") and b"not part of it" not in raw


def test_bare_lf_input_is_normalised_to_crlf(relay: RelayFiles) -> None:
    message = b"From: cron@relay.test\nSubject: lf\n\none\ntwo\rthree\n"
    assert sendmail(relay, ["-i", "to@customer.test"], message).returncode == 0
    raw = captured(relay)[0]
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert body == b"one\r\ntwo\r\nthree\r\n"
    assert raw.count(b"\n") == raw.count(b"\r\n")


def test_sender_not_allowed_for_the_tenant_exits_77_and_nothing_is_queued(relay: RelayFiles) -> None:
    result = sendmail(relay, ["-f", "ceo@elsewhere.test", "to@customer.test"], b"Subject: x\n\ny\n")
    assert result.returncode == 77
    line = result.stderr.decode()
    assert line.startswith("relayd-sendmail: relayd refused the sender <ceo@elsewhere.test> (tenant cron): 550 5.7.1")
    assert "not sent" in line and line.count("\n") == 1
    assert not (relay.root / "capture" / "new").exists() or not any((relay.root / "capture" / "new").iterdir())


def test_header_from_not_allowed_exits_77(relay: RelayFiles) -> None:
    result = sendmail(relay, ["-f", "cron@relay.test", "to@customer.test"],
                      b"From: someone@elsewhere.test\nSubject: x\n\ny\n")
    assert result.returncode == Exit.NOPERM, result.stderr
    assert b"Header From: <someone@elsewhere.test>" in result.stderr


def test_a_refused_recipient_exits_67_and_nobody_gets_the_message(relay_files: RelayFiles) -> None:
    tenant = TenantSpec(name="cron", password="x", senders=["*@relay.test"],
                        routes=[(["customer.test"], ["capture"])], bind_addresses=["127.0.0.2"])
    relay_files.write(upstreams=[], tenants=[tenant], capture=True)
    with RelayThread(relay_files.config):
        result = sendmail(relay_files, ["ok@customer.test", "no@other.example"],
                          b"From: cron@relay.test\n\nx\n")
        assert result.returncode == 67
        assert b"<no@other.example>: 550 5.7.1" in result.stderr
        assert b"not sent to anyone" in result.stderr
        time.sleep(0.5)
    assert "<=" not in relay_files.mainlog()


def test_help_names_every_option_in_its_usage_line() -> None:
    run = subprocess.run([sys.executable, "-m", "relayd.ops.sendmail", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    usage = run.stdout.split("\nReads one message")[0]
    for option in ("-t", "-i", "-f", "-F", "-v", "--socket", "--config"):
        assert f"[{option}" in usage, usage


def test_unreachable_relayd_exits_75_with_one_clear_line(relay_files: RelayFiles) -> None:
    relay_files.write(upstreams=[], tenants=[CRON], capture=True)  # nothing listens on its port
    result = sendmail(relay_files, ["to@customer.test"], b"From: cron@relay.test\n\nx\n")
    assert result.returncode == 75
    assert result.stderr.decode() == (
        f"relayd-sendmail: cannot reach relayd at 127.0.0.1:{relay_files.port}: connection refused; "
        "the message was not sent (exit 75: cron/PHP will retry or report)\n"
    )


def test_no_unix_listener_and_no_bound_tenant_exits_78_naming_the_unix_listener(relay_files: RelayFiles) -> None:
    tenant = TenantSpec(name="app", password="x", senders=["*@relay.test"], routes=[(["*"], ["capture"])])
    relay_files.write(upstreams=[], tenants=[tenant], capture=True)
    result = sendmail(relay_files, ["to@customer.test"], b"x\n")
    assert result.returncode == 78
    assert b"has no unix listener, so relayd cannot tell who local mail is from" in result.stderr
    assert b"local_users" in result.stderr


def test_plain_listener_is_used_without_tls(relay_files: RelayFiles) -> None:
    relay_files.write(upstreams=[], tenants=[CRON], capture=True, listener_extra="tls: none")
    with RelayThread(relay_files.config):
        result = sendmail(relay_files, ["-v", "to@customer.test"], b"From: cron@relay.test\n\nplain\n")
        assert result.returncode == 0, result.stderr
        assert b"from 127.0.0.2 (tenant cron)" in result.stderr and b"queued: 250 2.0.0 OK id=" in result.stderr
        assert captured(relay_files)[0].endswith(b"\r\nplain\r\n")
    assert "P=esmtp " in relay_files.mainlog()


def test_a_listener_certificate_other_than_the_configured_one_is_refused(
    relay: RelayFiles, ca: trustme.CA, tmp_path: Path
) -> None:
    other = ca.issue_cert("127.0.0.1")
    trusted = tmp_path / "other.pem"  # another leaf from the same CA, plus the CA: the chain checks out
    trusted.write_bytes(other.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())
    config = tmp_path / "sendmail.yaml"
    config.write_text(relay.config.read_text().replace(f"cert: {relay.root / 'cert.pem'}", f"cert: {trusted}"))
    result = sendmail(relay, ["to@customer.test"], b"From: cron@relay.test\n\nx\n", config=config)
    assert result.returncode == Exit.TEMPFAIL, result.stderr
    assert b"presented a certificate other than" in result.stderr


def test_too_big_for_the_tenant_exits_65_before_connecting(relay_files: RelayFiles) -> None:
    tenant = TenantSpec(name="cron", password="x", senders=["*@relay.test"], routes=[(["*"], ["capture"])],
                        bind_addresses=["127.0.0.2"], extra="max_message_size: 1K")
    relay_files.write(upstreams=[], tenants=[tenant], capture=True)
    result = sendmail(relay_files, ["-i", "to@customer.test"], b"From: cron@relay.test\n\n" + b"x" * 70 * 40)
    assert result.returncode == 65
    assert b"larger than relayd accepts (1024 bytes)" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-bs"], b"-bs: SMTP on standard input is not supported"),
        (["-bp"], b"relayctl queue list"),
        (["-q"], b"relayctl queue flush"),
        (["-bt"], b"-bt: unsupported mode"),
        (["-oXyz", "a@b.test"], b"-oXyz: unsupported option"),
        (["-Z"], b"-Z: unknown option"),
        (["-t", "-i"], b"no recipients"),
    ],
)
def test_unsupported_modes_and_bad_usage_exit_64(relay: RelayFiles, args: list[str], needle: bytes) -> None:
    result = sendmail(relay, args, b"Subject: none\n\n")
    assert result.returncode == 64
    assert needle in result.stderr


def test_unreadable_config_exits_78(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    result = subprocess.run([str(SENDMAIL), "--config", str(missing), "a@b.test"], input=b"x",
                            capture_output=True, timeout=30)
    assert result.returncode == Exit.CONFIG
    assert result.stderr.startswith(f"relayd-sendmail: {missing}:".encode())


def test_relayd_config_environment_variable_is_honoured(relay: RelayFiles) -> None:
    env = dict(os.environ, RELAYD_CONFIG=str(relay.config))
    result = subprocess.run([str(SENDMAIL), "-oi", "-odi", "-oem", "to@customer.test"],
                            input=b"From: cron@relay.test\n\nenv\n", capture_output=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert captured(relay)[0].endswith(b"\r\nenv\r\n")


def test_implicit_tls_listener_is_used_with_the_pinned_certificate(relay_files: RelayFiles) -> None:
    relay_files.write(upstreams=[], tenants=[CRON], capture=True, listener_extra="tls: implicit")
    with RelayThread(relay_files.config):
        result = sendmail(relay_files, ["-v", "to@customer.test"], b"From: cron@relay.test\n\nimplicit\n")
        assert result.returncode == 0, result.stderr
        assert b"TLSv1.3 with the certificate from" in result.stderr
        assert captured(relay_files)[0].endswith(b"\r\nimplicit\r\n")


def test_a_user_who_cannot_read_relay_yaml_uses_the_default_socket(relay_files: RelayFiles) -> None:
    """relay.yaml holds every tenant's password hash: local users submit over the socket instead."""
    relay_files.write(upstreams=[], tenants=[CRON], capture=True)
    os.chmod(relay_files.config, 0o600)
    command = [str(SENDMAIL), "--config", str(relay_files.config), "to@customer.test"]
    if os.geteuid() == 0:  # root reads anything: ask as the unprivileged user nobody
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to drop root for this test"
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    else:
        os.chmod(relay_files.config, 0o000)
    result = subprocess.run(command, input=b"x\n", capture_output=True, timeout=30)
    assert result.returncode == 75, result.stderr
    assert b"cannot reach relayd at /run/relayd/submit.sock" in result.stderr
    assert b"setfacl" not in result.stderr


def test_port_nobody_listens_on_is_reported_even_with_tls_none(relay_files: RelayFiles) -> None:
    relay_files.port = free_port()
    relay_files.write(upstreams=[], tenants=[CRON], capture=True, listener_extra="tls: none")
    result = sendmail(relay_files, ["to@customer.test"], b"x\n")
    assert result.returncode == 75 and b"connection refused" in result.stderr


# ------------------------------------------------------------------ pure parts


def test_flags_bundle_like_getopt() -> None:
    opts = parse_arguments(["-ti", "-fme@ops.test", "-F", "Me", "-oi", "-odb", "-oem", "-B", "8BITMIME",
                            "--", "-weird@x.test"])
    assert opts == Options(extract_recipients=True, dot_ends_input=False, sender="me@ops.test",
                           full_name="Me", recipients=("-weird@x.test",))
    assert parse_arguments(["-r", "a@b.test", "-bm", "x@y.test"]).sender == "a@b.test"
    assert parse_arguments(["-C/etc/r.yaml", "x@y.test"]).config == Path("/etc/r.yaml")


def test_exit_codes_follow_the_stage_and_the_enhanced_code() -> None:
    assert exit_for_reply(Stage.MAIL, 451, "4.3.0 later") is Exit.TEMPFAIL
    assert exit_for_reply(Stage.RCPT, 550, "5.7.1 no route") is Exit.NOUSER
    assert exit_for_reply(Stage.MAIL, 550, "5.7.1 Sender not allowed") is Exit.NOPERM
    assert exit_for_reply(Stage.MAIL, 553, "5.1.3 Malformed address") is Exit.DATAERR
    assert exit_for_reply(Stage.DATA, 554, "5.6.0 NUL") is Exit.DATAERR
    assert exit_for_reply(Stage.DATA, 552, "5.3.4 too big") is Exit.DATAERR
    assert exit_for_reply(Stage.MAIL, 530, "5.7.0 Authentication required") is Exit.CONFIG
    assert exit_for_reply(Stage.DATA, 554, "5.0.0 no") is Exit.UNAVAILABLE
    assert exit_for_reply(Stage.MAIL, 354, "") is Exit.PROTOCOL


def test_a_message_without_header_is_all_body() -> None:
    assert split_header(b"hello: world is not\r\nthis\r\n")[1] == b"this\r\n"
    assert split_header(b"just text\r\n") == ([], b"just text\r\n")
    assert split_header(b"From joe Mon Jan 1\r\nSubject: s\r\n\r\nb\r\n") == ([b"Subject: s\r\n"], b"b\r\n")


def test_lone_dot_cut_handles_every_line_end() -> None:
    assert cut_at_lone_dot(b"a\n.\nb") == b"a\n"
    assert cut_at_lone_dot(b"a\r\n.\r\nb") == b"a\r\n"
    assert cut_at_lone_dot(b"a\n.") == b"a\n"
    assert cut_at_lone_dot(b".\n") == b""
    assert cut_at_lone_dot(b"a\n..\nb") == b"a\n..\nb"


def test_submission_drops_bcc_without_dash_t_too() -> None:
    sub = build_submission(b"Bcc: x@y.test\nFrom: a@h.test\n\nb\n", Options(recipients=("r@y.test",)),
                           local_sender="u@h.test", hostname="h.test", now=0.0, message_id="<1@h.test>")
    assert sub.recipients == ("r@y.test",) and sub.sender == "a@h.test"
    assert sub.message.startswith(b"From: a@h.test\r\nDate: ") and b"Bcc" not in sub.message
