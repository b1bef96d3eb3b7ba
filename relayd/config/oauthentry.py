"""The OAuth entries of the credential store: their fields, checks and typed view.

Takes: one decrypted store entry (a JSON object) or the fields to change in one.
Emits: an `OAuthCredential` whose tokens and key are `Secret`s, or the new entry.
Untrusted input: the decrypted entry (checked field by field).
Fails: `valid_oauth_entry` says False for a malformed entry; `merged_oauth_entry`
raises ValueError naming the field, never its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from relayd.config.secret import Secret

# The text fields of an OAuth entry, besides "kind" and "user"; all secret but
# "issuer" (a service account's e-mail address). "access_expires" is a number.
OAUTH_SECRET_FIELDS = ("client_secret", "refresh_token", "private_key", "access_token")
OAUTH_TEXT_FIELDS = OAUTH_SECRET_FIELDS + ("issuer",)
MAX_PRIVATE_KEY_LENGTH = 16384  # an RSA-4096 PEM key is about 3.3K
MAX_OAUTH_FIELD_LENGTH = 8192  # Microsoft refresh tokens run to a few kilobytes


@dataclass(frozen=True)
class OAuthCredential:
    """The stored secrets of an OAuth 2.0 token source (relayd.delivery.tokensource).

    `user` is the account `relayctl oauth authorize` saw ("" when the
    transport's `auth: user:` names it); `issuer` a service account's
    e-mail address. Every token and key is a `Secret`.
    """

    name: str
    user: str
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    private_key: Secret | None = None
    issuer: str = ""
    access_token: Secret | None = None
    access_expires: float | None = None  # Unix time the cached access token ends
    kind: Literal["oauth"] = field(default="oauth", init=False)


def valid_oauth_entry(entry: Mapping[str, object]) -> bool:
    allowed = {"kind", "user", "access_expires", *OAUTH_TEXT_FIELDS}
    expires = entry.get("access_expires")
    return (
        set(entry) <= allowed
        and all(isinstance(entry.get(f, ""), str) for f in OAUTH_TEXT_FIELDS)
        and (expires is None or isinstance(expires, (int, float)) and not isinstance(expires, bool))
    )


def _secret(entry: Mapping[str, object], key: str) -> Secret | None:
    value = entry.get(key)
    return Secret(value) if isinstance(value, str) and value else None


def oauth_credential(name: str, entry: Mapping[str, object]) -> OAuthCredential:
    expires = entry.get("access_expires")
    return OAuthCredential(
        name=name,
        user=str(entry.get("user", "")),
        client_secret=_secret(entry, "client_secret"),
        refresh_token=_secret(entry, "refresh_token"),
        private_key=_secret(entry, "private_key"),
        issuer=str(entry.get("issuer", "")),
        access_token=_secret(entry, "access_token"),
        access_expires=float(expires) if isinstance(expires, (int, float)) else None,
    )



def merged_oauth_entry(
    current: Mapping[str, object] | None, user: str, fields: Mapping[str, str | float | None]
) -> dict[str, object]:
    """The OAuth entry `current` with `fields` applied (None removes a field); raises ValueError."""
    entry: dict[str, object] = dict(current) if current is not None and current.get("kind") == "oauth" else {}
    entry.update(kind="oauth", user=user or str(entry.get("user", "")))
    for key, value in fields.items():
        if key not in OAUTH_TEXT_FIELDS and key != "access_expires":
            raise ValueError(f"an OAuth credential has no field {key}")
        if value is None:
            entry.pop(key, None)
        elif isinstance(value, str):
            limit = MAX_PRIVATE_KEY_LENGTH if key == "private_key" else MAX_OAUTH_FIELD_LENGTH
            if len(value) > limit or "\x00" in value:
                raise ValueError(f"the {key.replace('_', ' ')} is too long or holds a NUL")
            entry[key] = value
        else:
            entry[key] = float(value)
    return entry
