"""One topic-filter implementation for the MQTT source and the live fan-out, as MQTT has it."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgegw.topicfilter import filter_problem, matches

LEVEL = st.sampled_from(["a", "b", "ate-01", "", "$SYS", "x.y"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
FILTER = st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=5).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"]), "#"]))


@settings(max_examples=500, deadline=None)
@given(FILTER, TOPIC)
def test_matching_agrees_with_paho(topic_filter: str, topic: str) -> None:
    assume(filter_problem(topic_filter) is None)  # an empty filter ("" from [""])
    assert matches(topic_filter, topic) == paho.topic_matches_sub(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("gateway/ate-07/#", "gateway/ate-07", True),  # '#' also matches the parent level
    ("lot/+/wafer/+", "lot/L1/wafer/W1", True),
    ("lot/+/wafer/+", "lot/L1/wafer", False),
    ("+/x", "$SYS/x", False),  # a wildcard first level never matches a '$' topic
])
def test_matching_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "problem"), [
    ("", "must not be empty"),
    ("a/#/b", "'#' must be a whole level and the last one"),
    ("a/b#", "'#' must be a whole level and the last one"),
    ("a/b+/c", "'+' must be a whole level"),
])
def test_invalid_filters_say_why(topic_filter: str, problem: str) -> None:
    assert filter_problem(topic_filter) == problem
