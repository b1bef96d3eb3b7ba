"""XOAUTH2 end to end: the real relayd process, a fake OAuth token server, fake upstreams that
accept only the bearer tokens it issued, and relayctl run as the operator runs it."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from relayd.config.credentials import CredentialStore, read_key_file
from relayd.ops.cli import main
from tests.fakeoauth import FakeOAuth
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, submit

ACME = ("acme", "acme-relay-password")
MAILBOX = "billing@acme.example"
CLIENT_ID = "1234.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-daemon-client-secret"
REFRESH_TOKEN = "1//0daemon-refresh-token"
NAME = "acme-oauth"
RELAYCTL = str(Path(sys.executable).parent / "relayctl")


@pytest.fixture
def oauth() -> Iterator[FakeOAuth]:
    fake = FakeOAuth().start()
    fake.add_client(CLIENT_ID, CLIENT_SECRET)
    yield fake
    fake.stop()


def configure(files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]) -> tuple[Any, Any]:
    """gmail_oauth logs in with XOAUTH2; backup with a password. a.test fails over, b.test does not."""
    gmail = upstreams(users={}, bearer_check=oauth.valid)
    backup = upstreams(users={"apikey": "SG.backup-key"})
    auth = "\n".join([
        f"credential: {NAME}", "auth:", "  grant: refresh_token", "  provider: google",
        f"  client_id: {CLIENT_ID}", f"  user: {MAILBOX}", f"  token_url: {oauth.token_url}",
        "  authorize_url: https://accounts.google.com/o/oauth2/v2/auth", "  timeout: 5s",
    ])
    files.write(
        upstreams=[
            UpstreamSpec("gmail_oauth", gmail.port, extra=auth),
            UpstreamSpec("backup", backup.port, "backup", "apikey", "SG.backup-key"),
        ],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [
            (["a.test"], ["gmail_oauth", "backup"]), (["b.test"], ["gmail_oauth"]),
        ])],
    )
    return gmail, backup


def store_oauth(files: RelayFiles, **fields: str) -> None:
    store = CredentialStore.open(files.root / "credentials.enc", list(read_key_file(files.key_file)))
    store.set_oauth(NAME, "", fields)
    store.save()


def relayctl(files: RelayFiles, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(["--config", str(files.config), *argv], environ={}, stdin=io.StringIO(stdin))
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def authorize_in_a_browser(files: RelayFiles, oauth: FakeOAuth, account: str) -> str:
    """`relayctl oauth authorize` as an operator runs it: open the URL, consent, paste the redirect.

    The client secret is already in the store, so only the redirect is read.
    """
    proc = subprocess.Popen([RELAYCTL, "--config", str(files.config), "oauth", "authorize", NAME],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    printed = ""
    while "https://accounts.google.com" not in printed:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        printed += line
    url = re.search(r"(https://accounts\.google\.com\S+)", printed).group(1)  # type: ignore[union-attr]
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["code_challenge_method"] == "S256" and "https://mail.google.com/" in query["scope"]
    code = oauth.approve_code(account, query["code_challenge"], query["redirect_uri"])
    out, err = proc.communicate(f"{query['redirect_uri']}/?state={query['state']}&code={code}\n", timeout=60)
    assert proc.returncode == 0, err
    return printed + out + err


def test_relayd_fails_over_defers_and_resumes_after_relayctl_oauth_authorize(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    gmail, backup = configure(relay_files, oauth, upstreams)
    store_oauth(relay_files, client_secret=CLIENT_SECRET, refresh_token="1//revoked")  # consent revoked
    with RelaydProcess(relay_files) as relayd:
        submit(relay_files, ACME, MAILBOX, ["one@a.test"])
        (failed_over,) = backup.wait_for_messages(1)
        relay_files.wait_for_log(f"needs re-authorisation: relayctl oauth authorize {NAME}")
        held = submit(relay_files, ACME, MAILBOX, ["two@b.test"])
        time.sleep(2)
        assert gmail.messages == [] and gmail.auth_attempts == 0  # no token: nothing sent upstream
        code, status, _ = relayctl(relay_files, "status", "--json")
        assert code == 0
        transport = json.loads(status)["transports"]["gmail_oauth"]
        assert transport["state"] == f"credential {NAME} needs re-authorisation: relayctl oauth authorize {NAME}"
        code, queue, _ = relayctl(relay_files, "queue", "list", "--json")
        assert held in queue

        said = authorize_in_a_browser(relay_files, oauth, MAILBOX)
        assert f"authorised {MAILBOX} for credential {NAME}" in said

        (delivered,) = gmail.wait_for_messages(1, timeout=30)  # no restart, no flush
        code, status, _ = relayctl(relay_files, "oauth", "status", "--json")
        (row,) = json.loads(status)
        relayd.stop()
    assert failed_over.rcpt_tos == ["one@a.test"] and delivered.rcpt_tos == ["two@b.test"]
    assert delivered.login == MAILBOX
    assert oauth.requests("authorization_code") == 1
    assert row["credential"] == NAME and row["account"] == MAILBOX and row["last_error"] == ""
    assert row["token_expires"] > time.time() + 3000 and row["needs_reauthorisation"] is False
    log = relay_files.mainlog()
    assert "** two@b.test" not in log  # never bounced for a token problem
    secrets = [CLIENT_SECRET, *oauth.refresh_tokens(), *oauth.access_tokens()]
    seen = "\n".join([log, said, status, relayd.output.decode(errors="replace"),
                      (relay_files.root / "credentials.enc").read_text(),
                      *(p.read_text(errors="replace") for p in (relay_files.root / "spool").rglob("*") if p.is_file())])
    assert [s for s in secrets if s in seen] == []


def test_a_token_endpoint_that_is_down_defers_then_delivery_resumes_by_itself(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    gmail, _ = configure(relay_files, oauth, upstreams)
    oauth.add_refresh_token(REFRESH_TOKEN, MAILBOX)
    store_oauth(relay_files, client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    oauth.set_mode("down")
    with RelaydProcess(relay_files) as relayd:
        submit(relay_files, ACME, MAILBOX, ["two@b.test"])
        relay_files.wait_for_log("token endpoint refused: HTTP 503")
        assert gmail.messages == []
        oauth.set_mode("ok")
        (delivered,) = gmail.wait_for_messages(1, timeout=30)
        relayd.stop()
    assert delivered.login == MAILBOX
    assert "** two@b.test" not in relay_files.mainlog()


def test_ten_messages_within_one_token_life_cause_one_token_request(
    relay_files: RelayFiles, oauth: FakeOAuth, upstreams: Callable[..., Any]
) -> None:
    gmail, _ = configure(relay_files, oauth, upstreams)
    oauth.add_refresh_token(REFRESH_TOKEN, MAILBOX)
    store_oauth(relay_files, client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN)
    with RelaydProcess(relay_files) as relayd:
        for n in range(10):
            submit(relay_files, ACME, MAILBOX, [f"r{n}@b.test"])
        gmail.wait_for_messages(10, timeout=60)
        relayd.stop()
    assert oauth.requests() == 1
    assert oauth.requests("refresh_token") == 1
    assert f"credential {NAME}: new OAuth access token for {MAILBOX}" in relay_files.mainlog()
