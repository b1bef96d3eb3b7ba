"""Crash-test helper: accept messages into a spool until killed, acknowledging each.

Run as ``python tests/spool_crash_child.py <spool root> [flush mode]``. Several
concurrent writers call `Spool.accept`; a line ``ACK <id>`` is printed (and
flushed) only after `accept` returned, i.e. exactly when relayd would answer
250. The parent test kills this process with SIGKILL at a random moment and
then checks that every acknowledged id survived. Bounded: stops by itself
after MAX_MESSAGES or MAX_SECONDS so a lost parent never leaves it running.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relayd.queue.spool import Spool  # noqa: E402
from relayd.values import Envelope  # noqa: E402

WRITERS = 8
MAX_MESSAGES = 5000
MAX_SECONDS = 20.0


def body_for(message_id: str, n: int) -> bytes:
    """A body the parent can recognise: names its id, has 8-bit bytes, CRLF and a dot line."""
    filler = bytes(range(256)) * (1 + n % 7)
    return (
        f"Message-Id: <{message_id}@crash.test>\r\nSubject: crash {n}\r\n\r\n".encode()
        + b"..leading dot\r\n.\r\n"
        + filler
        + b"\r\nend\r\n"
    )


async def main(root: Path, flush_mode: str) -> None:
    spool = Spool(root, flush_mode=flush_mode)
    await spool.start()
    deadline = time.monotonic() + MAX_SECONDS
    counter = iter(range(MAX_MESSAGES))

    async def writer() -> None:
        for n in counter:
            if time.monotonic() > deadline:
                return
            message_id = spool.new_id()
            body = body_for(message_id, n)
            envelope = Envelope(
                id=message_id,
                tenant="crash",
                sender="app@example.com",
                recipients=("to@example.org",),
                received_at=time.time(),
                size=len(body),
            )
            entry = await spool.accept(envelope, body)
            sys.stdout.write(f"ACK {entry.id}\n")
            sys.stdout.flush()

    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    await spool.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "syncfs"))
