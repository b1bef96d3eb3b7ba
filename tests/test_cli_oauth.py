"""relayctl oauth authorize / status and transport verify for XOAUTH2 transports, against a fake
OAuth token server and a fake upstream on loopback."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relayd.config.credentials import CredentialStore, read_key_file
from relayd.config.oauthentry import OAuthCredential
from relayd.ops.cli import main
from tests.fakeoauth import FakeOAuth
from tests.relayenv import RelayFiles, TenantSpec, UpstreamSpec

MAILBOX = "sender@contoso.example"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "entra~client~secret~value"
NAME = "m365"
RELAYCTL = str(Path(sys.executable).parent / "relayctl")


@pytest.fixture
def oauth() -> Iterator[FakeOAuth]:
    fake = FakeOAuth().start()
    yield fake
    fake.stop()


def write_config(files: RelayFiles, oauth: FakeOAuth, port: int, *lines: str) -> None:
    auth = "\n".join([f"credential: {NAME}", "auth:", "  provider: microsoft", "  tenant: contoso.example",
                      f"  client_id: {CLIENT_ID}", f"  token_url: {oauth.token_url}",
                      f"  device_url: {oauth.device_url}", "  timeout: 5s", *(f"  {line}" for line in lines)])
    files.write(upstreams=[UpstreamSpec("m365", port, extra=auth)],
                tenants=[TenantSpec("acme", "pw-acme-relay", ["*@acme.example"], [(["*"], ["m365"])])])


def run(files: RelayFiles, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(["--config", str(files.config), *argv], environ={}, stdin=io.StringIO(stdin))
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def stored(files: RelayFiles) -> OAuthCredential:
    credential = CredentialStore.open(files.root / "credentials.enc", list(read_key_file(files.key_file))).get(NAME)
    assert isinstance(credential, OAuthCredential)
    return credential


def test_device_code_sign_in_stores_the_refresh_token_and_names_the_account(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    oauth.add_client(CLIENT_ID, None)  # a public client: no secret
    write_config(relay_files, oauth, upstreams().port, "grant: refresh_token")
    proc = subprocess.Popen([RELAYCTL, "--config", str(relay_files.config), "oauth", "authorize", NAME, "--device"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    user_code = re.search(r"enter ([0-9A-F]{8})", first).group(1)  # type: ignore[union-attr]
    oauth.approve_device(user_code, MAILBOX)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"authorised {MAILBOX} for credential {NAME} (refresh_token; transport m365)" in out
    credential = stored(relay_files)
    assert credential.user == MAILBOX and credential.refresh_token is not None and credential.client_secret is None
    assert credential.refresh_token.reveal() not in first + out + err


def test_client_credentials_are_checked_with_one_token_request_then_stored(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    oauth.add_client(CLIENT_ID, CLIENT_SECRET)
    write_config(relay_files, oauth, upstreams().port, "grant: client_credentials", f"user: {MAILBOX}")
    code, out, err = run(relay_files, "oauth", "authorize", NAME, "--password-stdin", stdin="wrong secret\n")
    assert code == 1 and "token endpoint refused: HTTP 401 invalid_client" in err
    code, out, err = run(relay_files, "oauth", "authorize", NAME, "--password-stdin", stdin=CLIENT_SECRET + "\n")
    assert code == 0, err
    assert f"authorised {MAILBOX} for credential {NAME} (client_credentials" in out
    credential = stored(relay_files)
    assert credential.client_secret is not None and credential.client_secret.reveal() == CLIENT_SECRET
    assert CLIENT_SECRET not in out + err and credential.access_token is not None
    assert oauth.requests("client_credentials") == 2


def test_a_service_account_key_file_is_checked_and_its_key_sealed(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    issuer = "relay@acme.iam.gserviceaccount.com"
    oauth.add_service_account(issuer, key.public_key())
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps({"type": "service_account", "client_email": issuer, "private_key": pem}))
    auth = "\n".join([f"credential: {NAME}", "auth:", "  provider: google", "  grant: service_account",
                      "  client_id: \"1234567890\"", f"  user: {MAILBOX}", f"  token_url: {oauth.token_url}"])
    relay_files.write(upstreams=[UpstreamSpec("m365", upstreams().port, extra=auth)],
                      tenants=[TenantSpec("acme", "pw-acme-relay", ["*@acme.example"], [(["*"], ["m365"])])])
    code, out, err = run(relay_files, "oauth", "authorize", NAME, "--service-account-key", str(key_file))
    assert code == 0, err
    assert oauth.subjects == [MAILBOX]
    credential = stored(relay_files)
    assert credential.issuer == issuer and credential.private_key is not None
    assert "PRIVATE KEY" not in (relay_files.root / "credentials.enc").read_text() + out + err


def test_authorize_names_the_oauth_credentials_when_given_another_name(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    write_config(relay_files, oauth, upstreams().port, "grant: refresh_token")
    code, _, err = run(relay_files, "oauth", "authorize", "gmail")
    assert code == 1
    assert err == "relayctl: no transport in relay.yaml logs in with OAuth credential 'gmail' (OAuth credentials: m365)\n"


def test_a_pasted_redirect_for_another_request_is_refused(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    oauth.add_client(CLIENT_ID, None)
    write_config(relay_files, oauth, upstreams().port, "grant: refresh_token")
    code, out, err = run(relay_files, "oauth", "authorize", NAME,
                         stdin="http://localhost/?state=forged&code=stolen-code\n")
    assert code == 1 and "state differs" in err
    assert "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/authorize?" in out
    assert "code_challenge_method=S256" in out
    code, out, err = run(relay_files, "oauth", "authorize", NAME,
                         stdin="http://localhost/?error=access_denied&error_description=The+user+declined\n")
    assert code == 1 and "the provider refused: access_denied (The user declined)" in err


def test_status_shows_grant_account_expiry_and_transport_verify_logs_in(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    oauth.add_client(CLIENT_ID, CLIENT_SECRET)
    upstream = upstreams(users={}, bearer_check=oauth.valid)
    write_config(relay_files, oauth, upstream.port, "grant: client_credentials", f"user: app:{CLIENT_ID}")
    code, out, _ = run(relay_files, "oauth", "status", "--json")
    assert code == 0 and json.loads(out)[0]["needs_reauthorisation"] is True
    assert run(relay_files, "oauth", "authorize", NAME, "--password-stdin", stdin=CLIENT_SECRET + "\n")[0] == 0
    code, out, _ = run(relay_files, "oauth", "status")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["CREDENTIAL", "GRANT", "ACCOUNT", "TOKEN", "EXPIRES", "LAST", "REFRESH", "LAST", "ERROR"]
    cells = row.split()
    assert cells[:3] == [NAME, "client_credentials", f"app:{CLIENT_ID}"] and cells[3].startswith("20")
    code, out, err = run(relay_files, "transport", "verify", "m365")
    assert code == 0, out + err
    assert f"logged in as app:{CLIENT_ID}" in out and "m365: OK" in out
    assert upstream.mechanisms == ["XOAUTH2"] and oauth.requests("client_credentials") == 1  # the cached token
