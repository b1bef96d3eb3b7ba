"""Running relayd for tests: config writing, an in-thread relay, a subprocess relay, clients.

Everything listens on 127.0.0.1 only. The relay's listener certificate and
the fake upstreams' certificates come from one test CA, so clients and relayd
verify every certificate for real.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pytest
import trustme

from relayd.config.credentials import CredentialStore, generate_master_key, write_key_file
from relayd.config.passwords import hash_password
from tests.eventloop import TEST_LOOP, new_test_loop
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
ACME = ("acme", "acme-relay-password")  # the usual tenant's login and password


@dataclass
class TenantSpec:
    name: str
    password: str
    senders: Sequence[str]
    routes: Sequence[tuple[Sequence[str], Sequence[str]]]  # (domains, via)
    extra: str = ""  # extra YAML lines (indented 4 spaces) for the tenant
    bind_addresses: Sequence[str] = ()


@dataclass
class UpstreamSpec:
    """A transport pointing at a fake upstream (or any host:port)."""

    name: str
    port: int
    credential: str | None = None
    user: str = ""
    password: str = ""
    tls: str = "starttls"
    retry: str | None = None
    ca_file: Path | None = None
    extra: str = ""


@dataclass
class RelayFiles:
    """Everything a test relay needs on disk."""

    root: Path
    ca: trustme.CA
    port: int = field(default_factory=free_port)
    config: Path = field(init=False)
    ca_file: Path = field(init=False)
    key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "relay.yaml"
        self.ca_file = self.root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(self.root / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.root / "cert.pem"))
        os.chmod(self.root / "key.pem", 0o600)
        self.key_file = self.root / "master.key"
        write_key_file(self.key_file, [generate_master_key()])

    def store_credentials(self, upstreams: Iterable[UpstreamSpec]) -> None:
        from relayd.config.credentials import read_key_file

        store = CredentialStore.open(self.root / "credentials.enc", list(read_key_file(self.key_file)))
        for u in upstreams:
            if u.credential:
                store.set(u.credential, u.user, u.password)
        store.save()

    def write(
        self,
        *,
        upstreams: Sequence[UpstreamSpec],
        tenants: Sequence[TenantSpec],
        retry: str = "F,1m,2s",
        listener_extra: str = "",
        capture: bool = False,
        log_file: bool = True,
    ) -> Path:
        self.store_credentials(upstreams)
        lines = [
            "version: 1",
            "hostname: relay.test",
            f"spool_dir: {self.root / 'spool'}",
            f"log_file: {self.root / 'mainlog'}" if log_file else "",
            "tls:",
            f"  cert: {self.root / 'cert.pem'}",
            f"  key: {self.root / 'key.pem'}",
            "credentials:",
            f"  store: {self.root / 'credentials.enc'}",
            f"  master_key_file: {self.key_file}",
            f'retry: "{retry}"',
            "delivery:",
            "  queue_run_interval: 1s",
            "  shutdown_grace: 2s",
            "listeners:",
            "  - name: submission",
            "    address: 127.0.0.1",
            f"    port: {self.port}",
        ]
        listener = {"tls": "starttls", "command_timeout": "30s"}
        for line in listener_extra.splitlines():
            if line.strip():
                key, _, value = line.partition(":")
                listener[key.strip()] = value.strip()
        lines += [f"    {key}: {value}" for key, value in listener.items()]
        lines.append("transports:")
        for u in upstreams:
            lines += [
                f"  {u.name}:",
                "    type: smtp",
                "    host: 127.0.0.1",
                f"    port: {u.port}",
                f"    tls: {u.tls}",
                f"    ca_file: {u.ca_file or self.ca_file}",
                "    connect_timeout: 5s",
                "    command_timeout: 10s",
                "    idle_timeout: 2s",
            ]
            if u.credential:
                lines.append(f"    credential: {u.credential}")
            if u.retry:
                lines.append(f'    retry: "{u.retry}"')
            lines += [f"    {line}" for line in u.extra.splitlines() if line.strip()]
        if capture:
            lines += ["  capture:", "    type: capture", f"    maildir: {self.root / 'capture'}"]
        lines.append("tenants:")
        for t in tenants:
            lines += [
                f"  {t.name}:",
                f'    password_hash: "{hash_password(t.password)}"',
                "    senders: [" + ", ".join(f'"{s}"' for s in t.senders) + "]",
            ]
            if t.bind_addresses:
                lines.append("    bind_addresses: [" + ", ".join(t.bind_addresses) + "]")
                lines.append("    trust_every_local_user: true")
            lines += [f"    {line}" for line in t.extra.splitlines() if line.strip()]
            lines.append("    routes:")
            for domains, via in t.routes:
                lines.append("      - domains: [" + ", ".join(f'"{d}"' for d in domains) + "]")
                lines.append("        via: [" + ", ".join(via) + "]")
        self.config.write_text("\n".join(line for line in lines if line != "") + "\n")
        return self.config

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def mainlog(self) -> str:
        path = self.root / "mainlog"
        return path.read_text() if path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 15.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.mainlog()
            if text.count(needle) >= count:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} x{count} not in mainlog within {timeout}s:\n{self.mainlog()}")


def capture_files(
    files: RelayFiles, *, listener_extra: str = "", tenant_extra: str = "", bind: tuple[str, ...] = ()
) -> RelayFiles:
    """A relay delivering into a capture Maildir: tenant acme (any route) and globex (one domain)."""
    files.write(
        upstreams=[],
        tenants=[
            TenantSpec(
                "acme", ACME[1], ["*@acme.example", "ceo@acme-corp.example"],
                [(["*"], ["capture"])], extra=tenant_extra, bind_addresses=bind,
            ),
            TenantSpec("globex", "globex-password", ["*@globex.example"], [(["globex-partner.test"], ["capture"])]),
        ],
        capture=True,
        listener_extra=listener_extra,
    )
    return files


def captured(files: RelayFiles, count: int = 1, timeout: float = 15.0) -> list[bytes]:
    """The messages in the capture Maildir, once there are at least `count`."""
    folder = files.root / "capture" / "new"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = sorted(folder.iterdir()) if folder.exists() else []
        if len(names) >= count:
            return [p.read_bytes() for p in names]
        time.sleep(0.05)
    raise AssertionError(f"expected {count} captured message(s) in {folder}\n{files.mainlog()}")


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def make_message(sender: str, to: Sequence[str], subject: str = "hello", body: str = "Hello.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{time.time_ns()}@app.test>"
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def connect(files: RelayFiles, *, login: tuple[str, str] | None = None, timeout: float = 15.0) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", files.port, timeout=timeout, local_hostname="app.test")
    client.starttls(context=files.client_context())
    client.ehlo("app.test")
    if login is not None:
        client.login(*login)
    return client


def submit(
    files: RelayFiles,
    login: tuple[str, str],
    sender: str,
    recipients: Sequence[str],
    message: bytes | None = None,
) -> str:
    """Send one message over STARTTLS + AUTH; returns relayd's queue id."""
    with connect(files, login=login) as client:
        client.ehlo()
        code, reply = client.mail(sender)
        assert code == 250, reply
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        code, reply = client.data(message if message is not None else make_message(sender, recipients))
        assert code == 250, reply
        return reply.decode().rsplit("id=", 1)[-1]


class RelayThread:
    """relayd's `Relay` running in a background thread with its own event loop."""

    def __init__(
        self, config_path: Path, environ: dict[str, str] | None = None, spool_io: Any = None,
        loop_factory: Any = None,
    ) -> None:
        from relayd.config.loader import load_config

        self.config = load_config(config_path)
        self.environ = environ
        self.spool_io = spool_io
        self.loop = (loop_factory or new_test_loop)()
        self.relay: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "RelayThread":
        from relayd.daemon import Relay

        self._thread.start()

        async def start() -> Any:
            relay = Relay(self.config, environ=self.environ, spool_io=self.spool_io)
            await relay.start()
            await relay.wait_index_loaded()
            return relay

        self.relay = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.relay.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class RelaydProcess:
    """relayd as a real process: `python -m relayd.daemon --config ...`."""

    def __init__(self, files: RelayFiles, extra_env: dict[str, str] | None = None) -> None:
        if TEST_LOOP != "uvloop":
            pytest.skip("starts the real relayd, which always runs on uvloop: the uvloop pass covers it")
        self.files = files
        self.output = b""
        env = dict(os.environ)
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relayd.daemon", "--config", str(files.config)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.wait_listening()

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"relayd exited {self.proc.returncode}: {err.decode()}{out.decode()}")
            try:
                with socket.create_connection(("127.0.0.1", self.files.port), timeout=1) as sock:
                    sock.recv(100)
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("relayd did not start listening")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        out, err = self.proc.communicate(timeout=10)
        self.output = out + err

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; what the process printed is kept in `self.output`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            self.output = out + err
            raise AssertionError("relayd did not stop within the grace time") from None
        self.output = out + err
        return self.proc.returncode

    def __enter__(self) -> "RelaydProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()



def as_submitted(relayed: bytes, original: bytes) -> bytes:
    """A message as it reached an upstream, less what relayd adds on the way.

    relayd prepends one `Received:` field (folded over several lines) and
    appends `Date:` and `Message-ID:` to the header block when `original`
    had none; every other byte must be the client's. Fails if the first
    field is not relayd's `Received:`.
    """
    assert relayed.startswith(b"Received: from "), relayed[:80]
    at = 0
    while True:
        at = relayed.index(b"\r\n", at) + 2
        if relayed[at:at + 1] not in (b" ", b"\t"):
            break
    head, sep, body = relayed[at:].partition(b"\r\n\r\n")
    original_head = b"\r\n" + original.partition(b"\r\n\r\n")[0].lower()
    if b"\r\nmessage-id:" not in original_head:
        head = re.sub(rb"\r\nMessage-ID: <E[^@>\r\n]+@[^>\r\n]+>\Z", b"", head)
    if b"\r\ndate:" not in original_head:
        head = re.sub(rb"\r\nDate: [^\r\n]*\Z", b"", head)
    return head + sep + body
