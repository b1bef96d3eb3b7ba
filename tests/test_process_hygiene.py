"""Key and process hygiene of a real relayd process: no key in its environment, no core dumps, rotation and reload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from tests.relayenv import ROOT, RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, submit

ACME = ("acme", "acme-relay-password")


def credentialed_upstream(files: RelayFiles, upstreams: Callable[..., Any], **extra: Any) -> Any:
    gmail = upstreams(users={"acme@gmail.com": "acme-app-password"})
    files.write(
        upstreams=[UpstreamSpec("gmail_acme", gmail.port, "acme-gmail", "acme@gmail.com", "acme-app-password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme"])])],
        **extra,
    )
    return gmail


def relayctl(
    files: RelayFiles, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "relayctl"), "--config", str(files.config), *args],
        input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env or dict(os.environ),
    )


def test_the_master_key_is_in_no_environment_of_a_running_relayd_and_it_cannot_dump_core(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = credentialed_upstream(relay_files, upstreams)
    key_text = relay_files.key_file.read_text().strip()
    # The environment is the only source of the key.
    config = relay_files.config.read_text()
    relay_files.config.write_text(config.replace(f"  master_key_file: {relay_files.key_file}\n", ""))
    relay_files.key_file.unlink()
    with RelaydProcess(relay_files, extra_env={"RELAYD_MASTER_KEY": key_text}) as relayd:
        pid = relayd.proc.pid
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        limits = Path(f"/proc/{pid}/limits").read_text()
        owner = os.stat(f"/proc/{pid}").st_uid
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        (first,) = gmail.wait_for_messages(1)
        relayd.signal(signal.SIGHUP)  # a reload still has the key it read at start
        relay_files.wait_for_log("configuration reloaded")
        submit(relay_files, ACME, "billing@acme.example", ["other@customer.test"])
        gmail.wait_for_messages(2)
    assert key_text.encode() not in environ
    assert b"RELAYD_MASTER_KEY=" + key_text[:8].encode() not in environ
    assert b"PATH=" in environ  # the rest of the environment is intact
    assert first.login == "acme@gmail.com"
    core_line = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core_line.split()[4:6] == ["0", "0"]
    assert "process hardening: dumpable=no core_limit=0" in relay_files.mainlog()
    if os.geteuid() != 0:  # an undumpable process's /proc entries belong to root
        assert owner == 0
    assert key_text not in relay_files.mainlog()


def test_rotate_key_under_load_credential_then_reload_keeps_delivering_and_says_to_restart(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    gmail = credentialed_upstream(relay_files, upstreams)
    # What systemd's LoadCredential= does: a private copy of the key file, made at start.
    credentials_dir = relay_files.root / "credentials"
    credentials_dir.mkdir(mode=0o700)
    shutil.copy(relay_files.key_file, credentials_dir / "relayd-master-key")
    service_env = {"CREDENTIALS_DIRECTORY": str(credentials_dir)}
    operator_env = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "RELAYD_MASTER_KEY")}
    with RelaydProcess(relay_files, extra_env=service_env):
        submit(relay_files, ACME, "billing@acme.example", ["before@customer.test"])
        gmail.wait_for_messages(1)
        rotated = relayctl(relay_files, "secret", "rotate-key", env=operator_env)
        assert rotated.returncode == 0, rotated.stderr
        assert "restart it (systemctl restart relayd)" in rotated.stdout

        reloaded = relayctl(relay_files, "reload", env=operator_env)
        assert reloaded.returncode == 0, reloaded.stderr + reloaded.stdout
        log = relay_files.wait_for_log("configuration reloaded")
        assert "which relayd only reads at start: restart relayd (systemctl restart relayd)" in log
        submit(relay_files, ACME, "billing@acme.example", ["after@customer.test"])
        (_, after) = gmail.wait_for_messages(2)
        assert after.login == "acme@gmail.com"

        # A configuration needing a credential the running relayd cannot have: refused, saying why.
        added = relayctl(relay_files, "secret", "set", "sendgrid", "--user", "apikey", "--password-stdin",
                         env=operator_env, stdin="SG.new-key\n")
        assert added.returncode == 0, added.stderr
        config = relay_files.config.read_text().replace("    credential: acme-gmail", "    credential: sendgrid")
        relay_files.config.write_text(config)
        refused = relayctl(relay_files, "reload", env=operator_env)
    assert refused.returncode != 0
    assert "credential(s) sendgrid are not among those relayd holds" in refused.stderr
    assert "restart relayd (systemctl restart relayd) to load them" in refused.stderr
