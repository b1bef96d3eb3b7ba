"""OAuth entries in the encrypted credential store: old files still load, secrets stay sealed,
and the daemon's write-back and relayctl never overwrite each other."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relayd.config.credentials import (
    CredentialStore,
    CredentialStoreError,
    UpstreamCredential,
    generate_master_key,
    key_id,
    update_store,
)
from relayd.config.oauthentry import OAuthCredential

REFRESH = "1//0refresh-token-secret"


def version1_file(path: Path, key: bytes, plain: dict[str, dict[str, str]]) -> None:
    """A store exactly as relayd wrote it before OAuth entries existed."""
    nonce = secrets.token_bytes(12)
    header = {"format": "relayd-credentials", "version": 1, "key_id": key_id(key),
              "nonce": base64.b64encode(nonce).decode()}
    aad = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    sealed = AESGCM(key).encrypt(nonce, json.dumps(plain).encode(), aad)
    path.write_text(json.dumps(dict(header, ciphertext=base64.b64encode(sealed).decode())))


def test_a_version_1_store_still_loads_and_stays_version_1_without_oauth(tmp_path: Path) -> None:
    key = generate_master_key()
    path = tmp_path / "c.enc"
    version1_file(path, key, {"gmail": {"user": "a@gmail.com", "password": "app pass"}})
    store = CredentialStore.open(path, [key])
    credential = store.get("gmail")
    assert isinstance(credential, UpstreamCredential) and credential.password.reveal() == "app pass"
    store.set("sendgrid", "apikey", "SG.x")
    store.save()
    assert json.loads(path.read_text())["version"] == 1


def test_an_oauth_entry_is_sealed_round_trips_and_makes_the_store_version_2(tmp_path: Path) -> None:
    key = generate_master_key()
    path = tmp_path / "c.enc"
    version1_file(path, key, {"gmail": {"user": "a@gmail.com", "password": "app pass"}})
    store = CredentialStore.open(path, [key])
    store.set_oauth("m365", "ops@contoso.example", {"refresh_token": REFRESH, "access_expires": 123.0})
    store.save()
    text = path.read_text()
    assert json.loads(text)["version"] == 2 and REFRESH not in text and "contoso" not in text
    again = CredentialStore.open(path, [key])
    oauth = again.get("m365")
    assert isinstance(oauth, OAuthCredential)
    assert oauth.user == "ops@contoso.example" and oauth.refresh_token is not None
    assert oauth.refresh_token.reveal() == REFRESH and oauth.access_expires == 123.0
    assert REFRESH not in repr(oauth) and again.kinds() == {"gmail": "password", "m365": "oauth"}
    assert isinstance(again.get("gmail"), UpstreamCredential)


def test_writing_back_a_token_keeps_the_other_fields(tmp_path: Path) -> None:
    store = CredentialStore.open(tmp_path / "c.enc", [generate_master_key()])
    store.set_oauth("g", "a@example.com", {"client_secret": "cs", "refresh_token": REFRESH})
    store.set_oauth("g", "", {"access_token": "at", "access_expires": 5.0})
    oauth = store.get("g")
    assert isinstance(oauth, OAuthCredential)
    assert oauth.user == "a@example.com" and oauth.client_secret is not None and oauth.refresh_token is not None
    store.set_oauth("g", "", {"access_token": None})
    oauth = store.get("g")
    assert isinstance(oauth, OAuthCredential) and oauth.access_token is None


def test_a_malformed_oauth_entry_is_refused_without_echoing_it(tmp_path: Path) -> None:
    key = generate_master_key()
    path = tmp_path / "c.enc"
    version1_file(path, key, {"g": {"kind": "oauth", "user": "u", "refresh_token": 12345}})  # type: ignore[dict-item]
    with pytest.raises(CredentialStoreError, match="OAuth entry g is malformed"):
        CredentialStore.open(path, [key])


def test_two_writers_at_once_both_keep_their_change(tmp_path: Path) -> None:
    """The daemon writing back a token while relayctl authorises another credential."""
    key = generate_master_key()
    path = tmp_path / "c.enc"
    CredentialStore.open(path, [key]).save()
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        start.wait()
        for round_ in range(5):
            update_store(path, [key], lambda s: s.set_oauth(f"c{n}", "", {"access_token": f"t{round_}"}))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert CredentialStore.open(path, [key]).names() == [f"c{n}" for n in range(8)]
