"""Connection settings for well-known upstream mail providers.

Takes: a preset name from relay.yaml (``preset: gmail``) and, for SES, a region.
Emits: a frozen `ProviderPreset` whose host, port and TLS mode fill a transport's
defaults, plus the facts an operator needs when a login or a quota fails
(daily limit, recipients per message, what the user name looks like).
Untrusted input: only the preset and region names, checked here.
Fails with `PresetError`, whose message lists the known presets.

The numbers are the providers' published limits at the time of writing
(2026-12). `shaping` is what relayd enforces for a transport using the preset
unless relay.yaml sets its own `max_per_*` values; the sources:
* SES sandbox, 1 message/s and 200 per 24 hours: AWS, "Service quotas in
  Amazon SES" (a production account's quotas are per account: set them);
* Gmail, about 500 messages a day: Google, "Gmail sending limits";
* Google Workspace, 2,000 messages a day per user: Google Workspace Admin
  Help, "Gmail sending limits in Google Workspace";
* Microsoft 365, 30 messages a minute and 10,000 recipients a day: Microsoft
  Learn, "Exchange Online limits" (sending limits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from relayd.config.model import TlsMode
from relayd.config.shaping import UNSHAPED, Shaping


class PresetError(ValueError):
    """An unknown preset name, or a preset used without what it needs (SES region)."""


@dataclass(frozen=True, slots=True)
class ProviderPreset:
    """How to reach one provider's SMTP submission service, and what it allows."""

    name: str
    host: str  # may hold "{region}" (SES) until resolve_preset() fills it
    port: int
    tls: TlsMode
    notes: str
    daily_limit: int | None = None  # messages per day, where the provider publishes one
    max_recipients_per_message: int | None = None
    user_hint: str | None = None  # what goes in the SMTP user name
    shaping: Shaping = UNSHAPED  # the limits relayd enforces unless relay.yaml sets its own

    @property
    def needs_region(self) -> bool:
        return "{region}" in self.host


_PRESETS: tuple[ProviderPreset, ...] = (
    ProviderPreset(
        name="gmail",
        host="smtp.gmail.com",
        port=587,
        tls=TlsMode.STARTTLS,
        notes=(
            "Needs an app password, which Google only offers once 2-step verification "
            "is on (or XOAUTH2). Port 465 with implicit TLS also works. About 500 "
            "messages a day for a consumer account."
        ),
        daily_limit=500,
        max_recipients_per_message=100,
        user_hint="the full Gmail address, e.g. name@gmail.com",
        shaping=Shaping(max_per_day=500),
    ),
    ProviderPreset(
        name="google_workspace",
        host="smtp.gmail.com",
        port=587,
        tls=TlsMode.STARTTLS,
        notes=(
            "Same server as Gmail; app password with 2-step verification, or XOAUTH2. "
            "About 2,000 messages a day per user."
        ),
        daily_limit=2000,
        max_recipients_per_message=100,
        user_hint="the full Workspace address, e.g. name@example.com",
        shaping=Shaping(max_per_day=2000),
    ),
    ProviderPreset(
        name="sendgrid",
        host="smtp.sendgrid.net",
        port=587,
        tls=TlsMode.STARTTLS,
        notes=(
            "Ports 25 and 2525 also take STARTTLS (2525 passes hosting firewalls that "
            "block 587); 465 is implicit TLS. The password is an API key."
        ),
        user_hint="literally 'apikey'",
    ),
    ProviderPreset(
        name="mailgun",
        host="smtp.mailgun.org",
        port=587,
        tls=TlsMode.STARTTLS,
        notes=(
            "Ports 25 and 2525 also take STARTTLS (2525 passes hosting firewalls that "
            "block 587); 465 is implicit TLS. EU domains use smtp.eu.mailgun.org."
        ),
        max_recipients_per_message=1000,
        user_hint="the domain's SMTP login, e.g. postmaster@mg.example.com",
    ),
    ProviderPreset(
        name="ses",
        host="email-smtp.{region}.amazonaws.com",
        port=587,
        tls=TlsMode.STARTTLS,
        notes=(
            "Port 465 (and 2465) is implicit TLS, 2587 STARTTLS; 25 is usually blocked. "
            "The sender must be a verified address or domain. In the sandbox: 200 "
            "messages a day, 1 per second, verified recipients only. SMTP credentials "
            "are made in the SES console and only work in their own region."
        ),
        daily_limit=200,
        max_recipients_per_message=50,
        user_hint="the SMTP user name generated in the SES console (not an IAM key id)",
        shaping=Shaping(max_per_second=1.0, max_per_day=200),
    ),
    ProviderPreset(
        name="office365",
        host="smtp.office365.com",
        port=587,
        tls=TlsMode.STARTTLS,
        notes=(
            "Password (basic) SMTP AUTH is being retired in favour of OAuth2 (XOAUTH2) "
            "and is off by default for many tenants; SMTP AUTH must be enabled for the "
            "mailbox."
        ),
        max_recipients_per_message=500,
        user_hint="the mailbox address, e.g. name@example.onmicrosoft.com",
        shaping=Shaping(max_per_minute=30, max_recipients_per_day=10000),
    ),
    ProviderPreset(
        name="ovh",
        host="ssl0.ovh.net",
        port=465,
        tls=TlsMode.IMPLICIT,
        notes="OVH Mail Pro / hosted mail; port 587 with STARTTLS also works.",
        user_hint="the full mailbox address",
    ),
    ProviderPreset(
        name="orange",
        host="smtp.orange.fr",
        port=465,
        tls=TlsMode.IMPLICIT,
        notes="Orange mailboxes; implicit TLS on 465.",
        user_hint="the full Orange address",
    ),
    ProviderPreset(
        name="yahoo",
        host="smtp.mail.yahoo.com",
        port=465,
        tls=TlsMode.IMPLICIT,
        notes="Needs an app password; port 587 with STARTTLS also works.",
        user_hint="the full Yahoo address",
    ),
    ProviderPreset(
        name="ionos",
        host="smtp.ionos.fr",
        port=587,
        tls=TlsMode.STARTTLS,
        notes="Port 465 with implicit TLS also works; non-French accounts use smtp.ionos.com.",
        user_hint="the full mailbox address",
    ),
)

PROVIDER_PRESETS: Mapping[str, ProviderPreset] = MappingProxyType({p.name: p for p in _PRESETS})

# AWS region names: af-south-1, us-east-1, ap-southeast-2, us-gov-west-1, ...
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")


def is_valid_region(region: str) -> bool:
    """Whether `region` is shaped like an AWS region name (no lookup is made)."""
    return _REGION.fullmatch(region) is not None


def resolve_preset(name: str, region: str | None = None) -> ProviderPreset:
    """The preset called `name`, with its host completed for `region` when it needs one.

    Raises PresetError for an unknown name, for SES without a region, for a
    region that is not shaped like an AWS region, and for a region given to a
    preset that has no use for one.
    """
    preset = PROVIDER_PRESETS.get(name)
    if preset is None:
        known = ", ".join(PROVIDER_PRESETS)
        raise PresetError(f"there is no preset '{name}'; known presets are {known}")
    if not preset.needs_region:
        if region is not None:
            raise PresetError(f"region is only used with preset: ses, not with preset: {name}")
        return preset
    if region is None:
        raise PresetError(f"preset: {name} needs a region, e.g. region: eu-west-1")
    if not is_valid_region(region):
        raise PresetError(f"'{region}' is not an AWS region name such as eu-west-1 or us-east-1")
    return replace(preset, host=preset.host.format(region=region))
