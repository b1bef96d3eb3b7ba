"""Transports: what the delivery walk hands a message to, and how they are built.

Takes: the configured transports, a credential lookup and the HELO name.
Emits: one `Transport` per configured transport: an upstream SMTP server
(relayd.delivery.smtptransport, its session in relayd.delivery.smtpsession,
its connections in relayd.delivery.smtppool, the wire format in
relayd.delivery.smtpwire) or a Maildir for development
(relayd.delivery.capture).
Untrusted input: none here; see each transport module.
How it fails: `send()` of every transport never raises for network, SMTP,
TLS or disk trouble; every such problem becomes an outcome.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from relayd.config.model import SmtpTransportConfig, TransportConfig
from relayd.delivery.capture import CaptureTransport
from relayd.delivery.smtpsession import (
    CredentialLike,
    CredentialLookup,
    VerifyStep,
    client_tls_context,
    lookup_credential,
    verify_transport,
)
from relayd.delivery.smtptransport import SmtpTransport
from relayd.delivery.smtpwire import auth_precondition, clean_text, smtputf8_need, tls_label, wire_body
from relayd.values import AttemptResult, Delivery

__all__ = [
    "CaptureTransport", "CredentialLike", "CredentialLookup", "SmtpTransport", "Transport", "VerifyStep",
    "auth_precondition", "build_transports", "clean_text", "client_tls_context", "lookup_credential",
    "smtputf8_need", "tls_label", "verify_transport", "wire_body",
]


class Transport(Protocol):
    """Something that can attempt one delivery and report per recipient."""

    name: str

    async def send(self, delivery: Delivery) -> AttemptResult: ...

    async def close(self) -> None: ...


def build_transports(
    configs: Mapping[str, TransportConfig],
    *,
    credentials: CredentialLookup,
    helo_name: str,
) -> dict[str, Transport]:
    """One transport object per configured transport, keyed by name."""
    transports: dict[str, Transport] = {}
    for name, config in configs.items():
        if isinstance(config, SmtpTransportConfig):
            transports[name] = SmtpTransport(config, credentials=credentials, helo_name=helo_name)
        else:
            transports[name] = CaptureTransport(config)
    return transports
