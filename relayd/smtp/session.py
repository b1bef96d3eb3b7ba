"""The SMTP commands of a submission session: EHLO, AUTH, DATA, and replies with enhanced codes.

Takes: command lines from aiosmtpd's command loop on a `SubmissionConnection`
(relayd.smtp.connection). Emits: replies, `AuthFailed` and `AuthThrottled`
events, and the DATA bytes handed to `SubmissionHandler.receive_message`.
Untrusted input: every command argument, AUTH data and DATA byte. Fails: every
refusal is a named reply (relayd.replies); too many errors close the session
with `421`.

aiosmtpd does the command loop, STARTTLS and address parsing; this module
replaces EHLO (exact capability list), AUTH (async password check, TLS rule,
throttling), and DATA (reads large chunks instead of line by line and streams
them to the spool, with relayd's own smuggling, NUL and line-length rules:
relayd.smtp.datastream), and adds enhanced status codes to the replies aiosmtpd
writes itself.
"""

from __future__ import annotations

import asyncio
import binascii
from typing import Protocol, cast

from aiosmtpd.smtp import MISSING

from relayd import replies
from relayd.observe.events import AuthFailed, AuthThrottled
from relayd.smtp import policy
from relayd.smtp.authguard import Attempt, limits_of
from relayd.smtp.connection import READ_CHUNK, SubmissionConnection, helo_name_ok, with_enhanced_code
from relayd.smtp.sessionlimits import DataDeadline
from relayd.smtp.submission import SubmissionHandler


class _PushbackReader(Protocol):
    """asyncio.StreamReader's buffer: bytes read past DATA's final dot go back in front of it.

    StreamReader has no public way to unread; this is the one private attribute relied on.
    """

    _buffer: bytearray


class SubmissionProtocol(SubmissionConnection):
    """One client connection on one listener, with relayd's SMTP commands."""

    # -- replies ----------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._closing:
            return  # a 421 has been sent: nothing more goes to this client
        line = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        if not self._greeted:
            self._greeted = True  # the greeting carries no enhanced code
        else:
            line = with_enhanced_code(line)
        await super().push(line)
        if line[:1] in (b"4", b"5") and not line.startswith(b"421") and not self._budget.error(line):
            reason = f"too many errors ({self.listener.hard_error_limit}; last reply {line[:3].decode('ascii', 'replace')})"
            self._drop(replies.too_many_errors(self.hostname), reason)

    async def _push_lines(self, lines: list[str]) -> None:
        text = "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        )
        self._writer.write(text.encode("utf-8"))
        await self._writer.drain()

    # -- commands ---------------------------------------------------------------

    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and not helo_name_ok(hostname):
            await self.push(replies.bad_helo("HELO"))
            return
        await super().smtp_HELO(hostname)

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        if not helo_name_ok(hostname):
            await self.push(replies.bad_helo("EHLO"))  # never echoed: it may not even decode
            return
        self.envelope = self._create_envelope()  # aiosmtpd's RSET state: a fresh envelope
        session = self.submission_session()
        session.extended_smtp = True
        session.host_name = hostname
        lines = [
            f"{self.hostname} Hello {hostname} [{self.client_ip}]",
            f"SIZE {self.listener.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and not self.is_encrypted:
            lines.append("STARTTLS")
        if self.auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        await self._push_lines(lines)

    async def smtp_AUTH(self, arg: str) -> None:
        session = self.submission_session()
        if not session.host_name or not session.extended_smtp:
            await self.push(replies.AUTH_NEEDS_EHLO)
            return
        if not self.auth_offered():
            await self.push(replies.AUTH_NEEDS_TLS)
            return
        if session.authenticated:
            await self.push(replies.AUTH_ALREADY)
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            await self.push(replies.AUTH_SYNTAX)
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            credentials = await self._read_plain(args[1] if len(args) == 2 else None)
        elif mechanism == "LOGIN":
            credentials = await self._read_login(args[1] if len(args) == 2 else None)
        else:
            await self.push(replies.AUTH_MECHANISM_UNKNOWN)
            return
        if credentials is None:
            return
        login, password = credentials
        # Counted before the (slow) check starts, so parallel attempts are counted too.
        attempt = self.services.guard.begin(login, self.auth_source, limits_of(self.listener))
        if not isinstance(attempt, Attempt):
            self.services.events.emit(AuthThrottled(
                client_ip=self.client_ip or self.auth_source, login=login,
                reason=attempt.reason, retry_after=attempt.retry_after,
            ))
            await self._reply_and_close(replies.AUTH_TOO_MANY)
            return
        tenant = await self.services.authenticate(login, password) if login else None
        if tenant is not None:
            self.services.guard.succeeded(attempt)
            session.authenticated = True
            session.tenant_name = tenant.name
            session.auth_mechanism = mechanism
            await self.push(replies.AUTH_OK)
            return
        await self._auth_failed(login, attempt)

    async def _auth_failed(self, login: str, attempt: Attempt) -> None:
        delay = self.services.guard.failed(attempt)
        self.services.events.emit(AuthFailed(client_ip=self.client_ip or self.auth_source, login=login))
        if delay:
            await asyncio.sleep(delay)
        await self.push(replies.AUTH_INVALID)

    async def _reply_and_close(self, reply: str) -> None:
        """Say `reply` and hang up (a throttled login gets no second try on this connection)."""
        await self.push(reply)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _decode_b64(self, text: str) -> bytes | None:
        if text == "=":
            return b""
        try:
            return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            await self.push(replies.AUTH_BAD_BASE64)
            return None

    async def _challenge(self, prompt: str) -> bytes | None:
        answer = await self.challenge_auth(prompt)
        return None if answer is MISSING else bytes(answer)

    async def _read_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = await (self._decode_b64(initial) if initial is not None else self._challenge(""))
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push(replies.AUTH_BAD_BASE64)
            return None
        try:
            authzid, login, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            await self.push(replies.AUTH_BAD_BASE64)
            return None
        if authzid and authzid != login:
            return "", ""  # acting as another identity is not supported: plain failure
        return login, password

    async def _read_login(self, initial: str | None) -> tuple[str, str] | None:
        user = await (
            self._decode_b64(initial) if initial is not None else self._challenge("Username:")
        )
        if user is None:
            return None
        password = await self._challenge("Password:")
        if password is None:
            return None
        try:
            return user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push(replies.AUTH_BAD_BASE64)
            return None

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push(replies.NEED_MAIL)
            return
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler: SubmissionHandler = self.event_handler
        tenant = handler.tenant_for(self.submission_session())
        if tenant is None:
            await self.push(replies.AUTH_REQUIRED)
            return
        size_limit = policy.effective_limit(self.listener.max_message_size, tenant.max_message_size)
        refusal = handler.room_refusal(self.submission_session(), tenant, self.envelope.mail_options)
        if refusal is not None:
            await self.push(refusal)
            return
        await self.push(replies.START_DATA)
        self._in_data = True
        self._data_deadline = DataDeadline(
            started=self.loop.time(), line_timeout=self.listener.data_timeout,
            min_rate=self.listener.min_data_rate, max_bytes=size_limit,
        )
        try:
            reply = await handler.receive_message(self, tenant, size_limit)
        finally:
            self._in_data = False
            self._data_deadline = None
        if reply is None:
            return  # connection closed mid-DATA: nothing was promised
        self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state: a fresh envelope
        if reply.startswith("250"):
            self._budget.message_accepted()
        await self.push(reply)

    async def read_data_chunk(self) -> bytes:
        """The next piece of DATA as the client sent it; b"" when the client went away.

        Deadlines that apply inside DATA belong here: every read passes through.
        """
        deadline = self._data_deadline
        if deadline is not None and not self._arm_data_deadline(deadline):
            return b""  # too slow: the 421 is written and the connection is closing
        if deadline is None:
            self._reset_timeout(self.listener.data_timeout)
        chunk: bytes = await self._reader.read(READ_CHUNK)
        if chunk and deadline is not None:
            deadline.note(chunk, self.loop.time())
        return chunk

    def end_of_data(self, leftover: bytes) -> None:
        """After the final dot: commands pipelined behind it go back to aiosmtpd's command loop."""
        if leftover:
            cast(_PushbackReader, self._reader)._buffer[0:0] = leftover
        self._reset_timeout()

    def _arm_data_deadline(self, deadline: DataDeadline) -> bool:
        """Time the next DATA read out at the nearest deadline; False if one has passed."""
        left = deadline.seconds_left(self.loop.time())
        if left <= 0:
            self._timeout_cb()
            return False
        self._reset_timeout(left)
        return True
