"""Driving load and watching the sink: smtp-source, the Python load generator, smtp-sink.

Takes: a target port, a scenario (plain or STARTTLS + AUTH), sessions,
message count and size. Emits: a `Submission` (what was accepted, when, and
how fast it was acknowledged) and, from the sink, a running message count.
Untrusted input: the clients' and the sink's output, parsed leniently.
How it fails: a client that exceeds its time limit is killed (by pid) and
the run is recorded as failed with what it printed.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from relaybench.peers import ROOT, VENV_PY

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
_MSG_RE = re.compile(rb"(?:msg|mesg)=(\d+)")
BENCH_DIR = ROOT / "bench"


@dataclass
class Submission:
    client: str
    accepted: int
    wanted: int
    start: float  # wall clock, seconds
    end: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    client_cpu_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(1e-6, self.end - self.start)


def smtp_source(port: int, *, sessions: int, messages: int, size: int, timeout: float,
                reuse_connection: bool = False) -> Submission:
    """Postfix's smtp-source: one message per session unless `reuse_connection` (-d)."""
    cmd = [str(SMTP_SOURCE), "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", "bench.example", "-f", "bench@bench.example", "-t", "sink@sink.example"]
    if reuse_connection:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    before = os.times()
    start = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout)
        end = time.time()
        failed = out.returncode != 0
        errors = {out.stderr.decode(errors="replace").strip()[-200:] or f"exit {out.returncode}": 1} if failed else {}
    except subprocess.TimeoutExpired:
        end = time.time()
        failed, errors = True, {f"smtp-source exceeded {timeout:.0f}s": 1}
    after = os.times()
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    # smtp-source stops at the first unexpected reply: all or nothing.
    return Submission("smtp-source", 0 if failed else messages, messages, start, end,
                      client_cpu_s=round(cpu, 3), errors=errors)


def loadgen(port: int, *, mode: str, sessions: int, messages: int, size: int, timeout: float,
            password: str, cafile: Path | None, workers: int = 2) -> Submission:
    """The bench's own generator (bench/relaybench/loadgen.py), plain or STARTTLS + AUTH."""
    cmd = [str(VENV_PY), "-m", "relaybench.loadgen", "--port", str(port), "--mode", mode,
           "--sessions", str(sessions), "--messages", str(messages), "--size", str(size),
           "--workers", str(min(workers, sessions)), "--timeout", str(timeout),
           "--source", "127.0.0.3" if mode == "auth" else "127.0.0.1"]
    if cafile is not None:
        cmd += ["--cafile", str(cafile)]
    env = dict(os.environ, PYTHONPATH=str(BENCH_DIR), BENCH_SMTP_PASSWORD=password)
    start = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout + 60, env=env)
    except subprocess.TimeoutExpired:
        return Submission("loadgen", 0, messages, start, time.time(), errors={"loadgen hung": 1})
    try:
        data = json.loads(out.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Submission("loadgen", 0, messages, start, time.time(),
                          errors={out.stderr.decode(errors="replace")[-300:] or "no output": 1})
    return Submission(
        "loadgen", data["ok"], messages, data["start"] or start, data["end"] or time.time(),
        p50_ms=data["p50_ms"], p99_ms=data["p99_ms"], client_cpu_s=data["client_cpu_s"],
        errors=data["errors"],
    )


class Sink:
    """The upstream every server relays to; counts what it has received."""

    def __init__(self, port: int, *, python: bool, log: Path, tls_dir: Path | None = None,
                 procs: int = 1) -> None:
        self.port = port
        self.python = python
        self.log = log
        self.tls_dir = tls_dir
        self.procs = procs
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        if self.python:
            cmd = [str(VENV_PY), "-m", "relaybench.sink", "--port", str(self.port), "--procs", str(self.procs)]
            if self.tls_dir is not None:
                cmd += ["--cert", str(self.tls_dir / "cert.pem"), "--key", str(self.tls_dir / "key.pem")]
        else:
            # -c: running counters on stdout; -u: drop root after binding; 1024: listen backlog.
            cmd = [str(SMTP_SINK), "-c", "-u", "postfix", "-4", f"127.0.0.1:{self.port}", "1024"]
        self.count = 0
        # smtp-sink prints its counters only as its output buffer fills unless it writes to a
        # terminal, so it gets a pseudo-terminal; the Python sink flushes on its own.
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdout=slave, stderr=open(self.log, "ab"),
                                     env=dict(os.environ, PYTHONPATH=str(BENCH_DIR)), start_new_session=True)
        os.close(slave)
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()
        from relaybench.peers import wait_banner

        wait_banner(self.port, 30)

    def _read(self, fd: int) -> None:
        tail = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the sink exited and the terminal closed
                chunk = b""
            if not chunk:
                os.close(fd)
                return
            tail = (tail + chunk)[-256:]
            found = _MSG_RE.findall(tail)
            if found:
                self.count = max(self.count, int(found[-1]))

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> int:
        """The count once it has not moved for `quiet` seconds (or at the limit)."""
        deadline = time.monotonic() + timeout
        last, since = self.count, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.count != last:
                last, since = self.count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return self.count

    def wait_for(self, total: int, timeout: float) -> float | None:
        """Wall-clock time at which the count reached `total`, or None at the limit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count >= total:
                return time.time()
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.proc = None


def have_postfix_tools() -> bool:
    return SMTP_SOURCE.exists() and SMTP_SINK.exists() and shutil.which("unshare") is not None


def python_for_bench() -> str:
    return str(VENV_PY if VENV_PY.exists() else sys.executable)
