"""MQTT-style topic filters, one implementation for the MQTT source and the live fan-out.

Levels are separated by ``/``; ``+`` stands for exactly one level and must be a whole
level; ``#`` stands for the rest (zero or more levels: ``a/#`` matches ``a`` too) and must
be the whole last level.  As in MQTT (and paho's ``topic_matches_sub``), a topic starting
with ``$`` is not matched by a filter whose first level is a wildcard.
"""

from __future__ import annotations


def filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid filter, or None when it is."""
    if not topic_filter:
        return "must not be empty"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` (no wildcards) matches the valid filter ``topic_filter``."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


__all__ = ["filter_problem", "matches"]
