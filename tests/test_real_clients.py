"""The clients people really use, against a real relayd process, checked at the upstream byte for byte.

Each client submits over STARTTLS with AUTH and verifies relayd's certificate
against the test CA (nodemailer, Python smtplib, swaks, msmtp); PHP's mail()
goes through relayd-sendmail, which submits from the local tenant's loopback
address over STARTTLS with relayd's certificate pinned. relayd forwards to a
fake upstream that requires STARTTLS and AUTH and whose certificate relayd
verifies; the message the upstream read must be exactly the one the client sent.

Postfix stands in for a real provider in the last test: relayd delivers to a
private Postfix instance (its own config and queue directories under a
temporary directory, 127.0.0.1 on a free port, no DNS) with STARTTLS and Cyrus
SASL (sasldb), which relays to a local capture server.

scripts/install-test-clients (run by `scripts/bootstrap test`) installs the
clients; a client that is not installed makes its test skip with the reason.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from tests.fakeupstream import FakeUpstream, ReceivedMessage
from tests.relayenv import ROOT, RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, free_port

CLIENTS = ROOT / ".test-clients"
NODE_MODULES = CLIENTS / "node_modules"
INSTALL_HINT = "scripts/install-test-clients (run by `scripts/bootstrap test` as root on Debian) installs it"
TENANT, TENANT_PASSWORD = "app", "app-password-4-real-clients"
LOCAL_TENANT, LOCAL_ADDRESS = "cron", "127.0.0.2"
UPSTREAM_USER, UPSTREAM_PASSWORD = "relay@provider.test", "provider secret 1234"
SENDER = "app@shop.example"

def without_relayd_trace(data: bytes) -> bytes:
    """The message minus the Received: field relayd prepends (its first header field)."""
    assert data.startswith(b"Received: from "), data[:200]
    lines = data.split(b"\r\n")
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    assert b"(relayd)" in b"\r\n".join(lines[:end]), data[:200]
    return b"\r\n".join(lines[end:])



def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed; {INSTALL_HINT}")
    return path


def message_for(client: str, recipient: str) -> bytes:
    """A complete message (From, To, Date, Message-ID), so no client adds a header of its own."""
    lines = [
        f"From: Shop <{SENDER}>",
        f"To: <{recipient}>",
        f"Subject: sent with {client}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <{time.time_ns()}.{client}@shop.example>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"Hello from {client}.",
        ".a line that starts with a dot stays one",
        "",
        "-- ",
        "shop",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def crlf(data: bytes) -> bytes:
    """Every line end as CRLF, as SMTP carries it."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Relay:
    """One relayd process in front of one fake upstream (STARTTLS + AUTH, verified)."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.upstream = FakeUpstream(ca=ca, users={UPSTREAM_USER: UPSTREAM_PASSWORD}).start()
        self.files = RelayFiles(root, ca)
        self.files.write(
            upstreams=[UpstreamSpec("provider", self.upstream.port, credential="provider",
                                    user=UPSTREAM_USER, password=UPSTREAM_PASSWORD)],
            tenants=[
                TenantSpec(TENANT, TENANT_PASSWORD, ["*@shop.example"], [(["*"], ["provider"])]),
                TenantSpec(LOCAL_TENANT, "unused-" + TENANT_PASSWORD, ["*"], [(["*"], ["provider"])],
                           bind_addresses=[LOCAL_ADDRESS]),
            ],
        )
        self.process = RelaydProcess(self.files)

    def received_for(self, recipient: str, timeout: float = 30) -> ReceivedMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.upstream.messages:
                if recipient in message.rcpt_tos:
                    return message
            time.sleep(0.05)
        raise AssertionError(f"the upstream got nothing for {recipient}; relayd's log:\n{self.files.mainlog()}")

    def check_delivered(self, recipient: str, sent: bytes) -> None:
        received = self.received_for(recipient)
        assert received.login == UPSTREAM_USER and received.tls
        assert without_relayd_trace(received.data) == sent

    def close(self) -> None:
        try:
            self.process.stop()
        finally:
            self.upstream.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Relay]:
    running = Relay(tmp_path_factory.mktemp("real-clients"), ca)
    try:
        yield running
    finally:
        running.close()


# ------------------------------------------------------------------ submission clients


def test_python_smtplib_with_starttls_auth_and_a_verified_certificate(relay: Relay) -> None:
    import smtplib
    import ssl

    recipient = "smtplib@example.net"
    sent = message_for("smtplib", recipient)
    with smtplib.SMTP("127.0.0.1", relay.files.port, timeout=30) as client:
        client.starttls(context=ssl.create_default_context(cafile=str(relay.files.ca_file)))
        client.login(TENANT, TENANT_PASSWORD)
        assert client.sendmail(SENDER, [recipient], sent) == {}
    relay.check_delivered(recipient, sent)


NODEMAILER_SCRIPT = r"""
const fs = require('fs');
const nodemailer = require('nodemailer');
const MailComposer = require('nodemailer/lib/mail-composer');
const [port, ca, recipient, messageId, out] = process.argv.slice(2);
const mail = {
  from: 'Shop <app@shop.example>', to: recipient, subject: 'sent with nodemailer',
  text: 'Hello from nodemailer.\n.a line that starts with a dot stays one\n',
  messageId: messageId, date: new Date('2026-12-01T12:00:00Z'),
};
const transporter = nodemailer.createTransport({
  host: '127.0.0.1', port: Number(port), secure: false, requireTLS: true,
  auth: { user: 'app', pass: process.env.SMTP_PASSWORD },
  tls: { ca: fs.readFileSync(ca) },
});
new MailComposer(mail).compile().build((err, built) => {
  if (err) { console.error(err.message); process.exit(1); }
  fs.writeFileSync(out, built);
  transporter.sendMail(mail).then(
    (info) => console.log(info.response),
    (e) => { console.error(e.message); process.exitCode = 1; },
  );
});
"""


def test_nodemailer_with_starttls_auth_and_a_verified_certificate(relay: Relay, tmp_path: Path) -> None:
    node = _need("node")
    if not (NODE_MODULES / "nodemailer").is_dir():
        pytest.skip(f"nodemailer is not installed in {NODE_MODULES}; {INSTALL_HINT}")
    recipient = "nodemailer@example.net"
    script, built = tmp_path / "send.js", tmp_path / "built.eml"
    script.write_text(NODEMAILER_SCRIPT)
    run = subprocess.run(
        [node, str(script), str(relay.files.port), str(relay.files.ca_file), recipient,
         f"<{time.time_ns()}.nodemailer@shop.example>", str(built)],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES), "SMTP_PASSWORD": TENANT_PASSWORD},
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("250 2.0.0 OK id=")
    # The composed message has the text's bare LFs; on the wire nodemailer sends CRLF.
    relay.check_delivered(recipient, crlf(built.read_bytes()))


def test_swaks_with_starttls_auth_and_a_verified_certificate(relay: Relay, tmp_path: Path) -> None:
    swaks = _need("swaks")
    recipient = "swaks@example.net"
    sent = message_for("swaks", recipient)
    data = tmp_path / "message.eml"
    data.write_bytes(sent.removesuffix(b"\r\n"))  # swaks ends the data with CRLF . CRLF itself
    run = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{relay.files.port}", "--tls", "--tls-verify",
         "--tls-ca-path", str(relay.files.ca_file), "--auth", "PLAIN", "--auth-user", TENANT,
         "--auth-password", TENANT_PASSWORD, "--from", SENDER, "--to", recipient,
         "--helo", "swaks.shop.example", "--data", f"@{data}"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    relay.check_delivered(recipient, sent)


def test_msmtp_with_starttls_auth_and_a_verified_certificate(relay: Relay, tmp_path: Path) -> None:
    msmtp = _need("msmtp")
    recipient = "msmtp@example.net"
    sent = message_for("msmtp", recipient)
    config = tmp_path / "msmtprc"
    config.write_text(
        "defaults\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {relay.files.ca_file}\n"
        "account relayd\n"
        f"host 127.0.0.1\nport {relay.files.port}\n"
        f"auth plain\nuser {TENANT}\npassword {TENANT_PASSWORD}\n"
        f"from {SENDER}\n"
        "account default : relayd\n"
    )
    config.chmod(0o600)
    run = subprocess.run([msmtp, "-C", str(config), "-t"], input=sent.replace(b"\r\n", b"\n"),
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    relay.check_delivered(recipient, sent)


PHP_SCRIPT = r"""<?php
$ok = mail($argv[1], 'sent with php', "Hello from PHP mail().\n.a line that starts with a dot stays one\n",
           "From: Shop <cron@shop.example>\r\nDate: " . date(DATE_RFC2822) .
           "\r\nMessage-ID: <" . hrtime(true) . ".php@shop.example>");
exit($ok ? 0 : 1);
"""


def test_php_mail_through_relayd_sendmail(relay: Relay, tmp_path: Path) -> None:
    php = _need("php")
    recipient = "php@example.net"
    script, handed = tmp_path / "send.php", tmp_path / "handed-to-sendmail.eml"
    script.write_text(PHP_SCRIPT)
    sendmail = Path(sys.executable).parent / "relayd-sendmail"
    # What PHP hands to sendmail is kept (tee) so the upstream's copy can be compared with it.
    sendmail_path = f"tee {handed} | {sendmail} -t -i"
    run = subprocess.run(
        [php, "-n", "-d", f'sendmail_path="{sendmail_path}"', str(script), recipient],
        env={**os.environ, "RELAYD_CONFIG": str(relay.files.config)},
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    received = relay.received_for(recipient)
    assert received.tls and received.login == UPSTREAM_USER
    assert received.mail_from == "cron@shop.example"
    assert f" A=bind:{LOCAL_TENANT} " in relay.files.mainlog()  # known by its address, not a login
    assert without_relayd_trace(received.data) == crlf(handed.read_bytes())


# ------------------------------------------------------------------ Postfix as the upstream

POSTFIX = Path("/usr/sbin/postfix")
POSTFIX_MASTER = Path("/usr/lib/postfix/sbin/master")
SASLPASSWD2 = Path("/usr/sbin/saslpasswd2")
POSTFIX_HOST = "postfix.test"
POSTFIX_USER, POSTFIX_PASSWORD = "relayd", "postfix sasl secret 5678"

_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixUpstream:
    """A private Postfix instance: STARTTLS + SASL on 127.0.0.1:port, relaying to `sink_port`.

    Its directories live in a fresh temporary directory readable by the
    postfix user (pytest's own tmp directories are not); it runs `master -d`
    in the foreground, is stopped by its PID, and never touches /etc/postfix.
    """

    def __init__(self, ca: trustme.CA, sink_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relayd-postfix-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        etc, sasl = self.dir / "etc", self.dir / "etc" / "sasl"
        for sub in (etc, sasl, self.dir / "spool", self.dir / "data"):
            sub.mkdir(parents=True, exist_ok=True)
            sub.chmod(0o755)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", postfix.pw_uid, postfix.pw_gid)
        cert = ca.issue_cert("127.0.0.1", POSTFIX_HOST)
        cert.private_key_pem.write_to_path(str(etc / "key.pem"))
        (etc / "key.pem").chmod(0o600)
        cert.cert_chain_pems[0].write_to_path(str(etc / "cert.pem"))
        (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.dir / 'spool'}
data_directory = {self.dir / 'data'}
maillog_file = {self.dir / 'maillog'}
maillog_file_prefixes = {self.dir}
myhostname = {POSTFIX_HOST}
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_tls_security_level = may
smtpd_tls_cert_file = {etc / 'cert.pem'}
smtpd_tls_key_file = {etc / 'key.pem'}
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {sasl}
smtpd_sasl_local_domain = $myhostname
smtpd_sasl_security_options = noanonymous
smtp_tls_security_level = none
biff = no
append_dot_mydomain = no
""")
        (etc / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        sasldb = sasl / "sasldb2"
        (sasl / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\nmech_list: PLAIN LOGIN\n")
        subprocess.run([str(SASLPASSWD2), "-p", "-c", "-f", str(sasldb), "-u", POSTFIX_HOST, POSTFIX_USER],
                       input=POSTFIX_PASSWORD.encode(), check=True, timeout=30, capture_output=True)
        os.chown(sasldb, postfix.pw_uid, postfix.pw_gid)
        sasldb.chmod(0o600)
        env = {**os.environ, "MAIL_CONFIG": str(etc)}
        check = subprocess.run([str(POSTFIX), "-c", str(etc), "check"], env=env, capture_output=True, timeout=60)
        assert check.returncode == 0, f"postfix check failed: {check.stderr.decode()} {self.maillog()}"
        self.master = subprocess.Popen([str(POSTFIX_MASTER), "-c", str(etc), "-d"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.master.poll() is None, f"postfix master exited: {self.master.stderr.read().decode()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"postfix did not listen on 127.0.0.1:{self.port}: {self.maillog()}")

    def maillog(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)  # master stops its children and exits
            try:
                self.master.wait(20)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait(10)
        if self.master.stderr is not None:
            self.master.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _without_postfix_received(data: bytes) -> bytes:
    """The message as Postfix relayed it, minus the one Received: header Postfix prepends."""
    assert data.startswith(b"Received: from "), data[:200]
    lines = data.split(b"\r\n")
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    assert f"by {POSTFIX_HOST} (Postfix)".encode() in b"\r\n".join(lines[:end])
    return b"\r\n".join(lines[end:])


def test_postfix_as_a_real_upstream_with_starttls_and_sasl(tmp_path: Path, ca: trustme.CA) -> None:
    for binary in (POSTFIX, POSTFIX_MASTER, SASLPASSWD2):
        if not binary.exists():
            pytest.skip(f"{binary} is not installed; {INSTALL_HINT}")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        pytest.skip(f"no postfix user (the postfix package creates it); {INSTALL_HINT}")
    sink = FakeUpstream(ca=ca, tls="none", require_auth=False).start()
    postfix = PostfixUpstream(ca, sink.port)
    try:
        files = RelayFiles(tmp_path / "relay", ca)
        files.write(
            upstreams=[UpstreamSpec("postfix", postfix.port, credential="postfix",
                                    user=POSTFIX_USER, password=POSTFIX_PASSWORD)],
            tenants=[TenantSpec(TENANT, TENANT_PASSWORD, ["*@shop.example"], [(["*"], ["postfix"])])],
        )
        recipient = "postfix@example.net"
        sent = message_for("relayd to Postfix", recipient)
        with RelaydProcess(files):
            import smtplib
            import ssl

            with smtplib.SMTP("127.0.0.1", files.port, timeout=30) as client:
                client.starttls(context=ssl.create_default_context(cafile=str(files.ca_file)))
                client.login(TENANT, TENANT_PASSWORD)
                client.sendmail(SENDER, [recipient], sent)
            files.wait_for_log(f"=> {recipient} R=", timeout=30)
            (relayed,) = sink.wait_for_messages(1, timeout=30)
        log = files.mainlog()
        assert f"T=postfix H=127.0.0.1 [127.0.0.1]:{postfix.port}" in log and "X=TLS" in log
        assert "sasl_username=relayd" in postfix.maillog()
        assert relayed.rcpt_tos == [recipient] and relayed.mail_from == SENDER
        assert without_relayd_trace(_without_postfix_received(relayed.data)) == sent
    finally:
        postfix.stop()
        sink.stop()

