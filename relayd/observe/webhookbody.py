"""What a webhook receiver gets: the JSON body of one event, and its signature.

Takes: events (`relayd.observe.events`), the event id the outbox gave them,
a signing secret and the time of sending.
Emits: the body (UTF-8 JSON, schema 1, documented in README "Webhooks") and
the request headers. Pure functions: no I/O, no clock of their own.
Untrusted input: addresses, Message-IDs and upstream replies travel in the
body as received; JSON escaping keeps them inert, and each is cut to
`MAX_FIELD` characters so one event stays small.
Fails: never; an event kind with no webhook form gives None.

Schema 1 has the same keys in every body, null where a kind has no value:
schema, id, event, time, queue_id, message_id, tenant, sender, recipient,
transport, host, upstream_reply, reason, attempt, next_attempt, bounce_id.
New keys may be added; existing ones keep their meaning.

Signature: ``Relayd-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
with ``Relayd-Timestamp`` the Unix time of this request (each retry is signed
afresh, so a receiver may refuse timestamps older than a few minutes), and
``Relayd-Event-Id`` the same for every retry of one event, for de-duplication.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Mapping

from relayd.observe import events as ev

SCHEMA = 1
MAX_FIELD = 1000  # characters per text field: a long upstream reply is cut, not the event dropped

# The kinds of the events that have a name of their own; any other event's
# kind is its class name in snake_case (QuotaAlert -> quota_alert), so an
# event type added to relayd later can be subscribed to by that name.
KINDS: Mapping[type, str] = {
    ev.RecipientDelivered: "delivered",
    ev.RecipientDeferred: "deferred",
    ev.RecipientFailed: "bounced",
    ev.BounceCreated: "bounce_created",
}

HEADER_EVENT = "Relayd-Event"
HEADER_EVENT_ID = "Relayd-Event-Id"
HEADER_TIMESTAMP = "Relayd-Timestamp"
HEADER_SIGNATURE = "Relayd-Signature"
USER_AGENT = "relayd-webhook/1"


def kind_of(event: ev.Event) -> str:
    """The name a webhook endpoint subscribes to for this kind of event."""
    named = KINDS.get(type(event))
    return named if named is not None else snake_case(type(event).__name__)


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def known_kinds() -> frozenset[str]:
    """Every kind this relayd can send: the named ones and every event type's own name."""
    event_types: tuple[type, ...] = getattr(ev.Event, "__args__", ())
    return frozenset(KINDS.values()) | {KINDS.get(cls) or snake_case(cls.__name__) for cls in event_types}


def tenant_of(event: ev.Event) -> str | None:
    """The tenant an event belongs to; None for daemon-wide events (only global endpoints get those)."""
    value = getattr(event, "tenant", None)
    return value if isinstance(value, str) else None


def iso_time(when: float) -> str:
    """``2026-12-01T17:30:22.123Z``: RFC 3339, UTC, milliseconds."""
    whole = int(when)
    millis = int(round((when - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 3] + "..."


def payload(event: ev.Event, event_id: str) -> dict[str, object]:
    """The schema-1 object for `event`: every key present, null where the kind has no value."""
    report = getattr(event, "report", None)
    next_attempt = getattr(event, "next_attempt", None)
    attempt = getattr(event, "attempt", None)
    return {
        "schema": SCHEMA,
        "id": event_id,
        "event": kind_of(event),
        "time": iso_time(event.at),
        "queue_id": _text(getattr(event, "queue_id", None)),
        "message_id": _text(getattr(event, "message_id", None) or None),
        "tenant": _text(tenant_of(event)),
        "sender": _text(getattr(event, "sender", None)),
        "recipient": _text(getattr(event, "recipient", None)),
        "transport": _text(getattr(event, "transport", None) or None),
        "host": _text(getattr(report, "host", None) or getattr(event, "host", None) or None),
        "upstream_reply": _text(getattr(report, "reply", None)),
        "reason": _text(getattr(report, "reason", None) or getattr(event, "reason", None) or None),
        "attempt": attempt if isinstance(attempt, int) else None,
        "next_attempt": iso_time(next_attempt) if isinstance(next_attempt, (int, float)) else None,
        "bounce_id": _text(getattr(event, "bounce_id", None)),
    }


def encode(body: Mapping[str, object]) -> bytes:
    """Compact UTF-8 JSON; non-ASCII kept as is (receivers read UTF-8)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``v1=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>`` under `secret`."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def headers(*, kind: str, event_id: str, timestamp: int, signed: str) -> dict[str, str]:
    """The request headers of one POST."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        HEADER_EVENT: kind,
        HEADER_EVENT_ID: event_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: signed,
    }
