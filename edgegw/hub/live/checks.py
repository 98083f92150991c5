"""Type checks on record fields: the live state applies nothing it cannot use.

A record arrives from the wire, so every field is checked before it changes a count; a
field of the wrong type makes the record a ``BadRecord``, a valid record that cannot be
applied now (its lot evicted, a cap reached) raises ``NotApplied`` with the metric label.
"""

from __future__ import annotations

from typing import Any

#: TEST_FLG bits that make a measured value unusable for statistics (STDF V4, PTR "RESULT":
#: useful only if these are all 0): alarm, result invalid, unreliable, timeout, not
#: executed, aborted.
BAD_VALUE_FLAGS = 0b0011_1111
#: PARM_FLG bits that make it unusable too (the same note): scale error, drift (an unstable
#: measurement), oscillation.  Bits 3-7 (over/under a limit, alternate limits, limit
#: equality) describe a good value.
BAD_PARM_FLAGS = 0b0000_0111
#: TEST_FLG bit 4: the test was not executed (a record of defaults only, or a test the flow
#: skipped): not an execution, no pass/fail, no value.
NOT_EXECUTED = 0b0001_0000


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


def is_text(v: Any) -> bool:
    return isinstance(v, str)


def opt_bool(v: Any) -> bool:
    return v is None or v is True or v is False


def num_list(v: Any) -> bool:
    return isinstance(v, list) and all(opt_num(x) for x in v)


#: what each checked field must be, in the words a log line uses
EXPECTED = {is_int: "an integer", opt_int: "an integer or null", is_num: "a number",
            opt_num: "a number or null", is_text: "text", opt_bool: "true, false or null",
            num_list: "a list of numbers or nulls"}


def wrong_fields(rec: Any, rules: dict[str, Any]) -> str:
    """The fields of ``rec`` that break their rule (``field name -> check``), named with
    the value sent and what was expected, e.g. ``hard_bin='7' (an integer or null
    expected)``: the log line and the ``hub/state`` topic say which field of which record
    to look at, not a record cut off before it (a ``BadRecord``'s message)."""
    wrong = []
    for name, check in rules.items():
        value = getattr(rec, name)
        if not check(value):
            shown = repr(value) if not isinstance(value, int) or value.bit_length() < 64 \
                else f"<an integer of {value.bit_length()} bits>"
            wrong.append(f"{name}={shown:.40} ({EXPECTED[check]} expected)")
    return ", ".join(wrong) or "a field of the wrong type"
