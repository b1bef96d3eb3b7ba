"""scripts/install, run for real into a staging root (--root), twice and more.

The staging root keeps the running system untouched: the relayd user goes into
ROOT/etc/passwd, files are owned by numeric ids from there. Ownership is only
checked when the tests run as root (an ordinary user cannot chown); everything
else is checked always.

The venv is really created and relayd really installed into it from this
checkout. Its dependencies are not downloaded: pip is told `PIP_NO_DEPS=1`, and
the staged commands find them on PYTHONPATH (this venv's site-packages).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import ssl
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

from relayd.ops.cli import main as relayctl_main
from relayd.config.credentials import read_key_file
from tests.relayenv import ROOT

INSTALL = ROOT / "scripts" / "install"
LINKED = ("relayd", "relayctl", "relayd-sendmail")


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_NO_DEPS="1", PYTHONPATH=sysconfig.get_paths()["purelib"],
               PYTHON=shutil.which("python3") or sys.executable)
    env.pop("RELAYD_CONFIG", None)
    result = subprocess.run([str(INSTALL), "--root", str(root), *args], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path's type, mode, owner, size, mtime and content digest (or link target)."""
    seen: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            seen[str(path.relative_to(root))] = ("link", os.readlink(path))
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        seen[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, digest)
    return seen


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def ids(root: Path) -> tuple[int, int] | None:
    for line in (root / "etc" / "passwd").read_text().splitlines() if (root / "etc" / "passwd").exists() else []:
        fields = line.split(":")
        if fields[0] == "relayd":
            return int(fields[2]), int(fields[3])
    return None


def host_user() -> str:
    return subprocess.run(["getent", "passwd", "relayd"], capture_output=True, text=True).stdout


def test_install_script_is_bash_and_shellcheck_clean() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:  # optional tool; bash -n above always runs
        result = subprocess.run([shellcheck, str(INSTALL), str(ROOT / "scripts" / "bootstrap")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


def test_install_into_a_staging_root_is_complete_and_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    before_host = host_user()
    first = run_install(root, "--sendmail-link")
    assert "change(s) this run" in first.stdout and "0 change(s)" not in first.stdout

    # configuration, key and certificate
    etc = root / "etc" / "relayd"
    assert (etc / "relay.yaml").read_bytes() == (ROOT / "config" / "relay.yaml").read_bytes()
    assert (mode(etc), mode(etc / "relay.yaml"), mode(etc / "master.key")) == (0o750, 0o640, 0o600)
    assert len(read_key_file(etc / "master.key")) == 1
    assert (mode(etc / "tls"), mode(etc / "tls" / "cert.pem"), mode(etc / "tls" / "key.pem")) == (0o750, 0o644, 0o640)
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(etc / "tls" / "cert.pem", etc / "tls" / "key.pem")
    assert (mode(root / "var" / "spool" / "relayd"), mode(root / "var" / "lib" / "relayd")) == (0o700, 0o700)

    # units and snippets, byte for byte
    assert (root / "etc/systemd/system/relayd.service").read_bytes() == (ROOT / "systemd/relayd.service").read_bytes()
    assert (root / "etc/sysusers.d/relayd.conf").read_bytes() == (ROOT / "systemd/relayd.sysusers.conf").read_bytes()
    assert (root / "etc/tmpfiles.d/relayd.conf").read_bytes() == (ROOT / "systemd/relayd.tmpfiles.conf").read_bytes()
    assert "would have run: systemctl daemon-reload" in first.stdout

    # commands: links into the venv, which really holds relayd from this checkout
    for name in LINKED:
        link = root / "usr" / "local" / "bin" / name
        assert os.readlink(link) == f"/opt/relayd/venv/bin/{name}"
        assert (root / "opt" / "relayd" / "venv" / "bin" / name).exists()
    assert os.readlink(root / "usr" / "sbin" / "sendmail") == "/usr/local/bin/relayd-sendmail"
    staged = root / "opt" / "relayd" / "venv" / "bin" / "relayd-sendmail"
    help_text = subprocess.run([str(staged), "--help"], capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"]))
    assert help_text.returncode == 0 and "usage: relayd-sendmail" in help_text.stdout

    # ownership, when we may set it: relayd's group reads /etc/relayd, the key stays root's
    relayd_ids = ids(root)
    if os.geteuid() == 0:
        assert relayd_ids is not None
        uid, gid = relayd_ids
        owners = {p: ((etc / p).stat().st_uid, (etc / p).stat().st_gid)
                  for p in ("", "relay.yaml", "master.key", "tls/key.pem")}
        assert owners == {"": (0, gid), "relay.yaml": (0, gid), "master.key": (0, 0), "tls/key.pem": (0, gid)}
        spool = (root / "var" / "spool" / "relayd").stat()
        assert (spool.st_uid, spool.st_gid) == (uid, gid)
        # the next steps say no chown: a store that root creates stays relayd's
        assert "chown" not in first.stdout
        store = root / "var" / "lib" / "relayd" / "credentials.enc"
        code = relayctl_main(["secret", "set", "acme-gmail", "--user", "acme@gmail.com", "--password-stdin",
                              "--store", str(store), "--key-file", str(etc / "master.key")],
                             environ={}, stdin=io.StringIO("app password\n"))
        assert code == 0 and (store.stat().st_uid, store.stat().st_gid) == (uid, gid) and mode(store) == 0o600

    # the second run changes nothing at all, down to the mtimes
    state = snapshot(root)
    second = run_install(root, "--sendmail-link")
    assert "0 change(s) this run" in second.stdout, second.stdout
    assert snapshot(root) == state

    # an operator's edits and key survive a later run
    edited = (etc / "relay.yaml").read_bytes() + b"# edited by the operator\n"
    (etc / "relay.yaml").write_bytes(edited)
    key = (etc / "master.key").read_bytes()
    run_install(root)
    assert (etc / "relay.yaml").read_bytes() == edited and (etc / "master.key").read_bytes() == key

    assert host_user() == before_host  # the running system was not touched


def test_an_existing_sendmail_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    other = root / "usr" / "sbin" / "sendmail"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"#!/bin/sh\n# another MTA\n")
    result = run_install(root, "--sendmail-link")
    assert other.read_bytes() == b"#!/bin/sh\n# another MTA\n" and not other.is_symlink()
    assert "/usr/sbin/sendmail already exists" in result.stdout


def test_install_refuses_unknown_arguments(tmp_path: Path) -> None:
    result = subprocess.run([str(INSTALL), "--root", str(tmp_path), "--bogus"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 64 and "unknown argument: --bogus" in result.stderr
    assert not any(tmp_path.iterdir())


def test_install_into_the_real_system_needs_root() -> None:
    command = [str(INSTALL)]
    if os.geteuid() == 0:  # ask as the unprivileged user nobody
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to drop root for this test"
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 77 and "run as root" in result.stderr

