"""`relayd dev`: the embedded default runs with no provider and captures every message."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import pytest

from relayd.ops.clienthelp import snippets_in
from relayd.ops.devdefault import prepare_dev, shell_lines_in
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


# ------------------------------------------------------------ the first hour

NODE_MODULES = ROOT / ".test-clients" / "node_modules"
RELAYCTL = str(Path(sys.executable).parent / "relayctl")  # the installed entry point, as a user runs it


class DevRelay:
    """`relayd dev` as a real process; `banner` is what it printed before serving."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relayd.daemon", "dev", "--dir", str(state), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out = b""
        deadline = time.monotonic() + 20
        while b"Stop with Ctrl-C" not in out and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            out += line
        self.banner = out.decode()
        assert "Stop with Ctrl-C" in self.banner, self.banner + self.proc.stderr.read().decode()
        self.exports = dict(re.findall(r"^  export (\w+)=(.*)$", self.banner, re.M))
        self.exports = {k: v.strip("'") for k, v in self.exports.items()}
        self.port = int(re.search(r"starting on 127\.0\.0\.1:(\d+)", self.banner).group(1))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.exports, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def captured(self, count: int, timeout: float = 15) -> list[bytes]:
        new = self.state / "capture" / "new"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = sorted(new.iterdir()) if new.exists() else []
            if len(files) >= count:
                return [f.read_bytes() for f in files]
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} captured messages in {new}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def dev_relay(tmp_path: Path) -> Iterator[DevRelay]:
    relay = DevRelay(tmp_path / "dev", "--port", str(free_port()))
    try:
        yield relay
    finally:
        relay.stop()


def test_dev_banner_exports_the_password_and_the_config_for_relayctl(dev_relay: DevRelay) -> None:
    assert dev_relay.exports["SMTP_PASSWORD"] == (dev_relay.state / "dev-password").read_text().strip()
    assert dev_relay.exports["RELAYD_CONFIG"] == str(dev_relay.state / "relay.yaml")
    status = subprocess.run([RELAYCTL, "status"], env=dev_relay.env(),
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert f"127.0.0.1:{dev_relay.port}" in status.stdout


def test_the_printed_smtplib_snippet_runs_as_pasted_and_is_captured(dev_relay: DevRelay, tmp_path: Path) -> None:
    script = tmp_path / "send.py"
    script.write_text(snippets_in(dev_relay.banner)["python"])
    run = subprocess.run([sys.executable, str(script)], env=dev_relay.env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "sent"
    (captured,) = dev_relay.captured(1)
    assert b"Subject: Hello from relayd" in captured


def test_the_printed_nodemailer_snippet_runs_as_pasted_and_is_captured(dev_relay: DevRelay, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "nodemailer").is_dir():
        pytest.skip("node or nodemailer not installed (scripts/install-test-clients installs nodemailer)")
    script = tmp_path / "send.js"
    script.write_text(snippets_in(dev_relay.banner)["js"])
    run = subprocess.run([node, str(script)], env={**dev_relay.env(), "NODE_PATH": str(NODE_MODULES)},
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("250 ")
    (captured,) = dev_relay.captured(1)
    assert b"Subject: Hello from relayd" in captured


def test_the_shell_lines_of_the_banner_run_as_pasted(dev_relay: DevRelay, tmp_path: Path) -> None:
    commands = shell_lines_in(dev_relay.banner)
    assert commands[0].startswith("export SMTP_PASSWORD=") and "relayd-sendmail" in commands[-1]
    script = tmp_path / "pasted.sh"
    script.write_text("set -e\n" + "\n".join(commands) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RELAYD_CONFIG", "SMTP_PASSWORD")}
    run = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"127.0.0.1:{dev_relay.port}" in run.stdout  # relayctl status found the dev relay
    (captured,) = dev_relay.captured(1)
    assert b"Subject: hi" in captured and b"from cron" in captured


def test_the_printed_reset_command_runs_as_pasted_and_rewrites_the_same_relay(tmp_path: Path) -> None:
    relay = DevRelay(tmp_path / "dev", "--port", str(free_port()))
    relay.stop()
    config = relay.state / "relay.yaml"
    config.write_text(config.read_text().replace("queue_run_interval: 10s", "queue_run_interval: 42s"))
    reset_line = re.search(r"a fresh one:\n +(.+ --reset)$", relay.banner, re.M)
    assert reset_line is not None, relay.banner
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_DEV_DIR"}
    proc = subprocess.Popen(["bash", "-c", "exec " + reset_line.group(1)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        while b"Stop with Ctrl-C" not in out:
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode()
            out += line
        assert f"starting on 127.0.0.1:{relay.port}" in out.decode()  # same port, same directory
        assert "queue_run_interval: 42s" not in config.read_text()
        for _ in range(200):  # serving (and handling SIGTERM) once it accepts connections
            try:
                socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_relayd_sendmail_works_out_of_the_box_on_the_dev_default(dev_relay: DevRelay) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "relayd.ops.sendmail", "-t"], env=dev_relay.env(), timeout=60,
        input=b"To: cron-owner@example.com\nSubject: cron output\n\nbackup done\n", capture_output=True,
    )
    assert run.returncode == 0, run.stderr
    (captured,) = dev_relay.captured(1)
    assert b"Subject: cron output" in captured and b"X-Relayd-Envelope-To: <cron-owner@example.com>" in captured


def test_send_test_on_the_dev_default_reports_the_captured_file_and_exits_0(dev_relay: DevRelay) -> None:
    run = subprocess.run(
        [RELAYCTL, "send-test", "--tenant", "local", "--to", "you@example.com"],
        env=dev_relay.env(), capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    captured = re.search(r"^delivered \(captured as (\S+)\)$", run.stdout, re.M)
    assert captured is not None, run.stdout
    assert Path(captured.group(1)).parent == dev_relay.state / "capture" / "new"
    assert b"Subject: relayd send-test" in Path(captured.group(1)).read_bytes()


def test_send_test_without_a_terminal_says_to_use_password_stdin(dev_relay: DevRelay) -> None:
    run = subprocess.run(
        [RELAYCTL, "send-test", "--tenant", "dev", "--to", "you@example.com"],
        env=dev_relay.env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 1
    assert "--password-stdin" in run.stderr and "refusing an empty password" not in run.stderr
    piped = subprocess.run(
        [RELAYCTL, "send-test", "--tenant", "dev", "--to", "you@example.com",
         "--password-stdin"],
        env=dev_relay.env(), capture_output=True, text=True, timeout=90,
        input=dev_relay.exports["SMTP_PASSWORD"] + "\n",
    )
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert "delivered (captured as" in piped.stdout


def test_send_test_on_a_terminal_asks_for_the_password_without_echo_and_reports_the_capture(
    dev_relay: DevRelay,
) -> None:
    import pty
    import select

    pid, terminal = pty.fork()
    if pid == 0:  # the child: relayctl on a terminal, as an operator types it
        os.execve(RELAYCTL, [RELAYCTL, "send-test", "--tenant", "dev", "--to", "you@example.com"],
                  dev_relay.env())
    seen, answered = b"", False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([terminal], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if b"Password of tenant dev: " in seen and not answered:
            os.write(terminal, dev_relay.exports["SMTP_PASSWORD"].encode() + b"\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    os.close(terminal)
    text = seen.decode()
    assert os.WEXITSTATUS(status) == 0, text
    assert dev_relay.exports["SMTP_PASSWORD"] not in text  # not echoed
    assert re.search(r"^delivered \(captured as \S+\)\r?$", text, re.M), text


def test_a_port_in_use_is_reported_with_its_holder_before_any_banner(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "relayd.daemon", "dev", "--dir", str(tmp_path / "dev"), "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert run.returncode == 69
    assert run.stdout == ""  # no banner, no snippets for a relay that never started
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in run.stderr
    assert "Errno" not in run.stderr


def test_a_busy_port_on_a_first_start_leaves_no_relay_yaml_and_another_port_just_works(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "relayd.daemon", "dev", "--dir", str(state), "--port", str(busy)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert run.returncode == 69, run.stderr
    assert f"start on another port with --port {busy + 1}" in run.stderr
    assert "--reset" not in run.stderr  # nothing to reset: no hand edits exist yet
    assert not (state / "relay.yaml").exists()
    relay = DevRelay(state, "--port", str(free_port()))  # as advised: no --reset needed
    relay.stop()


def test_a_busy_port_in_a_kept_relay_yaml_says_to_change_it_there(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        config = prepare_dev(state, port=busy)
        run = subprocess.run(
            [sys.executable, "-m", "relayd.daemon", "dev", "--dir", str(state)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert run.returncode == 69 and run.stdout == ""
    assert f"change the port in {config.resolve()}" in run.stderr
    assert "dropping its hand edits" in run.stderr


def test_a_hand_edited_dev_relay_yaml_survives_a_restart_and_reset_rewrites_it(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    config = prepare_dev(state, port=2525)
    edited = config.read_text().replace("queue_run_interval: 10s", "queue_run_interval: 42s")
    config.write_text(edited)
    assert prepare_dev(state, port=None).read_text() == edited
    assert "queue_run_interval: 42s" not in prepare_dev(state, port=None, reset=True).read_text()


def test_a_port_option_that_a_kept_relay_yaml_would_ignore_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    prepare_dev(state, port=free_port())
    run = subprocess.run(
        [sys.executable, "-m", "relayd.daemon", "dev", "--dir", str(state), "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 69 and run.stdout == ""
    assert "--reset" in run.stderr


def test_relayctl_without_a_config_points_at_the_dev_relay_in_this_directory(tmp_path: Path) -> None:
    if Path("/etc/relayd/relay.yaml").exists():
        pytest.skip("this machine has /etc/relayd/relay.yaml, which relayctl reads first")
    config = prepare_dev(tmp_path / ".relayd-dev", port=free_port())
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    run = subprocess.run([RELAYCTL, "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"export RELAYD_CONFIG={config}" in run.stderr
