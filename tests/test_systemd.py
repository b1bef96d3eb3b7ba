"""systemd/relayd.service and its sysusers/tmpfiles snippets, checked by systemd's own tools.

`systemd-analyze verify` must find nothing to say, `systemd-analyze security`
must rate the unit "OK" or better, the paths in the unit must match
config/relay.yaml, and relayd must really run under MemoryDenyWriteExecute
(checked with the kernel's PR_SET_MDWE, the same W^X rule).

systemd-analyze comes from the Debian package systemd, which `scripts/bootstrap
test` installs when run as root; without it these tests fail, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayd import sdnotify
from relayd.config.loader import load_config
from relayd.config.credentials import SYSTEMD_CREDENTIAL_NAME
from tests.relayenv import ROOT, RelayFiles, TenantSpec, make_message

UNIT = ROOT / "systemd" / "relayd.service"
SYSUSERS = ROOT / "systemd" / "relayd.sysusers.conf"
TMPFILES = ROOT / "systemd" / "relayd.tmpfiles.conf"
EXEC_START = "/usr/local/bin/relayd --config /etc/relayd/relay.yaml"
MISSING = ("is not installed: run `scripts/bootstrap test` as root on Debian "
           "(it installs the systemd package), or `apt-get install systemd`")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} {MISSING}")
    return path


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, in order; keys may repeat."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's relayd, which exists here."""
    relayd = Path(sys.executable).parent / "relayd"
    assert relayd.exists(), f"{relayd} is missing: install the package first"
    copy = tmp_path / "units" / "relayd.service"
    copy.parent.mkdir()
    copy.write_text(UNIT.read_text().replace(f"ExecStart={EXEC_START.split()[0]}", f"ExecStart={relayd}"))
    return copy


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit.parent}:", SYSTEMD_LOG_COLOR="0")
    return subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_unit_passes_systemd_analyze_verify_without_a_word(tmp_path: Path) -> None:
    result = verify(runnable_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "relayd.service" not in result.stderr, result.stderr


def test_verify_would_report_a_misspelled_setting(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes"))
    assert "Unknown key 'ProtectHomme'" in verify(copy).stderr


def test_unit_exposure_is_rated_ok_or_better() -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, SYSTEMD_COLORS="0"),
    )
    found = re.search(r"Overall exposure level for relayd\.service: (\d+\.\d+) (\S+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure, rating = float(found.group(1)), found.group(2)
    assert exposure < 2.0 and rating in ("OK", "SAFE", "PERFECT"), found.group(0)


def test_unit_is_a_notify_service_with_watchdog_that_relayd_serves() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [EXEC_START]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] == ["30s"]
    # relayd pings at half of what systemd hands it, well inside the 30 s.
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_unit_runs_unprivileged_with_only_the_bind_capability() -> None:
    s = unit_settings()
    assert s["User"] == ["relayd"] and s["Group"] == ["relayd"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["LoadCredential"] == [f"{SYSTEMD_CREDENTIAL_NAME}:/etc/relayd/master.key"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
                "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality", "MemoryDenyWriteExecute"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["ProtectProc"] == ["invisible"] and s["ProcSubset"] == ["pid"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert s["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert s["SystemCallArchitectures"] == ["native"] and s["UMask"] == ["0077"]
    assert "IPAddressDeny" not in s  # relayd must reach providers anywhere


def test_unit_forbids_core_files_of_a_process_that_holds_decrypted_passwords() -> None:
    assert unit_settings()["LimitCORE"] == ["0"]


def test_every_path_relayd_writes_in_the_example_config_is_writable_under_the_unit() -> None:
    """ProtectSystem=strict makes everything read-only except what the unit names."""
    s = unit_settings()
    writable = [Path(p) for p in s["ReadWritePaths"]]
    writable += [Path("/var/lib") / d for d in s["StateDirectory"]]
    writable += [Path("/var/log") / d for d in s["LogsDirectory"]]
    writable += [Path("/run") / d for d in s["RuntimeDirectory"]]
    config = load_config(ROOT / "config" / "relay.yaml", check_files=False)
    written = [config.spool_dir, config.credentials.store, config.control_path]
    written += [p for p in (config.log_file, config.pid_file) if p is not None]
    written += [t.maildir for t in config.transports.values() if hasattr(t, "maildir")]
    # The managed tenants file and the audit log, where this relayd has them.
    written += [getattr(config, name) for name in ("tenants_path", "audit_path") if hasattr(config, name)]
    for path in written:
        assert any(path == w or w in path.parents for w in writable), f"{path} is read-only under the unit"
    assert s["StateDirectoryMode"] == ["0700"] and s["LogsDirectoryMode"] == ["0750"]
    tls = config.tls
    assert tls is not None and Path("/etc/relayd") in tls.cert_file.parents


def test_sysusers_and_tmpfiles_make_the_user_and_private_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
                   check=True, capture_output=True, timeout=60)
    entry = next(line for line in (root / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("relayd:"))
    _name, _x, uid, gid, _gecos, home, shell = entry.split(":")
    assert int(uid) < 1000 and home == "/var/lib/relayd" and shell == "/usr/sbin/nologin"
    if os.geteuid() != 0:
        return  # creating files owned by relayd needs root; the user entry was checked above
    subprocess.run([tool("systemd-tmpfiles"), "--create", f"--root={root}", str(TMPFILES)],
                   check=True, capture_output=True, timeout=60)
    expected = {
        "var/spool/relayd": (0o700, int(uid), int(gid)),
        "var/lib/relayd": (0o700, int(uid), int(gid)),
        "etc/relayd": (0o750, 0, int(gid)),
        "etc/relayd/tls": (0o750, 0, int(gid)),
    }
    for rel, (mode, owner, group) in expected.items():
        st = (root / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, group), rel


# ------------------------------------------------------------- MemoryDenyWriteExecute, for real

# Turns on the kernel's W^X rule (prctl PR_SET_MDWE = 65 with
# PR_MDWE_REFUSE_EXEC_GAIN = 1; PR_GET_MDWE = 66, from <linux/prctl.h>), proves
# it holds (a W+X mapping is refused), then runs relayd in this very process.
_LAUNCHER = """
import ctypes, mmap, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
    sys.exit(90)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(91)
except OSError:
    pass
sys.argv = ["relayd", "--config", sys.argv[1]]
runpy.run_module("relayd.daemon", run_name="__main__")
"""


def _kernel_has_mdwe() -> bool:
    """PR_SET_MDWE exists from Linux 6.3; probe it in a child so this process stays unchanged."""
    probe = subprocess.run([sys.executable, "-c", "import ctypes,sys; l=ctypes.CDLL(None);"
                            " sys.exit(0 if l.prctl(66,0,0,0,0) >= 0 else 1)"], timeout=30)
    return probe.returncode == 0


def test_relayd_delivers_mail_with_write_xor_execute_enforced(relay_files: RelayFiles) -> None:
    if not sys.platform.startswith("linux") or not _kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+), so W^X cannot be enforced here")
    tenant = TenantSpec(name="app", password="app-secret-1", senders=["*@app.test"], routes=[(["*"], ["capture"])])
    relay_files.write(upstreams=[], tenants=[tenant], capture=True)
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(relay_files.config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_listening(proc, relay_files.port)
        with smtplib.SMTP("127.0.0.1", relay_files.port, timeout=15, local_hostname="app.test") as client:
            client.starttls(context=relay_files.client_context())
            client.login("app", "app-secret-1")  # scrypt via cryptography, under W^X
            client.sendmail("cron@app.test", ["to@customer.test"], make_message("cron@app.test", ["to@customer.test"]))
        relay_files.wait_for_log("=> to@customer.test")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (proc.returncode, err.decode(), out.decode())
    assert "Completed" in relay_files.mainlog()


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            codes = {90: "PR_SET_MDWE did not take effect", 91: "a W+X mapping was allowed"}
            raise AssertionError(f"relayd exited {proc.returncode} {codes.get(proc.returncode, '')}: "
                                 f"{err.decode()}{out.decode()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("relayd did not start listening under W^X")

