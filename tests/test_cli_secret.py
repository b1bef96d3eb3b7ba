"""relayctl secret / key / tenant hash-password, in-process and as a real process."""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayd.ops.cli import build_parser, main
from relayd.config.credentials import (
    CredentialStore,
    generate_master_key,
    key_id,
    read_key_file,
    write_key_file,
)
from relayd.config.passwords import verify_password

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "Gm4il-App-Pa55word-xyz"


class Paths:
    def __init__(self, root: Path) -> None:
        self.store = root / "credentials.enc"
        self.key = root / "master.key"

    def opts(self) -> list[str]:
        return ["--store", str(self.store), "--key-file", str(self.key)]


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


def run(argv: list[str], stdin: str = "", environ: dict[str, str] | None = None) -> int:
    return main(argv, environ={} if environ is None else environ, stdin=io.StringIO(stdin))


def set_gmail(paths: Paths) -> None:
    argv = ["secret", "set", "gmail", "--user", "org@gmail.com", *paths.opts()]
    assert run(argv, PASSWORD + "\n") == 0


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relayctl: ")
    for fragment in fragments:
        assert fragment in lines[0]


# --------------------------------------------------------------- secret set


def test_secret_set_creates_key_and_store_and_never_prints_the_password(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    assert f"created master key file {paths.key}" in out
    assert "stored credential gmail (user org@gmail.com)" in out
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.store.stat().st_mode) == 0o600
    (key,) = read_key_file(paths.key)
    assert base64.urlsafe_b64encode(key).decode() not in out + err
    cred = CredentialStore.open(paths.store, [key]).get("gmail")
    assert cred is not None and cred.password.reveal() == PASSWORD


def test_secret_set_replaces_a_login_with_the_existing_key(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    capsys.readouterr()
    key_text = paths.key.read_text()
    argv = ["secret", "set", "gmail", "--user", "other@gmail.com", *paths.opts()]
    assert run(argv, "second-password\r\n") == 0
    assert "created master key" not in capsys.readouterr().out
    assert paths.key.read_text() == key_text
    cred = CredentialStore.open(paths.store, read_key_file(paths.key)).get("gmail")
    assert cred is not None
    assert (cred.user, cred.password.reveal()) == ("other@gmail.com", "second-password")


@pytest.mark.parametrize(("stdin", "said"), [("", "pipe it in with --password-stdin"),
                                             ("\n", "refusing an empty password")])
def test_secret_set_refuses_an_empty_password(
    paths: Paths, capsys: pytest.CaptureFixture[str], stdin: str, said: str
) -> None:
    argv = ["secret", "set", "gmail", "--user", "u", *paths.opts()]
    assert run(argv, stdin) == 1
    assert_one_error_line(capsys.readouterr().err, said)
    assert not paths.store.exists() and not paths.key.exists()


def test_secret_set_refuses_a_bad_name_before_reading_anything(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["secret", "set", "bad name", "--user", "u", *paths.opts()], PASSWORD) == 1
    assert_one_error_line(capsys.readouterr().err, "credential name")


def test_secret_set_without_any_key_source_says_how_to_make_one(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["secret", "set", "gmail", "--user", "u", "--store", str(paths.store)]
    assert run(argv, PASSWORD) == 1
    assert_one_error_line(capsys.readouterr().err, "no master key found", "relayctl key generate")


def test_secret_set_will_not_make_a_new_key_for_an_existing_store(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    paths.key.unlink()
    assert run(["secret", "set", "x", "--user", "u", *paths.opts()], PASSWORD) == 1
    assert_one_error_line(capsys.readouterr().err, "the store exists but no master key found")
    assert not paths.key.exists()


# ---------------------------------------------------- list, remove, rotate-key


def test_secret_list_shows_names_and_users_never_passwords(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    argv = ["secret", "set", "sendgrid", "--user", "apikey", *paths.opts()]
    assert run(argv, "SG.key\n") == 0
    capsys.readouterr()

    assert run(["secret", "list", *paths.opts()]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "USER"]
    assert [line.split() for line in table[1:]] == [
        ["gmail", "org@gmail.com"],
        ["sendgrid", "apikey"],
    ]

    assert run(["secret", "list", "--json", *paths.opts()]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == [
        {"name": "gmail", "user": "org@gmail.com"},
        {"name": "sendgrid", "user": "apikey"},
    ]
    assert PASSWORD not in out and "SG.key" not in out


def test_secret_list_of_an_empty_store_says_so(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    write_key_file(paths.key, [generate_master_key()])
    assert run(["secret", "list", *paths.opts()]) == 0
    assert "no credentials" in capsys.readouterr().out


def test_secret_remove_deletes_and_a_missing_name_is_an_error(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    assert run(["secret", "remove", "gmail", *paths.opts()]) == 0
    assert CredentialStore.open(paths.store, read_key_file(paths.key)).names() == []
    capsys.readouterr()
    assert run(["secret", "remove", "gmail", *paths.opts()]) == 1
    assert_one_error_line(capsys.readouterr().err, "no credential named 'gmail'")


def test_wrong_key_is_one_clear_line_with_the_key_id(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    (right,) = read_key_file(paths.key)
    write_key_file(paths.key, [generate_master_key()])
    capsys.readouterr()
    assert run(["secret", "list", *paths.opts()]) == 1
    assert capsys.readouterr().err == (
        f"relayctl: {paths.store}: cannot decrypt: the master key does not match this store "
        f"(key id {key_id(right)})\n"
    )


def test_too_open_key_file_is_refused_with_the_chmod_fix(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    paths.key.chmod(0o644)
    capsys.readouterr()
    assert run(["secret", "list", *paths.opts()]) == 1
    assert_one_error_line(capsys.readouterr().err, f"chmod 600 {paths.key}")


def test_rotate_key_rewrites_the_key_file_and_keeps_the_logins(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    set_gmail(paths)
    (old,) = read_key_file(paths.key)
    assert run(["secret", "rotate-key", *paths.opts()]) == 0
    (new,) = read_key_file(paths.key)
    assert new != old
    assert key_id(new) in capsys.readouterr().out
    cred = CredentialStore.open(paths.store, [new]).get("gmail")
    assert cred is not None and cred.password.reveal() == PASSWORD


def test_rotate_key_from_the_environment_needs_a_new_key_file(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    env_key = generate_master_key()
    environ = {"RELAYD_MASTER_KEY": base64.urlsafe_b64encode(env_key).decode()}
    store_opts = ["--store", str(paths.store)]
    assert run(["secret", "set", "gmail", "--user", "u", *store_opts], PASSWORD, environ) == 0
    capsys.readouterr()

    assert run(["secret", "rotate-key", *store_opts], environ=environ) == 2
    assert_one_error_line(capsys.readouterr().err, "$RELAYD_MASTER_KEY", "--new-key-file")

    new_file = paths.store.parent / "new.key"
    argv = ["secret", "rotate-key", *store_opts, "--new-key-file", str(new_file)]
    assert run(argv, environ=environ) == 0
    (new,) = read_key_file(new_file)
    assert CredentialStore.open(paths.store, [new]).names() == ["gmail"]
    assert run(argv, environ=environ) == 1  # the new key file exists now: never overwritten
    assert read_key_file(new_file) == (new,)


# ------------------------------------------------------------------ config


def test_secret_commands_find_store_and_key_through_relay_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        "version: 1\n"
        "hostname: relay.example.test\n"
        "spool_dir: spool\n"
        "credentials:\n"
        "  store: secrets/credentials.enc\n"
        "  master_key_file: secrets/master.key\n"
        "listeners:\n"
        "  - {name: submission, address: 127.0.0.1, port: 2525, tls: none}\n"
        "transports:\n"
        "  capture: {type: capture, maildir: captured}\n"
        "tenants: {}\n"
    )
    argv = ["--config", str(config), "secret", "set", "gmail", "--user", "org@gmail.com"]
    assert run(argv, PASSWORD) == 0
    assert (tmp_path / "secrets" / "master.key").exists()
    capsys.readouterr()
    assert run(["secret", "list", "--json"], environ={"RELAYD_CONFIG": str(config)}) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == [{"name": "gmail", "user": "org@gmail.com"}]


def test_broken_config_prints_its_problems_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text("version: 7\n")
    assert run(["--config", str(config), "secret", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() and all(line.startswith("relayctl: ") for line in err.splitlines())
    assert f"{config}:1:10: version must be 1" in err


# -------------------------------------------------------------- key, tenant


def test_key_generate_writes_0600_and_refuses_to_overwrite_without_force(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["key", "generate", str(paths.key)]) == 0
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    (first,) = read_key_file(paths.key)
    assert key_id(first) in capsys.readouterr().out
    assert run(["key", "generate", str(paths.key)]) == 1
    assert_one_error_line(capsys.readouterr().err, "already exists", "--force")
    assert read_key_file(paths.key) == (first,)
    assert run(["key", "generate", "--force", str(paths.key)]) == 0
    assert read_key_file(paths.key) != (first,)


def test_tenant_hash_password_prints_a_hash_that_verifies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["tenant", "hash-password"], "tenant-pass-1\n") == 0
    out, err = capsys.readouterr()
    assert "tenant-pass-1" not in out + err
    assert verify_password("tenant-pass-1", out.strip())


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([]) == 2
    assert run(["secret"]) == 2
    assert run(["secret", "set", "gmail"]) == 2  # --user is required
    assert run(["frobnicate"]) == 2
    assert run(["--help"]) == 0
    assert "secret" in capsys.readouterr().out


def test_every_command_group_is_registered() -> None:
    parser = build_parser()
    for argv in (
        ["secret", "set", "n", "--user", "u"],
        ["secret", "list"],
        ["secret", "remove", "n"],
        ["secret", "rotate-key"],
        ["key", "generate", "p"],
        ["tenant", "hash-password"],
    ):
        assert callable(parser.parse_args(argv).func)


# ---------------------------------------------------------- as a real process


def _relayctl(args: list[str], stdin: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.ops.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_relayctl_process_takes_the_password_on_stdin_and_never_echoes_it(paths: Paths) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RELAYD_MASTER_KEY", "CREDENTIALS_DIRECTORY", "RELAYD_CONFIG")
    }
    set_result = _relayctl(
        ["secret", "set", "gmail", "--user", "org@gmail.com", *paths.opts()], PASSWORD + "\n", env
    )
    assert set_result.returncode == 0, set_result.stderr
    list_result = _relayctl(["secret", "list", "--json", *paths.opts()], "", env)
    assert list_result.returncode == 0, list_result.stderr
    assert json.loads(list_result.stdout) == [{"name": "gmail", "user": "org@gmail.com"}]
    hash_result = _relayctl(["tenant", "hash-password"], PASSWORD + "\n", env)
    assert hash_result.returncode == 0
    assert verify_password(PASSWORD, hash_result.stdout.strip())
    for result in (set_result, list_result, hash_result):
        assert PASSWORD not in result.stdout + result.stderr
    cred = CredentialStore.open(paths.store, read_key_file(paths.key)).get("gmail")
    assert cred is not None and cred.password.reveal() == PASSWORD


def test_relayctl_process_with_a_wrong_key_fails_without_a_traceback(paths: Paths) -> None:
    set_gmail(paths)
    wrong = base64.urlsafe_b64encode(generate_master_key()).decode()
    env = dict(os.environ, RELAYD_MASTER_KEY=wrong)
    env.pop("CREDENTIALS_DIRECTORY", None)
    result = _relayctl(["secret", "list", "--store", str(paths.store)], "", env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert_one_error_line(result.stderr, "cannot decrypt")
    assert wrong not in result.stderr


def _converse(fd: int, answers: dict[bytes, bytes], deadline: float) -> bytes:
    """Read a terminal until it closes, typing an answer after each prompt seen."""
    seen = b""
    pending = dict(answers)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        for prompt in [p for p in pending if seen.endswith(p)]:
            os.write(fd, pending.pop(prompt))
    return seen


def _hash_password_on_a_terminal(first: str, second: str) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: relayctl with the pseudo-terminal as its controlling tty
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "relayd.ops.cli", "tenant", "hash-password"])
    try:
        answers = {b"Tenant password: ": first.encode() + b"\n",
                   b"Repeat it: ": second.encode() + b"\n"}
        seen = _converse(fd, answers, time.monotonic() + 30)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen


def test_on_a_terminal_the_password_is_asked_twice_without_echo() -> None:
    code, seen = _hash_password_on_a_terminal(PASSWORD, PASSWORD)
    assert code == 0
    assert b"Tenant password: " in seen and b"Repeat it: " in seen
    assert PASSWORD.encode() not in seen  # typed, but never echoed
    hashes = [line for line in seen.decode().splitlines() if line.startswith("scrypt$")]
    assert len(hashes) == 1 and verify_password(PASSWORD, hashes[0].strip())


def test_on_a_terminal_two_different_passwords_are_refused() -> None:
    code, seen = _hash_password_on_a_terminal(PASSWORD, PASSWORD + "-typo")
    assert code == 1
    assert b"relayctl: the two passwords differ" in seen
    assert b"scrypt$" not in seen and PASSWORD.encode() not in seen
