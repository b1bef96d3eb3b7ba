"""`relayd dev`: the embedded default runs with no provider and captures every message."""

from __future__ import annotations

import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from tests.relayenv import ROOT, free_port


def test_dev_default_prints_how_to_connect_and_captures_mail(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "dev"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayd.daemon", "dev", "--dir", str(state), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        banner = b""
        deadline = time.monotonic() + 20
        while b"Stop with Ctrl-C" not in banner and time.monotonic() < deadline:
            banner += proc.stdout.readline()
        text = banner.decode()
        assert "nodemailer.createTransport" in text and "smtplib" in text
        password = re.search(r"password: (\S+)", text).group(1)
        cert = state / "tls" / "cert.pem"
        for _ in range(100):
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                time.sleep(0.1)
        with client:
            client.starttls(context=ssl.create_default_context(cafile=str(cert)))
            client.login("dev", password)
            msg = EmailMessage()
            msg["From"] = "app@example.test"
            msg["To"] = "someone@example.test"
            msg["Subject"] = "dev capture"
            msg.set_content("captured, never sent")
            client.send_message(msg)
        new = state / "capture" / "new"
        deadline = time.monotonic() + 10
        while not (new.exists() and any(new.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        (captured,) = list(new.iterdir())
        assert b"Subject: dev capture" in captured.read_bytes()
        assert (state / "master.key").stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        proc.stdout.close()
        proc.stderr.close()
