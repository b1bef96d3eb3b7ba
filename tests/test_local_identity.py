"""Local submission identifies the local user: relayd-sendmail over relayd's Unix socket.

The real relayd process (uvloop) listens on a Unix socket as well as on TCP;
relayd-sendmail runs as a real subprocess, as root and, through setpriv, as
other uids, so the tenant relayd picks comes from the kernel's SO_PEERCRED
and not from anything the client says.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec

SENDMAIL = Path(sys.executable).parent / "relayd-sendmail"
NOBODY = pwd.getpwnam("nobody").pw_uid
UNMAPPED_UID = 48213  # no user of this machine, listed by no tenant

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="runs relayd-sendmail as other uids: needs root and setpriv")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory every uid can reach (pytest's own tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="relayd-sock-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def write_config(files: RelayFiles, socket_path: Path | None, *, mode: str = "0666", bind: bool = False) -> None:
    tenants = [
        TenantSpec("cron", "unused", ["*@relay.test"], [(["*"], ["capture"])], extra="local_users: [root]"),
        TenantSpec("web", "unused", ["*@web.test"], [(["*"], ["capture"])], extra=f"local_users: [{NOBODY}]"),
    ]
    if bind:
        tenants.append(TenantSpec("legacy", "unused", ["*@legacy.test"], [(["*"], ["capture"])],
                                  bind_addresses=["127.0.0.2"]))
    files.write(upstreams=[], tenants=tenants, capture=True)
    if socket_path is not None:
        text = files.config.read_text().replace(
            "transports:\n",
            f"  - name: local\n    unix: {socket_path}\n    mode: \"{mode}\"\ntransports:\n", 1)
        files.config.write_text(text)


def sendmail(args: Sequence[str], message: bytes, *, uid: int | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    command = [str(SENDMAIL), *args]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    environ = {k: v for k, v in os.environ.items() if k not in ("RELAYD_CONFIG", "RELAYD_SUBMIT_SOCKET")}
    environ.update(env or {})
    return subprocess.run(command, input=message, capture_output=True, timeout=30, env=environ)


def arrivals(files: RelayFiles) -> list[str]:
    return [line for line in files.mainlog().splitlines() if " <= " in line]


def test_sendmail_over_the_socket_submits_as_the_tenant_of_the_calling_uid(
    relay_files: RelayFiles, socket_dir: Path
) -> None:
    sock = socket_dir / "submit.sock"
    write_config(relay_files, sock)
    with RelaydProcess(relay_files):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666
        as_root = sendmail(["--config", str(relay_files.config), "-v", "ops@customer.test"],
                           b"From: cron@relay.test\nSubject: nightly\n\nroot's cron\n")
        assert as_root.returncode == 0, as_root.stderr
        assert f"connected to {sock} as local user root".encode() in as_root.stderr
        # nobody cannot read relay.yaml, and needs not: the socket is named in its environment
        relay_files.config.chmod(0o600)
        as_nobody = sendmail(["ops@customer.test"], b"From: www@web.test\nSubject: form\n\nphp mail()\n",
                             uid=NOBODY, env={"RELAYD_CONFIG": str(relay_files.config),
                                              "RELAYD_SUBMIT_SOCKET": str(sock)})
        assert as_nobody.returncode == 0, as_nobody.stderr
        relay_files.wait_for_log(" <= www@web.test")
    cron, web = arrivals(relay_files)
    assert re.search(r" <= cron@relay\.test U=0/root P=local-esmtp A=local:cron S=\d+ id=\S+ for ops@customer\.test$", cron)
    assert re.search(rf" <= www@web\.test U={NOBODY}/nobody P=local-esmtp A=local:web S=\d+ ", web)


def test_a_uid_no_tenant_lists_is_refused_with_a_clear_reply(relay_files: RelayFiles, socket_dir: Path) -> None:
    sock = socket_dir / "submit.sock"
    write_config(relay_files, sock)
    with RelaydProcess(relay_files):
        result = sendmail(["--socket", str(sock), "ops@customer.test"], b"From: x@relay.test\n\nhello\n",
                          uid=UNMAPPED_UID)
        log = relay_files.wait_for_log("rejected MAIL")
    assert result.returncode == 77, result.stderr
    assert (f"550 5.7.1 Local user {UNMAPPED_UID} may not submit mail here: no tenant lists it in "
            "local_users; ask the administrator; the message was not sent").encode() in result.stderr
    assert f"U={UNMAPPED_UID} is in no tenant's local_users" in log
    assert arrivals(relay_files) == []


def test_the_socket_mode_decides_who_may_connect(relay_files: RelayFiles, socket_dir: Path) -> None:
    sock = socket_dir / "submit.sock"
    write_config(relay_files, sock, mode="0600")
    with RelaydProcess(relay_files):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        result = sendmail(["--socket", str(sock), "ops@customer.test"], b"From: www@web.test\n\nx\n", uid=NOBODY)
    assert result.returncode == 77
    assert f"{sock}: permission denied; the unix listener's mode and group".encode() in result.stderr


def test_bind_by_address_still_works_when_the_tenant_trusts_every_local_user(relay_files: RelayFiles) -> None:
    write_config(relay_files, None, bind=True)  # no unix listener: relayd-sendmail uses the old way
    with RelaydProcess(relay_files):
        result = sendmail(["--config", str(relay_files.config), "-v", "ops@customer.test"],
                          b"From: cron@legacy.test\n\nold way\n")
        assert result.returncode == 0, result.stderr
        assert b"from 127.0.0.2 (tenant legacy)" in result.stderr
        relay_files.wait_for_log(" <= cron@legacy.test")
    (line,) = arrivals(relay_files)
    assert " H=(relay.test) [127.0.0.2]:" in line and " A=bind:legacy " in line and " U=" not in line


def test_bind_addresses_without_the_trust_keep_relayd_from_starting(relay_files: RelayFiles) -> None:
    write_config(relay_files, None, bind=True)
    text = relay_files.config.read_text().replace("    trust_every_local_user: true\n", "")
    relay_files.config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "relayd.daemon", "--config", str(relay_files.config)],
                            capture_output=True, timeout=30)
    assert result.returncode == 78
    assert b"bind_addresses trusts every local user" in result.stderr
    assert b"add `trust_every_local_user: true` to the tenant" in result.stderr
