"""The 250 leaves only after the message file was flushed: the real relayd process under strace.

The power-cut test needs root and a loop device; this guard needs only
strace (scripts/bootstrap installs it for the tests on Debian). The listener
is plaintext on loopback so the 250 can be read in the trace.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.relayenv import ROOT, RelayFiles, TenantSpec, UpstreamSpec, make_message

ACME = ("acme", "acme-relay-password")
_LINE = re.compile(r"^(\d+)\s+(.*)$")


def start_traced(files: RelayFiles, trace: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "signal=none", "-s", "80", "-o", str(trace),
         "-e", "trace=openat,write,writev,sendmsg,sendto,fsync,fdatasync,syncfs",
         sys.executable, "-m", "relayd.daemon", "--config", str(files.config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def events(trace: Path, message_id: str) -> list[tuple[str, str]]:
    """(kind, detail) in the order the calls completed: create, write, flush, reply."""
    fd: str | None = None
    found: list[tuple[str, str]] = []
    pending: dict[str, str] = {}  # pid -> start of an unfinished call
    for raw in trace.read_text(errors="replace").splitlines():
        m = _LINE.match(raw)
        if m is None:
            continue
        pid, call = m.groups()
        if call.endswith("<unfinished ...>"):
            pending[pid] = call
            continue
        if call.startswith("<... "):
            call = pending.pop(pid, "") + call
        if call.startswith("openat(") and f"/{message_id}\"" in call and "O_EXCL" in call:
            fd = call.rsplit("= ", 1)[-1].strip()
            found.append(("create", fd))
        elif fd is not None and call.startswith(f"write({fd},"):
            found.append(("write", call[:60]))
        elif call.startswith("syncfs(") or (fd is not None and call.startswith(f"fsync({fd})")):
            if call.rstrip().endswith("= 0"):
                found.append(("flush", call[:40]))
        elif f"250 2.0.0 OK id={message_id}" in call:
            found.append(("reply", call[:60]))
    return found


def test_the_250_is_written_only_after_the_message_file_is_flushed(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/bootstrap test installs it on Debian)")
    down = upstreams()
    down.refuse_connections()
    relay_files.write(
        upstreams=[UpstreamSpec("up", down.port, "cred", "u@up.test", "pw")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])],
        listener_extra="tls: none\nallow_plaintext_auth: true",
    )
    pid_file = relay_files.root / "relayd.pid"
    with relay_files.config.open("a") as f:
        f.write(f"pid_file: {pid_file}\n")
    trace = tmp_path / "strace.txt"
    tracer = start_traced(relay_files, trace)
    try:
        wait_for(pid_file, 30)
        assert pid_file.exists(), "relayd did not start under strace"
        with smtplib.SMTP("127.0.0.1", relay_files.port, timeout=30, local_hostname="app.test") as client:
            client.login(*ACME)
            client.mail("billing@acme.example")
            client.rcpt("x@customer.test")
            code, reply = client.data(make_message("billing@acme.example", ["x@customer.test"]))
        assert code == 250
        message_id = reply.decode().rsplit("id=", 1)[-1]
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    kinds = [kind for kind, _ in events(trace, message_id)]
    assert "create" in kinds and "reply" in kinds, kinds
    created, replied = kinds.index("create"), kinds.index("reply")
    last_write = max(i for i, k in enumerate(kinds) if k == "write")
    assert created < last_write < replied
    assert any(k == "flush" for k in kinds[last_write + 1 : replied]), kinds
