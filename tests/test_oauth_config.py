"""The `auth:` block of a transport: the providers' real endpoints and scopes by default."""

from __future__ import annotations

from pathlib import Path

from relayd.config.loader import load_config
from relayd.config.model import OAuthConfig, OAuthGrant, SmtpTransportConfig

CONFIG = """\
version: 1
hostname: relay.example.com
spool_dir: spool
credentials: {store: credentials.enc}
listeners:
  - {name: local, port: 2525, tls: none}
transports:
  m365:
    preset: office365
    credential: m365
    auth: {grant: client_credentials, tenant: contoso.example, client_id: app-id, user: noreply@contoso.example}
  m365_user:
    preset: office365
    credential: m365-user
    auth: {grant: refresh_token, client_id: app-id}
  gmail:
    preset: gmail
    credential: gmail-oauth
    auth: {grant: refresh_token, client_id: 1234.apps.googleusercontent.com, refresh_margin: 10m}
  workspace:
    host: smtp.gmail.com
    credential: workspace
    auth: {grant: service_account, provider: google, client_id: "1234567890", user: ops@acme.example}
tenants: {}
"""


def test_presets_fill_the_real_token_endpoints_and_scopes(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(CONFIG)
    transports = load_config(path).transports

    def oauth(name: str) -> OAuthConfig:
        transport = transports[name]
        assert isinstance(transport, SmtpTransportConfig) and transport.oauth is not None
        return transport.oauth

    app = oauth("m365")
    assert app.grant is OAuthGrant.CLIENT_CREDENTIALS and app.provider == "microsoft"
    assert app.token_url == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    assert app.scope == "https://outlook.office365.com/.default" and app.user == "noreply@contoso.example"
    user = oauth("m365_user")
    assert user.token_url == "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
    assert user.device_url == "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode"
    assert user.scope == "https://outlook.office.com/SMTP.Send offline_access"
    gmail = oauth("gmail")
    assert gmail.token_url == "https://oauth2.googleapis.com/token" and gmail.scope == "https://mail.google.com/"
    assert gmail.authorize_url == "https://accounts.google.com/o/oauth2/v2/auth" and gmail.device_url == ""
    assert gmail.refresh_margin == 600.0 and gmail.timeout == 30.0
    assert oauth("workspace").grant is OAuthGrant.SERVICE_ACCOUNT
