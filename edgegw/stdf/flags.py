"""STDF flag bits (OPT_FLAG, TEST_FLG, PART_FLG) and what a result or part's flags say.

Its own module, importing nothing, so a reader of PRRs (``stats``) does not import the
live state's machinery (``state``, where they were first, re-exports the functions).
"""

from __future__ import annotations

# OPT_FLAG bits
RES_SCAL_INVALID = 0x01
NO_LO_SPEC = 0x04
NO_HI_SPEC = 0x08
LO_LIMIT_INVALID = 0x10
HI_LIMIT_INVALID = 0x20
NO_LO_LIMIT = 0x40
NO_HI_LIMIT = 0x80

# TEST_FLG bits
TEST_ALARM = 0x01
TEST_RESULT_INVALID = 0x02
TEST_UNRELIABLE = 0x04
TEST_TIMEOUT = 0x08
TEST_NOT_EXECUTED = 0x10
TEST_ABORTED = 0x20
TEST_NO_PASS_FAIL = 0x40
TEST_FAILED = 0x80

# PART_FLG bits
PART_SUPERSEDES_ID = 0x01
PART_SUPERSEDES_XY = 0x02
PART_ABNORMAL_END = 0x04
PART_FAILED = 0x08
PART_NO_PASS_FAIL = 0x10


def result_passed(test_flg: int) -> bool | None:
    """Pass/fail of a PTR/MPR/FTR from TEST_FLG; None when the record says there is none:
    bit 6 (no pass/fail), or bit 4 (not executed: its pass/fail bits mean nothing, even
    a fail bit left set)."""
    if test_flg & (TEST_NO_PASS_FAIL | TEST_NOT_EXECUTED):
        return None
    return not test_flg & TEST_FAILED


result_passed.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
#: the same function under the name TEST_FLG's meaning suggests
test_passed = result_passed


def part_passed(part_flg: int) -> bool | None:
    """Pass/fail of a PRR from PART_FLG; None when pass/fail is flagged invalid."""
    if part_flg & PART_NO_PASS_FAIL:
        return None
    return not part_flg & PART_FAILED


def part_supersedes(part_flg: int) -> bool:
    """The PRR is a retest replacing an earlier result (same PART_ID or same X/Y)."""
    return bool(part_flg & (PART_SUPERSEDES_ID | PART_SUPERSEDES_XY))


__all__ = [
    "HI_LIMIT_INVALID", "LO_LIMIT_INVALID", "NO_HI_LIMIT", "NO_HI_SPEC", "NO_LO_LIMIT",
    "NO_LO_SPEC", "PART_ABNORMAL_END", "PART_FAILED", "PART_NO_PASS_FAIL", "PART_SUPERSEDES_ID",
    "PART_SUPERSEDES_XY", "RES_SCAL_INVALID", "TEST_ABORTED", "TEST_ALARM", "TEST_FAILED",
    "TEST_NOT_EXECUTED", "TEST_NO_PASS_FAIL", "TEST_RESULT_INVALID", "TEST_TIMEOUT",
    "TEST_UNRELIABLE", "part_passed", "part_supersedes", "result_passed", "test_passed",
]
