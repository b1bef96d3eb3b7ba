"""contrib/: the Prometheus alert rules pass promtool, and every metric they and the Grafana dashboard name exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from tests.relayenv import ROOT, RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, free_port

ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "relayd.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed; scripts/install-test-clients "
                             "installs it as root on Debian")

_METRIC = re.compile(r"\brelayd_[a-z0-9_]+")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_the_alerts_fire_on_the_series_they_are_meant_for_and_not_before() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_file_has_each_promised_alert() -> None:
    rules = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    for name in ("RelaydQueueOldMessage", "RelaydDeferredGrowing", "RelaydTransportDown", "RelaydTenantQuota80",
                 "RelaydTokenRefreshFailing", "RelaydSpoolAlmostFull"):
        assert name in rules
        assert rules[name]["labels"]["severity"] in ("warning", "critical")
        assert rules[name]["annotations"]["summary"]


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def family(sample_name: str, families: set[str]) -> str:
    """A sample name's metric family: relayd_deliveries_total -> relayd_deliveries."""
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return sample_name


def test_the_dashboard_is_a_grafana_dashboard_with_a_query_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "relayd" and dashboard["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24


@pytest.fixture
def exported_families(relay_files: RelayFiles, upstreams: Callable[..., Any]) -> set[str]:
    """The metric families a running relayd declares on its metrics listener (# TYPE lines)."""
    provider = upstreams(users={"relay@provider.test": "pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("provider", provider.port, "provider", "relay@provider.test", "pw")],
        tenants=[TenantSpec("acme", "acme-pw", ["*@acme.example"], [(["*"], ["provider"])])],
    )
    port = free_port()
    with relay_files.config.open("a") as config:
        config.write(f"metrics:\n  address: 127.0.0.1\n  port: {port}\n")
    with RelaydProcess(relay_files):
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE relayd_")}


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported_by_relayd(exported_families: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used_by_dashboard = {family(n, exported_families) for e in dashboard_exprs(dashboard) for n in _METRIC.findall(e)}
    assert len(used_by_dashboard) >= 15
    assert sorted(used_by_dashboard - exported_families) == []

    alerts = yaml.safe_load(ALERTS.read_text())
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    used_by_alerts = {family(n, exported_families) for e in exprs for n in _METRIC.findall(e)}
    assert sorted(used_by_alerts - exported_families) == []
