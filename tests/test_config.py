"""relay.yaml loading: valid files become frozen config, broken ones say where and why.

Broken files live in tests/bad_configs/NAME.yaml with the exact expected report
in NAME.expected (golden files): a change in wording or position shows up as a
readable diff.
"""

from __future__ import annotations

import dataclasses
import pwd
import textwrap
from pathlib import Path

import pytest

from relayd.config.model import (
    CaptureTransportConfig,
    RelayConfig,
    SmtpTransportConfig,
    TlsMode,
)
from relayd.config.loader import ConfigError, ConfigProblem, SizeSyntaxError, load_config, parse_size
from relayd.config.presets import PROVIDER_PRESETS, PresetError, resolve_preset
from relayd.config.retry import parse_retry_schedule
from relayd.config.shaping import Shaping

HERE = Path(__file__).parent
BAD_CONFIGS = HERE / "bad_configs"
EXAMPLE = HERE.parent / "config" / "relay.yaml"
HASH = "scrypt$14$8$1$c2FsdHNhbHQ=$aGFzaGhhc2g="


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, *, check_files: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=check_files)
    return str(info.value)


MINIMAL = f"""\
version: 1
hostname: relay.example.com
spool_dir: spool
credentials: {{store: credentials.enc}}
listeners:
  - {{name: local, port: 2525, tls: none}}
transports:
  sink: {{host: 127.0.0.1, port: 2526, tls: none}}
tenants:
  acme:
    password_hash: "{HASH}"
    senders: ["*@acme.example"]
    routes:
      - {{domains: ["*"], via: [sink]}}
"""


# --------------------------------------------------------------------------- valid files


def test_example_production_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(EXAMPLE.parent.parent)
    config = load_config(Path("config/relay.yaml"), check_files=False)
    assert config.hostname == "relay.example.com"
    assert [t for t in config.tenants] == ["acme", "globex", "ops"]
    assert config.tenants["acme"].routes[0].transports == ("gmail_acme", "sendgrid", "mailgun")
    assert config.tenants["ops"].bind_addresses == ()
    assert config.tenants["ops"].local_uids == (0, pwd.getpwnam("www-data").pw_uid)
    local = config.listeners[-1]
    assert local.unix_path == Path("/run/relayd/submit.sock") and local.unix_mode == 0o666
    sendgrid = config.transports["sendgrid"]
    assert isinstance(sendgrid, SmtpTransportConfig)
    assert (sendgrid.host, sendgrid.port) == ("smtp.sendgrid.net", 2525)
    ses = config.transports["ses_ops"]
    assert isinstance(ses, SmtpTransportConfig)
    assert ses.host == "email-smtp.eu-west-1.amazonaws.com"
    assert {(lst.port, lst.tls) for lst in config.listeners if lst.unix_path is None} == {
        (587, TlsMode.STARTTLS), (465, TlsMode.IMPLICIT)}


def test_valid_config_loads_into_frozen_objects_with_presets_paths_and_defaults(
    tmp_path: Path,
) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("tls/cert.pem", "tls/key.pem", "tls/ca.pem", "master.key"):
        (tmp_path / name).write_text("placeholder\n")
    path = write(tmp_path, f"""\
        version: 1
        hostname: relay.example.com
        spool_dir: spool
        log_file: "-"
        tls: {{cert: tls/cert.pem, key: tls/key.pem}}
        credentials: {{store: ../elsewhere/credentials.enc, master_key_file: master.key}}
        retry: "F,1h,10m; F,2d,2h"
        delivery: {{max_parallel: 4, queue_run_interval: 30s}}
        listeners:
          - name: submission
            max_message_size: 10MB
            command_timeout: 2m
        transports:
          gmail_acme:
            preset: gmail
            credential: acme-gmail
          sendgrid:
            preset: sendgrid
            port: 2525
            credential: sendgrid
          private:
            host: mail.internal.example
            ca_file: tls/ca.pem
            credential: internal
            retry: "F,3s,1s"
          capture:
            type: capture
            maildir: captured
        tenants:
          acme:
            password_hash: "{HASH}"
            senders: ["*@acme.example", billing@acme.example]
            max_message_size: 512K
            routes:
              - domains: ["*.test"]
                via: [capture]
              - name: acme-all
                domains: ["*"]
                via: [gmail_acme, sendgrid, private]
        """)
    config = load_config(path)

    assert isinstance(config, RelayConfig)
    assert config.source == tmp_path / "relay.yaml"
    assert config.spool_dir == tmp_path / "spool"
    assert config.log_file is None
    assert config.credentials.store == tmp_path.parent / "elsewhere" / "credentials.enc"
    assert config.credentials.master_key_file == tmp_path / "master.key"
    assert config.tls is not None and config.tls.key_file == tmp_path / "tls" / "key.pem"
    assert config.retry == parse_retry_schedule("F,1h,10m; F,2d,2h")
    assert (config.delivery.max_parallel, config.delivery.queue_run_interval) == (4, 30.0)
    assert config.delivery.shutdown_grace == 10.0
    assert config.metrics.port is None

    (listener,) = config.listeners
    assert (listener.address, listener.port, listener.tls) == ("127.0.0.1", 587, TlsMode.STARTTLS)
    assert listener.max_message_size == 10 * 1024 * 1024
    assert listener.command_timeout == 120.0
    assert listener.data_timeout == 600.0

    gmail = config.transports["gmail_acme"]
    assert gmail == SmtpTransportConfig(name="gmail_acme", host="smtp.gmail.com", port=587,
                                        tls=TlsMode.STARTTLS, credential="acme-gmail",
                                        provider="gmail", shaping=Shaping(max_per_day=500))
    sendgrid = config.transports["sendgrid"]
    assert isinstance(sendgrid, SmtpTransportConfig) and sendgrid.port == 2525
    private = config.transports["private"]
    assert isinstance(private, SmtpTransportConfig)
    assert private.ca_file == tmp_path / "tls" / "ca.pem"
    assert private.provider is None and private.port == 587
    assert config.retry_for("private") == parse_retry_schedule("F,3s,1s")
    assert config.transports["capture"] == CaptureTransportConfig(
        name="capture", maildir=tmp_path / "captured")

    acme = config.tenants["acme"]
    assert acme.senders == ("*@acme.example", "billing@acme.example")
    assert acme.max_message_size == 512 * 1024 and acme.max_recipients is None
    assert [r.name for r in acme.routes] == ["acme-1", "acme-all"]
    assert acme.routes[1].transports == ("gmail_acme", "sendgrid", "private")

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.tenants["evil"] = acme  # type: ignore[index]


def test_missing_files_are_not_checked_when_check_files_is_false(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "tls: {cert: nowhere/cert.pem, key: nowhere/key.pem}\n")
    assert load_config(path, check_files=False).tls is not None
    assert "nowhere/cert.pem does not exist" in problems_of(path, check_files=True)


# --------------------------------------------------------------------------- golden bad files

GOLDEN = sorted(p.stem for p in BAD_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", GOLDEN)
def test_bad_config_reports_exactly_the_golden_problems(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(BAD_CONFIGS)  # reports name the file as it was given: NAME.yaml
    expected = (BAD_CONFIGS / f"{name}.expected").read_text(encoding="utf-8").rstrip("\n")
    assert problems_of(Path(f"{name}.yaml"), check_files=True) == expected


def test_golden_set_covers_the_required_cases() -> None:
    required = {"yaml_syntax", "duplicate_key", "unknown_key", "plaintext_password",
                "unknown_transport", "verify_off_with_credential", "tls_none_remote",
                "bind_not_loopback", "bad_retry", "bad_size", "port_out_of_range",
                "missing_required", "many_problems"}
    assert required <= set(GOLDEN)
    for name in GOLDEN:
        assert (BAD_CONFIGS / f"{name}.expected").is_file(), name


def test_every_problem_in_a_file_is_reported_not_just_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(BAD_CONFIGS)
    with pytest.raises(ConfigError) as info:
        load_config(Path("many_problems.yaml"))
    lines = [p.line for p in info.value.problems]
    assert len(lines) >= 10 and lines == sorted(lines)


def test_plaintext_secrets_are_refused_without_repeating_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(BAD_CONFIGS)
    report = problems_of(Path("plaintext_password.yaml"))
    assert "plaintext secrets are not allowed" in report
    assert "abcd-efgh-ijkl-mnop" not in report
    assert "hunter2" not in report


def test_secret_nested_anywhere_under_a_transport_is_found(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace(
        "sink: {host: 127.0.0.1, port: 2526, tls: none}",
        "sink: {host: 127.0.0.1, port: 2526, tls: none, login: {user: u, API_KEY: sk-live-123}}"))
    report = problems_of(path)
    assert "unknown key 'login'" in report
    assert "'API_KEY': plaintext secrets are not allowed" in report
    assert "sk-live-123" not in report


def test_a_password_written_as_hash_or_credential_is_not_repeated(tmp_path: Path) -> None:
    text = MINIMAL.replace(HASH, "Tr0ub4dor&3").replace(
        "tls: none}\ntenants", "tls: none, credential: \"my gmail pw\"}\ntenants")
    report = problems_of(write(tmp_path, text))
    assert "password_hash must have the form scrypt$" in report
    assert "credential must be the name of a stored credential" in report
    assert "Tr0ub4dor" not in report and "my gmail pw" not in report


# --------------------------------------------------------------------------- smaller rules


def test_one_bind_address_cannot_stand_for_two_tenants(tmp_path: Path) -> None:
    text = MINIMAL.replace("    routes:", "    bind_addresses: [127.0.0.2]\n    trust_every_local_user: true\n"
                                          "    routes:") + (
        "  globex:\n"
        "    senders: ['*@globex.example']\n"
        "    bind_addresses: 127.0.0.2\n"
        "    trust_every_local_user: true\n"
        "    routes: [{domains: ['*'], via: [sink]}]\n")
    assert problems_of(write(tmp_path, text)) == (
        "relay.yaml:19:21: 127.0.0.2 already stands for tenant 'acme'; one address can only "
        "stand for one tenant"
    ).replace("relay.yaml", str(tmp_path / "relay.yaml"))


def test_wildcard_listener_clashes_with_a_specific_address_on_the_same_port(
    tmp_path: Path,
) -> None:
    text = MINIMAL.replace(
        "  - {name: local, port: 2525, tls: none}",
        "  - {name: any, address: 0.0.0.0, port: 2525, tls: none}\n"
        "  - {name: local, port: 2525, tls: none}\n"
        "  - {name: v6, address: '::1', port: 2525, tls: none}")
    report = problems_of(write(tmp_path, text))
    assert report.endswith(":7:25: port 2525 on 127.0.0.1 is already taken by the listener "
                           "at line 6 on 0.0.0.0")
    assert len(report.splitlines()) == 1


def test_ses_preset_with_region_builds_the_regional_host_and_region_needs_ses(
    tmp_path: Path,
) -> None:
    text = MINIMAL.replace(
        "  sink: {host: 127.0.0.1, port: 2526, tls: none}",
        "  sink: {host: 127.0.0.1, port: 2526, tls: none}\n"
        "  ses: {preset: ses, region: us-east-1, port: 465, tls: implicit, credential: ses}\n"
        "  mg: {preset: mailgun, region: eu-west-1}")
    report = problems_of(write(tmp_path, text))
    assert report.endswith(":10:33: region is only used with preset: ses, not with preset: mailgun")
    text = text.replace("  mg: {preset: mailgun, region: eu-west-1}\n", "")
    ses = load_config(write(tmp_path, text)).transports["ses"]
    assert isinstance(ses, SmtpTransportConfig)
    assert (ses.host, ses.port, ses.tls) == ("email-smtp.us-east-1.amazonaws.com", 465,
                                             TlsMode.IMPLICIT)


def test_a_port_with_a_leading_zero_is_not_silently_read_as_octal(tmp_path: Path) -> None:
    report = problems_of(write(tmp_path, MINIMAL.replace("port: 2526", "port: 0465")))
    assert report.endswith(":8:33: write port as a plain decimal number; YAML reads '0465' as 309")


def test_empty_unreadable_and_non_mapping_files_are_reported_at_file_level(
    tmp_path: Path,
) -> None:
    assert problems_of(write(tmp_path, "# nothing\n")).endswith(": the file is empty; see "
                                                                "config/relay.yaml for a complete example")
    missing = tmp_path / "absent.yaml"
    assert problems_of(missing) == f"{missing}: cannot read the file: No such file or directory"
    assert problems_of(write(tmp_path, "- a\n- b\n")).endswith(
        ":1:1: relay.yaml must be a mapping of 'key: value' lines, but this is a list")


def test_self_referencing_and_exploding_aliases_stay_bounded(tmp_path: Path) -> None:
    loop = write(tmp_path, MINIMAL + "metrics: &m {address: 127.0.0.1, port: 1, x: *m}\n")
    assert "unknown key 'x' in metrics" in problems_of(loop)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = write(tmp_path, MINIMAL + "\n".join(lines) + "\n", "bomb.yaml")
    assert "unknown key 'a8'" in problems_of(bomb)


def test_problem_prints_file_line_and_column_and_error_joins_lines() -> None:
    first = ConfigProblem("relay.yaml", 12, 5, "port must be from 1 to 65535; 0 is out of range")
    whole = ConfigProblem("relay.yaml", 0, 0, "the file is empty")
    assert str(first) == "relay.yaml:12:5: port must be from 1 to 65535; 0 is out of range"
    assert str(ConfigError([first, whole])) == f"{first}\nrelay.yaml: the file is empty"


# --------------------------------------------------------------------------- sizes and presets


@pytest.mark.parametrize("text, size", [
    ("25M", 25 * 1024**2), ("10MB", 10 * 1024**2), ("512K", 512 * 1024), ("1G", 1024**3),
    ("1048576", 1048576), ("2kib", 2048), ("1.5M", 1572864), ("100B", 100), (4096, 4096),
])
def test_parse_size_reads_binary_units_and_plain_bytes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "25 megabytes", "-1", "1.5", "10T", "1e6"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(SizeSyntaxError):
        parse_size(text)


def test_every_preset_resolves_and_ses_needs_a_region() -> None:
    assert set(PROVIDER_PRESETS) == {"gmail", "google_workspace", "sendgrid", "mailgun", "ses",
                                     "office365", "ovh", "orange", "yahoo", "ionos"}
    assert resolve_preset("ovh").tls is TlsMode.IMPLICIT and resolve_preset("ovh").port == 465
    assert resolve_preset("sendgrid").user_hint == "literally 'apikey'"
    assert resolve_preset("ses", "ap-southeast-2").host == "email-smtp.ap-southeast-2.amazonaws.com"
    with pytest.raises(PresetError, match="needs a region"):
        resolve_preset("ses")
    with pytest.raises(PresetError, match="not an AWS region"):
        resolve_preset("ses", "Paris")
    with pytest.raises(PresetError, match="known presets are gmail, google_workspace"):
        resolve_preset("hotmail")


# --------------------------------------------------------------------------- local identity


def test_bind_addresses_without_the_explicit_trust_is_an_error_naming_both_fixes(tmp_path: Path) -> None:
    text = MINIMAL.replace("    routes:", "    bind_addresses: [127.0.0.2]\n    routes:")
    assert problems_of(write(tmp_path, text)) == (
        f"{tmp_path / 'relay.yaml'}:13:21: bind_addresses trusts every local user: any program on this "
        "machine can connect from 127.0.0.2 and submit as tenant 'acme'. Prefer local_users (the uids "
        "relayd-sendmail may submit as this tenant over a unix listener); to keep bind_addresses, add "
        "`trust_every_local_user: true` to the tenant"
    )
    trusted = MINIMAL.replace("    routes:", "    bind_addresses: [127.0.0.2]\n    trust_every_local_user: true\n"
                                           "    routes:")
    tenant = load_config(write(tmp_path, trusted), check_files=False).tenants["acme"]
    assert tenant.bind_addresses == ("127.0.0.2",) and tenant.trust_every_local_user


def test_local_users_take_names_and_numbers_once_each(tmp_path: Path) -> None:
    unknown = MINIMAL.replace("    routes:", "    local_users: [root, 4242, no-such-user-here]\n    routes:")
    path = write(tmp_path, unknown)
    assert problems_of(path) == (
        f"{path}:13:31: local_users: there is no local user named 'no-such-user-here' on this machine "
        "(getent passwd); write an existing user name or a uid number"
    )
    twice = MINIMAL.replace("    routes:", "    local_users: [root, 4242]\n    routes:") + (
        "  globex:\n"
        "    senders: ['*@globex.example']\n"
        "    local_users: [4242]\n"
        "    routes: [{domains: ['*'], via: [sink]}]\n")
    path = write(tmp_path, twice)
    assert problems_of(path) == (
        f"{path}:18:19: local user 4242 already submits as tenant 'acme'; a local user can only stand "
        "for one tenant"
    )
    good = MINIMAL.replace("    routes:", "    local_users: [root, 4242]\n    routes:")
    config = load_config(write(tmp_path, good), check_files=False)
    assert config.tenants["acme"].local_uids == (0, 4242)
    assert config.tenant_for_uid(4242) is config.tenants["acme"] and config.tenant_for_uid(4243) is None


def test_unix_listener_has_a_path_mode_and_group_but_no_address_or_tls(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "  - {name: local, port: 2525, tls: none}\n",
        "  - {name: local, port: 2525, tls: none}\n"
        "  - {name: sock, unix: run/submit.sock, mode: \"0660\", group: root, max_recipients: 5}\n",
    )
    config = load_config(write(tmp_path, text), check_files=False)
    sock = config.listeners[1]
    assert (sock.unix_path, sock.unix_mode, sock.unix_group) == (tmp_path / "run/submit.sock", 0o660, 0)
    assert sock.tls is TlsMode.NONE and sock.max_recipients == 5
    bad = MINIMAL.replace(
        "  - {name: local, port: 2525, tls: none}\n",
        "  - {name: sock, unix: /run/x.sock, port: 25, mode: \"u+rw\"}\n"
        "  - {name: local, port: 2525, tls: none, mode: \"0600\"}\n",
    )
    path = write(tmp_path, bad)
    assert problems_of(path) == "\n".join([
        f"{path}:6:24: the first listener must be a network listener (address and port: relayctl uses "
        "it); list the unix listener after it",
        f"{path}:6:43: port does not apply to a unix listener (it has a socket path instead of an "
        "address, and no TLS)",
        f"{path}:6:53: mode must be permission bits in octal such as \"0660\" (owner, group, others), "
        "but this is text",
        f"{path}:7:48: mode only applies to a unix listener (unix: /run/relayd/submit.sock)",
    ])


def test_login_throttling_settings_have_bounds_and_an_order(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "  - {name: local, port: 2525, tls: none}\n",
        "  - {name: local, port: 2525, tls: none, auth_failures_per_source: 0, auth_lockout: 10m,\n"
        "     auth_lockout_max: 2m}\n",
    )
    path = write(tmp_path, text)
    assert problems_of(path) == "\n".join([
        f"{path}:6:68: auth_failures_per_source must be from 1 to 100000; 0 is out of range",
        f"{path}:7:24: auth_lockout_max (2m) must not be below auth_lockout (10m)",
    ])
    good = MINIMAL.replace("port: 2525, tls: none}", "port: 2525, tls: none, auth_failures_per_source: 50, "
                                                     "auth_lockout: 30s}")
    listener = load_config(write(tmp_path, good), check_files=False).listeners[0]
    assert (listener.auth_failures_per_source, listener.auth_lockout, listener.auth_lockout_max) == (50, 30.0, 900.0)


def test_transport_max_parallel_defaults_to_half_the_slots_capped_by_connections_and_is_bounded(
    tmp_path: Path,
) -> None:
    text = MINIMAL.replace(
        "  sink: {host: 127.0.0.1, port: 2526, tls: none}",
        "  sink: {host: 127.0.0.1, port: 2526, tls: none}\n"
        "  few: {host: 127.0.0.1, port: 2527, tls: none, max_connections: 3}\n"
        "  own: {host: 127.0.0.1, port: 2528, tls: none, max_parallel: 15}\n"
        "  dev: {type: capture, maildir: capture}",
    ) + "delivery: {max_parallel: 20}\n"
    config = load_config(write(tmp_path, text))
    assert [config.transport_max_parallel(n) for n in ("sink", "few", "own", "dev")] == [10, 3, 15, 10]
    tiny = load_config(write(tmp_path, text.replace("max_parallel: 20", "max_parallel: 1")))
    assert tiny.transport_max_parallel("sink") == 1
    bad = problems_of(write(tmp_path, text.replace("max_parallel: 15", "max_parallel: 0")))
    assert bad.endswith("relay.yaml:10:63: max_parallel must be from 1 to 1000; 0 is out of range")


def test_a_preset_fills_the_providers_send_limits_and_relay_yaml_overrides_them(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace(
        "  sink: {host: 127.0.0.1, port: 2526, tls: none}",
        "  sink: {host: 127.0.0.1, port: 2526, tls: none, max_per_second: 0.5, max_per_hour: 100}\n"
        "  ses: {preset: ses, region: eu-west-1, max_per_day: 50000}\n"
        "  gmail: {preset: gmail}\n"
        "  o365: {preset: office365}\n"
        "  dev: {type: capture, maildir: mail, max_per_minute: 5}",
    ))
    config = load_config(path, check_files=False)
    shaping = {name: t.shaping for name, t in config.transports.items()}
    assert shaping["sink"] == Shaping(max_per_second=0.5, max_per_hour=100)
    assert shaping["ses"] == Shaping(max_per_second=1.0, max_per_day=50000)  # the sandbox's 1/s stays
    assert shaping["gmail"] == Shaping(max_per_day=500)
    assert shaping["o365"] == Shaping(max_per_minute=30, max_recipients_per_day=10000)
    assert shaping["dev"] == Shaping(max_per_minute=5)
    assert shaping["ses"].describe() == "max_per_second 1, max_per_day 50000"
    assert not Shaping().is_limited and Shaping().describe() == "unshaped"


def test_tenant_quota_and_usage_sections_parse_into_frozen_values_with_their_defaults(tmp_path: Path) -> None:
    from relayd.config.quota import CounterStore, QuotaAction, RedisSettings

    text = MINIMAL + """\
    quota: {max_per_day: 1000, on_quota: hold}
usage:
  time_zone: Europe/Paris
  store: redis
  redis: {host: 10.0.0.5, port: 6380, key_prefix: acct1}
"""
    config = load_config(write(tmp_path, text), check_files=False)
    quota = config.tenants["acme"].quota
    assert (quota.max_per_day, quota.max_per_month, quota.on_quota, quota.alert_percent) == (
        1000, None, QuotaAction.HOLD, 80)
    assert config.usage.time_zone == "Europe/Paris" and config.usage.store is CounterStore.REDIS
    assert config.usage.redis == RedisSettings(host="10.0.0.5", port=6380, key_prefix="acct1")
    plain = load_config(write(tmp_path, MINIMAL, "plain.yaml"), check_files=False)
    assert not plain.tenants["acme"].quota.is_limited and plain.usage.store is CounterStore.SQLITE
