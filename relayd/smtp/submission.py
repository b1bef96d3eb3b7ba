"""The submission policy at MAIL, RCPT and DATA, and the hand-off of DATA to the queue.

Takes: aiosmtpd's MAIL and RCPT hooks for one listener, and the DATA of a
session whose envelope is complete (`DataConnection`, the session as this
module sees it). Emits: replies, `SmtpRefused` events, and the message streamed
into the queue through `services.receive` (relayd.smtp.intake). Untrusted
input: addresses, ESMTP options and message bytes. Policy decisions live in
relayd.smtp.policy (pure functions). Fails: every refusal is a named reply; an
unexpected exception becomes `451 4.3.0` and a log line.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relayd import replies
from relayd.config.model import ListenerConfig, TenantConfig
from relayd.observe.events import Notice, SmtpRefused
from relayd.smtp import policy
from relayd.smtp.datastream import DataDecoder
from relayd.smtp.intake import DataTurns, MessageIntake
from relayd.netaddr import is_loopback
from relayd.smtp.services import ListenerServices, SubmissionSession
from relayd.values import Envelope


class DataConnection(Protocol):
    """What the handler needs from the SMTP connection (relayd.smtp.session.SubmissionProtocol)."""

    @property
    def listener(self) -> ListenerConfig: ...
    @property
    def envelope(self) -> SmtpEnvelope | None: ...
    @property
    def client_ip(self) -> str: ...
    @property
    def client_port(self) -> int: ...
    @property
    def is_encrypted(self) -> bool: ...
    def tls_version(self) -> str | None: ...
    def submission_session(self) -> SubmissionSession: ...
    async def read_data_chunk(self) -> bytes: ...
    def end_of_data(self, leftover: bytes) -> None: ...


class SubmissionHandler:
    """aiosmtpd hooks for MAIL and RCPT, and relayd's side of DATA."""

    def __init__(
        self, listener: ListenerConfig, services: ListenerServices, *, data_turns: DataTurns | None = None
    ) -> None:
        self.listener = listener
        self.services = services
        self.data_turns = data_turns if data_turns is not None else DataTurns()
        # What aiosmtpd's constructor would find by scanning for handle_* methods.
        self.hooks: dict[str, Callable[..., Awaitable[str]]] = {
            "MAIL": self.handle_MAIL,
            "RCPT": self.handle_RCPT,
            "exception": self.handle_exception,
        }

    def tenant_for(self, session: SubmissionSession) -> TenantConfig | None:
        """The authenticated tenant, or one bound to the client's loopback address."""
        config = self.services.config()
        if session.authenticated and session.tenant_name:
            tenant = config.tenants.get(session.tenant_name)
            return tenant if tenant is not None and tenant.enabled else None
        if self.listener.unix_path is not None:
            if session.local_uid is None:
                return None
            tenant = config.tenant_for_uid(session.local_uid)
            return tenant if tenant is not None and tenant.enabled else None
        peer = session.peer[0] if session.peer else ""
        if not is_loopback(str(peer)):
            return None
        for tenant in config.tenants.values():
            # configfile refuses bind_addresses without trust_every_local_user; checked again here.
            if tenant.enabled and tenant.trust_every_local_user and str(peer) in tenant.bind_addresses:
                return tenant
        return None

    def _refusal_without_tenant(self, session: SubmissionSession) -> tuple[str, str]:
        """The reply (and log detail) when a session has no tenant: AUTH, or an unlisted local user."""
        if self.listener.unix_path is None or session.authenticated:
            return replies.AUTH_REQUIRED, "no AUTH"
        who = session.local_user or "unknown"
        return replies.local_user_not_allowed(who), f"U={who} is in no tenant's local_users"

    def _refuse(
        self, session: SubmissionSession, stage: str, reply: str, detail: str, address: str | None = None
    ) -> str:
        peer = session.peer[0] if session.peer else ""
        logged = session.may_log is None or session.may_log()
        self.services.events.emit(SmtpRefused(
            client_ip=str(peer), stage=stage, reply=reply, detail=detail, address=address, logged=logged
        ))
        return reply

    async def handle_MAIL(
        self, server: DataConnection, session: SubmissionSession,
        envelope: SmtpEnvelope, address: str, mail_options: list[str],
    ) -> str:
        tenant = self.tenant_for(session)
        if tenant is None:
            reply, detail = self._refusal_without_tenant(session)
            return self._refuse(session, "MAIL", reply, detail, address)
        if not policy.address_is_valid(address):
            return self._refuse(session, "MAIL", replies.bad_address(address), "", address)
        if policy.needs_smtputf8(address) and "SMTPUTF8" not in mail_options:
            return self._refuse(session, "MAIL", replies.SMTPUTF8_NEEDED, "", address)
        if not policy.sender_allowed(tenant, address):
            reply = replies.sender_not_allowed(address, tenant.name, "Sender")
            return self._refuse(session, "MAIL", reply, f"A={tenant.name}", address)
        size = _size_option(mail_options)
        limit = policy.effective_limit(self.listener.max_message_size, tenant.max_message_size)
        if size is not None and size > limit:
            return self._refuse(session, "MAIL", replies.message_too_big(limit), f"SIZE={size}", address)
        refusal = self._quota_refusal(session, "MAIL", tenant, address)
        if refusal is not None:
            return refusal
        refusal = self.services.admit(tenant.name, size or 0)
        if refusal is not None:
            return self._refuse(session, "MAIL", refusal, f"A={tenant.name} spool", address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    def _quota_refusal(
        self, session: SubmissionSession, stage: str, tenant: TenantConfig, address: str | None = None
    ) -> str | None:
        """The tenant's quota (`on_quota: refuse`): the 450 naming the reset, logged as a quota refusal."""
        refusal = self.services.quota(tenant.name)
        if refusal is None:
            return None
        return self._refuse(session, stage, refusal, f"A={tenant.name} quota", address)

    def room_refusal(self, session: SubmissionSession, tenant: TenantConfig, mail_options: list[str]) -> str | None:
        """The quota and the room on the spool, checked again right before DATA (either may have filled since MAIL)."""
        quota = self._quota_refusal(session, "DATA", tenant)
        if quota is not None:
            return quota
        refusal = self.services.admit(tenant.name, _size_option(mail_options) or 0)
        if refusal is None:
            return None
        return self._refuse(session, "DATA", refusal, f"A={tenant.name} spool")

    async def handle_RCPT(
        self, server: DataConnection, session: SubmissionSession,
        envelope: SmtpEnvelope, address: str, rcpt_options: list[str],
    ) -> str:
        tenant = self.tenant_for(session)
        if tenant is None:
            return self._refuse(session, "RCPT", replies.AUTH_REQUIRED, "no AUTH", address)
        limit = policy.effective_limit(self.listener.max_recipients, tenant.max_recipients)
        if len(envelope.rcpt_tos) >= limit:
            return self._refuse(session, "RCPT", replies.TOO_MANY_RECIPIENTS, f"limit {limit}", address)
        if not policy.address_is_valid(address):
            return self._refuse(session, "RCPT", replies.bad_address(address), "", address)
        if policy.needs_smtputf8(address) and not envelope.smtp_utf8:
            return self._refuse(session, "RCPT", replies.SMTPUTF8_NEEDED, "", address)
        if self.services.route(tenant, address) is None:
            reply = replies.no_route(address, tenant.name)
            return self._refuse(session, "RCPT", reply, f"A={tenant.name}", address)
        # Another session may have taken the quota's last place since MAIL FROM.
        refusal = self._quota_refusal(session, "RCPT", tenant, address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    async def receive_message(
        self, server: DataConnection, tenant: TenantConfig, size_limit: int
    ) -> str | None:
        """Read DATA to the final dot, streaming it into the queue; the reply, None on disconnect.

        Only the header block is held in memory (see relayd.smtp.intake); the
        partial file is removed on any way out but a 250.
        """
        session = server.submission_session()
        receive = self.services.receive
        if receive is None:
            raise RuntimeError("the listener was started without a queue to receive into")
        decoder = DataDecoder(max_line_length=self.listener.max_line_length, size_limit=size_limit)
        intake = MessageIntake(
            template=self._envelope_template(server, tenant),
            tenant=tenant,
            listener=self.listener,
            hostname=self.services.config().hostname,
            receive=receive,
        )
        try:
            while decoder.end is None:
                chunk = await server.read_data_chunk()
                if not chunk:
                    return None
                async with self.data_turns:
                    checked = decoder.feed(chunk)
                    if decoder.refusal is None:
                        await intake.take(checked)
                    else:
                        intake.abort()
            server.end_of_data(decoder.end.leftover)
            if decoder.end.refusal is not None:
                detail = "too big" if decoder.end.refusal.startswith("552") else ""
                return self._refuse(session, "DATA", decoder.end.refusal, detail)
            reply = await intake.finish()
            if intake.refusal is not None and not intake.refusal_logged:
                return self._refuse(session, "DATA", intake.refusal, intake.refusal_detail)
            return reply
        finally:
            intake.abort()

    def _envelope_template(self, server: DataConnection, tenant: TenantConfig) -> Envelope:
        """The message's envelope as far as it is known at DATA (id and size come later)."""
        session = server.submission_session()
        envelope = server.envelope
        assert envelope is not None and envelope.mail_from is not None
        return Envelope(
            id=self.services.new_id(),
            tenant=tenant.name,
            sender=envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            received_at=self.services.clock(),
            size=0,
            client_ip=server.client_ip,
            client_port=server.client_port,
            local_user=session.local_user,
            tls=server.tls_version() or "",
            client_helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8),
            protocol=_protocol_name(server),
            auth_mechanism=(session.auth_mechanism or "").lower() if session.authenticated else "",
        )

    async def handle_exception(self, error: Exception) -> str:
        self.services.events.emit(Notice(text=f"SMTP session error: {type(error).__name__}: {error}", level="error"))
        return replies.INTERNAL_ERROR


def _protocol_name(server: DataConnection) -> str:
    """Exim's P= values: esmtp, plus s for TLS and a for AUTH."""
    session = server.submission_session()
    name = "esmtp" if session.extended_smtp else "smtp"
    if server.listener.unix_path is not None:
        name = "local-" + name  # Exim's P=local-esmtp for SMTP from a local process
    if server.is_encrypted:
        name += "s"
    if session.authenticated:
        name += "a"
    return name


def _size_option(options: list[str]) -> int | None:
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None
