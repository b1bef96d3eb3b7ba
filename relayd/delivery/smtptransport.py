"""The SMTP transport: hand one `Delivery` to an upstream SMTP server.

Takes: a `Delivery` (sender, recipients, CRLF body), the transport's
configuration, a credential lookup and the HELO name.
Emits: one `AttemptResult` per attempt, with one `RecipientResult` per
recipient whose outcome `relayd.delivery.failover.classify` decided.
Untrusted input: everything the upstream sends (greeting, EHLO keywords,
reply texts). Reply texts are flattened to one printable line before they go
anywhere, and never decide anything except through `failover.classify`.
How it fails: `send()` never raises for network, SMTP, TLS or disk trouble;
every such problem becomes an outcome. Secrets are revealed only as they are
handed to aiosmtplib and appear in no result, detail or log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import (
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relayd.config.model import SmtpTransportConfig
from relayd.delivery import failover, mime7bit
from relayd.delivery.smtppool import ConnectionPool
from relayd.delivery.smtpsession import (
    CredentialLike,
    CredentialLookup,
    SessionStopped,
    UpstreamConnection,
    client_tls_context,
    lookup_credential,
    open_session,
    resolve_login,
)
from relayd.delivery.smtpwire import clean_text, has_8bit, no_reply_detail, reply_of, smtp_reply, smtputf8_need, wire_body
from relayd.values import AttemptOutcome, AttemptResult, Delivery, RecipientResult, SmtpReply, Stage


@dataclass
class _Txn:
    """What one MAIL..DATA transaction produced, and what to do with the connection."""

    results: dict[str, RecipientResult] = field(default_factory=dict)
    keep: bool = False
    stale: bool = False  # the connection was found dead before MAIL was accepted
    connection_failed: bool = False
    detail: str = ""


def _token_refused(stop: SessionStopped) -> bool:
    return stop.stage is Stage.AUTH and stop.reply is not None and stop.reply.code == 535


class SmtpTransport:
    """An upstream SMTP server reached with STARTTLS, implicit TLS or (loopback) plaintext."""

    def __init__(
        self,
        config: SmtpTransportConfig,
        *,
        credentials: CredentialLookup,
        helo_name: str,
    ) -> None:
        self.name = config.name
        self.config = config
        self._credentials = credentials
        self._helo = config.helo_name or helo_name
        self._context: ssl.SSLContext | None = None
        self._pool = ConnectionPool(config)

    def __repr__(self) -> str:
        c = self.config
        return f"<SmtpTransport {c.name} {c.host}:{c.port} tls={c.tls.value}>"

    async def send(self, delivery: Delivery) -> AttemptResult:
        """Attempt `delivery` once; see the module docstring for the guarantees."""
        if not delivery.recipients:
            return AttemptResult(transport=self.name, results=())
        for attempt in (1, 2):
            try:
                conn = await self._checkout()
            except SessionStopped as stop:
                return self._stopped_result(delivery, stop)
            reused = conn.messages > 0
            txn = await self._transact(conn, delivery)
            # A reused connection that died while idle is replaced once: nothing
            # was sent on it, so a fresh connection is safe and no failure.
            if txn.stale and reused and attempt == 1:
                continue
            return self._txn_result(delivery, conn, txn)
        raise AssertionError("unreachable: the second attempt always returns")

    async def close(self) -> None:
        """QUIT every idle connection; busy ones are closed when they come back."""
        await self._pool.close()

    # -- connections

    async def _checkout(self) -> UpstreamConnection:
        source, problem = self._lookup_credential()
        if problem is not None:
            raise SessionStopped("AUTH", Stage.AUTH, None, problem)
        conn = await self._pool.take()
        if conn is not None:
            return conn
        try:
            try:
                return await self._open(source)
            except SessionStopped as stop:
                if source is None or source.kind != "oauth" or not _token_refused(stop):
                    raise
            # The upstream refused the access token (it ended early: revoked
            # session, clock skew): forget it and log in once more with a new one.
            source.refused()
            try:
                return await self._open(source)
            except SessionStopped as stop:
                if _token_refused(stop):
                    source.refused()
                raise
        except BaseException:
            await self._pool.release_slot()
            raise

    async def _open(self, source: CredentialLike | None) -> UpstreamConnection:
        credential, problem = await resolve_login(source)
        if problem is not None:
            raise SessionStopped("AUTH", Stage.AUTH, None, problem)
        return await open_session(
            self.config,
            context=self._tls_context(),
            helo_name=self._helo,
            credential=credential,
            credential_problem=None,
        )

    def _lookup_credential(self) -> tuple[CredentialLike | None, str | None]:
        return lookup_credential(self.config, self._credentials)

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = client_tls_context(self.config)
            except (OSError, ssl.SSLError) as exc:
                detail = f"cannot load ca_file {self.config.ca_file}: {exc.strerror or exc}"
                raise SessionStopped("certificate", Stage.CONNECT, None, detail) from None
        return self._context

    # -- the transaction

    async def _transact(self, conn: UpstreamConnection, delivery: Delivery) -> _Txn:
        try:
            txn = await self._transaction(conn, delivery)
        except (SMTPException, OSError) as exc:
            # Every step handles its own failures; this is the net under them.
            # Not knowing how far the transaction got, assume the body may have
            # left (defer, never a second provider now).
            detail = clean_text(f"unexpected upstream error: {type(exc).__name__}: {exc}")
            txn = self._all(delivery.recipients, Stage.AFTER_DATA, None, detail, connection_failed=True)
        except BaseException:
            await self._pool.discard(conn, polite=False)
            raise
        if txn.keep and conn.smtp.is_connected:
            await self._pool.give_back(conn)
        else:
            await self._pool.discard(conn, polite=False)
        return txn

    async def _transaction(self, conn: UpstreamConnection, delivery: Delivery) -> _Txn:
        smtp = conn.smtp
        prepared = await self._fit_to_upstream(smtp, delivery)
        if isinstance(prepared, _Txn):
            return prepared
        delivery = prepared
        payload = wire_body(delivery.body)
        txn = await self._mail(conn, delivery, payload)
        if txn is not None:
            return txn
        txn, accepted = await self._rcpts(conn, delivery)
        if txn.connection_failed:
            return txn
        if not accepted:  # every recipient refused: end the transaction without DATA
            txn.keep = await self._rset(smtp)
            return txn
        return await self._data(conn, txn, accepted, payload)

    async def _fit_to_upstream(self, smtp: aiosmtplib.SMTP, delivery: Delivery) -> Delivery | _Txn:
        """The delivery as this upstream can take it (RFC 6152, RFC 6531), or why it cannot.

        SMTPUTF8 is used when the upstream offers it and the client asked for
        it or the message needs it. A message that needs it (non-ASCII
        addresses, 8-bit header fields) goes nowhere else: each recipient gets
        a local 5xx at MAIL, so the chain moves on and, when no transport of
        it offers SMTPUTF8, the recipient fails at once with that reason.
        An 8-bit body to an upstream without 8BITMIME is converted to 7-bit
        MIME in a worker thread (CPU work on up to 25 MB).
        """
        offers_smtputf8 = smtp.supports_extension("smtputf8")
        why = smtputf8_need(delivery)
        if why is not None and not offers_smtputf8:
            return self._smtputf8_missing(delivery, why)
        body = delivery.body
        if has_8bit(body) and not smtp.supports_extension("8bitmime"):
            try:
                body = await asyncio.to_thread(mime7bit.to_7bit, body)
            except mime7bit.NeedsSmtpUtf8:
                return self._smtputf8_missing(delivery, "8-bit MIME part header fields")
        smtputf8 = offers_smtputf8 and (delivery.smtputf8 or why is not None)
        if body is delivery.body and smtputf8 == delivery.smtputf8:
            return delivery
        return dataclasses.replace(delivery, body=body, smtputf8=smtputf8)

    def _smtputf8_missing(self, delivery: Delivery, why: str) -> _Txn:
        address_case = why.startswith("non-ASCII")
        reply = SmtpReply(553, "5.6.7 SMTPUTF8 required") if address_case else SmtpReply(554, "5.6.9 SMTPUTF8 required")
        detail = (
            f"SMTPUTF8 required ({why}) but transport {self.name} ({self.config.host}) does not offer it"
        )
        txn = _Txn(keep=True, detail=detail)
        for address in delivery.recipients:
            txn.results[address] = RecipientResult(
                address, AttemptOutcome.NEXT_TRANSPORT, Stage.MAIL, reply, detail, local=True
            )
        return txn

    def _mail_options(self, smtp: aiosmtplib.SMTP, delivery: Delivery, payload: bytes) -> list[str]:
        options: list[str] = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(payload)}")
        if delivery.smtputf8:
            options.append("SMTPUTF8")
        if has_8bit(delivery.body) and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        return options

    async def _mail(self, conn: UpstreamConnection, delivery: Delivery, payload: bytes) -> _Txn | None:
        smtp, timeout = conn.smtp, self.config.command_timeout
        options = self._mail_options(smtp, delivery, payload)
        encoding = "utf-8" if delivery.smtputf8 else "ascii"
        try:
            await smtp.mail(delivery.sender, options=options, encoding=encoding, timeout=timeout)
        except SMTPSenderRefused as exc:
            txn = self._all(delivery.recipients, Stage.MAIL, reply_of(exc), "", keep=False)
            txn.keep = await self._rset(smtp)
            txn.connection_failed = True
            return txn
        except SMTPServerDisconnected as exc:
            txn = self._all(delivery.recipients, Stage.MAIL, None, no_reply_detail(exc, "MAIL FROM", timeout))
            txn.stale = txn.connection_failed = True
            return txn
        except SMTPTimeoutError as exc:
            txn = self._all(delivery.recipients, Stage.MAIL, None, no_reply_detail(exc, "MAIL FROM", timeout))
            txn.connection_failed = True
            return txn
        except (UnicodeEncodeError, ValueError):
            # The address cannot be written on an SMTP command line at all
            # (control characters, or non-ASCII without SMTPUTF8). No upstream
            # will ever take it, so this is permanent; nothing was sent.
            detail = "the sender address cannot be sent in an SMTP command"
            return self._all(delivery.recipients, Stage.MAIL, None, detail, keep=True, fixed=AttemptOutcome.FAIL)
        conn.messages += 1
        return None

    async def _rcpts(self, conn: UpstreamConnection, delivery: Delivery) -> tuple[_Txn, list[str]]:
        smtp, timeout = conn.smtp, self.config.command_timeout
        encoding = "utf-8" if delivery.smtputf8 else "ascii"
        txn = _Txn(keep=True)
        accepted: list[str] = []
        for address in delivery.recipients:
            try:
                await smtp.rcpt(address, encoding=encoding, timeout=timeout)
            except SMTPRecipientRefused as exc:
                reply = reply_of(exc)
                if reply.code == 421:  # the upstream is closing: nobody goes through now
                    return self._all(delivery.recipients, Stage.RCPT, reply, "", connection_failed=True), []
                txn.results[address] = self._result(address, Stage.RCPT, reply, "")
                continue
            except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
                detail = no_reply_detail(exc, "RCPT TO", timeout)
                return self._all(delivery.recipients, Stage.RCPT, None, detail, connection_failed=True), []
            except (UnicodeEncodeError, ValueError):
                detail = "the recipient address cannot be sent in an SMTP command"
                txn.results[address] = RecipientResult(address, AttemptOutcome.FAIL, Stage.RCPT, None, detail)
                continue
            accepted.append(address)
        return txn, accepted

    async def _data(self, conn: UpstreamConnection, txn: _Txn, accepted: list[str], payload: bytes) -> _Txn:
        smtp, timeout = conn.smtp, self.config.command_timeout
        try:
            start = await smtp.execute_command(b"DATA", timeout=timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
            return self._finish(txn, accepted, Stage.DATA, None, no_reply_detail(exc, "DATA", timeout),
                                keep=False, connection_failed=True)
        if start.code != 354:
            reply = smtp_reply(start.code, start.message)
            keep = reply.code != 421 and await self._rset(smtp)
            return self._finish(txn, accepted, Stage.DATA, reply, "", keep=keep,
                                connection_failed=reply.code == 421)
        final = await self._send_body(smtp, payload, timeout)
        if isinstance(final, str):
            return self._finish(txn, accepted, Stage.AFTER_DATA, None, final, keep=False)
        return self._finish(txn, accepted, Stage.AFTER_DATA, final, "",
                            keep=final.code != 421 and smtp.is_connected)

    async def _send_body(self, smtp: aiosmtplib.SMTP, payload: bytes, timeout: float) -> SmtpReply | str:
        """Write the dot-stuffed body and its terminator; the final reply, or why there is none.

        Done here rather than with aiosmtplib's data() so that a failure before
        the 354 (nothing sent) and one after the body (maybe delivered) stay apart.
        """
        protocol = smtp.protocol
        try:
            if protocol is None:
                raise SMTPServerDisconnected("connection lost")
            protocol.write(payload + b".\r\n")
            response = await protocol.read_response(timeout=timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError) as exc:
            smtp.close()
            return no_reply_detail(exc, "end of data", timeout)
        except SMTPResponseException as exc:  # a malformed or oversized reply
            smtp.close()
            return reply_of(exc)
        return smtp_reply(response.code, response.message)

    async def _rset(self, smtp: aiosmtplib.SMTP) -> bool:
        """Reset the transaction so the connection can be reused; False: discard it."""
        if not smtp.is_connected:
            return False
        try:
            await smtp.rset(timeout=self.config.command_timeout)
        except (SMTPException, OSError):
            return False
        return True

    # -- building results

    def _result(self, address: str, stage: Stage, reply: SmtpReply | None, detail: str) -> RecipientResult:
        outcome = failover.classify(stage, reply, provider=self.config.provider)
        return RecipientResult(address, outcome, stage, reply, detail)

    def _all(
        self,
        addresses: tuple[str, ...],
        stage: Stage,
        reply: SmtpReply | None,
        detail: str,
        *,
        keep: bool = False,
        connection_failed: bool = False,
        fixed: AttemptOutcome | None = None,
    ) -> _Txn:
        txn = _Txn(keep=keep, connection_failed=connection_failed, detail=detail or str(reply or ""))
        for address in addresses:
            result = self._result(address, stage, reply, detail)
            if fixed is not None:
                result = RecipientResult(address, fixed, stage, reply, detail)
            txn.results[address] = result
        return txn

    def _finish(
        self,
        txn: _Txn,
        accepted: list[str],
        stage: Stage,
        reply: SmtpReply | None,
        detail: str,
        *,
        keep: bool,
        connection_failed: bool = False,
    ) -> _Txn:
        for address in accepted:
            txn.results[address] = self._result(address, stage, reply, detail)
        txn.keep = keep
        txn.connection_failed = connection_failed
        if reply is None or not 200 <= reply.code < 300:
            txn.detail = detail or str(reply)
        return txn

    def _txn_result(self, delivery: Delivery, conn: UpstreamConnection, txn: _Txn) -> AttemptResult:
        return AttemptResult(
            transport=self.name,
            results=tuple(txn.results[a] for a in delivery.recipients),
            host=self.config.host,
            ip=conn.ip,
            port=self.config.port,
            tls=conn.tls,
            connection_failed=txn.connection_failed,
            detail=txn.detail,
        )

    def _stopped_result(self, delivery: Delivery, stop: SessionStopped) -> AttemptResult:
        results = tuple(self._result(a, stop.stage, stop.reply, stop.detail) for a in delivery.recipients)
        return AttemptResult(
            transport=self.name,
            results=results,
            host=self.config.host,
            port=self.config.port,
            connection_failed=True,
            detail=stop.detail,
        )


