"""edgegw.metrics: what a Prometheus server reads off ``/metrics`` is exact, conventionally
named and parses with prometheus_client's own parser; the in-process API the services
use (counter/gauge/histogram, get/total, as_dict) reads back what was counted."""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from edgegw.metrics import Metrics, internal_errors, report_internal_error


def parse(metrics: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> (sorted labels -> value), as a Prometheus server reads the page."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.render_prometheus()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counters_past_a_million_print_exactly() -> None:
    m = Metrics()
    m.counter("uplink_bytes_sent_total", "bytes").inc(43_466_917)
    m.counter("hub_records_applied_total").inc(2**40 + 3)
    page = parse(m)
    assert page["edgegw_uplink_bytes_sent_total"][()] == 43_466_917
    assert page["edgegw_hub_records_applied_total"][()] == 2**40 + 3


def test_labels_are_escaped_and_read_back() -> None:
    m = Metrics()
    bad = m.counter("source_errors_total", "bad input")
    bad.inc(source='te"st\\er\n1', kind="corrupt")
    bad.inc(2, kind="corrupt", source='te"st\\er\n1')  # label order does not matter
    assert bad.get(source='te"st\\er\n1', kind="corrupt") == 3
    assert parse(m)["edgegw_source_errors_total"] == {
        (("kind", "corrupt"), ("source", 'te"st\\er\n1')): 3}


def test_names_follow_the_conventions() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="ends in _total"):
        m.counter("source_errors")
    with pytest.raises(ValueError, match="_total is for counters"):
        m.gauge("spool_bytes_total")
    assert m.gauge("spool_bytes") is m.gauge("spool_bytes")  # the same metric again
    with pytest.raises(ValueError, match="is a gauge, not a histogram"):
        m.histogram("spool_bytes")
    m.histogram("spool_fsync_seconds")
    with pytest.raises(ValueError, match="is a histogram, not a gauge"):
        m.gauge("spool_fsync_seconds")


def test_a_metric_nothing_touched_yet_exports_zero() -> None:
    m = Metrics()
    m.counter("hub_duplicate_frames_total", "duplicates")
    m.histogram("hub_frame_apply_seconds", "apply")
    page = parse(m)
    assert page["edgegw_hub_duplicate_frames_total"] == {(): 0}
    assert page["edgegw_hub_frame_apply_seconds_count"] == {(): 0}
    assert page["edgegw_hub_frame_apply_seconds_bucket"][(("le", "+Inf"),)] == 0
    assert m.as_dict()["hub_duplicate_frames_total"] == {}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from(
    [0.01, 0.1, 1.0, -0.0, math.nan, math.inf, -math.inf])), max_size=60))
def test_observe_many_counts_exactly_what_observe_counts_one_by_one(values: list[float]) -> None:
    """observe_many sorts and cuts at the bounds (the hub's per-record hot path): the same
    buckets as one observe per value, NaN and infinities included."""
    m = Metrics()
    many = m.histogram("a_seconds", "a", buckets=(0.01, 0.1, 1.0))
    one = m.histogram("b_seconds", "b", buckets=(0.01, 0.1, 1.0))
    many.observe_many(values)
    for v in values:
        one.observe(v)
    assert many.count() == one.count() == len(values)
    if values:
        (counts, (total,)), (counts1, (total1,)) = many.series[()], one.series[()]
        assert counts == counts1
        # the sum in another order: equal up to rounding (both NaN when one is)
        assert (math.isnan(total) and math.isnan(total1)) or total == total1 or math.isclose(
            total, total1, rel_tol=1e-9, abs_tol=1e-6)


def test_histogram_buckets_are_cumulative_with_inclusive_bounds() -> None:
    m = Metrics()
    h = m.histogram("spool_fsync_seconds", "fsync", buckets=(0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    h.observe_many([0.001, 20.0], disk="ssd")
    page = parse(m)
    buckets = {dict(k)["le"]: v for k, v in page["edgegw_spool_fsync_seconds_bucket"].items()
               if "disk" not in dict(k)}
    assert buckets == {"0.01": 2, "0.1": 4, "1.0": 5, "+Inf": 6}
    assert page["edgegw_spool_fsync_seconds_count"][()] == 6
    assert math.isclose(page["edgegw_spool_fsync_seconds_sum"][()], 3.665)
    assert page["edgegw_spool_fsync_seconds_count"][(("disk", "ssd"),)] == 2
    assert (h.count(), h.count(disk="ssd"), h.total()) == (6, 2, 8)
    assert m.as_dict()["spool_fsync_seconds"] == {
        "": {"count": 6, "sum": pytest.approx(3.665)},
        "disk=ssd": {"count": 2, "sum": 20.001}}


def test_process_platform_and_build_info_are_exported() -> None:
    page = parse(Metrics())
    (labels, value), = page["edgegw_build_info"].items()
    assert dict(labels)["version"] and dict(labels)["python"] and value == 1
    # the test command builds the compiled STDF record loop (docs/stdf.md)
    assert dict(labels)["stdf_loop"] == "compiled"
    assert page["process_resident_memory_bytes"][()] > 1e6
    assert page["process_open_fds"][()] >= 3
    assert page["process_max_fds"][()] >= page["process_open_fds"][()]
    assert "process_cpu_seconds_total" in page
    assert "python_info" in page and "python_gc_collections_total" in page


def test_collectors_refresh_gauges_before_each_read() -> None:
    m = Metrics()
    connected = m.gauge("uplink_connected", "1 while connected")
    state = {"up": 0}
    m.add_collector(lambda: connected.set(state["up"]))
    assert parse(m)["edgegw_uplink_connected"][()] == 0
    state["up"] = 1
    assert parse(m)["edgegw_uplink_connected"][()] == 1
    assert m.as_dict()["uplink_connected"] == 1


def test_two_registries_in_one_process_are_independent() -> None:
    hub, gateway = Metrics(), Metrics()
    hub.counter("hub_frames_applied_total").inc(5)
    assert "edgegw_hub_frames_applied_total" not in parse(gateway)
    assert parse(hub)["edgegw_hub_frames_applied_total"][()] == 5


def test_internal_errors_are_counted_by_where() -> None:
    m = Metrics()
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        report_internal_error(m, "test_boundary", logging.getLogger("t"), "doing %s", "x")
    assert internal_errors(m).get(where="test_boundary") == 1
    assert parse(m)["edgegw_internal_errors_total"] == {(("where", "test_boundary"),): 1}


def test_a_registry_made_again_carries_on_the_counts_not_the_gauges() -> None:
    """A gateway reloaded by SIGHUP is made again with a new registry: its counters and
    histograms go on from the old one's (``carry_on``), its gauges are its own."""
    old, new = Metrics(), Metrics()
    old.counter("records_in_total", "records").inc(40, source="tester")
    old.counter("records_in_total").inc(2, source="sensors")
    old.counter("errors_total", "errors").inc(3)
    old.gauge("connected", "1 while connected").set(1)
    old.histogram("age_seconds", "ages", buckets=(0.1, 1.0)).observe_many([0.05, 0.5, 5.0])
    new.counter("records_in_total", "records").inc(1, source="tester")  # counted already
    new.histogram("age_seconds", "ages", buckets=(0.1, 1.0)).observe(0.5)
    new.carry_on(old)
    got = new.as_dict()
    assert got["records_in_total"] == {"source=tester": 41, "source=sensors": 2}
    assert got["errors_total"] == 3  # a counter the new one had not made yet
    assert "connected" not in got
    assert got["age_seconds"] == {"count": 4, "sum": 6.05}
    assert 'edgegw_age_seconds_bucket{le="0.1"} 1.0' in new.render_prometheus()
