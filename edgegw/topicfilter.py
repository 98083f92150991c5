"""MQTT-style topic filters, one implementation for the MQTT source and the live fan-out.

Levels are separated by ``/``; ``+`` stands for exactly one level and must be a whole
level; ``#`` stands for the rest (zero or more levels: ``a/#`` matches ``a`` too) and must
be the whole last level.  As in MQTT (and paho's ``topic_matches_sub``), a topic starting
with ``$`` is not matched by a filter whose first level is a wildcard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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


class FilterSet:
    """Valid filters matched together: ``matches_any(topic)`` is ``any(matches(f, topic)
    for f in filters)`` at the cost of a walk down a tree of the filters' levels -- the
    topic's few levels, not the number of filters.  A live client may hold 256 patterns
    and a full hub 300,000 topics: one by one, a subscription blocked the hub for
    seconds (docs/live-protocol.md, "subscribe")."""

    __slots__ = ("_root",)

    def __init__(self, filters: Iterable[str] = ()) -> None:
        # level -> subtree; the key None: the filter that ends here
        self._root: dict[Any, Any] = {}
        for topic_filter in filters:
            node = self._root
            for level in topic_filter.split("/"):
                node = node.setdefault(level, {})
            node[None] = topic_filter

    def matches_any(self, topic: str) -> bool:
        levels = topic.split("/")
        if topic.startswith("$"):  # a filter starting with a wildcard does not match it
            node = self._root.get(levels[0])
            return node is not None and _walk(node, levels, 1)
        return _walk(self._root, levels, 0)

    def matching(self, topic: str) -> list[str]:
        """The filters that match ``topic`` (each once)."""
        levels = topic.split("/")
        found: list[str] = []
        if topic.startswith("$"):
            node = self._root.get(levels[0])
            if node is not None:
                _collect(node, levels, 1, found)
        else:
            _collect(self._root, levels, 0, found)
        return found


def _walk(node: dict[Any, Any], levels: list[str], i: int) -> bool:
    if "#" in node:  # the rest, zero levels included
        return True
    if i == len(levels):
        return None in node
    child = node.get(levels[i])
    if child is not None and _walk(child, levels, i + 1):
        return True
    child = node.get("+")
    return child is not None and _walk(child, levels, i + 1)


def _collect(node: dict[Any, Any], levels: list[str], i: int, found: list[str]) -> None:
    wild = node.get("#")
    if wild is not None:
        found.append(wild[None])
    if i == len(levels):
        if None in node:
            found.append(node[None])
        return
    level = levels[i]
    child = node.get(level) if level != "#" else None  # "#": the wildcard, found above
    if child is not None:
        _collect(child, levels, i + 1, found)
    if level != "+" and (child := node.get("+")) is not None:  # "+": the same subtree
        _collect(child, levels, i + 1, found)


__all__ = ["FilterSet", "filter_problem", "matches"]
