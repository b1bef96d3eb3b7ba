"""One message between 354 and the final dot: the header block in memory, the body to the spool.

Takes: checked DATA bytes (from `relayd.smtp.datastream.DataDecoder`) in pieces; the
session's envelope as a template `Envelope`; the tenant; the listener's limits;
a `receive` call that opens a message in the queue (`IncomingBody`).
Emits: the reply to DATA once the end marker is seen: `250 ... id=` only
after `IncomingBody.commit` returned (the message is durable), or a refusal.
Untrusted input: the bytes are the client's. The header block is held only up
to `max_header_size` (552 5.3.4 past it); policy runs on it (From: check,
Received: count) before anything is written; then the trace fields and the
header block are written and the body follows in pieces, so memory per
session stays bounded whatever the message size.
How it fails: a policy refusal, a header block too large or a spool error
(452/451 from `receive`) stops writing and removes the partial file; the
caller keeps reading to the end marker so the session stays in step. Any
other end (disconnect, timeout, cancellation) calls `abort`, which removes it.

Trace fields (RFC 5321 4.4, and what Exim and Postfix add): a Received: field
is prepended; Date: and Message-ID: are appended to the header block when it
has none. Every other byte is stored as the client sent it (after the DATA
rules of relayd.smtp.policy).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Awaitable, Callable, Protocol

from relayd.smtp import headers
from relayd.smtp import policy
from relayd import replies
from relayd.config.model import ListenerConfig, TenantConfig
from relayd.values import Envelope


class IncomingBody(Protocol):
    """A message being written to the queue (the daemon wraps `spool.IncomingMessage`).

    Every call may raise `SubmissionRefused` with the reply
    (452 4.3.1 for a full disk, 451 4.3.0 otherwise).
    """

    @property
    def id(self) -> str: ...

    async def begin(self, envelope: Envelope) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> str: ...

    def abort(self) -> None: ...


class SubmissionRefused(Exception):
    """Raised when the queue cannot take a message; carries the reply (already logged)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class DataTurns:
    """Shares the event loop between DATA sessions and everyone else.

    Checking a chunk of DATA is CPU work on the event loop. Without a limit,
    every session with data waiting checks a chunk in each loop round, so with
    a hundred clients pouring in messages a round lasts a hundred chunks, and a
    client that only wants its greeting waits several such rounds. Here at
    most `slots` sessions check a chunk per round: a session takes a slot,
    checks one chunk, and gives the slot back only in the next round. The
    others wait without reading, so TCP flow control holds their clients back.
    Throughput is unchanged (the loop is busy either way); rounds stay short.
    """

    def __init__(self, slots: int = 8) -> None:
        self._slots = asyncio.Semaphore(slots)

    async def __aenter__(self) -> None:
        await self._slots.acquire()

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.sleep(0)  # hold the slot to the end of this loop round
        finally:
            self._slots.release()


class MessageIntake:
    """Collects the header block, checks it, then streams the message into the queue."""

    def __init__(
        self,
        *,
        template: Envelope,
        tenant: TenantConfig,
        listener: ListenerConfig,
        hostname: str,
        receive: Callable[[Envelope], Awaitable[IncomingBody]],
    ) -> None:
        self._template = template
        self._tenant = tenant
        self._listener = listener
        self._hostname = hostname
        self._receive = receive
        self._header: bytearray | None = bytearray()
        self._incoming: IncomingBody | None = None
        self.refusal: str | None = None
        self.refusal_logged = False  # a spool refusal was logged where it happened
        self.refusal_detail = ""

    async def take(self, data: bytes) -> None:
        """Add checked bytes; does nothing once the message is refused."""
        if self.refusal is not None or not data:
            return
        header = self._header
        if header is not None:
            search_from = max(0, len(header) - 3)
            header += data
            end = _header_end(header, search_from)
            limit = self._listener.max_header_size
            if end < 0:
                if len(header) > limit:
                    self._refuse_header_size()
                return
            if end > limit:
                self._refuse_header_size()
                return
            block, data = bytes(header[:end]), bytes(header[end:])
            self._header = None
            await self._start(block)
            if self.refusal is not None or not data:
                return
        await self._write(data)

    async def finish(self) -> str:
        """After the end marker: commit and answer 250, or the refusal."""
        if self.refusal is None and self._header is not None:
            block, self._header = bytes(self._header), None  # a message with no empty line
            await self._start(block)
        if self.refusal is not None or self._incoming is None:
            self.abort()
            return self.refusal or replies.INTERNAL_ERROR
        incoming, self._incoming = self._incoming, None
        try:
            queue_id = await incoming.commit()
        except SubmissionRefused as exc:
            incoming.abort()
            self._set_refusal(exc.reply, logged=True)
            return exc.reply
        except BaseException:
            incoming.abort()
            raise
        return replies.queued(queue_id)

    def abort(self) -> None:
        """Remove whatever was written (disconnect, timeout, refusal)."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.abort()

    # -- internals -------------------------------------------------------------

    def _set_refusal(self, reply: str, *, logged: bool = False, detail: str = "") -> None:
        self.refusal = reply
        self.refusal_logged = logged
        self.refusal_detail = detail
        self._header = None
        self.abort()

    def _refuse_header_size(self) -> None:
        limit = self._listener.max_header_size
        self._set_refusal(
            f"552 5.3.4 Message header exceeds the maximum size of {limit} bytes",
            detail="header too big",
        )

    async def _start(self, block: bytes) -> None:
        """Policy on the header block, then open the queue file and write the head of the message."""
        facts = await asyncio.to_thread(headers.read_header_facts, block)
        refusal = headers.too_many_hops(facts, self._listener.max_received_headers)
        if refusal is None:
            refusal = policy.check_header_from(self._tenant, facts)
        if refusal is not None:
            self._set_refusal(refusal, detail=f"A={self._tenant.name}")
            return
        try:
            incoming = await self._receive(self._template)
        except SubmissionRefused as exc:
            self._set_refusal(exc.reply, logged=True)
            return
        self._incoming = incoming
        message_id = (facts.message_id if facts.has_message_id
                      else headers.message_id_value(incoming.id, self._hostname))
        envelope = replace(self._template, id=incoming.id, header_message_id=message_id)
        head = self._trace_field(envelope) + block
        if not facts.has_date:
            head += headers.date_field(envelope.received_at)
        if not facts.has_message_id:
            head += headers.message_id_field(incoming.id, self._hostname)
        try:
            await incoming.begin(envelope)
        except SubmissionRefused as exc:
            self._set_refusal(exc.reply, logged=True)
            return
        await self._write(head)

    def _trace_field(self, envelope: Envelope) -> bytes:
        return headers.received_field(headers.TraceInfo(
            helo=envelope.client_helo,
            client_ip=envelope.client_ip,
            hostname=self._hostname,
            protocol=envelope.protocol,
            queue_id=envelope.id,
            recipients=envelope.recipients,
            received_at=envelope.received_at,
            tls=envelope.tls,
        ))

    async def _write(self, data: bytes) -> None:
        incoming = self._incoming
        if incoming is None:
            return
        try:
            await incoming.write(data)
        except SubmissionRefused as exc:
            self._set_refusal(exc.reply, logged=True)


def _header_end(header: bytearray, search_from: int) -> int:
    """Length of the header block (through the CRLF ending its last field); -1 if not yet seen."""
    if header.startswith(b"\r\n"):
        return 0
    end = header.find(b"\r\n\r\n", search_from)
    return -1 if end < 0 else end + 2
