"""Benchmark: `mailq` against a running relayd holding 100,000 queued messages.

Writes the queue files with the spool's own format helpers straight into a
temporary spool (no fsync: this measures reading, not durability), starts
relayd on it with its only upstream down (a port nothing listens on), and
prints: the time to write the queue, relayd's start-up time (until its
control socket answers), how many upstream attempts the start-up made (the
host retry state must make all but one wave skip), relayd's resident memory,
and the wall time of `mailq` (stdout to /dev/null and to a pipe), `relayctl
queue count` and `relayctl queue summary`.

Not part of the test suite. Run: .venv/bin/python bench/mailq_100k.py [--messages N]
Everything stays on 127.0.0.1 and in a temporary directory (removed at the end
unless --keep).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relayd.ops.controlclient import ControlClient, ControlUnavailable
from relayd.queue.msgid import ALPHABET, new_message_id
from relayd.config.passwords import hash_password
from relayd.queue.spoolformat import format_message
from relayd.values import Envelope

BIN = Path(sys.executable).parent
BODY = (
    b"From: billing@acme.example\r\nTo: client@customer.test\r\nSubject: invoice\r\n"
    b"Message-ID: <bench@acme.example>\r\n\r\n" + b"Your invoice is attached.\r\n" * 40
)


def free_port() -> int:
    """A port nothing listens on once this returns (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(root: Path, listen_port: int, upstream_port: int) -> Path:
    config = root / "relay.yaml"
    config.write_text(
        "version: 1\n"
        "hostname: relay.bench\n"
        f"spool_dir: {root / 'spool'}\n"
        f"log_file: {root / 'mainlog'}\n"
        f"credentials: {{store: {root / 'credentials.enc'}}}\n"
        "listeners:\n"
        f"  - {{name: local, address: 127.0.0.1, port: {listen_port}, tls: none}}\n"
        "transports:\n"
        f"  down: {{host: 127.0.0.1, port: {upstream_port}, tls: none, connect_timeout: 5s}}\n"
        "tenants:\n"
        "  acme:\n"
        f'    password_hash: "{hash_password("bench-password")}"\n'
        '    senders: ["*@acme.example"]\n'
        "    routes:\n"
        '      - {domains: ["*"], via: [down]}\n'
    )
    return config


def write_queue(spool: Path, count: int, now: float) -> None:
    """`count` messages spread over the last two days, one or two recipients each."""
    queue = spool / "queue"
    for shard in ALPHABET:
        (queue / shard).mkdir(mode=0o700, parents=True, exist_ok=True)
    for i in range(count):
        received = now - (i % 172800)
        mid = new_message_id(received)
        recipients = (f"client{i}@customer{i % 50}.test",) + ((f"cc{i}@other.test",) if i % 3 == 0 else ())
        env = Envelope(mid, "acme", "billing@acme.example", recipients, received, len(BODY), protocol="local")
        fd = os.open(queue / mid[5] / mid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, format_message(env, BODY))
        finally:
            os.close(fd)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for(predicate: object, timeout: float, poll: float = 0.02) -> float:
    """Seconds until predicate() is true; raises after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate():  # type: ignore[operator]
                return time.monotonic() - started
        except ControlUnavailable:
            pass
        time.sleep(poll)
    raise SystemExit(f"not reached within {timeout}s")


def timed(argv: list[str], *, runs: int, to_pipe: bool = False) -> tuple[float, float, int]:
    """Best and median wall time of a command, and its output size in lines (last run)."""
    times = []
    lines = 0
    for _ in range(runs):
        started = time.monotonic()
        if to_pipe:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
            lines = proc.stdout.count(b"\n")
        else:
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
        times.append(time.monotonic() - started)
    return min(times), statistics.median(times), lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    relayd: subprocess.Popen[bytes] | None = None
    try:
        config = write_config(root, free_port(), free_port())
        started = time.monotonic()
        write_queue(root / "spool", args.messages, time.time())
        print(f"queue written: {args.messages} messages in {time.monotonic() - started:.2f}s ({root / 'spool'})")

        client = ControlClient(root / "spool" / "control.sock", timeout=60)
        relayd = subprocess.Popen(
            [sys.executable, "-m", "relayd.daemon", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        startup = wait_for(lambda: client.request("status").get("ok"), 120)
        print(f"relayd start-up (spool load until the control socket answers): {startup:.2f}s")
        # Polled gently: each count walks the whole index on relayd's event loop.
        settle = wait_for(lambda: client.request("queue.count").get("deferred") == args.messages, 120, poll=0.5)
        log = (root / "mainlog").read_text().splitlines()
        deferrals = [line for line in log if " == " in line]
        attempted = {line.split()[2] for line in deferrals}
        print(f"queue settled as deferred {settle:.2f}s later; messages that tried the upstream: "
              f"{len(attempted)} of {args.messages} (deferral lines written: {len(deferrals)})")
        print(f"relayd RSS: {rss_mib(relayd.pid):.0f} MiB")

        base = ["--config", str(config)]
        best, median, _ = timed([str(BIN / "mailq"), *base], runs=args.runs)
        print(f"mailq > /dev/null: best {best:.3f}s, median {median:.3f}s")
        best, median, lines = timed([str(BIN / "mailq"), *base], runs=args.runs, to_pipe=True)
        print(f"mailq | pipe:      best {best:.3f}s, median {median:.3f}s ({lines} lines)")
        best, median, _ = timed([str(BIN / "relayctl"), *base, "queue", "count"], runs=args.runs)
        print(f"relayctl queue count:   best {best:.3f}s, median {median:.3f}s")
        best, median, _ = timed([str(BIN / "relayctl"), *base, "queue", "summary"], runs=args.runs)
        print(f"relayctl queue summary: best {best:.3f}s, median {median:.3f}s")
        best, median, _ = timed([str(BIN / "relayctl"), *base, "queue", "list", "--tenant", "acme",
                                 "--to", "customer7\\.test$", "-i"], runs=args.runs)
        print(f"relayctl queue list with filters: best {best:.3f}s, median {median:.3f}s")
        print(f"relayd RSS after the listings: {rss_mib(relayd.pid):.0f} MiB")
        relayd.send_signal(signal.SIGTERM)
        relayd.wait(60)
        return 0
    finally:
        if relayd is not None and relayd.poll() is None:
            relayd.kill()
            relayd.wait()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
