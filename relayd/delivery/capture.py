"""The capture transport: write each message into a Maildir instead of sending it.

Takes: a `Delivery` and the transport's Maildir.
Emits: an `AttemptResult` delivering every recipient at once, or deferring
them when the disk refuses the write.
Untrusted input: the envelope addresses, written as header fields (control
characters replaced).
How it fails: never raises for disk trouble; it becomes a deferral.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

from relayd import safeio
from relayd.config.model import CaptureTransportConfig
from relayd.delivery import failover
from relayd.values import AttemptResult, Delivery, RecipientResult, SmtpReply, Stage

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class CaptureTransport:
    """Writes every message into a Maildir instead of sending it (development)."""

    def __init__(self, config: CaptureTransportConfig) -> None:
        self.name = config.name
        self.config = config
        self._counter = 0

    def __repr__(self) -> str:
        return f"<CaptureTransport {self.name} {self.config.maildir}>"

    async def send(self, delivery: Delivery) -> AttemptResult:
        """Deliver all recipients at once by writing one Maildir file; disk errors defer."""
        self._counter += 1
        name = _maildir_name(delivery.message_id, self._counter)
        try:
            await asyncio.to_thread(_write_maildir, self.config.maildir, name, _captured(delivery))
        except OSError as exc:
            detail = f"cannot write to maildir {self.config.maildir}: {exc.strerror or exc}"
            outcome = failover.classify(Stage.WRITE, None)
            results = tuple(RecipientResult(a, outcome, Stage.WRITE, None, detail) for a in delivery.recipients)
            return AttemptResult(transport=self.name, results=results, detail=detail)
        reply = SmtpReply(250, f"2.0.0 captured as {name}")
        outcome = failover.classify(Stage.WRITE, reply)
        results = tuple(RecipientResult(a, outcome, Stage.WRITE, reply) for a in delivery.recipients)
        return AttemptResult(transport=self.name, results=results)

    async def close(self) -> None:
        """Nothing stays open between deliveries."""


def _header_value(text: str) -> str:
    return _CONTROL.sub("?", text)


def _captured(delivery: Delivery) -> bytes:
    lines = [f"Return-Path: <{_header_value(delivery.sender)}>\r\n"]
    lines += [f"X-Relayd-Envelope-To: <{_header_value(r)}>\r\n" for r in delivery.recipients]
    return "".join(lines).encode("utf-8") + delivery.body


def _maildir_name(message_id: str, counter: int) -> str:
    """A unique Maildir file name: time, a sequence and random part, the message id."""
    now = time.time()
    safe_id = _UNSAFE_NAME.sub("_", message_id)[:64]
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}Q{counter}R{uuid.uuid4().hex[:12]}.{safe_id}"


def _write_maildir(maildir: Path, name: str, content: bytes) -> None:
    """Maildir delivery: write to tmp/, fsync, rename into new/, fsync new/."""
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    safeio.write_file(
        maildir / "new" / name, content, mode=0o600, directory_mode=None, temp_path=maildir / "tmp" / name
    )


