"""Type checks on record fields: the live state applies nothing it cannot use.

A record arrives from the wire, so every field is checked before it changes a count; a
field of the wrong type makes the record a ``BadRecord``, a valid record that cannot be
applied now (its lot evicted, a cap reached) raises ``NotApplied`` with the metric label.
"""

from __future__ import annotations

from typing import Any

#: TEST_FLG bits that make a measured value unusable for statistics: result invalid,
#: unreliable, timeout, not executed, aborted.
BAD_VALUE_FLAGS = 0b0011_1110


class BadRecord(ValueError):
    """A record whose fields the live state cannot use (wrong types, over a limit)."""


class NotApplied(Exception):
    """A valid record the live state cannot apply; ``reason`` is its metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def opt_int(v: Any) -> bool:
    return v is None or is_int(v)


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def opt_num(v: Any) -> bool:
    return v is None or is_num(v)
