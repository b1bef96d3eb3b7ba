"""What an operator meets in the first hour: status, queue summary, transport verify, config
check, help texts, and the snippets `tenant add` prints, each against a real relayd process
or the real command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from relayd.ops.cli import build_parser
from relayd.ops.clienthelp import snippets_in
from relayd.runtime import build_parser as relayd_parser
from relayd.ops.queueview import backlog_transport, transport_state
from tests.fakeupstream import DEFAULT_PASSWORD, DEFAULT_USER
from tests.relayenv import ROOT, RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, submit

ACME = ("acme", "acme-relay-password")
RELAYCTL = str(Path(sys.executable).parent / "relayctl")
NODE_MODULES = ROOT / ".test-clients" / "node_modules"
Run = Callable[..., tuple[int, str, str]]


# ------------------------------------------------------------------ status: unused and verified


def test_status_shows_a_never_used_transport_as_unused_with_its_failed_verify(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    used = upstreams(users={"relay@used.test": "right"})
    spare = upstreams(users={"relay@spare.test": "right"})
    relay_files.write(
        upstreams=[UpstreamSpec("used", used.port, "used", "relay@used.test", "right"),
                   UpstreamSpec("spare", spare.port, "spare", "relay@spare.test", "wrong password")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["used"])])],
    )
    with RelaydProcess(relay_files):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        used.wait_for_messages(1)
        relay_files.wait_for_log("=> client@customer.test")
        code, before, _ = relayctl("status")
        assert code == 0
        code, _, _ = relayctl("transport", "verify", "spare")
        assert code == 1
        code, after, _ = relayctl("status")
        _, as_json, _ = relayctl("status", "--json")
    lines = before.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("TRANSPORT "))
    rows = {line.split()[0]: line for line in lines[header + 1:]}
    assert lines[header].split() == ["TRANSPORT", "STATE", "LAST", "SUCCESS", "LAST", "ERROR", "LAST", "VERIFY"]
    assert rows["used"].split()[1] == "ok" and rows["spare"].split()[1] == "unused"
    assert rows["spare"].rstrip().endswith("-")  # not verified yet
    spare_row = next(line for line in after.splitlines() if line.startswith("spare "))
    assert spare_row.split()[1] == "unused"
    assert re.search(r"FAILED \d+s ago: AUTH: 535", spare_row), spare_row
    transports = json.loads(as_json)["transports"]
    assert transports["spare"]["state"] == "unused" and transports["used"]["state"] == "ok"
    assert transports["spare"]["last_verify"]["ok"] is False
    assert "wrong password" not in after + as_json


def test_transport_state_words() -> None:
    assert transport_state({}) == "unused"
    assert transport_state({"last_success": 100.0}) == "ok"
    assert transport_state({"last_success": 100.0, "last_error": "x", "last_error_at": 50.0}) == "ok"
    assert transport_state({"last_success": 100.0, "last_error": "x", "last_error_at": 150.0}) == "failing"
    assert transport_state({"last_error": "x", "last_error_at": 150.0}) == "failing"
    assert transport_state({"skipped_until": 2e9, "last_error": "x"}).startswith("retry wait until ")


# ------------------------------------------------------------------ queue summary: who holds the backlog


def test_backlog_transport_is_the_one_the_next_attempt_starts_with() -> None:
    now = 1000.0
    assert backlog_transport(("gmail", "sendgrid"), {}, now) == "gmail"
    assert backlog_transport(("gmail", "sendgrid"), {"gmail": 2000.0}, now) == "sendgrid"
    assert backlog_transport(("gmail", "sendgrid"), {"gmail": 500.0}, now) == "gmail"  # its wait is over
    assert backlog_transport(("gmail", "sendgrid"), {"gmail": 3000.0, "sendgrid": 2000.0}, now) == "sendgrid"
    assert backlog_transport((), {}, now) is None


def test_queue_summary_counts_the_backlog_under_the_transport_holding_it(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = upstreams(users={"acme@gmail.com": "pw"})
    sendgrid = upstreams(users={"apikey": "SG.key"})
    relay_files.write(
        upstreams=[UpstreamSpec("gmail", gmail.port, "gmail", "acme@gmail.com", "pw"),
                   UpstreamSpec("sendgrid", sendgrid.port, "sendgrid", "apikey", "SG.key")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail", "sendgrid"])])],
        retry="F,1h,30m",
    )
    gmail.refuse_connections()
    sendgrid.reply_to("RCPT", "451 4.2.0 try later")
    with RelaydProcess(relay_files):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        relay_files.wait_for_log("== client@customer.test")
        code, out, _ = relayctl("queue", "summary", "--json")
    assert code == 0
    # gmail refused the connection and is in its retry wait: the next attempt starts at sendgrid
    assert {g["key"]: g["messages"] for g in json.loads(out)["by_transport"]} == {"sendgrid": 1}


# ------------------------------------------------------------------ transport verify: bounded, step by step


@pytest.fixture
def stalled_upstream() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_transport_verify_against_a_stalled_upstream_shows_its_steps_and_gives_up_in_time(
    relay_files: RelayFiles, stalled_upstream: int
) -> None:
    relay_files.write(upstreams=[UpstreamSpec("slow", stalled_upstream)],
                      tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["slow"])])])
    started = time.monotonic()
    proc = subprocess.Popen([RELAYCTL, "--config", str(relay_files.config), "transport", "verify", "slow",
                             "--timeout", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = proc.stdout.readline()
        waiting = proc.stdout.readline()
        # what it waits for is on the screen while it waits
        assert proc.poll() is None
        assert "each step waits up to 3s" in header
        assert waiting == f"  ... connecting to 127.0.0.1:{stalled_upstream} and waiting for its greeting\n"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, out + err
    assert "greeting" in out and "timeout after 3s waiting for the greeting" in out
    assert out.splitlines()[-1] == "slow: FAILED"
    assert 2.5 < elapsed < 20


def test_transport_verify_refuses_a_timeout_out_of_bounds(relay_files: RelayFiles, relayctl: Run) -> None:
    relay_files.write(upstreams=[UpstreamSpec("up", 9)],
                      tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])])
    code, _, err = relayctl("transport", "verify", "up", "--timeout", "0")
    assert code == 2 and "--timeout 0: give seconds between 0 and 600" in err


# ------------------------------------------------------------------ config check


def test_config_check_no_files_passes_the_shipped_example_on_a_fresh_box(tmp_path: Path) -> None:
    example = ROOT / "config" / "relay.yaml"
    with_files = subprocess.run([RELAYCTL, "config", "check", str(example)], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "RELAYD_MASTER_KEY": ""})
    assert with_files.returncode == 1 and "/etc/relayd/" in with_files.stdout
    schema_only = subprocess.run([RELAYCTL, "config", "check", "--no-files", str(example)],
                                 capture_output=True, text=True, timeout=60)
    assert schema_only.returncode == 0, schema_only.stdout + schema_only.stderr
    assert schema_only.stdout == (f"{example}: OK (3 tenants, 6 transports, 3 listeners; "
                                  "files not checked (--no-files))\n")


def test_config_check_no_files_still_finds_errors_in_the_yaml(tmp_path: Path) -> None:
    broken = tmp_path / "relay.yaml"
    text = (ROOT / "config" / "relay.yaml").read_text()
    broken.write_text(text.replace("via: [gmail_acme", "via: [gmial_acme", 1)
                      .replace("credential: acme-gmail ", "credential: acme/gmail ", 1))
    run = subprocess.run([RELAYCTL, "config", "check", "--no-files", str(broken)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    where = re.escape(str(broken))
    assert re.search(rf"^{where}:\d+:\d+: .*gmial_acme", run.stdout, re.M), run.stdout
    line = next(n for n, text in enumerate(broken.read_text().splitlines(), 1) if "acme/gmail" in text)
    assert re.search(rf"^{where}:{line}:\d+: credential must be the name of a stored credential", run.stdout,
                     re.M), run.stdout
    assert run.stdout.splitlines()[-1] == f"{broken}: 2 problems"


def test_config_check_says_one_transport_and_one_listener(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    up = upstreams()
    relay_files.write(upstreams=[UpstreamSpec("up", up.port, "up", DEFAULT_USER, DEFAULT_PASSWORD)],
                      tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])])
    code, out, _ = relayctl("config", "check")
    assert (code, out) == (0, f"{relay_files.config}: OK (1 tenant, 1 transport, 1 listener)\n")


# ------------------------------------------------------------------ help everywhere


def _undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    missing.append(f"{path} {name}: no help line")
                if not sub.description:
                    missing.append(f"{path} {name}: no description on its --help page")
                missing += _undocumented(sub, f"{path} {name}")
        elif not action.help:
            missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest} has no help")
    return missing


def test_every_command_and_option_has_a_help_text() -> None:
    assert _undocumented(build_parser(), "relayctl") + _undocumented(relayd_parser(), "relayd") == []


# ------------------------------------------------------------------ tenant add: snippets that run


def _tenant_add(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> tuple[Any, str, dict[str, str]]:
    up = upstreams(users={"relay@up.test": "up-pw"})
    relay_files.write(upstreams=[UpstreamSpec("up", up.port, "up", "relay@up.test", "up-pw")],
                      tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])])
    run = subprocess.run([RELAYCTL, "--config", str(relay_files.config), "tenant", "add", "shop",
                          "--sender", "*@shop.example", "--via", "up"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    password = re.search(r"^  password: (\S+)$", run.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert run.stdout.count(password) == 1  # shown once; the snippets read $SMTP_PASSWORD
    # The listener's certificate comes from the test CA, which the system would trust for a
    # real certificate: SSL_CERT_FILE / NODE_EXTRA_CA_CERTS stand in for the system store.
    env = {**os.environ, "SMTP_PASSWORD": password, "SSL_CERT_FILE": str(relay_files.ca_file),
           "NODE_EXTRA_CA_CERTS": str(relay_files.ca_file), "NODE_PATH": str(NODE_MODULES)}
    return up, run.stdout, env


def test_the_smtplib_snippet_tenant_add_prints_runs_as_pasted(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    up, printed, env = _tenant_add(relay_files, upstreams)
    script = tmp_path / "send.py"
    script.write_text(snippets_in(printed)["python"])
    with RelaydProcess(relay_files):
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        (received,) = up.wait_for_messages(1)
    assert received.mail_from == "app@shop.example" and received.rcpt_tos == ["you@example.com"]
    assert b"Subject: Hello from relayd" in received.data


def test_the_nodemailer_snippet_tenant_add_prints_runs_as_pasted(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "nodemailer").is_dir():
        pytest.skip("node or nodemailer not installed (scripts/install-test-clients installs nodemailer)")
    up, printed, env = _tenant_add(relay_files, upstreams)
    script = tmp_path / "send.js"
    script.write_text(snippets_in(printed)["js"])
    with RelaydProcess(relay_files):
        run = subprocess.run([node, str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        (received,) = up.wait_for_messages(1)
    assert received.mail_from == "app@shop.example"
    assert b"Subject: Hello from relayd" in received.data
