"""The load generator: many concurrent SMTP sessions, plain or STARTTLS + AUTH PLAIN.

Takes: a target (host, port), a mode, the number of concurrent sessions, a
total message count, a payload size, and a number of worker processes (so the
generator itself is not held to one core). The AUTH password comes from the
environment (BENCH_SMTP_PASSWORD), never from the command line.
Emits: one JSON object on stdout: messages accepted and failed, the first
errors, wall-clock start/end of the submission phase, submission latencies
(from sending the final "." to reading the 250) as percentiles, and the
generator's own CPU seconds (to show it is not the bottleneck).
Untrusted input: the server's replies.
How it fails: a failed session is counted with its reply; the run stops at
the deadline (--timeout) with whatever was sent. Every loop is bounded by the
message count and the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import resource
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

from relaybench.smtpio import SmtpError, build_message, expect

SENDER = "bench@bench.example"
RECIPIENT = "sink@sink.example"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    mode: str  # "plain" | "auth"
    source: str
    user: str
    password: str
    cafile: str | None
    server_name: str
    timeout: float


class _Counter:
    def __init__(self, n: int) -> None:
        self.left = n

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def _session(target: Target, message: bytes, tls: ssl.SSLContext | None) -> float:
    """One connection, one message; returns the DATA latency in seconds."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(target.host, target.port, local_addr=(target.source, 0), limit=1 << 20),
        timeout=target.timeout,
    )
    try:
        await expect(reader, 220)
        writer.write(b"EHLO bench.example\r\n")
        await expect(reader, 250)
        if target.mode == "auth":
            writer.write(b"STARTTLS\r\n")
            await expect(reader, 220)
            assert tls is not None  # made for mode "auth"
            await writer.start_tls(tls, server_hostname=target.server_name)
            writer.write(b"EHLO bench.example\r\n")
            await expect(reader, 250)
            token = base64.b64encode(f"\0{target.user}\0{target.password}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await expect(reader, 235)
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
        await expect(reader, 250)
        writer.write(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
        await expect(reader, 250)
        writer.write(b"DATA\r\n")
        await expect(reader, 354)
        writer.write(message)
        writer.write(b".\r\n")
        sent = time.perf_counter()
        await expect(reader, 250)
        latency = time.perf_counter() - sent
        writer.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(expect(reader, 221), timeout=5)
        except (SmtpError, asyncio.TimeoutError, OSError):
            pass  # the message is already accepted; a sloppy QUIT does not undo that
        return latency
    finally:
        writer.close()


async def _worker_main(target: Target, sessions: int, messages: int, size: int) -> dict[str, Any]:
    tls = ssl.create_default_context(cafile=target.cafile) if target.mode == "auth" else None
    message = build_message(size, SENDER, RECIPIENT)
    counter = _Counter(messages)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + target.timeout

    async def lane() -> None:
        while time.monotonic() < deadline and counter.take():
            try:
                latencies.append(
                    await asyncio.wait_for(_session(target, message, tls), timeout=min(60.0, target.timeout))
                )
            except (SmtpError, OSError, asyncio.TimeoutError, ssl.SSLError) as error:
                key = f"{type(error).__name__}: {error}"[:160]
                errors[key] = errors.get(key, 0) + 1
                if sum(errors.values()) > max(100, messages // 10):
                    counter.left = 0  # the server is refusing: stop instead of hammering it

    start = time.time()
    await asyncio.gather(*(lane() for _ in range(sessions)))
    return {"ok": len(latencies), "latencies": latencies, "errors": errors, "start": start, "end": time.time()}


def _run_worker(target: Target, sessions: int, messages: int, size: int, out: Any) -> None:
    try:
        import uvloop

        result = uvloop.run(_worker_main(target, sessions, messages, size))
    except ImportError:
        result = asyncio.run(_worker_main(target, sessions, messages, size))
    out.send(result)
    out.close()


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def run(target: Target, sessions: int, messages: int, size: int, workers: int) -> dict[str, Any]:
    """Run the load in `workers` processes and merge their results."""
    workers = max(1, min(workers, sessions))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ctx = multiprocessing.get_context("fork")
    procs, pipes = [], []
    for lanes, count in zip(split(sessions, workers), split(messages, workers)):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_run_worker, args=(target, lanes, count, size, child))
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    results = []
    for parent in pipes:
        if parent.poll(target.timeout + 30):
            results.append(parent.recv())
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return merge(results, messages, cpu=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))


def merge(results: list[dict[str, Any]], wanted: int, cpu: float) -> dict[str, Any]:
    from relaybench.measure import percentile

    latencies = [lat for r in results for lat in r["latencies"]]
    errors: dict[str, int] = {}
    for r in results:
        for key, n in r["errors"].items():
            errors[key] = errors.get(key, 0) + n
    start = min((r["start"] for r in results), default=0.0)
    end = max((r["end"] for r in results), default=0.0)
    return {
        "wanted": wanted,
        "ok": len(latencies),
        "failed": sum(errors.values()),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "start": start,
        "end": end,
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "client_cpu_s": round(cpu, 3),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="relaybench.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("plain", "auth"), default="plain")
    p.add_argument("--source", default="127.0.0.1", help="local address to connect from")
    p.add_argument("--user", default="bench")
    p.add_argument("--cafile")
    p.add_argument("--server-name", default="127.0.0.1")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0, help="deadline for the whole run, seconds")
    args = p.parse_args(argv)
    target = Target(
        host=args.host, port=args.port, mode=args.mode, source=args.source, user=args.user,
        password=os.environ.get("BENCH_SMTP_PASSWORD", ""), cafile=args.cafile,
        server_name=args.server_name, timeout=args.timeout,
    )
    result = run(target, args.sessions, args.messages, args.size, args.workers)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
