"""The queue's wire format read back: every field survives, a field of the wrong type is refused."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from relayd.queue.queuewire import entry_from_json, entry_to_json, row_from_wire, wire_row
from relayd.values import Envelope, QueueEntry, Recipient, RecipientState


def _entry() -> QueueEntry:
    """Every field set to something other than its default, so a field not read back shows."""
    envelope = Envelope(
        id="1tA2bC-0000aB-x9", tenant="acme", sender="billing@acme.example",
        recipients=("a@x.test", "b@y.test"), received_at=1700000000.5, size=2048,
        client_ip="127.0.0.7", client_port=40001, client_helo="app.acme.example", local_user="1000/cron",
        tls="TLSv1.3", smtputf8=True, bounce_of="1tA2bC-0000aA-x8", protocol="esmtpa", header_message_id="<m@acme>",
        auth_mechanism="login",
    )
    recipients = (
        Recipient("a@x.test", RecipientState.DEFERRED, attempts=2, first_failure=1700000100.0,
                  next_attempt=1700000700.0, last_error="451 4.7.1 try later", last_interval=600.0),
        Recipient("b@y.test", RecipientState.DELIVERED, attempts=1),
    )
    return QueueEntry(envelope, recipients, True)


def test_every_field_is_set_away_from_its_default_in_the_sample() -> None:
    for value, cls in ((_entry().envelope, Envelope), (_entry().recipients[0], Recipient)):
        for f in fields(cls):
            assert getattr(value, f.name) != f.default, f"set {cls.__name__}.{f.name} in _entry()"


def test_a_message_sent_for_queue_show_reads_back_equal_through_json() -> None:
    entry = _entry()
    assert entry_from_json(json.loads(json.dumps(entry_to_json(entry)))) == entry


@pytest.mark.parametrize("path, value", [
    (("envelope", "size"), "2048"),
    (("envelope", "received_at"), None),
    (("envelope", "recipients"), "a@x.test"),
    (("envelope", "bounce_of"), 7),
    (("frozen",), None),
])
def test_a_message_with_a_field_of_the_wrong_type_is_refused(path: tuple[str, ...], value: object) -> None:
    obj = json.loads(json.dumps(entry_to_json(_entry())))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    if path == ("frozen",):
        del obj["frozen"]
    with pytest.raises(ValueError, match="malformed message description"):
        entry_from_json(obj)


def test_a_recipient_with_an_unknown_state_is_refused() -> None:
    obj = json.loads(json.dumps(entry_to_json(_entry())))
    obj["recipients"][0]["state"] = "lost"
    with pytest.raises(ValueError, match="malformed message description"):
        entry_from_json(obj)


def test_a_listed_row_reads_back_with_its_states_and_times() -> None:
    row = row_from_wire(json.loads(json.dumps(wire_row(_entry(), True))))
    assert (row.id, row.tenant, row.size, row.frozen, row.in_flight) == ("1tA2bC-0000aB-x9", "acme", 2048, True, True)
    assert [(r.address, r.state, r.attempts, r.next_attempt) for r in row.recipients] == [
        ("a@x.test", RecipientState.DEFERRED, 2, 1700000700.0), ("b@y.test", RecipientState.DELIVERED, 1, None),
    ]


@pytest.mark.parametrize("row", [None, "x", [1, 2], ["id", "t", "s", 1.0, 2, 0, 0, [["a", "?", 1, None]]]])
def test_a_malformed_row_is_refused(row: object) -> None:
    with pytest.raises(ValueError, match="malformed queue row"):
        row_from_wire(json.loads(json.dumps(row)))
