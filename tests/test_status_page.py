"""The status page: served by the real relayd on the metrics listener, rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from relayd.config.credentials import CredentialStore, read_key_file
from relayd.ops.controlclient import ControlClient
from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, free_port, submit, wait_until

LOGIN = ("acme", "acme-pw")
SENDER = "app@acme.example"
CHROMIUM = shutil.which("chromium")
CHROMIUM_TIMEOUT = 90.0


def fetch(url: str, auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def cell(page: str, element_id: str) -> str:
    match = re.search(rf'id="{re.escape(element_id)}"[^>]*>(.*?)</', page, re.S)
    assert match is not None, f"no element {element_id} in the page"
    return match.group(1)


def seeded_relay(relay_files: RelayFiles, upstreams: Callable[..., Any], extra_metrics: str = "") -> tuple[int, Any]:
    """A relayd whose queue holds one deferred, one held and one frozen message, and a recent failure."""
    provider = upstreams(users={"relay@provider.test": "pw"})
    dead = upstreams(users={"relay@dead.test": "pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("provider", provider.port, "provider", "relay@provider.test", "pw"),
                   UpstreamSpec("dead", dead.port, "dead", "relay@dead.test", "pw")],
        tenants=[TenantSpec("acme", "acme-pw", ["*@acme.example"],
                            [(["down.test"], ["dead"]), (["*"], ["provider"])])],
        retry="F,1h,30m",
    )
    port = free_port()
    with relay_files.config.open("a") as config:
        config.write(f"metrics:\n  address: 127.0.0.1\n  port: {port}\n{extra_metrics}")
    dead.refuse_connections()
    provider.reply_to("RCPT", "550 5.1.1 <script>alert('owned')</script> no such user", for_address="evil@customer.test")
    return port, provider


def seed_queue(relay_files: RelayFiles, provider: Any) -> None:
    submit(relay_files, LOGIN, SENDER, ["ok@customer.test"])
    submit(relay_files, LOGIN, SENDER, ["evil@customer.test"])
    provider.wait_for_messages(2)  # ok, and the bounce for evil
    submit(relay_files, LOGIN, SENDER, ["first@down.test"])
    relay_files.wait_for_log("== first@down.test")  # deferred: dead is unreachable
    submit(relay_files, LOGIN, SENDER, ["second@down.test"])  # held by dead's retry wait
    frozen = submit(relay_files, LOGIN, SENDER, ["third@down.test"])
    assert ControlClient(relay_files.root / "spool" / "control.sock").request("freeze", ids=[frozen])["ok"]


def test_the_status_page_shows_the_seeded_queue_transports_and_failures_all_escaped(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    port, provider = seeded_relay(relay_files, upstreams)
    with RelaydProcess(relay_files):
        seed_queue(relay_files, provider)
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: cell(fetch(url)[2], "queue-held") == "1", what="the held message on the page")
        status, headers, page = fetch(url)
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert [cell(page, f"queue-{s}") for s in ("queued", "deferred", "held", "frozen", "total")] == \
            ["0", "1", "1", "1", "3"]
        assert cell(page, "queue-oldest").endswith("s") or "m" in cell(page, "queue-oldest")
        assert f"127.0.0.1:{relay_files.port}" in cell(page, "listeners") or f"127.0.0.1:{relay_files.port}" in page
        dead_row = re.search(r'<tr id="transport-dead">(.*?)</tr>', page, re.S)
        provider_row = re.search(r'<tr id="transport-provider">(.*?)</tr>', page, re.S)
        assert dead_row is not None and provider_row is not None
        assert 'class="state down"' in dead_row.group(1) and "until" in dead_row.group(1)
        assert "refused" in dead_row.group(1).lower()  # the last error
        assert 'class="state open"' in provider_row.group(1)
        assert "ago)" in provider_row.group(1)  # the last success
        failures = page[page.index('id="failures"'):]
        assert "unreachable" in failures and "evil@customer.test" in failures
        # The upstream's reply is shown as text, never as markup.
        assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in failures
        assert "<script" not in page
        assert "No tenant has a quota to show." in page

        assert fetch(f"http://127.0.0.1:{port}/nothing-here")[0] == 404
        request = urllib.request.Request(url, method="POST", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
        assert refused.value.code == 405


def png_size_and_pixels(png: bytes) -> tuple[int, int, bytes]:
    """Width, height and the inflated image data (filter bytes included) of a PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, width, height, data = 8, 0, 0, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            data += body
        pos += 12 + length
    return width, height, zlib.decompress(data)


def run_chromium(tmp_path: Path, *args: str) -> bytes:
    """Run headless Chromium in its own process group; the group is ended if it overstays."""
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-proxy-server", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("chromium did not finish in time") from None
    assert proc.returncode == 0, f"chromium exited {proc.returncode}"
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/install-test-clients)")
def test_headless_chromium_renders_the_status_page_of_a_running_relayd(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    port, provider = seeded_relay(relay_files, upstreams)
    with RelaydProcess(relay_files):
        seed_queue(relay_files, provider)
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: cell(fetch(url)[2], "queue-held") == "1", what="the held message on the page")
        dom = run_chromium(tmp_path, "--dump-dom", url).decode()
        assert [cell(dom, f"queue-{s}") for s in ("queued", "deferred", "held", "frozen", "total")] == \
            ["0", "1", "1", "1", "3"]
        assert 'id="transport-dead"' in dom and "<script" not in dom
        shot = tmp_path / "status.png"
        run_chromium(tmp_path, "--window-size=1280,1000", "--hide-scrollbars", f"--screenshot={shot}", url)
    if os.environ.get("RELAYD_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["RELAYD_KEEP_SCREENSHOT"])
    png = shot.read_bytes()
    width, height, pixels = png_size_and_pixels(png)
    assert (width, height) == (1280, 1000)
    assert len(png) > 20_000  # a page of tables and text, not a blank or error screen
    rows = [pixels[i * (1 + width * 4) + 1:(i + 1) * (1 + width * 4)] for i in range(0, height, 40)]
    assert len(set(rows)) > 10  # many different rows: text, tables, coloured state badges


def store_status_login(relay_files: RelayFiles, name: str, user: str, password: str) -> None:
    store = CredentialStore.open(relay_files.root / "credentials.enc", list(read_key_file(relay_files.key_file)))
    store.set(name, user, password)
    store.save()


def test_basic_auth_from_the_credential_store_guards_the_page_and_metrics(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    port, _provider = seeded_relay(relay_files, upstreams, "  status_auth: statuspage\n")
    store_status_login(relay_files, "statuspage", "ops", "s3cret-page-password")
    with RelaydProcess(relay_files) as relay:
        for path in ("/", "/metrics"):
            status, headers, body = fetch(f"http://127.0.0.1:{port}{path}")
            assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="relayd"')
            assert fetch(f"http://127.0.0.1:{port}{path}", ("ops", "wrong"))[0] == 401
            assert fetch(f"http://127.0.0.1:{port}{path}", ("other", "s3cret-page-password"))[0] == 401
            status, _, body = fetch(f"http://127.0.0.1:{port}{path}", ("ops", "s3cret-page-password"))
            assert status == 200 and ("relayd on relay.test" in body or "relayd_smtp_sessions" in body)
        relay.stop()
    assert b"s3cret-page-password" not in relay.output
    assert "s3cret-page-password" not in relay_files.mainlog()
    assert b"s3cret-page-password" not in relay_files.config.read_bytes()


def test_a_status_auth_credential_missing_from_the_store_stops_the_start(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    seeded_relay(relay_files, upstreams, "  status_auth: nosuchlogin\n")
    with pytest.raises(AssertionError, match=r"relayd exited 78: .*status_auth names credential 'nosuchlogin'"):
        RelaydProcess(relay_files)


def test_a_reload_takes_a_new_status_password_and_keeps_the_old_one_when_the_login_is_missing(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    port, _provider = seeded_relay(relay_files, upstreams, "  status_auth: statuspage\n")
    store_status_login(relay_files, "statuspage", "ops", "first-password")
    url = f"http://127.0.0.1:{port}/"
    with RelaydProcess(relay_files) as relay:
        assert fetch(url, ("ops", "first-password"))[0] == 200
        store_status_login(relay_files, "statuspage", "ops", "second-password")
        relay.signal(signal.SIGHUP)
        wait_until(lambda: fetch(url, ("ops", "second-password"))[0] == 200, what="the new password")
        assert fetch(url, ("ops", "first-password"))[0] == 401

        relay_files.config.write_text(relay_files.config.read_text().replace(
            "status_auth: statuspage", "status_auth: gone"))
        relay.signal(signal.SIGHUP)
        relay_files.wait_for_log("reload failed, keeping the running configuration")
        assert "status_auth names credential 'gone'" in relay_files.mainlog()
        assert fetch(url, ("ops", "second-password"))[0] == 200
        assert fetch(url)[0] == 401


def test_the_status_page_shows_a_tenants_usage_against_its_quota(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    provider = upstreams(users={"relay@provider.test": "pw"})
    relay_files.write(
        upstreams=[UpstreamSpec("provider", provider.port, "provider", "relay@provider.test", "pw")],
        tenants=[TenantSpec("acme", "acme-pw", ["*@acme.example"], [(["*"], ["provider"])],
                            extra="quota:\n  max_per_day: 10\n  max_per_month: 1000"),
                 TenantSpec("beta", "beta-pw", ["*@beta.example"], [(["*"], ["provider"])])],
    )
    port = free_port()
    with relay_files.config.open("a") as config:
        config.write(f"metrics:\n  address: 127.0.0.1\n  port: {port}\n")
    with RelaydProcess(relay_files):
        for n in range(9):
            submit(relay_files, LOGIN, SENDER, [f"r{n}@customer.test"])
        provider.wait_for_messages(9)
        url = f"http://127.0.0.1:{port}/"
        page = fetch(url)[2]
    usage = page[page.index('id="usage"'):]
    usage = usage[:usage.index("</table>")]
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td class=\"n\">([^<]*)</td>", usage)
    assert rows == [("acme", "day", "9 of 10 (90%)"), ("acme", "month", "9 of 1000 (1%)")]
    assert 'class="high"' in usage  # 90 % of the day's quota: the bar turns to the warning colour
    assert "beta" not in usage  # no quota: nothing to measure against
