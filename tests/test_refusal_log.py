"""Which refused HELLOs the hub logs (edgegw/hub/refusals.py ``RefusalLog``, sans-IO): the
first of each (address, gateway id, reason), then at most one summary per interval for it;
new keys beyond a budget per interval go into one line together; memory stays bounded."""

from __future__ import annotations

from edgegw.hub.refusals import LogLine, RefusalLog, address_of

KEY = ("10.0.0.7", "ate-01", "unauthorized")


def test_the_first_refusal_is_logged_then_one_summary_per_interval() -> None:
    log = RefusalLog(interval_s=60.0)
    assert log.note(KEY, 0.0) == LogLine(True)
    assert [log.note(KEY, t) for t in range(1, 60)] == [None] * 59  # within the minute
    # the minute is up: the refusals since the first line, this one included
    assert log.note(KEY, 60.0) == LogLine(False, 60, 60.0)
    assert log.note(KEY, 61.0) is None
    assert log.note(KEY, 200.0) == LogLine(False, 2, 140.0)


def test_each_address_gateway_and_reason_has_its_own_first_line() -> None:
    log = RefusalLog()
    keys = [KEY, ("10.0.0.8", "ate-01", "unauthorized"), ("10.0.0.7", "ate-02", "unauthorized"),
            ("10.0.0.7", "ate-01", "unsupported_version")]
    assert [log.note(k, 1.0) for k in keys] == [LogLine(True)] * 4
    assert [log.note(k, 2.0) for k in keys] == [None] * 4


def test_new_keys_over_the_budget_are_summed_up_in_one_line_per_interval() -> None:
    log = RefusalLog(interval_s=60.0, new_per_interval=3)
    scan = [("10.0.0.9", f"scan-{i}", "unauthorized") for i in range(10)]
    assert [log.note(k, 1.0) is not None for k in scan] == [True] * 3 + [False] * 7
    assert log.others_due(1.0) == 7  # the first line about them
    assert log.note(("10.0.0.9", "more", "unauthorized"), 2.0) is None
    assert log.others_due(2.0) == 0  # at most one line per interval
    # the next interval: new keys get their first lines again, the rest is summed up
    assert log.note(("10.0.0.9", "later", "unauthorized"), 61.0) == LogLine(True)
    assert log.others_due(61.0) == 1


def test_memory_is_bounded_whatever_the_keys() -> None:
    log = RefusalLog(max_keys=50, new_per_interval=10**9)
    for i in range(10_000):
        log.note(("10.0.0.9", f"scan-{i}", "unauthorized"), float(i))
    assert len(log._keys) == 50
    # the least recently refused are forgotten: an old key counts as new again
    assert log.note(("10.0.0.9", "scan-0", "unauthorized"), 20_000.0) == LogLine(True)


def test_the_address_is_the_remote_without_its_port() -> None:
    assert address_of("10.0.0.7:53122") == "10.0.0.7"
    assert address_of("::1:53122") == "::1"
    assert address_of("?") == "?"
