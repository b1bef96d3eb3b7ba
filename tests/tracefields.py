"""What relayd adds to a message's header block on the way in, taken off again for byte comparisons.

relayd prepends its own ``Received:`` field and appends ``Date:`` and
``Message-ID:`` when the client left them out; everything else must reach
the upstream byte for byte.
"""

from __future__ import annotations


def _fields(head: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def without_relayd_fields(data: bytes, sent: bytes) -> bytes:
    """`data` minus relayd's Received: field and the Date:/Message-ID: it added because `sent` had none."""
    head, sep, body = data.partition(b"\r\n\r\n")
    fields = _fields(head)
    assert fields and fields[0].startswith(b"Received: from ") and b"(relayd)" in fields[0], fields[:1]
    fields = fields[1:]
    had = {_name(f) for f in _fields(sent.partition(b"\r\n\r\n")[0])}
    while fields and _name(fields[-1]) in (b"date", b"message-id") and _name(fields[-1]) not in had:
        fields.pop()
    return b"\r\n".join(fields) + sep + body
