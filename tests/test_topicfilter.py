"""One topic-filter implementation for the MQTT source and the live fan-out, as MQTT has it."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgegw.topicfilter import FilterSet, filter_problem, matches

LEVEL = st.sampled_from(["a", "b", "ate-01", "", "$SYS", "x.y"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
FILTER = st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=5).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"]), "#"]))


@settings(max_examples=500, deadline=None)
@given(FILTER, TOPIC)
def test_matching_agrees_with_paho(topic_filter: str, topic: str) -> None:
    assume(filter_problem(topic_filter) is None)  # an empty filter ("" from [""])
    assert matches(topic_filter, topic) == paho.topic_matches_sub(topic_filter, topic)


@settings(max_examples=300, deadline=None)
@given(st.lists(FILTER, max_size=6), TOPIC)
def test_a_filter_set_matches_a_topic_when_one_of_its_filters_does(filters: list[str],
                                                                    topic: str) -> None:
    filters = list(dict.fromkeys(f for f in filters if filter_problem(f) is None))
    assert FilterSet(filters).matches_any(topic) == any(matches(f, topic) for f in filters)
    assert sorted(FilterSet(filters).matching(topic)) == sorted(
        f for f in filters if matches(f, topic))


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "+", "#", "$SYS/+"])
def test_a_filter_set_reads_wildcard_characters_in_a_topic_as_plain_levels(topic: str) -> None:
    filters = ["#", "+/#", "a/+/b", "a/#", "+", "$SYS/+", "$SYS/#"]
    assert sorted(FilterSet(filters).matching(topic)) == sorted(
        f for f in filters if matches(f, topic))


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
