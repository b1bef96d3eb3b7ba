"""The OAuth 2.0 endpoints and scopes of the providers that speak XOAUTH2.

Takes: a provider name (`auth: provider:` or the transport's preset), a grant,
and for Microsoft the Entra tenant.
Emits: an `OAuthEndpoints` value whose URLs fill an `auth:` block's defaults.
Untrusted input: the tenant name, checked here to be a plain domain or GUID
so it cannot change the URL's path.
Fails: `OAuthPresetError` with one sentence saying what is allowed.

The values are the providers' documented ones (2026): Google's token
endpoint with the full-mail scope that SMTP needs, and Microsoft identity
platform v2.0 with the Exchange Online SMTP scopes (delegated SMTP.Send, or
the application's `.default` for app-only access).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.config.model import OAuthGrant


class OAuthPresetError(ValueError):
    """An unknown provider, a grant it does not offer, or a malformed tenant."""


@dataclass(frozen=True, slots=True)
class OAuthEndpoints:
    """Where a provider hands out tokens, and the scope SMTP needs."""

    token_url: str
    authorize_url: str
    device_url: str  # "" when the provider has no device flow for this scope
    scope: str


OAUTH_PROVIDERS = ("google", "microsoft")

# Which provider a transport preset implies (relayd.config.presets).
PRESET_PROVIDER = {"gmail": "google", "google_workspace": "google", "office365": "microsoft"}

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_SCOPE = "https://mail.google.com/"
MICROSOFT_LOGIN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
MICROSOFT_DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send offline_access"
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"
# Delegated sign-in from any work or school account when no tenant is named.
MICROSOFT_DEFAULT_TENANT = "organizations"

_TENANT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def oauth_endpoints(provider: str, grant: OAuthGrant, tenant: str | None) -> OAuthEndpoints:
    """The endpoints and scope for `provider` and `grant`; raises OAuthPresetError."""
    if provider == "google":
        if grant is OAuthGrant.CLIENT_CREDENTIALS:
            raise OAuthPresetError(
                "Google has no client-credentials grant for Gmail; use grant: service_account "
                "(Workspace domain-wide delegation) or grant: refresh_token"
            )
        # Google's device flow does not allow the mail scope: no device_url.
        return OAuthEndpoints(GOOGLE_TOKEN_URL, GOOGLE_AUTHORIZE_URL, "", GOOGLE_SCOPE)
    if provider == "microsoft":
        if grant is OAuthGrant.SERVICE_ACCOUNT:
            raise OAuthPresetError(
                "grant: service_account is Google's; for Microsoft 365 app-only access use "
                "grant: client_credentials"
            )
        if tenant is None and grant is OAuthGrant.CLIENT_CREDENTIALS:
            raise OAuthPresetError(
                "grant: client_credentials needs tenant: (the Entra tenant id or its domain)"
            )
        name = tenant or MICROSOFT_DEFAULT_TENANT
        if _TENANT.fullmatch(name) is None:
            raise OAuthPresetError("tenant must be an Entra tenant id (a GUID) or a domain name")
        base = MICROSOFT_LOGIN.format(tenant=name)
        scope = MICROSOFT_APP_SCOPE if grant is OAuthGrant.CLIENT_CREDENTIALS else MICROSOFT_DELEGATED_SCOPE
        return OAuthEndpoints(f"{base}/token", f"{base}/authorize", f"{base}/devicecode", scope)
    raise OAuthPresetError(f"provider must be one of {', '.join(OAUTH_PROVIDERS)}")
