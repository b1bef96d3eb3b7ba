"""A counting SMTP sink in Python: the upstream for smoke runs, and a null server for capacity checks.

Takes: a port, optionally a certificate (then it offers STARTTLS and accepts
any AUTH PLAIN/LOGIN after it), a number of processes (SO_REUSEPORT).
Emits: on stdout, "msg=N" lines as its count of received messages grows
(the same shape `smtp-sink -c` prints, so the harness reads both alike).
Untrusted input: whatever the relay under test sends; commands are matched
loosely and the message is only scanned for its end marker, never stored.
How it fails: a broken session is dropped; the process runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
from typing import Any


class Sink:
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.count = 0
        self._reported = -1

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._dialog(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _dialog(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.bench.example ESMTP\r\n")
        encrypted = False
        for _ in range(100000):  # commands per session: bounded
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                caps = [b"sink.bench.example", b"PIPELINING", b"8BITMIME", b"SIZE 1073741824"]
                if self.tls is not None and not encrypted:
                    caps.append(b"STARTTLS")
                if encrypted:
                    caps.append(b"AUTH PLAIN LOGIN")
                writer.write(b"".join(b"250-" + c + b"\r\n" for c in caps[:-1]) + b"250 " + caps[-1] + b"\r\n")
            elif verb == b"HELO":
                writer.write(b"250 sink.bench.example\r\n")
            elif verb == b"STAR" and self.tls is not None and not encrypted:
                writer.write(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                await writer.start_tls(self.tls)
                encrypted = True
            elif verb == b"AUTH":
                writer.write(b"235 2.7.0 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                self.count += 1
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 2.0.0 ok\r\n")  # MAIL, RCPT, RSET, NOOP, XFORWARD...
            await writer.drain()

    async def report(self) -> None:
        while True:
            if self.count != self._reported:
                self._reported = self.count
                sys.stdout.write(f"msg={self.count}\n")
                sys.stdout.flush()
            await asyncio.sleep(0.02)


async def serve(port: int, tls: ssl.SSLContext | None) -> None:
    sink = Sink(tls)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    server = await asyncio.start_server(sink.session, sock=sock, limit=1 << 22)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reporter = loop.create_task(sink.report())
    await stop.wait()
    reporter.cancel()
    server.close()
    sys.stdout.write(f"msg={sink.count}\n")
    sys.stdout.flush()


def _run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="relaybench.sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--procs", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = p.parse_args(argv)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    children = []
    for _ in range(max(0, args.procs - 1)):
        pid = os.fork()
        if pid == 0:
            _run(serve(args.port, tls))
            os._exit(0)
        children.append(pid)
    try:
        _run(serve(args.port, tls))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
