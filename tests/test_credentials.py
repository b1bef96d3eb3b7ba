"""Encrypted upstream credentials: Secret redaction, the store, master keys, rotation."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relayd.config.model import CredentialsConfig
from relayd.config.credentials import (
    CredentialStore,
    CredentialStoreError,
    KeySource,
    MasterKeyError,
    MasterKeyMissing,
    Secret,
    UpstreamCredential,
    begin_key_rotation,
    encode_keys,
    generate_master_key,
    key_id,
    load_master_keys,
    locate_master_keys,
    read_key_file,
    reencrypt_store,
    rotate_key,
    write_key_file,
)

GMAIL_USER = "acme-org@gmail.com"
GMAIL_PASSWORD = "abcd efgh ijkl mnop"  # the shape of a Gmail app password


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _store_with_gmail(path: Path, key: bytes) -> CredentialStore:
    store = CredentialStore.open(path, [key])
    store.set("gmail", GMAIL_USER, GMAIL_PASSWORD)
    store.save()
    return store


def _b64key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


# ------------------------------------------------------------------ Secret


def test_secret_never_shows_its_value_in_repr_str_or_format() -> None:
    s = Secret(GMAIL_PASSWORD)
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", f"{s:>40}", "%s %r" % (s, s)):
        assert GMAIL_PASSWORD not in shown
        assert "********" in shown
    assert s.reveal() == GMAIL_PASSWORD


def test_credential_repr_and_logging_hide_the_password(caplog: pytest.LogCaptureFixture) -> None:
    cred = UpstreamCredential(name="gmail", user=GMAIL_USER, password=Secret(GMAIL_PASSWORD))
    assert GMAIL_PASSWORD not in repr(cred)
    assert GMAIL_PASSWORD not in str(cred)
    assert GMAIL_PASSWORD not in f"{cred}"
    assert GMAIL_PASSWORD not in str(dataclasses.asdict(cred))
    logger = logging.getLogger("relayd.test.credentials")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        logger.info("using %s", cred)
        logger.info("password %r / %s", cred.password, cred.password)
        logger.info(f"inline {cred} {cred.password}")
    assert "acme-org@gmail.com" in caplog.text  # the records really were captured
    assert GMAIL_PASSWORD not in caplog.text


def test_secret_refuses_to_be_pickled_alone_or_inside_a_credential() -> None:
    cred = UpstreamCredential(name="gmail", user=GMAIL_USER, password=Secret(GMAIL_PASSWORD))
    with pytest.raises(TypeError):
        pickle.dumps(cred.password)
    with pytest.raises(TypeError):
        pickle.dumps(cred)


def test_secret_copies_and_compares_by_value() -> None:
    s = Secret("one")
    assert copy.deepcopy(s) is s
    assert s == Secret("one")
    assert s != Secret("two")
    assert s != "one"  # a Secret is not a str: no accidental comparison with plain text
    with pytest.raises(TypeError):
        hash(s)
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------- the store


def test_credentials_round_trip_through_the_encrypted_file(tmp_path: Path) -> None:
    key = generate_master_key()
    path = tmp_path / "credentials.enc"
    store = CredentialStore.open(path, [key])
    store.set("gmail", GMAIL_USER, GMAIL_PASSWORD)
    store.set("sendgrid", "apikey", "SG.xxxxx.yyyyy")
    store.save()

    reopened = CredentialStore.open(path, [key])
    cred = reopened.get("gmail")
    assert cred is not None
    assert (cred.name, cred.user, cred.password.reveal()) == ("gmail", GMAIL_USER, GMAIL_PASSWORD)
    assert reopened.names() == ["gmail", "sendgrid"]
    assert reopened.users() == {"gmail": GMAIL_USER, "sendgrid": "apikey"}
    assert reopened.get("mailgun") is None


def test_store_file_holds_neither_user_nor_password_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "credentials.enc"
    _store_with_gmail(path, generate_master_key())
    data = path.read_bytes()
    assert GMAIL_PASSWORD.encode() not in data
    assert GMAIL_USER.encode() not in data
    assert b"acme-org" not in data
    assert b"gmail" not in data  # not even the credential's name
    header = json.loads(data)
    assert set(header) == {"format", "version", "key_id", "nonce", "ciphertext"}


def test_store_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "new-dir" / "credentials.enc"
        _store_with_gmail(path, generate_master_key())
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["credentials.enc"]  # no temp files left


def test_missing_store_is_an_empty_store(tmp_path: Path) -> None:
    store = CredentialStore.open(tmp_path / "absent.enc", [generate_master_key()])
    assert store.names() == [] and store.users() == {}
    assert not (tmp_path / "absent.enc").exists()


def test_remove_says_whether_the_name_was_there(tmp_path: Path) -> None:
    key = generate_master_key()
    store = _store_with_gmail(tmp_path / "c.enc", key)
    assert store.remove("gmail") is True
    assert store.remove("gmail") is False
    store.save()
    assert CredentialStore.open(tmp_path / "c.enc", [key]).names() == []


@pytest.mark.parametrize(
    ("name", "user", "password"),
    [
        ("", "u", "p"),
        ("has space", "u", "p"),
        ("a/b", "u", "p"),
        ("x" * 65, "u", "p"),
        ("gmail", "", "p"),
        ("gmail", "u", ""),
        ("gmail", "u", "p\x00q"),
        ("gmail", "u\r\n", "p"),
    ],
)
def test_set_refuses_bad_names_and_empty_or_control_fields(
    tmp_path: Path, name: str, user: str, password: str
) -> None:
    store = CredentialStore.open(tmp_path / "c.enc", [generate_master_key()])
    with pytest.raises(ValueError) as info:
        store.set(name, user, password)
    if password not in ("", "p"):
        assert password not in str(info.value)


def test_wrong_key_is_refused_naming_the_path_and_key_id_but_no_key(tmp_path: Path) -> None:
    path = tmp_path / "credentials.enc"
    right = generate_master_key()
    _store_with_gmail(path, right)
    wrong = generate_master_key()
    with pytest.raises(CredentialStoreError) as info:
        CredentialStore.open(path, [wrong])
    message = str(info.value)
    assert message == (
        f"{path}: cannot decrypt: the master key does not match this store (key id {key_id(right)})"
    )
    assert _b64key(wrong) not in message and _b64key(right) not in message


def test_tampered_ciphertext_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "credentials.enc"
    key = generate_master_key()
    _store_with_gmail(path, key)
    doc = json.loads(path.read_bytes())
    raw = bytearray(base64.b64decode(doc["ciphertext"]))
    raw[3] ^= 0x01
    doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(CredentialStoreError, match="altered or damaged"):
        CredentialStore.open(path, [key])


def test_key_ids_swapped_between_two_stores_are_refused(tmp_path: Path) -> None:
    key_a, key_b = generate_master_key(), generate_master_key()
    a, b = tmp_path / "a.enc", tmp_path / "b.enc"
    _store_with_gmail(a, key_a)
    _store_with_gmail(b, key_b)
    doc_a, doc_b = json.loads(a.read_bytes()), json.loads(b.read_bytes())
    doc_a["key_id"], doc_b["key_id"] = doc_b["key_id"], doc_a["key_id"]
    a.write_text(json.dumps(doc_a))
    b.write_text(json.dumps(doc_b))
    for path in (a, b):
        with pytest.raises(CredentialStoreError, match="cannot decrypt"):
            CredentialStore.open(path, [key_a, key_b])


def test_ciphertext_not_bound_to_its_header_is_refused(tmp_path: Path) -> None:
    # Same key and nonce, but sealed without the header as associated data: the
    # kind of blob another component sharing the key could produce.
    path = tmp_path / "credentials.enc"
    key = generate_master_key()
    _store_with_gmail(path, key)
    doc = json.loads(path.read_bytes())
    nonce = base64.b64decode(doc["nonce"])
    forged = AESGCM(key).encrypt(nonce, b'{"evil":{"user":"u","password":"p"}}', None)
    doc["ciphertext"] = base64.b64encode(forged).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(CredentialStoreError, match="authentication failed"):
        CredentialStore.open(path, [key])


def test_nonce_swapped_between_two_saves_is_refused(tmp_path: Path) -> None:
    key = generate_master_key()
    path = tmp_path / "c.enc"
    _store_with_gmail(path, key)
    first = json.loads(path.read_bytes())
    _store_with_gmail(path, key)
    second = json.loads(path.read_bytes())
    assert first["nonce"] != second["nonce"]  # a fresh nonce every save
    second["nonce"] = first["nonce"]
    path.write_text(json.dumps(second))
    with pytest.raises(CredentialStoreError, match="authentication failed"):
        CredentialStore.open(path, [key])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x00\x01binary", "not JSON"),
        (b"[1, 2]", "not a relayd credential store"),
        (b'{"format": "something-else"}', "not a relayd credential store"),
        (b'{"format": "relayd-credentials", "version": 3}', "version"),
        (
            b'{"format": "relayd-credentials", "version": 1, "key_id": "../../etc",'
            b' "nonce": "", "ciphertext": ""}',
            "bad key_id",
        ),
    ],
)
def test_files_that_are_not_stores_are_refused_with_a_sentence(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "c.enc"
    path.write_bytes(content)
    with pytest.raises(CredentialStoreError, match=expected) as info:
        CredentialStore.open(path, [generate_master_key()])
    assert str(info.value).startswith(f"{path}: ")


def test_store_is_saved_with_the_primary_key_and_opens_with_a_secondary(tmp_path: Path) -> None:
    old, new = generate_master_key(), generate_master_key()
    path = tmp_path / "c.enc"
    _store_with_gmail(path, old)
    store = CredentialStore.open(path, [new, old])
    store.save()
    assert json.loads(path.read_bytes())["key_id"] == key_id(new)
    assert CredentialStore.open(path, [new]).names() == ["gmail"]


# ------------------------------------------------------------- master keys


def test_key_file_is_written_0600_with_one_key_a_line(tmp_path: Path) -> None:
    keys = [generate_master_key(), generate_master_key()]
    path = tmp_path / "master.key"
    write_key_file(path, keys)
    assert _mode(path) == 0o600
    assert path.read_text() == encode_keys(keys)
    assert len(path.read_text().splitlines()) == 2
    assert list(read_key_file(path)) == keys


def test_key_file_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = generate_master_key()
    write_key_file(path, [first], replace=False)
    with pytest.raises(FileExistsError):
        write_key_file(path, [generate_master_key()], replace=False)
    assert list(read_key_file(path)) == [first]
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_key_file_open_to_group_or_others_is_refused_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "master.key"
    key = generate_master_key()
    write_key_file(path, [key])
    path.chmod(mode)
    config = CredentialsConfig(store=tmp_path / "c.enc", master_key_file=path)
    with pytest.raises(MasterKeyError) as info:
        load_master_keys(config, {})
    assert f"chmod 600 {path}" in str(info.value)
    assert _b64key(key) not in str(info.value)


def test_key_file_with_a_bad_line_names_the_line_not_its_content(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    good = _b64key(generate_master_key())
    almost = good[:-3] + "AA="  # the right shape, one byte short
    path.write_text(f"# comment\n{good}\n\n{almost[:-4]}\n")
    path.chmod(0o600)
    with pytest.raises(MasterKeyError) as info:
        read_key_file(path)
    assert "line 4" in str(info.value)
    assert good not in str(info.value) and almost[:-4] not in str(info.value)


def test_empty_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("\n# nothing here\n")
    path.chmod(0o600)
    with pytest.raises(MasterKeyError, match="holds no master key"):
        read_key_file(path)


def test_key_from_environment_variable_is_used(tmp_path: Path) -> None:
    key = generate_master_key()
    config = CredentialsConfig(store=tmp_path / "c.enc")
    found = locate_master_keys(config, {"RELAYD_MASTER_KEY": _b64key(key)})
    assert found.keys == (key,) and found.source is KeySource.ENVIRONMENT
    assert _b64key(key) not in repr(found)
    unpadded = _b64key(key).rstrip("=")
    assert load_master_keys(config, {"RELAYD_MASTER_KEY": unpadded + "\n"}) == [key]


def test_systemd_credential_comes_first_and_is_not_mode_checked(tmp_path: Path) -> None:
    systemd_key, env_key, file_key = (generate_master_key() for _ in range(3))
    cred_dir = tmp_path / "creds"
    cred_dir.mkdir()
    # systemd grants the service user read access with an ACL, shown in the group bits.
    (cred_dir / "relayd-master-key").write_text(encode_keys([systemd_key]))
    (cred_dir / "relayd-master-key").chmod(0o440)
    key_file = tmp_path / "master.key"
    write_key_file(key_file, [file_key])
    config = CredentialsConfig(store=tmp_path / "c.enc", master_key_file=key_file)
    environ = {"CREDENTIALS_DIRECTORY": str(cred_dir), "RELAYD_MASTER_KEY": _b64key(env_key)}

    found = locate_master_keys(config, environ)
    assert found.keys == (systemd_key,) and found.source is KeySource.SYSTEMD_CREDENTIAL
    assert load_master_keys(config, {"RELAYD_MASTER_KEY": _b64key(env_key)}) == [env_key]
    assert load_master_keys(config, {}) == [file_key]


def test_credentials_directory_without_our_key_falls_through_to_the_environment(
    tmp_path: Path,
) -> None:
    key = generate_master_key()
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "RELAYD_MASTER_KEY": _b64key(key)}
    config = CredentialsConfig(store=tmp_path / "c.enc")
    assert load_master_keys(config, environ) == [key]


def test_missing_key_says_everywhere_it_looked(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    config = CredentialsConfig(store=tmp_path / "c.enc", master_key_file=key_file)
    with pytest.raises(MasterKeyMissing) as info:
        load_master_keys(config, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    message = str(info.value)
    assert str(tmp_path / "creds" / "relayd-master-key") in message
    assert "$RELAYD_MASTER_KEY" in message
    assert str(key_file) in message


def test_bad_environment_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = CredentialsConfig(store=tmp_path / "c.enc")
    with pytest.raises(MasterKeyError) as info:
        load_master_keys(config, {"RELAYD_MASTER_KEY": "not-a-key-but-secret-ish"})
    assert "not-a-key-but-secret-ish" not in str(info.value)
    assert "$RELAYD_MASTER_KEY" in str(info.value)


# ---------------------------------------------------------------- rotation


def test_rotation_replaces_the_key_and_keeps_the_credentials(tmp_path: Path) -> None:
    store_path, key_file = tmp_path / "c.enc", tmp_path / "master.key"
    old = generate_master_key()
    write_key_file(key_file, [old])
    _store_with_gmail(store_path, old)

    new_id = rotate_key(store_path, key_file)

    keys = read_key_file(key_file)
    assert len(keys) == 1 and keys[0] != old and key_id(keys[0]) == new_id
    assert _mode(key_file) == 0o600 and _mode(store_path) == 0o600
    cred = CredentialStore.open(store_path, keys).get("gmail")
    assert cred is not None and cred.password.reveal() == GMAIL_PASSWORD
    with pytest.raises(CredentialStoreError):
        CredentialStore.open(store_path, [old])


def test_crash_after_adding_the_new_key_leaves_a_store_that_opens(tmp_path: Path) -> None:
    store_path, key_file = tmp_path / "c.enc", tmp_path / "master.key"
    old = generate_master_key()
    write_key_file(key_file, [old])
    _store_with_gmail(store_path, old)

    begin_key_rotation(key_file, read_key_file(key_file))  # step 1, then "crash"

    keys = load_master_keys(CredentialsConfig(store_path, key_file), {})
    assert len(keys) == 2 and keys[1] == old
    assert CredentialStore.open(store_path, keys).names() == ["gmail"]


def test_crash_after_reencrypting_leaves_a_store_that_opens(tmp_path: Path) -> None:
    store_path, key_file = tmp_path / "c.enc", tmp_path / "master.key"
    old = generate_master_key()
    write_key_file(key_file, [old])
    _store_with_gmail(store_path, old)

    new = begin_key_rotation(key_file, read_key_file(key_file))  # step 1
    reencrypt_store(store_path, read_key_file(key_file))  # step 2, then "crash"

    assert json.loads(store_path.read_bytes())["key_id"] == key_id(new)
    keys = load_master_keys(CredentialsConfig(store_path, key_file), {})
    cred = CredentialStore.open(store_path, keys).get("gmail")
    assert cred is not None and cred.password.reveal() == GMAIL_PASSWORD
    # A later rotation finishes the job and drops every old key.
    rotate_key(store_path, key_file)
    assert len(read_key_file(key_file)) == 1
    assert CredentialStore.open(store_path, read_key_file(key_file)).names() == ["gmail"]


def test_rotation_with_a_key_that_does_not_open_the_store_changes_nothing(tmp_path: Path) -> None:
    store_path, key_file = tmp_path / "c.enc", tmp_path / "master.key"
    _store_with_gmail(store_path, generate_master_key())
    write_key_file(key_file, [generate_master_key()])
    key_text, store_bytes = key_file.read_text(), store_path.read_bytes()
    with pytest.raises(CredentialStoreError):
        rotate_key(store_path, key_file)
    assert key_file.read_text() == key_text
    assert store_path.read_bytes() == store_bytes


def test_rotation_from_an_environment_key_writes_a_new_key_file(tmp_path: Path) -> None:
    store_path, new_file = tmp_path / "c.enc", tmp_path / "new.key"
    env_key = generate_master_key()
    _store_with_gmail(store_path, env_key)
    rotate_key(store_path, new_file, current_keys=[env_key])
    keys = read_key_file(new_file)
    assert len(keys) == 1 and keys[0] != env_key
    assert CredentialStore.open(store_path, keys).names() == ["gmail"]


def test_store_rewritten_by_root_keeps_the_daemon_users_ownership(tmp_path: Path) -> None:
    from relayd.config.credentials import CredentialStore, generate_master_key

    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # the daemon's user owns its state directory
    key = generate_master_key()
    store = CredentialStore.open(state / "credentials.enc", [key])
    store.set("gmail", "acme@gmail.com", "app-password")
    store.save()
    first = (state / "credentials.enc").stat()
    assert (first.st_uid, first.st_gid) == (65534, 65534)
    again = CredentialStore.open(state / "credentials.enc", [key])
    again.set("sendgrid", "apikey", "SG.key")
    again.save()
    second = (state / "credentials.enc").stat()
    assert (second.st_uid, second.st_gid, second.st_mode & 0o777) == (65534, 65534, 0o600)
