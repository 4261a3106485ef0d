"""The limits of priorzoo's Hub waits (priorzoo/_network.py), on a fake connection and a fake clock."""

from __future__ import annotations

import pytest

from priorzoo import _network
from priorzoo._network import HubLimits, HubTimeoutError, _Stream, bounded


class FakeConnection:
    """Each read returns ``chunk`` and moves the fake clock on by ``delay`` seconds."""

    def __init__(self, clock: list[float], chunk: bytes, delay: float) -> None:
        self.clock, self.chunk, self.delay = clock, chunk, delay
        self.timeouts: list[float | None] = []

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.timeouts.append(timeout)
        self.clock[0] += self.delay
        return self.chunk

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(_network.time, "monotonic", lambda: now[0])
    return now


def test_a_trickling_answer_is_given_up_after_one_read_window(clock):
    inner = FakeConnection(clock, b"X", 0.2)
    stream = _Stream(inner)
    with bounded(HubLimits(connect=1, read=2, deadline=100)):
        stream.write(b"GET / HTTP/1.1\r\n\r\n")
        for _ in range(9):
            assert stream.read(65536) == b"X"
        with pytest.raises(HubTimeoutError, match=r"stalled: 10 bytes in 2 s, under 1024 bytes per 2 s"):
            stream.read(65536)
    assert len(inner.timeouts) == 10 and max(inner.timeouts) == 2  # each wait capped by the read timeout


def test_one_late_answer_is_not_a_stall(clock):
    stream = _Stream(FakeConnection(clock, b"{}" * 50, 1.9))
    with bounded(HubLimits(connect=1, read=2, deadline=100)):
        for _ in range(3):  # three requests, each answered once, late
            stream.write(b"GET / HTTP/1.1\r\n\r\n")
            assert stream.read(65536) == b"{}" * 50


def test_the_deadline_caps_every_wait_and_then_refuses(clock):
    inner = FakeConnection(clock, b"Y" * 4096, 3.0)
    stream = _Stream(inner)
    with bounded(HubLimits(connect=1, read=5, deadline=7)):
        stream.read(65536)
        stream.read(65536)
        stream.read(65536)  # 1 s were left: that was its timeout
        assert inner.timeouts == [5, 4, 1]
        with pytest.raises(HubTimeoutError, match="no answer within the 7 s deadline"):
            stream.read(65536)


def test_outside_a_bounded_block_nothing_changes(clock):
    inner = FakeConnection(clock, b"X", 100.0)
    stream = _Stream(inner)
    for _ in range(20):
        stream.read(1, timeout=None)
    assert inner.timeouts == [None] * 20
