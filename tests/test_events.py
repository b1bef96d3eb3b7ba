"""The event seam: each sink turns an event into exactly its line or metric; the stages emit the right events."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Iterator

import pytest

from relayd.observe import events as ev
from relayd.delivery.walk import DeliveryAgent
from relayd.delivery.gates import GateSet
from relayd.observe.mainlog import MainLog, format_deferred, format_delivered
from relayd.observe.metrics import RelayMetrics
from relayd.observe.outcomes import RecentOutcomes
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.values import AttemptOutcome, DeliveryReport, Envelope, QueueEntry, Recipient, Route, SmtpReply, Stage
from tests.relayenv import ACME, RelayFiles, RelayThread, capture_files, connect, submit
from tests.test_delivery_outcome import CONFIG, ScriptedTransport, entry

NOON = 1767268800.0  # 2026-01-01 12:00:00 UTC
QID = "1abcDE-000001-Xy"


class Recorder:
    """A fake sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)


def logged(*events: ev.Event) -> str:
    stream = io.StringIO()
    log = MainLog(None, stream=stream, clock=lambda: NOON, utc=True)
    for event in events:
        log.emit(event)
    return stream.getvalue()


def delivered_report(address: str = "x@gmail.com") -> DeliveryReport:
    return DeliveryReport(
        address, AttemptOutcome.DELIVERED, "acme", transport="gmail", reply=SmtpReply(250, "2.0.0 OK"),
        host="smtp.gmail.com", ip="1.2.3.4", port=587, tls="TLSv1.3",
    )


def delivered(report: DeliveryReport, *, first: bool = True) -> ev.RecipientDelivered:
    return ev.RecipientDelivered(queue_id=QID, tenant="acme", sender="app@acme.example",
                                 message_id="<m1@acme.example>", report=report, attempt=1, first=first)


def deferred(report: DeliveryReport, next_attempt: float) -> ev.RecipientDeferred:
    return ev.RecipientDeferred(queue_id=QID, tenant="acme", sender="app@acme.example",
                                message_id="<m1@acme.example>", report=report, attempt=1, next_attempt=next_attempt)


def failed(report: DeliveryReport, *, bounce_discarded: bool = False) -> ev.RecipientFailed:
    return ev.RecipientFailed(queue_id=QID, tenant="acme", sender="app@acme.example", message_id="<m1@acme.example>",
                              report=report, attempt=1, bounce_discarded=bounce_discarded)


# ------------------------------------------------------------------ main log sink


def test_a_delivery_event_becomes_exactly_the_exim_delivery_line() -> None:
    event = delivered(delivered_report())
    assert logged(event) == (
        f'2026-01-01 12:00:00 {QID} => x@gmail.com R=acme T=gmail H=smtp.gmail.com [1.2.3.4]:587 '
        'X=TLS1.3 C="250 2.0.0 OK"\n'
    )


def test_a_further_recipient_of_the_same_transaction_gets_the_arrow_line() -> None:
    event = delivered(delivered_report(), first=False)
    assert logged(event) == f"2026-01-01 12:00:00 {format_delivered(QID, delivered_report(), first=False)}\n"
    assert f"{QID} -> x@gmail.com" in logged(event)


def test_a_deferral_event_is_the_same_line_as_the_deferred_method_wrote() -> None:
    report = DeliveryReport("x@gmail.com", AttemptOutcome.DEFER, "acme", transport="gmail", reason="Connection refused")
    event = deferred(report, NOON + 900)
    expected = format_deferred(QID, report, next_attempt=NOON + 900, utc=True)
    assert logged(event) == f"2026-01-01 12:00:00 {expected}\n"
    assert expected.endswith("(next try 2026-01-01 12:15:00)")


def test_a_failure_of_a_bounce_is_logged_as_discarded_not_as_a_plain_failure() -> None:
    report = DeliveryReport("a@x.test", AttemptOutcome.FAIL, "", transport="gmail", reply=SmtpReply(550, "5.1.1 no such user"))
    plain = logged(failed(report))
    dropped = logged(failed(report, bounce_discarded=True))
    assert plain == f"2026-01-01 12:00:00 {QID} ** a@x.test T=gmail: SMTP error from remote mail server: 550 5.1.1 no such user\n"
    assert dropped == plain[:-1] + " (null sender: bounce discarded)\n"


def test_operator_actions_keep_their_free_text_lines() -> None:
    assert logged(
        ev.OperatorAction(action="freeze", user="root", queue_id=QID),
        ev.OperatorAction(action="thaw", user="root", queue_id=QID),
        ev.OperatorAction(action="remove", user="alice", queue_id=QID),
        ev.OperatorAction(action="giveup", user="alice", queue_id=QID),
        ev.OperatorAction(action="flush", user="root", count=3),
    ).splitlines() == [
        f"2026-01-01 12:00:00 {QID} frozen by root",
        f"2026-01-01 12:00:00 {QID} unfrozen by root",
        f"2026-01-01 12:00:00 {QID} removed by alice",
        f"2026-01-01 12:00:00 {QID} delivery cancelled by alice",
        "2026-01-01 12:00:00 queue flush by root: 3 message(s) forced",
    ]


def test_daemon_and_spool_events_keep_their_lines() -> None:
    assert logged(
        ev.DaemonStarted(listening="submission=127.0.0.1:587"),
        ev.SpoolRefusedMessage(full=True, error="1 MB free"),
        ev.SpoolCannotRecord(queue_id=QID, error="No space left on device"),
        ev.SpoolRecovered(queue_id=QID),
        ev.IncompleteDiscarded(queue_id=QID),
        ev.Notice(text="spool: odd file", level="warning"),
        ev.DaemonStopping(),
        ev.DaemonStopped(),
    ).splitlines() == [
        "2026-01-01 12:00:00 relayd started: listening on submission=127.0.0.1:587; loading the queue index",
        "2026-01-01 12:00:00 error: spool full, message refused: 1 MB free",
        f"2026-01-01 12:00:00 error: {QID} cannot record delivery state, delivery held until the spool can "
        "write: No space left on device",
        f"2026-01-01 12:00:00 {QID} delivery state recorded; the spool can write again",
        f"2026-01-01 12:00:00 {QID} incomplete message from a stopped receiver discarded",
        "2026-01-01 12:00:00 warning: spool: odd file",
        "2026-01-01 12:00:00 relayd stopping: no longer accepting connections",
        "2026-01-01 12:00:00 relayd stopped",
    ]


def test_a_rejection_held_back_by_the_log_gate_writes_no_line_but_is_still_counted() -> None:
    refused = ev.SmtpRefused(client_ip="127.0.0.9", stage="RCPT", reply="550 5.7.1 no route", logged=False)
    metrics = RelayMetrics()
    metrics.emit(refused)
    assert logged(refused) == ""
    assert metrics.smtp_rejections.labels(reason="RCPT")._value.get() == 1
    assert logged(ev.SessionOpened(), ev.UpstreamAttempted(transport="gmail", seconds=0.1, reachable=True)) == ""


# ------------------------------------------------------------------ metrics sink


def test_each_outcome_event_moves_its_own_delivery_counter() -> None:
    metrics = RelayMetrics()
    refused = DeliveryReport("a@x.test", AttemptOutcome.FAIL, "", reason="no route")
    metrics.emit(delivered(delivered_report()))
    metrics.emit(failed(refused))
    assert metrics.deliveries.labels("acme", "gmail", "delivered")._value.get() == 1
    assert metrics.deliveries.labels("acme", "none", "failed")._value.get() == 1
    assert metrics.deliveries.labels("acme", "gmail", "deferred")._value.get() == 0


def test_session_upstream_and_bounce_events_move_their_metrics() -> None:
    metrics = RelayMetrics()
    for event in (
        ev.SessionOpened(), ev.SessionOpened(), ev.SessionClosed(),
        ev.UpstreamAttempted(transport="gmail", seconds=0.3, reachable=False),
        ev.HostFailed(queue_id=QID, transport="gmail", host="h", ip="", port=587, reason="x", reason_label="refused"),
        ev.BounceCreated(queue_id=QID, bounce_id="2abcDE-000002-Xy", tenant="acme", sender="a@acme.example", size=900),
        ev.AuthFailed(client_ip="127.0.0.1", login="acme"),
        ev.ConnectionRefused(client_ip="127.0.0.1", reason="too many", logged=False),
    ):
        metrics.emit(event)
    text = metrics.render().decode()
    assert "relayd_smtp_sessions 1.0" in text
    assert 'relayd_upstream_up{transport="gmail"} 0.0' in text
    assert 'relayd_delivery_seconds_count{transport="gmail"} 1.0' in text
    assert 'relayd_failovers_total{reason="refused",transport="gmail"} 1.0' in text
    assert 'relayd_bounces_total{tenant="acme"} 1.0' in text
    assert "relayd_auth_failures_total 1.0" in text
    assert 'relayd_smtp_rejections_total{reason="CONNECT"} 1.0' in text


def test_an_arrival_counts_the_message_and_its_bytes_for_its_tenant() -> None:
    metrics = RelayMetrics()
    env = Envelope(id=QID, tenant="acme", sender="a@acme.example", recipients=("b@x.test",), received_at=NOON, size=1234)
    metrics.emit(ev.MessageArrived(entry=QueueEntry(env, (Recipient("b@x.test"),))))
    assert metrics.messages_received.labels(tenant="acme")._value.get() == 1
    assert metrics.bytes_received.labels(tenant="acme")._value.get() == 1234


# ------------------------------------------------------------------ fan-out and the ring


def test_a_sink_that_raises_does_not_stop_the_others() -> None:
    class Broken:
        def emit(self, event: ev.Event) -> None:
            raise RuntimeError("disk gone")

    after = Recorder()
    fan = ev.FanOut([Broken(), after])
    fan.emit(ev.DaemonStopped())
    assert len(after.events) == 1 and fan.sink_errors == 1


def test_the_ring_answers_a_recipients_outcome_with_the_log_lines_detail() -> None:
    ring = RecentOutcomes()
    ring.emit(delivered(delivered_report()))
    verdict = ring.outcome(QID, "x@gmail.com")
    assert verdict is not None and verdict.outcome == "delivered"
    assert verdict.detail == 'x@gmail.com R=acme T=gmail H=smtp.gmail.com [1.2.3.4]:587 X=TLS1.3 C="250 2.0.0 OK"'
    assert ring.outcome(QID, "other@gmail.com") is None


def test_the_ring_gives_only_what_came_after_a_mark_and_files_a_bounce_under_its_original() -> None:
    ring = RecentOutcomes()
    ring.emit(ev.OperatorAction(action="freeze", user="root", queue_id=QID))
    mark = ring.mark()
    ring.emit(ev.BounceCreated(queue_id=QID, bounce_id="2abcDE-000002-Xy", tenant="acme", sender="a@acme.example", size=9))
    ring.emit(ev.MessageCompleted(queue_id=QID))
    lines = ring.lines_since(QID, mark)
    assert [line.split(" ", 2)[2] for line in lines] == [
        f"2abcDE-000002-Xy <= <> R={QID} U=relayd P=local S=9 for a@acme.example", f"{QID} Completed",
    ]
    assert len(ring.lines_since(QID)) == 3 and len(ring.lines_since("2abcDE-000002-Xy")) == 1


def test_the_ring_stays_bounded_in_messages_and_lines_per_message() -> None:
    ring = RecentOutcomes(max_messages=3, max_per_message=2)
    for n in range(5):
        ring.emit(ev.MessageCompleted(queue_id=f"1abcDE-00000{n}-Xy"))
    for _ in range(4):
        ring.emit(ev.SpoolRecovered(queue_id="1abcDE-000004-Xy"))
    assert ring.lines_since("1abcDE-000000-Xy") == [] and ring.lines_since("1abcDE-000001-Xy") == []
    assert len(ring.lines_since("1abcDE-000002-Xy")) == 1
    assert len(ring.lines_since("1abcDE-000004-Xy")) == 2


# ------------------------------------------------------------------ stages emit


def test_the_delivery_walk_emits_a_host_failure_and_both_upstream_attempts() -> None:
    recorder = Recorder()
    gmail = ScriptedTransport("gmail", AttemptOutcome.NEXT_TRANSPORT, Stage.CONNECT, None, True)
    sendgrid = ScriptedTransport("sendgrid", AttemptOutcome.DELIVERED, Stage.AFTER_DATA, SmtpReply(250, "ok"), False)
    transports = {"gmail": gmail, "sendgrid": sendgrid}
    agent = DeliveryAgent(
        config=lambda: CONFIG, spool=None, transports=lambda: transports, gates=GateSet([UpstreamHealth()]),
        events=recorder, enqueue_bounce=None, build_dsn=None,  # type: ignore[arg-type]
    )
    queued = entry("a@x.test")
    asyncio.run(agent.walk_chain(queued, b"body", Route("all", ("gmail", "sendgrid")), ["a@x.test"], CONFIG))
    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["UpstreamAttempted", "HostFailed", "UpstreamAttempted"]
    attempted, failed, second = recorder.events
    assert isinstance(failed, ev.HostFailed) and failed.queue_id == queued.id and failed.transport == "gmail"
    assert isinstance(attempted, ev.UpstreamAttempted) and not attempted.reachable
    assert isinstance(second, ev.UpstreamAttempted) and second.transport == "sendgrid" and second.reachable


@pytest.fixture
def recorded_relay(relay_files: RelayFiles) -> Iterator[tuple[RelayFiles, Recorder]]:
    capture_files(relay_files)
    recorder = Recorder()
    with RelayThread(relay_files.config) as thread:
        thread.relay.events.add(recorder)
        yield relay_files, recorder


def wait_for(recorder: Recorder, kind: type, timeout: float = 15.0) -> list[ev.Event]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in list(recorder.events) if isinstance(e, kind)]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {kind.__name__} among {[type(e).__name__ for e in recorder.events]}")


def test_a_real_session_emits_refusal_auth_failure_arrival_delivery_and_completion(
    recorded_relay: tuple[RelayFiles, Recorder],
) -> None:
    files, recorder = recorded_relay
    with connect(files) as client:
        code, _ = client.mail("billing@acme.example")
        assert code == 530
        code, _ = client.docmd("AUTH", "PLAIN AGFjbWUAd3Jvbmc=")  # acme / wrong
        assert code == 535
    queue_id = submit(files, ACME, "billing@acme.example", ["someone@customer.test"])
    [_completed] = [e for e in wait_for(recorder, ev.MessageCompleted) if getattr(e, "queue_id", "") == queue_id]
    refused = wait_for(recorder, ev.SmtpRefused)
    assert refused[0].stage == "MAIL" and refused[0].reply.startswith("530")  # type: ignore[union-attr]
    (auth,) = wait_for(recorder, ev.AuthFailed)
    assert isinstance(auth, ev.AuthFailed) and auth.login == "acme" and auth.client_ip == "127.0.0.1"
    about = [e for e in recorder.events if getattr(e, "queue_id", "") == queue_id]
    assert [type(e).__name__ for e in about] == ["MessageArrived", "RecipientDelivered", "MessageCompleted"]
    verdict = about[1]
    assert isinstance(verdict, ev.RecipientDelivered)
    assert (verdict.tenant, verdict.sender, verdict.recipient, verdict.transport, verdict.attempt) == (
        "acme", "billing@acme.example", "someone@customer.test", "capture", 1,
    )
    assert verdict.message_id.startswith("<") and verdict.first
    opened = sum(isinstance(e, ev.SessionOpened) for e in recorder.events)
    assert opened == 2
