"""ReplayableInput: a request body read again from the start, as it was, within a limit."""

from __future__ import annotations

import io

import pytest

from middlestorm.replay import ReplayableInput

BODY = b"first line\nsecond line\n" + b"x" * 5000 + b"\nlast line without newline"


def replayable(body: bytes = BODY, limit: int = 1 << 20, in_memory: int = 1024):
    return ReplayableInput(io.BytesIO(body), limit=limit, in_memory=in_memory)


@pytest.mark.parametrize(
    "read",
    [
        lambda stream: stream.read(),
        lambda stream: b"".join(iter(lambda: stream.read(7), b"")),
        lambda stream: b"".join(stream.readlines()),
        lambda stream: b"".join(stream),
        lambda stream: stream.readline() + stream.read(3) + stream.readline(4) + stream.read(),
    ],
    ids=["read all", "read in pieces", "readlines", "iterate", "mixed"],
)
def test_a_rewound_body_reads_the_same_again_whatever_way_it_is_read(read):
    stream = replayable()
    first = read(stream)

    assert stream.rewind()
    assert read(stream) == first == BODY


def test_a_body_read_in_part_replays_that_part_then_goes_on_from_the_stream():
    stream = replayable()
    start = stream.read(100)

    assert stream.rewind()
    assert stream.read() == BODY
    assert start == BODY[:100]


def test_a_body_over_the_memory_threshold_still_replays_whole():
    stream = replayable(in_memory=16)
    stream.read()

    assert stream.rewind()
    assert stream.read() == BODY


def test_a_body_over_the_replay_limit_cannot_be_rewound_but_still_reads_whole():
    stream = replayable(limit=100)

    assert stream.read() == BODY
    assert not stream.rewind()


def test_a_body_never_read_rewinds_and_reads_whole():
    stream = replayable()

    assert stream.rewind()
    assert stream.read() == BODY
