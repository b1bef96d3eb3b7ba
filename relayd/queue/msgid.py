"""Message ids in Exim's shape: ``TTTTTT-NNNNNN-PP`` in base62.

Takes: the current time (passed in, so tests choose it) and this process's id.
Emits: ids such as ``1hT3Xq-000004-2b`` that are safe as file names (only
``[0-9A-Za-z-]``), sort by receive second (the alphabet is in ASCII order), and
are unique within a process: ``T`` is the time in whole seconds, ``N`` a counter
that only ever grows in this process, ``P`` derived from the process id so that
two processes differ. Two processes whose ids collide in ``P`` within the same
second are possible; the spool creates files with O_EXCL and retries with a new
id, so a collision costs one retry, never a lost message.
Untrusted input: ids typed by an operator go through `is_message_id` before
they touch a path.
Fails: `id_time` raises ValueError for a string that is not an id.
"""

from __future__ import annotations

import itertools
import os
import re

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE = len(ALPHABET)
_TIME_DIGITS = 6  # 62**6 seconds reach the year 3770
_COUNTER_DIGITS = 6  # 62**6 ids per process before the counter wraps
_PID_DIGITS = 2
_ID_RE = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}")

# One counter per process, on purpose: uniqueness is a property of the process,
# so two spools in one process must never draw the same number. itertools.count
# is advanced atomically under the GIL, so threads may share it.
_COUNTER = itertools.count()


def encode_base62(value: int, width: int) -> str:
    """`value` modulo 62**width as exactly `width` base62 digits, most significant first."""
    digits = []
    v = value % (_BASE**width)
    for _ in range(width):
        v, d = divmod(v, _BASE)
        digits.append(ALPHABET[d])
    return "".join(reversed(digits))


def decode_base62(text: str) -> int:
    """The number that `text` spells in base62; ValueError for another character."""
    value = 0
    for ch in text:
        d = ALPHABET.find(ch)
        if d < 0:
            raise ValueError(f"{ch!r} is not a base62 digit")
        value = value * _BASE + d
    return value


def new_message_id(now: float, *, pid: int | None = None) -> str:
    """A fresh id for a message received at `now` (seconds since the epoch)."""
    p = os.getpid() if pid is None else pid
    return "-".join(
        (
            encode_base62(int(now), _TIME_DIGITS),
            encode_base62(next(_COUNTER), _COUNTER_DIGITS),
            encode_base62(p, _PID_DIGITS),
        )
    )


def is_message_id(text: str) -> bool:
    """True when `text` has exactly the shape of an id (and is therefore path-safe)."""
    return _ID_RE.fullmatch(text) is not None


def id_time(message_id: str) -> float:
    """The receive second encoded in an id; ValueError if it is not an id."""
    if not is_message_id(message_id):
        raise ValueError("not a message id")
    return float(decode_base62(message_id[:_TIME_DIGITS]))
