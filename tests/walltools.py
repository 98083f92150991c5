"""A wall clock stepped for the whole test process: ``time.time`` / ``time.time_ns`` plus an
offset, as NTP stepping the machine's clock (or a node whose clock is off) does.  Trio,
paho and every timeout run on the monotonic clock, which a step leaves alone, as with a
real step.  The ``wall`` fixture (conftest.py) installs one for a test."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")


class SteppedWall:
    """``time.time`` for the whole process, plus ``offset`` seconds."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._real = time.time
        self._real_ns = time.time_ns

    def __call__(self) -> float:
        return self._real() + self.offset

    def ns(self) -> int:
        return self._real_ns() + round(self.offset * 1e9)

    def as_of(self, offset: float, call: Callable[[], T]) -> T:
        """``call()`` on a node whose clock is ``offset`` seconds off."""
        self.offset = offset
        try:
            return call()
        finally:
            self.offset = 0.0

    async def as_of_async(self, offset: float, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` on a node whose clock is ``offset`` seconds off."""
        self.offset = offset
        try:
            return await call()
        finally:
            self.offset = 0.0


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[SteppedWall]:
    stepped = SteppedWall()
    monkeypatch.setattr(time, "time", stepped)
    monkeypatch.setattr(time, "time_ns", stepped.ns)
    yield stepped
