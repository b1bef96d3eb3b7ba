"""The streaming DATA decoder applies exactly the rules of policy.check_data, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from relayd.smtp import policy
from relayd.smtp.datastream import DataDecoder

ALPHABET = [b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\x00", b"x" * 40]


def decode(raw: bytes, cuts: list[int], *, limit: int = 998, size: int = 10**9) -> tuple[bytes, DataDecoder, bytes]:
    """Feed `raw` cut at `cuts`; the checked bytes, the decoder, and what followed the end marker."""
    decoder = DataDecoder(max_line_length=limit, size_limit=size)
    out = []
    start = 0
    for cut in sorted(cuts) + [len(raw)]:
        out.append(decoder.feed(raw[start:cut]))
        start = cut
        if decoder.end is not None:
            return b"".join(out), decoder, decoder.end.leftover + raw[start:]
    return b"".join(out), decoder, b""


def test_random_messages_in_random_chunks_match_the_whole_message_rules() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        content = b"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        while b"\r\n.\r\n" in b"\r\n" + content:
            content = (b"\r\n" + content).replace(b"\r\n.\r\n", b"\r\n..\r\n")[2:]
        raw = content + b".\r\nQUIT\r\n"
        expected = policy.check_data(content, max_line_length=60)
        cuts = [rng.randint(0, len(raw)) for _ in range(rng.randint(0, 6))]
        body, decoder, after = decode(raw, cuts, limit=60)
        assert decoder.end is not None, raw
        assert after == b"QUIT\r\n", raw
        assert decoder.end.refusal == expected.refusal, (raw, cuts)
        if expected.refusal is None:
            assert body == expected.body, (raw, cuts)


@pytest.mark.parametrize("shape", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggling_shapes_split_across_chunks_never_end_the_data(shape: bytes) -> None:
    raw = b"Subject: a\r\n\r\nfirst" + shape + b"MAIL FROM:<x@y>\r\n.\r\n"
    for cut in range(len(raw)):
        body, decoder, after = decode(raw, [cut])
        assert decoder.end is not None and after == b""
        assert body == policy.check_data(raw[:-3], max_line_length=998).body
        assert body.endswith(b"MAIL FROM:<x@y>\r\n")


def test_dot_stuffing_is_undone_when_the_dot_starts_the_next_chunk() -> None:
    raw = b"a\r\n..hidden\r\n.\r\n"
    for cut in range(len(raw)):
        body, _, _ = decode(raw, [cut])
        assert body == b"a\r\n.hidden\r\n"


def test_a_long_line_split_over_many_chunks_is_refused_with_its_number() -> None:
    raw = b"one\r\ntwo\r\n" + b"y" * 5000 + b"\r\n.\r\n"
    _, decoder, _ = decode(raw, list(range(0, len(raw), 7)))
    assert decoder.end is not None
    assert decoder.end.refusal is not None and decoder.end.refusal.startswith("554 5.6.0 Line 3 ")


def test_size_over_the_limit_is_refused_and_the_rest_is_only_scanned_for_the_end() -> None:
    decoder = DataDecoder(max_line_length=998, size_limit=1000)
    emitted = 0
    line = b"z" * 98 + b"\r\n"
    for _ in range(100):
        emitted += len(decoder.feed(line * 10))
    decoder.feed(b".\r\nNOOP\r\n")
    assert emitted <= 1000
    assert decoder.end is not None and decoder.end.refusal is not None
    assert decoder.end.refusal.startswith("552 5.3.4")
    assert decoder.end.leftover == b"NOOP\r\n"


def test_memory_held_between_chunks_is_a_few_bytes() -> None:
    decoder = DataDecoder(max_line_length=998, size_limit=10**9)
    for _ in range(50):
        decoder.feed(b"x" * 60 + b"\r\n" + b"y" * 1000 + b"\r")
        assert len(decoder._carry) <= 5
