"""relayctl for admins, driven for real: tenants against a running relayd, config check,
route test and transport verify against fake upstreams on 127.0.0.1."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from relayd.ops.cli import main
from relayd.ops.cli_admin import format_verify, route_report, format_route_report, unreachable_rules
from relayd.config.model import RouteRule, TenantConfig
from relayd.config.loader import load_config
from relayd.config.passwords import verify_password
from relayd.delivery.transport import VerifyStep
from tests.fakeupstream import DEFAULT_PASSWORD, DEFAULT_USER
from tests.relayenv import ROOT, RelayFiles, RelayThread, TenantSpec, UpstreamSpec, connect, submit

HERE = Path(__file__).parent
CHECK_GOLDEN = HERE / "bad_configs" / "check"
ACME = ("acme", "acme-relay-password")
Run = Callable[..., tuple[int, str, str]]


def one_upstream(files: RelayFiles, upstreams: Callable[..., Any], **spec: Any) -> Any:
    up = upstreams(users={"relay@up.test": "up-app-password"})
    files.write(
        upstreams=[UpstreamSpec("up", up.port, "up-login", "relay@up.test", "up-app-password", **spec)],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])],
    )
    return up


def printed_password(out: str) -> str:
    match = re.search(r"^  password: (\S+)$", out, re.MULTILINE)
    assert match is not None, out
    return match.group(1)


def audit_records(files: RelayFiles) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (files.root / "audit.log").read_text().splitlines()]


def refused_login(files: RelayFiles, login: tuple[str, str]) -> int:
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        connect(files, login=login).quit()
    return info.value.smtp_code


# ------------------------------------------------------------------ tenant add


def test_tenant_add_prints_credentials_that_log_in_to_the_running_relay(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    up = one_upstream(relay_files, upstreams)
    with RelayThread(relay_files.config) as relay:
        code, out, err = relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
        assert code == 0, err
        password = printed_password(out)
        assert out.count(password) == 1  # once; the snippets read $SMTP_PASSWORD
        assert f"  host:     127.0.0.1\n  port:     {relay_files.port}\n" in out
        assert "  TLS:      STARTTLS" in out and "  user:     shop\n" in out
        assert "nodemailer.createTransport({" in out and "pass: process.env.SMTP_PASSWORD" in out
        assert f"with smtplib.SMTP('127.0.0.1', {relay_files.port}) as s:" in out
        assert "s.starttls(context=ssl.create_default_context())" in out
        assert out.endswith("relayd reloaded its configuration\n")  # over the control socket
        submit(relay_files, ("shop", password), "orders@shop.example", ["buyer@customer.test"])
        (message,) = up.wait_for_messages(1)
    assert message.mail_from == "orders@shop.example" and message.login == "relay@up.test"
    assert password not in err
    audit_text = (relay_files.root / "audit.log").read_text()
    assert password not in audit_text and "scrypt$" not in audit_text
    (record,) = audit_records(relay_files)
    assert record["action"] == "tenant.add" and record["target"] == "shop"
    assert record["outcome"] == "ok" and record["who"] and isinstance(record["uid"], int)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["time"])


def test_tenant_add_with_routes_refuses_unknown_transports_and_existing_names(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    code, _, err = relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up,sendgird")
    assert (code, err) == (1, "relayctl: unknown transport 'sendgird'; relay.yaml defines: up\n")
    code, _, err = relayctl("tenant", "add", "acme", "--sender", "*@acme.example", "--via", "up")
    assert (code, err) == (1, f"relayctl: tenant acme is defined in {relay_files.config}:33; edit it there\n")
    assert relay_files.config.read_text().splitlines()[32] == "  acme:"
    code, _, err = relayctl("tenant", "add", "shop", "--sender", "shop.example", "--via", "up")
    assert code == 1 and "not changed: 'shop.example' is not a sender pattern" in err
    code, _, err = relayctl("tenant", "add", "shop", "--sender", "*@shop.example")
    assert code == 2 and "--via" in err
    code, out, _ = relayctl("tenant", "add", "shop", "--sender", "*@shop.example",
                            "--route", "*.test,example.com=up", "--via", "up")
    assert code == 0
    routes = load_config(relay_files.config).tenants["shop"].routes
    assert routes == (RouteRule("shop-1", ("*.test", "example.com"), ("up",)),
                      RouteRule("shop-2", ("*",), ("up",)))
    code, _, err = relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
    assert code == 1 and "tenant shop already exists" in err
    outcomes = [(r["target"], r["outcome"]) for r in audit_records(relay_files)]
    assert outcomes == [("shop", "failed"), ("acme", "failed"), ("shop", "failed"), ("shop", "failed"),
                        ("shop", "ok"), ("shop", "failed")]


# ----------------------------------------------------- passwd, disable, enable, remove


def test_passwd_changes_the_login_and_disable_refuses_it(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    with RelayThread(relay_files.config):
        _, out, _ = relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
        first = printed_password(out)
        connect(relay_files, login=("shop", first)).quit()
        code, out, _ = relayctl("tenant", "passwd", "shop")
        assert code == 0 and out.endswith("relayd reloaded its configuration\n")
        second = re.search(r"new password for tenant shop \(shown only this once\): (\S+)", out).group(1)  # type: ignore[union-attr]
        assert refused_login(relay_files, ("shop", first)) == 535
        connect(relay_files, login=("shop", second)).quit()

        code, out, _ = relayctl("tenant", "disable", "shop")
        assert code == 0 and "tenant shop is now disabled" in out
        assert refused_login(relay_files, ("shop", second)) == 535

        assert relayctl("tenant", "enable", "shop")[0] == 0
        connect(relay_files, login=("shop", second)).quit()

        code, out, err = relayctl("tenant", "passwd", "shop", "--password-stdin", stdin="chosen-by-admin-42\n")
        assert code == 0 and "chosen-by-admin-42" not in out + err
        connect(relay_files, login=("shop", "chosen-by-admin-42")).quit()
    audit_text = (relay_files.root / "audit.log").read_text()
    for secret in (first, second, "chosen-by-admin-42", "scrypt$"):
        assert secret not in audit_text
    assert [r["action"] for r in audit_records(relay_files)] == [
        "tenant.add", "tenant.passwd", "tenant.disable", "tenant.enable", "tenant.passwd"]


def test_relay_yaml_tenants_are_never_rewritten_but_passwd_prints_a_hash_to_paste(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    before = relay_files.config.read_bytes()
    for verb, value in (("disable", "false"), ("enable", "true")):
        code, _, err = relayctl("tenant", verb, "acme")
        assert (code, err) == (1, f"relayctl: tenant acme is defined in {relay_files.config}:33, which relayctl "
                                  "does not rewrite; there, under `acme:`, write\n"
                                  f"relayctl:     enabled: {value}\nrelayctl: then run `relayctl reload`\n")
    code, _, err = relayctl("tenant", "remove", "acme", "--yes")
    assert code == 1 and "edit it there" in err
    code, out, _ = relayctl("tenant", "passwd", "acme")
    assert code == 0 and f"tenant acme is defined in {relay_files.config}:33" in out
    new_hash = re.search(r'password_hash: "(\S+)"', out).group(1)  # type: ignore[union-attr]
    password = re.search(r"The new password \(shown only this once\): (\S+)", out).group(1)  # type: ignore[union-attr]
    assert verify_password(password, new_hash)
    assert relay_files.config.read_bytes() == before


def test_remove_needs_yes_and_then_the_tenant_is_gone(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
    code, _, err = relayctl("tenant", "remove", "shop")
    assert code == 2 and "add --yes" in err
    assert "shop" in load_config(relay_files.config).tenants
    code, out, _ = relayctl("tenant", "remove", "shop", "--yes")
    assert code == 0 and out.startswith(f"removed tenant shop from {relay_files.root / 'tenants.yaml'}")
    assert set(load_config(relay_files.config).tenants) == {"acme"}
    code, _, err = relayctl("tenant", "remove", "shop", "--yes")
    assert code == 1 and "no tenant named 'shop'" in err


def test_without_a_control_socket_relayctl_says_how_to_reload(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    _, out, _ = relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
    assert out.endswith("\nrelayd is not running; it reads the change when it starts\n")


# ------------------------------------------------------------------ tenant list


def test_list_shows_names_senders_routes_and_origin_never_hashes(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--sender", "ops@shop.example",
             "--route", "*.test=up", "--via", "up")
    relayctl("tenant", "disable", "shop")
    code, out, _ = relayctl("tenant", "list")
    assert code == 0 and "scrypt" not in out
    managed = relay_files.root / "tenants.yaml"
    assert out.splitlines() == [
        "NAME  ENABLED  SENDERS                           ROUTES                 DEFINED IN",
        f"acme  yes      *@acme.example                    * -> up                {relay_files.config}:33",
        f"shop  no       *@shop.example, ops@shop.example  *.test -> up; * -> up  {managed}:7",
    ]
    code, out, _ = relayctl("tenant", "list", "--json")
    listed = json.loads(out)
    assert "scrypt" not in out
    assert listed[1] == {
        "name": "shop", "enabled": False, "senders": ["*@shop.example", "ops@shop.example"],
        "routes": [{"name": "shop-1", "domains": ["*.test"], "via": ["up"]},
                   {"name": "shop-2", "domains": ["*"], "via": ["up"]}],
        "defined_in": f"{managed}:7", "managed": True,
    }


# ------------------------------------------------------- two relayctl processes at once


def test_concurrent_tenant_adds_from_separate_processes_all_survive(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    one_upstream(relay_files, upstreams)
    names = [f"app{n}" for n in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relayd.ops.cli", "--config", str(relay_files.config),
             "tenant", "add", name, "--sender", f"*@{name}.example", "--via", "up"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in names
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(names), [err for _, err in results]
    tenants = load_config(relay_files.config).tenants
    assert set(tenants) == {"acme", *names}
    for name, (out, _) in zip(names, results):
        hashed = tenants[name].password_hash
        assert hashed is not None and verify_password(printed_password(out), hashed)
    assert sorted(r["target"] for r in audit_records(relay_files)) == names


# ------------------------------------------------------------- secret commands are audited


def test_secret_commands_are_audited_without_the_secret(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    assert relayctl("secret", "set", "mailgun", "--user", "postmaster@mg.test",
                    stdin="mg-secret-key-123\n")[0] == 0
    assert relayctl("secret", "remove", "nothing-here")[0] == 1
    assert relayctl("secret", "rotate-key")[0] == 0
    text = (relay_files.root / "audit.log").read_text()
    assert "mg-secret-key-123" not in text
    assert [(r["action"], r["target"], r["outcome"]) for r in audit_records(relay_files)] == [
        ("secret.set", "mailgun", "ok"),
        ("secret.remove", "nothing-here", "failed"),
        ("secret.rotate-key", "credential store", "ok"),
    ]
    assert "no credential named 'nothing-here'" in audit_records(relay_files)[1]["error"]
    for key_line in relay_files.key_file.read_text().split():
        assert key_line not in text


def test_an_unwritable_audit_log_stops_the_action_before_it_happens(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    (relay_files.root / "audit.log").mkdir()  # a directory cannot be appended to
    code, out, err = relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
    assert code == 1 and out == ""
    assert "cannot write the audit log" in err and "nothing was changed" in err
    assert not (relay_files.root / "tenants.yaml").exists()


# ------------------------------------------------------------------ config check


@pytest.mark.parametrize("name", sorted(p.stem for p in CHECK_GOLDEN.glob("*.yaml")))
def test_config_check_reports_exactly_the_golden_problems(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(CHECK_GOLDEN)
    assert main(["config", "check", f"{name}.yaml"], environ={}) == 1
    assert capsys.readouterr().out == (CHECK_GOLDEN / f"{name}.expected").read_text()


def test_config_check_passes_a_sound_config(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    relayctl("tenant", "add", "shop", "--sender", "*@shop.example", "--via", "up")
    code, out, _ = relayctl("config", "check")
    assert (code, out) == (0, f"{relay_files.config}: OK (2 tenants, 1 transport, 1 listener)\n")


def test_config_check_finds_a_missing_credential_a_foreign_key_a_bad_hash_and_a_dead_route(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run, ca: Any
) -> None:
    up = upstreams()
    relay_files.write(
        upstreams=[UpstreamSpec("up", up.port, extra="credential: ghost-login")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"],
                            [(["*"], ["up"]), (["partner.test"], ["up"])])],
    )
    text = relay_files.config.read_text()
    good_hash = re.search(r'password_hash: "(\S+)"', text).group(1)  # type: ignore[union-attr]
    costly = good_hash.replace("scrypt$14$", "scrypt$30$")
    relay_files.config.write_text(text.replace(good_hash, costly))
    other = ca.issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(relay_files.root / "key.pem"))
    code, out, _ = relayctl("config", "check")
    config = relay_files.config
    credential_line = relay_files.config.read_text().splitlines().index("    credential: ghost-login") + 1
    assert code == 1
    assert out.splitlines() == [
        f"{config}:33: tenant acme: route acme-2 can never match: partner.test already matched by "
        "route acme-1 before it",
        f"{config}:33: tenant acme: password_hash is not a usable password hash: log2(n) 30 is "
        "outside 10..20",
        f"{config}:{credential_line}:17: transport up: credential ghost-login is not in "
        f"{relay_files.root / 'credentials.enc'}; "
        "add it with `relayctl secret set ghost-login --user USER`",
        f"{config}: tls: the key in {relay_files.root / 'key.pem'} does not belong to the certificate "
        f"in {relay_files.root / 'cert.pem'}",
        f"{config}: 4 problems",
    ]


def test_config_check_says_when_the_master_key_cannot_be_found(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    text = relay_files.config.read_text()
    relay_files.config.write_text(text.replace(f"  master_key_file: {relay_files.key_file}\n", ""))
    code, out, _ = relayctl("config", "check")
    assert code == 1
    assert out.splitlines()[0].startswith(
        f"{relay_files.config}: cannot check the credentials named by transports: no master key found")


def test_config_check_reports_a_certificate_that_is_not_pem(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    one_upstream(relay_files, upstreams)
    (relay_files.root / "cert.pem").write_text("not a certificate\n")
    code, out, _ = relayctl("config", "check")
    assert code == 1
    assert f"{relay_files.config}: tls.cert: {relay_files.root / 'cert.pem'} holds no PEM certificate" in out


def test_unreachable_rules_know_which_patterns_cover_which() -> None:
    def tenant(*rules: tuple[str, ...]) -> TenantConfig:
        return TenantConfig("t", None, ("*@t.example",),
                            tuple(RouteRule(f"r{n}", d, ("x",)) for n, d in enumerate(rules, 1)))

    assert unreachable_rules(tenant(("*.example.com",), ("mail.example.com", "*.eu.example.com"))) == [
        (RouteRule("r2", ("mail.example.com", "*.eu.example.com"), ("x",)), ("r1",))]
    assert unreachable_rules(tenant(("*.example.com",), ("example.com",))) == []
    assert unreachable_rules(tenant(("a.test",), ("b.test",), ("a.test", "b.test"))) == [
        (RouteRule("r3", ("a.test", "b.test"), ("x",)), ("r1", "r2"))]
    assert unreachable_rules(tenant(("a.test",), ("*",))) == []


# ------------------------------------------------------------------ route test


def route_setup(files: RelayFiles, upstreams: Callable[..., Any]) -> tuple[Any, Any]:
    gmail, sendgrid = upstreams(), upstreams()
    files.write(
        upstreams=[UpstreamSpec("gmail", gmail.port, "gmail-login", DEFAULT_USER, DEFAULT_PASSWORD),
                   UpstreamSpec("sendgrid", sendgrid.port, extra="credential: sendgrid-key")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"],
                            [(["*.example.com"], ["gmail", "sendgrid"]), (["partner.test"], ["sendgrid"])])],
    )
    return gmail, sendgrid


def test_route_test_shows_rule_pattern_and_chain_for_each_address(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail, sendgrid = route_setup(relay_files, upstreams)
    code, out, _ = relayctl("route", "test", "--tenant", "acme",
                            "someone@mail.example.com", "someone@example.com", "ceo@Partner.TEST")
    assert code == 1  # example.com itself is not a subdomain: no route
    retry = "retry state unknown (relayd not running)"
    assert out.splitlines() == [
        "someone@mail.example.com",
        "  rule acme-1: domain mail.example.com matches '*.example.com'",
        f"  1. gmail: 127.0.0.1:{gmail.port}, STARTTLS, certificate verified, credential gmail-login (in the store)",
        f"     {retry}",
        f"  2. sendgrid: 127.0.0.1:{sendgrid.port}, STARTTLS, certificate verified, credential sendgrid-key "
        "(MISSING from the store)",
        f"     {retry}",
        "someone@example.com",
        "  no route: would be refused with 550 5.7.1 at RCPT (tenant acme has no rule for example.com)",
        "ceo@Partner.TEST",
        "  rule acme-2: domain partner.test matches 'partner.test'",
        f"  1. sendgrid: 127.0.0.1:{sendgrid.port}, STARTTLS, certificate verified, credential sendgrid-key "
        "(MISSING from the store)",
        f"     {retry}",
    ]
    code, out, _ = relayctl("route", "test", "--tenant", "acme", "--json", "a@b.example.com")
    assert code == 0
    (report,) = json.loads(out)
    assert report["rule"] == "acme-1" and report["pattern"] == "*.example.com"
    assert [t["name"] for t in report["transports"]] == ["gmail", "sendgrid"]
    assert report["transports"][0]["credential_in_store"] is True
    assert report["transports"][1]["credential_in_store"] is False
    assert report["transports"][0]["retry"] == {"known": False, "skipped": None, "next_try": None,
                                                "last_error": None}
    code, _, err = relayctl("route", "test", "--tenant", "nobody", "a@b.example.com")
    assert code == 1 and "no tenant named 'nobody'" in err


def test_route_test_shows_the_upstream_the_running_relay_skips(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = upstreams(users={"acme@gmail.com": "gmail-app-password"})
    sendgrid = upstreams(users={"apikey": "SG.key"})
    relay_files.write(
        upstreams=[UpstreamSpec("gmail", gmail.port, "acme-gmail", "acme@gmail.com", "gmail-app-password"),
                   UpstreamSpec("sendgrid", sendgrid.port, "sendgrid", "apikey", "SG.key")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail", "sendgrid"])])],
        retry="F,1h,10m",
    )
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["client@customer.test"])
        sendgrid.wait_for_messages(1)
        code, out, _ = relayctl("route", "test", "--tenant", "acme", "client@customer.test")
        _, json_out, _ = relayctl("route", "test", "--tenant", "acme", "--json", "client@customer.test")
    assert code == 0
    lines = out.splitlines()
    assert lines[3].startswith("     SKIPPED by its retry state until ")
    assert f"connect to 127.0.0.1 port {gmail.port}: connection refused" in lines[3].lower()
    assert lines[5] == "     retry state: usable"
    (report,) = json.loads(json_out)
    gmail_retry = report["transports"][0]["retry"]
    assert gmail_retry["known"] and gmail_retry["skipped"] and gmail_retry["next_try"] > time.time()
    assert report["transports"][1]["retry"]["skipped"] is False


def test_route_report_shows_a_transport_skipped_by_its_retry_state() -> None:
    config_tenant = TenantConfig("acme", None, ("*@acme.example",),
                                 (RouteRule("acme-all", ("*",), ("gmail", "sendgrid")),))
    from relayd.config.model import SmtpTransportConfig

    transports = {"gmail": SmtpTransportConfig("gmail", "smtp.gmail.com", 587, credential="g"),
                  "sendgrid": SmtpTransportConfig("sendgrid", "smtp.sendgrid.net", 2525)}
    health = {"ok": True, "transports": {
        "gmail": {"skipped_until": 1893456000.0, "last_error": "Connection refused"},
        "sendgrid": {"skipped_until": None, "last_error": "550 earlier, per message"}}}
    report = route_report(config_tenant, "x@customer.test", transports, store=None, health=health)
    assert format_route_report(report).splitlines() == [
        "x@customer.test",
        "  rule acme-all: domain customer.test matches '*'",
        "  1. gmail: smtp.gmail.com:587, STARTTLS, certificate verified, credential g (store not readable)",
        "     SKIPPED by its retry state until 2030-01-01 00:00:00Z (last error: Connection refused)",
        "  2. sendgrid: smtp.sendgrid.net:2525, STARTTLS, certificate verified, no credential",
        "     retry state: usable",
    ]


# ------------------------------------------------------------------ transport verify


def test_transport_verify_shows_the_gmail_hint_for_535_and_fails(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = upstreams()
    gmail.reply_to("AUTH", "535 5.7.8 Username and Password not accepted")
    relay_files.write(
        upstreams=[UpstreamSpec("gmail_acme", gmail.port, "acme-gmail", DEFAULT_USER, DEFAULT_PASSWORD,
                                extra="preset: gmail")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme"])])],
    )
    code, out, err = relayctl("transport", "verify", "gmail_acme")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == (f"verifying transport gmail_acme (127.0.0.1:{gmail.port}, STARTTLS); no mail is sent; "
                        "each step waits up to 15s")
    assert lines[1] == f"  ... connecting to 127.0.0.1:{gmail.port} and waiting for its greeting"
    del lines[1]
    assert [line.split()[:2] for line in lines[1:6]] == [
        ["\u2713", "connect"], ["\u2713", "greeting"], ["\u2713", "EHLO"], ["\u2713", "STARTTLS"],
        ["\u2713", "certificate"]]
    assert lines[6].split(None, 2)[:2] == ["\u2717", "AUTH"]
    assert "535 5.7.8 Username and Password not accepted" in lines[6]
    assert lines[7].startswith("    hint: Gmail needs 2-step verification and a 16-letter app password")
    assert lines[-1] == "gmail_acme: FAILED"
    assert DEFAULT_PASSWORD not in out + err


def test_transport_verify_passes_against_a_healthy_upstream(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    up = upstreams()
    relay_files.write(
        upstreams=[UpstreamSpec("up", up.port, "up-login", DEFAULT_USER, DEFAULT_PASSWORD)],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])],
    )
    code, out, err = relayctl("transport", "verify", "up")
    assert code == 0, out
    assert f"\u2713 AUTH" in out and f"logged in as {DEFAULT_USER}" in out and "\u2717" not in out
    assert out.splitlines()[-1] == "up: OK"
    assert DEFAULT_PASSWORD not in out + err
    assert up.messages == []  # verify sends no mail
    code, _, err = relayctl("transport", "verify", "nope")
    assert code == 1 and "no transport named 'nope'" in err


def test_transport_verify_explains_a_refused_port(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    up = upstreams()
    relay_files.write(upstreams=[UpstreamSpec("up", up.port)],
                      tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])])
    up.refuse_connections()
    code, out, _ = relayctl("transport", "verify", "up")
    assert code == 1
    assert f"connect to 127.0.0.1 port {up.port}: connection refused" in out
    assert "hint:" in out


def test_verify_report_falls_back_to_ascii_marks() -> None:
    steps = [VerifyStep("connect", True, "connected"), VerifyStep("AUTH", False, "535 no", "use an app password")]
    assert format_verify(steps, "ascii") == (
        "  ok   connect  connected\n  FAIL AUTH     535 no\n    hint: use an app password")
    assert format_verify(steps, "utf-8").splitlines()[0] == "  \u2713 connect  connected"
