"""The managed tenants file: merged with relay.yaml, written atomically under a lock."""

from __future__ import annotations

import dataclasses
import os
import stat
import textwrap
import threading
import time
from pathlib import Path

import pytest

from relayd.config.model import RouteRule, TenantConfig
from relayd.config.loader import ConfigError, load_config
from relayd.config.tenants import ManagedTenants, TenantRejected, TenantsFileLocked, render_tenants_file

HASH = "scrypt$14$8$1$c2FsdHNhbHQ=$aGFzaGhhc2g="

RELAY_YAML = f"""\
version: 1
hostname: relay.example.com
spool_dir: spool
credentials: {{store: state/credentials.enc}}
listeners:
  - {{name: local, port: 2525, tls: none}}
transports:
  sink: {{host: 127.0.0.1, port: 2526, tls: none}}
  other: {{host: 127.0.0.1, port: 2527, tls: none}}
tenants:
  acme:
    password_hash: "{HASH}"
    senders: ["*@acme.example"]
    routes:
      - domains: ["*"]
        via: [sink]
"""


def shop(name: str = "shop", **changes: object) -> TenantConfig:
    tenant = TenantConfig(
        name=name,
        password_hash=HASH,
        senders=("*@shop.example", "billing@shop-invoices.example"),
        routes=(RouteRule(f"{name}-1", ("*.test", "example.com"), ("other",)),
                RouteRule(f"{name}-2", ("*",), ("sink", "other"))),
        max_recipients=20,
        max_message_size=10 * 1024 * 1024,
        managed=True,
    )
    return dataclasses.replace(tenant, **changes)  # type: ignore[arg-type]


@pytest.fixture
def relay_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(RELAY_YAML)
    return path


def managed_for(config_path: Path, **kwargs: float) -> ManagedTenants:
    config = load_config(config_path, check_files=False)
    return ManagedTenants(
        config.tenants_path,
        shown=str(config.tenants_path),
        transport_names=frozenset(config.transports),
        defined={n: t for n, t in config.tenants.items() if not t.managed},
        **kwargs,  # type: ignore[arg-type]
    )


def test_written_tenants_are_merged_by_load_config_with_their_own_origin(relay_yaml: Path) -> None:
    managed = managed_for(relay_yaml)
    managed.update(lambda tenants: tenants.update(shop=shop()))
    config = load_config(relay_yaml, check_files=False)
    assert set(config.tenants) == {"acme", "shop"}
    loaded = config.tenants["shop"]
    assert loaded == shop(origin=f"{managed.path}:7")
    assert config.tenants["acme"].origin == f"{relay_yaml}:11" and not config.tenants["acme"].managed


def test_default_tenants_file_sits_beside_the_credential_store(relay_yaml: Path) -> None:
    config = load_config(relay_yaml, check_files=False)
    assert config.tenants_path == relay_yaml.parent / "state" / "tenants.yaml"
    assert config.audit_path == relay_yaml.parent / "state" / "audit.log"


def test_tenants_file_and_audit_log_keys_resolve_against_the_yaml(relay_yaml: Path) -> None:
    relay_yaml.write_text(RELAY_YAML + "tenants_file: managed/t.yaml\naudit_log: logs/audit.jsonl\n"
                          "log_file: logs/mainlog\n")
    config = load_config(relay_yaml, check_files=False)
    assert config.tenants_path == relay_yaml.parent / "managed" / "t.yaml"
    assert config.audit_path == relay_yaml.parent / "logs" / "audit.jsonl"


def test_audit_log_defaults_to_the_main_log_directory(relay_yaml: Path) -> None:
    relay_yaml.write_text(RELAY_YAML + "log_file: /var/log/relayd/mainlog\n")
    assert load_config(relay_yaml, check_files=False).audit_path == Path("/var/log/relayd/audit.log")


def test_the_file_is_mode_0600_and_no_temporary_file_is_left(relay_yaml: Path) -> None:
    managed = managed_for(relay_yaml)
    managed.update(lambda tenants: tenants.update(shop=shop()))
    assert stat.S_IMODE(managed.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in managed.path.parent.iterdir()) == [
        "tenants.yaml", "tenants.yaml.lock"]


def test_rendered_file_says_who_manages_it_and_never_loses_a_field() -> None:
    text = render_tenants_file([shop("zeta"), shop("alpha", enabled=False)])
    assert text.startswith("# Tenants managed by `relayctl tenant`")
    assert text.index("alpha:") < text.index("zeta:")
    assert "enabled: false" in text and "max_message_size: 10485760" in text


def test_a_name_in_both_files_is_an_error_naming_both_places(relay_yaml: Path) -> None:
    managed = managed_for(relay_yaml).path
    managed.parent.mkdir()
    managed.write_text(textwrap.dedent(f"""\
        version: 1
        tenants:
          acme:
            password_hash: "{HASH}"
            senders: ["*@acme.example"]
            routes: [{{domains: ["*"], via: [sink]}}]
        """))
    with pytest.raises(ConfigError) as info:
        load_config(relay_yaml, check_files=False)
    assert str(info.value) == (
        f"{managed}:3:3: tenant 'acme' is also defined at {relay_yaml}:11; a tenant can be "
        "defined in only one place, so remove one of the two")


def test_problems_in_the_managed_file_carry_its_name_and_line(tmp_path: Path, relay_yaml: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "tenants.yaml").write_text(textwrap.dedent(f"""\
        version: 1
        colour: blue
        tenants:
          shop:
            password_hash: "{HASH}"
            senders: ["not-an-address"]
            routes: [{{domains: ["*"], via: [sinc]}}]
        """))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(Path("relay.yaml"), check_files=False)
    assert str(info.value).splitlines() == [
        "state/tenants.yaml:2:1: unknown key 'colour' in the tenants file; allowed keys are version, tenants",
        "state/tenants.yaml:6:15: 'not-an-address' is not a sender pattern; write an address "
        "(billing@acme.example) or *@domain (*@acme.example)",
        "state/tenants.yaml:7:37: via names 'sinc', which is not a transport defined in relay.yaml; "
        "did you mean 'sink'?",
    ]


def test_what_would_not_load_is_refused_and_the_file_is_untouched(relay_yaml: Path) -> None:
    managed = managed_for(relay_yaml)
    managed.update(lambda tenants: tenants.update(shop=shop()))
    before = managed.path.read_bytes()
    bad = shop("bad", senders=("nobody",))
    with pytest.raises(TenantRejected, match="'nobody' is not a sender pattern"):
        managed.update(lambda tenants: tenants.update(bad=bad))
    with pytest.raises(TenantRejected, match="not a transport"):
        managed.update(lambda tenants: tenants.update(bad=shop("bad", routes=(RouteRule("r", ("*",), ("x",)),))))
    assert managed.path.read_bytes() == before


def test_a_change_that_raises_writes_nothing(relay_yaml: Path) -> None:
    managed = managed_for(relay_yaml)

    def change(tenants: dict[str, TenantConfig]) -> None:
        tenants["shop"] = shop()
        raise KeyError("shop")

    with pytest.raises(KeyError):
        managed.update(change)
    assert not managed.path.exists()


def test_a_second_writer_waits_for_the_lock_then_gives_up(relay_yaml: Path) -> None:
    first = managed_for(relay_yaml)
    second = managed_for(relay_yaml, lock_timeout=0.3)
    with first.locked():
        started = time.monotonic()
        with pytest.raises(TenantsFileLocked, match="another relayctl has held its lock"):
            second.update(lambda tenants: tenants.update(shop=shop()))
        assert time.monotonic() - started >= 0.3
    second.update(lambda tenants: tenants.update(shop=shop()))  # free again
    assert "shop" in second.read()


def test_writers_in_threads_serialise_and_every_update_survives(relay_yaml: Path) -> None:
    names = [f"t{n}" for n in range(8)]
    barrier = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def add(name: str) -> None:
        managed = managed_for(relay_yaml)  # each writer has its own lock descriptor
        try:
            barrier.wait(5)

            def change(tenants: dict[str, TenantConfig]) -> None:
                time.sleep(0.01)  # widen the read-modify-write window
                tenants[name] = shop(name)

            managed.update(change)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert set(load_config(relay_yaml, check_files=False).tenants) == {"acme", *names}


def test_root_keeps_the_owner_of_the_state_directory(relay_yaml: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    state = relay_yaml.parent / "state"
    state.mkdir()
    os.chown(state, 4242, 4343)
    managed = managed_for(relay_yaml)
    managed.update(lambda tenants: tenants.update(shop=shop()))
    st = managed.path.stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343)


def test_local_users_and_the_bind_trust_survive_a_rewrite_of_the_managed_file(tmp_path: Path) -> None:
    from relayd.config.loader import parse_managed_tenants

    tenant = TenantConfig(
        name="cron", password_hash=None, senders=("*@relay.test",),
        routes=(RouteRule("cron-1", ("*",), ("sink",)),), bind_addresses=("127.0.0.3",),
        trust_every_local_user=True, local_uids=(0, 4242),
    )
    text = render_tenants_file([tenant])
    (back,) = parse_managed_tenants(text, file="tenants.yaml", base=tmp_path, transport_names=frozenset({"sink"}),
                                    defined={}).values()
    assert (back.bind_addresses, back.trust_every_local_user, back.local_uids) == (("127.0.0.3",), True, (0, 4242))
