#!/usr/bin/env python3
"""Memory and responsiveness of relayd under a flood of idle connections and big DATA sessions.

    .venv/bin/python bench/data_flood.py                       # 1,000 idle + 100 x 20 MB
    .venv/bin/python bench/data_flood.py --idle 200 --data-sessions 20 --json out.json

Starts a real relayd process (uvloop, as in production) on a fresh spool in a
temporary directory, on 127.0.0.1 only, with NOTIFY_SOCKET pointing at this
script's datagram socket and WATCHDOG_USEC set, and its soft RLIMIT_NOFILE
raised to the hard limit. Then, at once:

* `--idle` connections that read the greeting and say nothing more;
* `--data-sessions` sessions that each send one `--size` message in DATA;
* one legitimate client that, every half second, connects and submits a
  small message, timing connect-to-250.

Measured: relayd's peak RSS (VmHWM from /proc, the kernel's own high-water
mark) and sampled RSS, the largest gap between watchdog pings, the slowest
legitimate submission, and how each DATA session ended. Everything is bounded:
connection counts are arguments, the whole run stops at `--deadline` seconds,
and relayd and its spool are removed at the end.

Delivery is pointed at a closed port, so queued messages are deferred, never
sent; `--max-parallel` sets how many are in delivery at once (default 20,
relayd's own default; a delivery attempt reads the whole body into memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 2_000_000  # relayd pings every second; a gap over 2 s would be a miss


@dataclass
class Figures:
    idle_connections: int = 0
    data_sessions: int = 0
    message_bytes: int = 0
    data_replies: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # VmHWM
    max_sampled_rss_mb: float = 0.0
    rss_before_mb: float = 0.0
    watchdog_pings: int = 0
    watchdog_max_gap_s: float = 0.0
    watchdog_misses: int = 0
    legit_submissions: int = 0
    legit_max_s: float = 0.0
    legit_slowest_phases: dict[str, float] = field(default_factory=dict)  # seconds to greeting, to 354, to 250
    legit_failures: int = 0
    seconds: float = 0.0
    timed_out: bool = False  # the run hit --deadline (sessions still waiting for a reply)
    passed: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=int, default=1000, help="idle connections (default 1000)")
    p.add_argument("--data-sessions", type=int, default=100, help="sessions sending a big message (default 100)")
    p.add_argument("--size", type=int, default=20 * 1000 * 1000, help="message size in bytes (default 20 MB)")
    p.add_argument("--rss-limit-mb", type=float, default=300.0, help="pass/fail bound on peak RSS (default 300)")
    p.add_argument("--legit-limit-s", type=float, default=1.0, help="bound on a legitimate submission (default 1 s)")
    p.add_argument("--deadline", type=float, default=600.0, help="stop the whole run after this many seconds")
    p.add_argument("--max-parallel", type=int, default=20, help="relayd delivery.max_parallel (default 20)")
    p.add_argument("--work", type=Path, default=None, help="directory for relayd's files (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if not 0 <= args.idle <= 5000 or not 0 <= args.data_sessions <= 500:
        p.error("--idle is bounded to 5000 and --data-sessions to 500")
    if not 1000 <= args.size <= 100 * 1000 * 1000:
        p.error("--size is bounded to 1 KB - 100 MB")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(work: Path, port: int, max_parallel: int, size: int, connections: int) -> Path:
    from relayd.config.passwords import hash_password

    closed = free_port()  # nothing listens there: deliveries are deferred
    max_size = max(size * 2, 25 * 1024 * 1024)
    lines = [
        "version: 1",
        "hostname: relayd.bench.example",
        f"spool_dir: {work / 'spool'}",
        f"log_file: {work / 'mainlog'}",
        f"control_socket: {work / 'control.sock'}",
        "credentials:",
        f"  store: {work / 'credentials.enc'}",
        "delivery:",
        f"  max_parallel: {max_parallel}",
        "listeners:",
        "  - name: submission",
        "    address: 127.0.0.1",
        f"    port: {port}",
        "    tls: none",
        f"    max_message_size: {max_size}",
        # Every bench connection comes from the bound tenant's address, so none
        # is an evictable stranger: room for all of them plus the legitimate client.
        f"    max_connections: {connections}",
        "transports:",
        "  nowhere:",
        "    type: smtp",
        "    host: 127.0.0.1",
        f"    port: {closed}",
        "    tls: none",
        "tenants:",
        "  bench:",
        f'    password_hash: "{hash_password(os.urandom(16).hex())}"',  # bound address: no AUTH
        '    senders: ["*@bench.example"]',
        "    bind_addresses: [127.0.0.1]",
        "    trust_every_local_user: true",  # the bench is the only local user
        "    routes:",
        '      - domains: ["*"]',
        "        via: [nowhere]",
    ]
    path = work / "relay.yaml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Watchdog:
    """The NOTIFY_SOCKET end: records when each WATCHDOG=1 arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if b"READY=1" in data:
                self.ready.set()
            if b"WATCHDOG=1" in data:
                self.pings.append(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_kb = max(self.max_kb, self.read("VmRSS"))
            except OSError:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One complete (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line + b"\r\n")
    return await read_reply(reader)


async def idle_connection(port: int, hold: asyncio.Event, opened: list[int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
    except OSError:
        return
    opened.append(1)
    await hold.wait()
    writer.close()


def big_message(size: int) -> bytes:
    head = (b"From: load@bench.example\r\nTo: sink@bench.test\r\nSubject: data flood\r\n"
            b"Message-ID: <flood@bench.example>\r\n\r\n")
    line = b"0123456789" * 7 + b"abcdefgh\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[: size - len(head)].rsplit(b"\r\n", 1)[0] + b"\r\n.\r\n"


async def data_session(port: int, message: memoryview, replies: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        await command(reader, writer, b"EHLO flood.bench.example")
        await command(reader, writer, b"MAIL FROM:<load@bench.example>")
        await command(reader, writer, b"RCPT TO:<sink@bench.test>")
        if not (await command(reader, writer, b"DATA")).startswith(b"354"):
            raise ConnectionError("DATA refused")
        for start in range(0, len(message), 256 * 1024):
            writer.write(message[start:start + 256 * 1024])
            await writer.drain()
        reply = (await read_reply(reader))[:3].decode()
        writer.write(b"QUIT\r\n")
        writer.close()
    except (OSError, ConnectionError) as exc:
        reply = type(exc).__name__
    replies[reply] = replies.get(reply, 0) + 1


async def legit_client(port: int, stop: asyncio.Event, figures: Figures) -> None:
    small = b"From: app@bench.example\r\nSubject: hello\r\n\r\nhello\r\n.\r\n"
    while not stop.is_set():
        started = time.monotonic()
        phases: dict[str, float] = {}
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await read_reply(reader)
                phases["greeting"] = time.monotonic() - started
                await command(reader, writer, b"EHLO app.bench.example")
                await command(reader, writer, b"MAIL FROM:<app@bench.example>")
                await command(reader, writer, b"RCPT TO:<someone@bench.test>")
                await command(reader, writer, b"DATA")
                phases["data"] = time.monotonic() - started
                writer.write(small)
                ok = (await read_reply(reader)).startswith(b"250")
                phases["queued"] = time.monotonic() - started
                writer.close()
        except (OSError, ConnectionError, TimeoutError):
            ok = False
        took = time.monotonic() - started
        figures.legit_submissions += 1
        if took > figures.legit_max_s:
            figures.legit_slowest_phases = {k: round(v, 3) for k, v in phases.items()}
        figures.legit_max_s = max(figures.legit_max_s, took)
        figures.legit_failures += 0 if ok else 1
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def load(args: argparse.Namespace, port: int, figures: Figures) -> None:
    hold, stop = asyncio.Event(), asyncio.Event()
    opened: list[int] = []
    legit = asyncio.create_task(legit_client(port, stop, figures))
    idle = [asyncio.create_task(idle_connection(port, hold, opened)) for _ in range(args.idle)]
    give_up = time.monotonic() + 30  # a greeting that has not come by then is not coming
    while len(opened) < args.idle and not all(t.done() for t in idle) and time.monotonic() < give_up:
        await asyncio.sleep(0.05)
    figures.idle_connections = len(opened)
    message = memoryview(big_message(args.size))
    figures.message_bytes = len(message)
    await asyncio.gather(*(data_session(port, message, figures.data_replies) for _ in range(args.data_sessions)))
    figures.data_sessions = sum(figures.data_replies.values())
    await asyncio.sleep(1.0)  # one more legitimate submission after the flood
    stop.set()
    hold.set()
    await legit
    await asyncio.gather(*idle)


def run(args: argparse.Namespace) -> Figures:
    figures = Figures()
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="relayd-flood-", dir=args.work))
    watchdog = Watchdog(work / "notify.sock")
    port = free_port()
    config = write_config(work, port, args.max_parallel, args.size, args.idle + args.data_sessions + 100)
    env = dict(os.environ, NOTIFY_SOCKET=str(watchdog.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayd.daemon", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=raise_nofile,
    )
    sampler: RssSampler | None = None
    started = time.monotonic()
    try:
        if not watchdog.ready.wait(30):
            raise SystemExit("relayd did not report READY=1 within 30 s")
        sampler = RssSampler(proc.pid)
        figures.rss_before_mb = sampler.read("VmRSS") / 1024
        import uvloop

        try:
            uvloop.run(asyncio.wait_for(load(args, port, figures), args.deadline))
        except TimeoutError:
            figures.timed_out = True
        figures.peak_rss_mb = sampler.read("VmHWM") / 1024
    finally:
        figures.seconds = time.monotonic() - started
        if sampler is not None:
            sampler.stop()
            figures.max_sampled_rss_mb = sampler.max_kb / 1024
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        watchdog.stop()
        pings = [t for t in watchdog.pings if t >= started]
        figures.watchdog_pings = len(pings)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        figures.watchdog_max_gap_s = max(gaps, default=0.0)
        figures.watchdog_misses = sum(1 for g in gaps if g > WATCHDOG_USEC / 1e6)
        shutil.rmtree(work, ignore_errors=True)
    figures.data_sessions = sum(figures.data_replies.values())
    figures.passed = (
        not figures.timed_out
        and figures.peak_rss_mb < args.rss_limit_mb
        and figures.legit_max_s < args.legit_limit_s
        and figures.legit_failures == 0
        and figures.watchdog_misses == 0
        and figures.watchdog_pings > 0
        and figures.idle_connections == args.idle
        and figures.data_replies.get("250", 0) == args.data_sessions
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop relayd and remove its files
    figures = run(args)
    text = json.dumps(asdict(figures), indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if figures.passed else 1


if __name__ == "__main__":
    sys.exit(main())
