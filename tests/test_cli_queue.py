"""relayctl queue / reload / status / send-test and mailq, against a real relayd and its spool.

The commands run in-process through `relayd.ops.cli.main` (and `mailq` as the
installed console script); relayd runs in its own thread with real fake
upstreams on 127.0.0.1. The pure formatting in relayd.ops.queueview is tested
directly at the end.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from relayd.ops.controlclient import ControlClient
from relayd.ops.queueview import (
    QueueFilter,
    QueueRow,
    RecipientRow,
    age_bucket,
    compile_address_pattern,
    format_age,
    format_size,
    listing_lines,
    matches,
    summarize,
)
from relayd.queue.spool import Spool
from relayd.values import RecipientState
from tests.relayenv import RelayFiles, RelayThread, TenantSpec, UpstreamSpec, submit

ACME = ("acme", "acme-relay-password")
GLOBEX = ("globex", "globex-relay-password")
Run = Callable[..., tuple[int, str, str]]


class TtyInput(io.StringIO):
    """Keyboard input: a stdin that is a terminal."""

    def isatty(self) -> bool:
        return True


def setup_relay(files: RelayFiles, upstreams: Callable[..., Any], *, retry: str = "F,1h,10m", bind: bool = False) -> Any:
    gmail = upstreams(users={"relay@gmail.com": "app-password"})
    files.write(
        upstreams=[UpstreamSpec("gmail_acme", gmail.port, "gmail", "relay@gmail.com", "app-password")],
        tenants=[
            TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["gmail_acme"])]),
            TenantSpec("globex", GLOBEX[1], ["news@globex.example"], [(["*"], ["gmail_acme"])],
                       bind_addresses=["127.0.0.2"] if bind else []),
        ],
        retry=retry,
    )
    return gmail


def two_messages(files: RelayFiles, gmail: Any, run: Run) -> tuple[str, str]:
    """acme: one recipient delivered, one deferred; globex: one deferred and frozen."""
    gmail.reply_to("RCPT", "451 4.2.0 mailbox busy", for_address="later@customer.test")
    gmail.reply_to("RCPT", "451 4.2.0 mailbox busy", for_address="held@other.test")
    a = submit(files, ACME, "billing@acme.example", ["ok@customer.test", "later@customer.test"])
    files.wait_for_log("== later@customer.test")
    b = submit(files, GLOBEX, "news@globex.example", ["held@other.test"])
    files.wait_for_log("== held@other.test")
    code, out, _ = run("queue", "freeze", b)
    assert code == 0 and out == f"Message {b} is now frozen\n"
    settle(files)
    return a, b


def settle(files: RelayFiles) -> None:
    """Wait until no delivery attempt runs (the index holds every attempt's outcome)."""
    control = ControlClient(files.root / "spool" / "control.sock")
    deadline = time.monotonic() + 15
    while any(row[6] for m in control.stream("queue.list") for row in m.get("rows", [])):
        assert time.monotonic() < deadline, "deliveries did not settle"
        time.sleep(0.05)


# ------------------------------------------------------------ listing


def test_queue_list_has_exim_bp_shape_with_tenant_delivered_marks_and_frozen(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        a, b = two_messages(relay_files, gmail, relayctl)
        code, out, err = relayctl("queue", "list")
    assert code == 0 and err == ""
    lines = out.split("\n")
    assert re.fullmatch(rf" 0m +\d+ {a} <billing@acme\.example> A=acme", lines[0]), lines[0]
    assert lines[1:4] == ["        D ok@customer.test", "          later@customer.test", ""]
    assert re.fullmatch(rf" 0m +\d+ {b} <news@globex\.example> A=globex \*\*\* frozen \*\*\*", lines[4]), lines[4]
    assert lines[5:] == ["          held@other.test", "", ""]


def test_mailq_command_prints_the_same_listing(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    mailq = Path(sys.executable).parent / "mailq"
    with RelayThread(relay_files.config):
        two_messages(relay_files, gmail, relayctl)
        _, listing, _ = relayctl("queue", "list")
        done = subprocess.run([str(mailq), "--config", str(relay_files.config)], capture_output=True, text=True, timeout=60)
        ids = subprocess.run([str(mailq), "-i", f"--config={relay_files.config}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == listing
    assert ids.returncode == 0 and len(ids.stdout.split()) == 2


def test_filters_select_like_exiqgrep_and_json_and_ids_only(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        a, b = two_messages(relay_files, gmail, relayctl)

        def ids(*filters: str) -> list[str]:
            code, out, _ = relayctl("queue", "list", "-i", *filters)
            assert code == 0
            return out.split()

        assert ids() == [a, b]
        assert ids("--tenant", "acme") == [a]
        assert ids("--from", "^news@") == [b]
        assert ids("--to", "HELD@other") == [b]
        assert ids("--to", "customer", "--tenant", "globex") == []
        assert ids("--frozen") == [b]
        assert ids("--deferred") == [a]  # b is frozen
        assert ids("--older-than", "1h") == []
        assert ids("--younger-than", "1h") == [a, b]
        code, out, _ = relayctl("queue", "list", "--json", "--tenant", "acme")
    (entry,) = json.loads(out)
    assert entry["id"] == a and entry["tenant"] == "acme" and entry["frozen"] is False
    assert entry["state"] == "deferred" and entry["sender"] == "billing@acme.example"
    assert [(r["address"], r["state"], r["attempts"]) for r in entry["recipients"]] == [
        ("ok@customer.test", "delivered", 1), ("later@customer.test", "deferred", 1)]


def test_count_and_summary_by_tenant_domain_transport_and_age(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        two_messages(relay_files, gmail, relayctl)
        assert relayctl("queue", "count")[1] == "2\n"
        assert relayctl("queue", "count", "--frozen")[1] == "1\n"
        assert json.loads(relayctl("queue", "count", "--json", "--tenant", "acme")[1]) == {"count": 1}
        code, text, _ = relayctl("queue", "summary")
        summary = json.loads(relayctl("queue", "summary", "--json")[1])
    assert code == 0
    for title in ("By tenant:", "By recipient domain:", "By transport:", "By age:"):
        assert title in text
    assert re.search(r"^ +1 +\S+ +0m +0m  acme$", text, re.M) and re.search(r"^ +2 +\S+ +0m +0m  TOTAL$", text, re.M)
    assert {g["key"]: g["messages"] for g in summary["by_tenant"]} == {"acme": 1, "globex": 1}
    # acme's open recipient is at customer.test (ok@ is delivered), globex's at other.test
    assert {g["key"]: g["messages"] for g in summary["by_domain"]} == {"customer.test": 1, "other.test": 1}
    assert {g["key"]: g["messages"] for g in summary["by_transport"]} == {"gmail_acme": 2}
    assert {g["key"]: g["messages"] for g in summary["by_age"]} == {"<5m": 2, "<1h": 0, "<4h": 0, "<1d": 0, ">=1d": 0}
    assert summary["total"]["messages"] == 2 and summary["total"]["volume"] > 0


def test_show_prints_envelope_recipient_states_headers_body_and_history(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        a, _ = two_messages(relay_files, gmail, relayctl)
        code, default, _ = relayctl("queue", "show", a)
        headers = relayctl("queue", "show", a, "--headers")[1]
        body = relayctl("queue", "show", a, "--body")[1]
        history = relayctl("queue", "show", a, "--log")[1]
        shown = json.loads(relayctl("queue", "show", a, "--json")[1])
    assert code == 0
    assert default.startswith(f"Message {a}\n  state:      deferred\n  tenant:     acme\n  sender:     <billing@acme.example>\n")
    assert "  ok@customer.test: delivered, 1 attempt\n" in default
    assert re.search(r"  later@customer\.test: deferred, 1 attempt, next attempt \S+ \S+ \(in (9|10)m\)\n"
                     r"      last error: .*451 4\.2\.0 mailbox busy", default)
    assert "Headers:\n  Received: from app.test ([127.0.0.1])\n" in default
    assert "\n  From: billing@acme.example\n" in default and "  Subject: hello\n" in default
    assert headers.startswith("Received: from app.test ([127.0.0.1])\n") and "Recipients:" not in headers
    assert "\nFrom: billing@acme.example\n" in headers
    assert body == "Hello.\r\n"
    assert f"{a} <= billing@acme.example" in history and f"{a} => ok@customer.test" in history
    assert f"{a} == later@customer.test" in history and "later@customer.test: deferred, 1 attempt" in history
    assert shown["message"]["envelope"]["id"] == a and any("<=" in line for line in shown["log"])


def test_show_refuses_what_is_not_a_message_id_and_reports_unknown_ones(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        code, out, err = relayctl("queue", "show", "../../etc/passwd")
        assert code == 2 and out == "" and err.startswith("relayctl: '../../etc/passwd' is not a message id")
        code, _, err = relayctl("queue", "show", "1abcde-000001-00")
        assert code == 1 and err == "relayctl: message 1abcde-000001-00 is not in the queue\n"
        code, _, err = relayctl("queue", "list", "--from", "(unclosed")
        assert code == 2 and "is not a regular expression" in err and "Traceback" not in err
        code, _, err = relayctl("queue", "list", "--older-than", "5 parsecs")
        assert code == 2 and err.count("\n") == 1


# ------------------------------------------------------------- actions


def test_actions_take_filters_and_remove_asks_before_acting(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        a, b = two_messages(relay_files, gmail, relayctl)
        code, _, err = relayctl("queue", "freeze")
        assert code == 2 and "name one or more message ids, or select messages with a filter" in err
        code, out, _ = relayctl("queue", "freeze", "--tenant", "acme")
        assert code == 0 and out == f"Message {a} is now frozen\n"
        assert relayctl("queue", "list", "-i", "--frozen")[1].split() == [a, b]
        code, out, _ = relayctl("queue", "thaw", "--frozen", "--from", "news@")
        assert code == 0 and out == f"Message {b} is no longer frozen\n"
        code, _, err = relayctl("queue", "remove", a)
        assert code == 2 and "without --yes when stdin is not a terminal" in err
        code, _, err = relayctl("queue", "remove", a, stdin=TtyInput("n\n"))
        assert code == 1 and "nothing done" in err
        assert relayctl("queue", "count")[1] == "2\n"
        code, out, err = relayctl("queue", "remove", a, stdin=TtyInput("y\n"))
        assert code == 0 and out == f"Message {a} has been removed\n" and "Remove 1 message(s)? [y/N]" in err
        code, out, _ = relayctl("queue", "remove", a, "--yes")
        assert code == 1 and out == f"Message {a} is not in the queue\n"
        assert relayctl("queue", "list", "-i")[1].split() == [b]


def test_many_messages_act_with_progress_and_a_summary_line(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        for i in range(25):
            submit(relay_files, ACME, "billing@acme.example", [f"r{i}@customer.test"])
        code, out, err = relayctl("queue", "freeze", "--tenant", "acme")
        assert code == 0 and out == "freeze: 25 frozen\n"
        assert "relayctl: freeze 25/25" in err
        code, out, _ = relayctl("queue", "giveup", "--tenant", "acme", "--yes")
        assert code == 0 and out == "giveup: 25 cancelled and bounced\n"


def test_deliver_and_flush_report_what_happened(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        a = submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        b = submit(relay_files, ACME, "billing@acme.example", ["two@customer.test"])
        relay_files.wait_for_log("== one@customer.test")
        code, out, _ = relayctl("queue", "deliver", a)
        assert code == 0 and out.endswith(f"Message {a} was tried and is deferred\n") and "connection refused" in out
        gmail.accept_connections()
        code, out, _ = relayctl("queue", "deliver", a)
        assert code == 0 and f"{a} => one@customer.test" in out
        assert out.endswith(f"Message {a} left the queue (every recipient delivered or failed)\n")
        code, out, _ = relayctl("queue", "flush")
        assert code == 0 and out == "1 message(s) forced for delivery now, ignoring retry times\n"
        gmail.wait_for_messages(2)
    assert f"{b} Completed" in relay_files.wait_for_log(f"{b} Completed")


def test_stopped_relayd_list_freeze_and_remove_work_on_the_spool(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        ids = [submit(relay_files, ACME, "billing@acme.example", [f"r{i}@customer.test"]) for i in range(3)]
    code, listing, _ = relayctl("queue", "list")
    assert code == 0 and all(f" {i} <billing@acme.example> A=acme" in listing for i in ids)
    assert relayctl("queue", "count")[1] == "3\n"
    assert relayctl("queue", "freeze", ids[0]) == (0, f"Message {ids[0]} is now frozen\n", "")
    assert relayctl("queue", "remove", ids[1], "--yes") == (0, f"Message {ids[1]} has been removed\n", "")
    code, _, err = relayctl("queue", "deliver", ids[2])
    assert code == 1 and err.startswith("relayctl: relayd is not running") and "needs the running daemon" in err
    code, _, err = relayctl("status")
    assert code == 1 and err.startswith("relayctl: relayd is not running")
    code, shown, _ = relayctl("queue", "show", ids[0])
    assert code == 0 and "state:      frozen" in shown
    log = relay_files.mainlog()
    assert f"{ids[0]} frozen by " in log and f"{ids[1]} removed by " in log and f"{ids[1]} Completed" in log
    assert Spool(relay_files.root / "spool").load().problems == []
    gmail.accept_connections()
    with RelayThread(relay_files.config):
        gmail.wait_for_messages(1)
        time.sleep(0.5)
        listing = relayctl("queue", "list")[1]
    assert f"{ids[0]} <billing@acme.example> A=acme *** frozen ***" in listing
    assert ids[1] not in listing and ids[2] not in listing
    assert [m.rcpt_tos for m in gmail.messages] == [["r2@customer.test"]]


# ------------------------------------------------------ reload / status


def test_reload_reports_success_or_the_error_with_file_and_line(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    setup_relay(relay_files, upstreams)
    good = relay_files.config.read_text()
    with RelayThread(relay_files.config):
        assert relayctl("reload") == (0, f"relayd reloaded its configuration from {relay_files.config}\n", "")
        relay_files.config.write_text(good.replace("tenants:\n", "tenants:\n  broken: [unclosed\n", 1))
        code, out, err = relayctl("reload")
        assert code == 1 and out == ""
        assert err.startswith("relayctl: not reloading: relayd would keep its running configuration:\n")
        assert f"relayctl: {relay_files.config}:34:7: YAML syntax error" in err
        relay_files.config.write_text(good)
        relay_files.key_file.rename(relay_files.root / "elsewhere.key")  # only relayd opens the store
        code, out, err = relayctl("reload")
        assert code == 1 and err.startswith("relayctl: relayd kept its running configuration:\nrelayctl: ")
        assert "master key" in err or "master_key" in err
    code, _, err = relayctl("reload")
    assert code == 1 and "relayd is not running" in err


def test_status_shows_listeners_queue_and_transport_health(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    gmail.refuse_connections()
    with RelayThread(relay_files.config):
        submit(relay_files, ACME, "billing@acme.example", ["one@customer.test"])
        relay_files.wait_for_log("== one@customer.test")
        settle(relay_files)
        code, text, _ = relayctl("status")
        data = json.loads(relayctl("status", "--json")[1])
    assert code == 0
    assert re.match(r"relayd pid \d+, up \d+s, config ", text)
    assert f"listeners: submission 127.0.0.1:{relay_files.port}\n" in text
    assert "queue: 1 message(s): 0 active, 1 deferred, 0 frozen; oldest " in text
    assert re.search(r"^gmail_acme +retry wait until \S+ \S+ +- +\d+s ago: .*connection refused", text, re.M)
    assert data["running"] is True and data["queue"]["deferred"] == 1
    assert data["transports"]["gmail_acme"]["skipped_until"] is not None


# ------------------------------------------------------------ send-test


def test_send_test_submits_and_follows_the_message_to_delivery(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    with RelayThread(relay_files.config):
        code, out, err = relayctl("send-test", "--tenant", "acme", "--to", "me@customer.test", "--password-stdin",
                                  stdin=io.StringIO(ACME[1] + "\n"))
    assert code == 0, err
    queue_id = re.match(r"queued as (\S+);", out).group(1)  # type: ignore[union-attr]
    assert f"delivered: me@customer.test R=acme-1 T=gmail_acme" in out
    (msg,) = gmail.messages
    assert msg.mail_from == "relayd-test@acme.example" and b"Subject: relayd send-test" in msg.data
    assert f"{queue_id} <= relayd-test@acme.example" in relay_files.mainlog()
    assert ACME[1] not in out + err + relay_files.mainlog()


def test_send_test_reports_a_failure_with_its_reason_and_exits_1(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams)
    gmail.reply_to("RCPT", "550 5.1.1 no such user", for_address="nobody@customer.test")
    with RelayThread(relay_files.config):
        code, out, _ = relayctl("send-test", "--tenant", "acme", "--to", "nobody@customer.test",
                                "--password-stdin", stdin=io.StringIO(ACME[1] + "\n"))
        assert code == 1 and "failed: nobody@customer.test" in out and "550 5.1.1 no such user" in out
        code, _, err = relayctl("send-test", "--tenant", "acme", "--to", "x@customer.test",
                                "--password-stdin", stdin=io.StringIO("wrong password\n"))
        assert code == 1 and "refused the login of tenant acme" in err


def test_send_test_for_a_tenant_bound_to_a_loopback_address_needs_no_password(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    gmail = setup_relay(relay_files, upstreams, bind=True)
    with RelayThread(relay_files.config):
        code, out, err = relayctl("send-test", "--tenant", "globex", "--to", "me@customer.test", "--timeout", "20")
    assert code == 0, err
    assert "delivered: me@customer.test" in out
    assert gmail.messages[0].mail_from == "news@globex.example"
    assert "[127.0.0.2]" in relay_files.mainlog()


def test_send_test_to_a_stopped_relayd_says_connection_refused_without_an_errno(
    relay_files: RelayFiles, upstreams: Callable[..., Any], relayctl: Run
) -> None:
    setup_relay(relay_files, upstreams)  # relay.yaml only: no relayd is listening on its port
    code, out, err = relayctl("send-test", "--tenant", "acme", "--to", "me@customer.test",
                              "--password-stdin", stdin=io.StringIO(ACME[1] + "\n"))
    assert code == 1 and out == ""
    assert re.search(r"could not submit to relayd at 127\.0\.0\.1:\d+: connection refused "
                     r"\(is relayd running\? `relayctl status` says\)", err), err
    assert "Errno" not in err


# ------------------------------------------------------- pure formatting


def row(**changes: Any) -> QueueRow:
    base: dict[str, Any] = dict(
        id="1tA2bC-0000aB-x9", tenant="acme", sender="billing@acme.example", received_at=1000.0,
        size=4404, frozen=False, in_flight=False,
        recipients=(RecipientRow("a@x.test", RecipientState.DELIVERED, 1, None),
                    RecipientRow("b@y.test", RecipientState.DEFERRED, 2, 5000.0)),
    )
    base.update(changes)
    return QueueRow(**base)


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0m"), (59, "0m"), (25 * 60, "25m"), (90 * 60, "90m"), (91 * 60, "2h"), (3 * 3600, "3h"),
     (72 * 3600, "72h"), (73 * 3600, "3d"), (10 * 86400, "10d")],
)
def test_age_reads_like_exim(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


@pytest.mark.parametrize(
    "size, text",
    [(0, "0"), (1023, "1023"), (4404, "4.3K"), (123 * 1024, "123K"), (5 * 1024 * 1024, "5.0M"),
     (300 * 1024 * 1024, "300M")],
)
def test_size_reads_like_exim(size: int, text: str) -> None:
    assert format_size(size) == text


def test_listing_escapes_what_a_client_put_in_an_address() -> None:
    lines = listing_lines(row(sender="evil\x1b[2J@x.test", frozen=True), now=1000.0 + 3 * 3600)
    assert lines[0] == " 3h  4.3K 1tA2bC-0000aB-x9 <evil\\x1b[2J@x.test> A=acme *** frozen ***"
    assert lines[1:] == ["        D a@x.test", "          b@y.test", ""]


def test_filters_and_age_buckets_are_pure_decisions() -> None:
    r = row()
    now = 1000.0 + 600
    assert matches(r, QueueFilter(tenant="acme", older_than=300, younger_than=3600), now)
    assert not matches(r, QueueFilter(older_than=601), now)
    assert matches(r, QueueFilter(deferred=True, recipient=compile_address_pattern(r"@Y\.test$")), now)
    assert not matches(r, QueueFilter(frozen=True), now)
    assert not matches(row(frozen=True), QueueFilter(deferred=True), now)
    assert [age_bucket(a) for a in (0, 299, 300, 3599, 3600, 4 * 3600, 86399, 86400)] == [
        "<5m", "<5m", "<1h", "<1h", "<4h", "<1d", "<1d", ">=1d"]
    summary = summarize([r, row(id="1tA2bC-0000aC-x9", tenant="globex")], now,
                        lambda tenant, address: None if tenant == "globex" else "gmail")
    assert {k: b.messages for k, b in summary.by_transport.items()} == {"gmail": 1, "(no route)": 1}
    assert {k: b.messages for k, b in summary.by_domain.items()} == {"y.test": 2}  # a@x.test is delivered
    assert summary.total.volume == 2 * 4404 and summary.by_age["<1h"].messages == 2
