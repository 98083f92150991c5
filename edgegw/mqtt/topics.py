"""The channel-name templates that map an MQTT topic to a sensor channel (the filters
themselves: ``edgegw.topicfilter``).

A template is text with placeholders taken from the *received* topic's levels:

- ``{N}``: level N of the topic, counted from 0 (``ate/ate-01/handler/temp``: ``{0}`` is
  ``ate``, ``{1}`` is ``ate-01``); ``{-N}`` counts from the end (``{-1}`` is ``temp``);
- ``{#}``: the levels matched by a trailing ``#`` of the filter, joined with ``.``;
- ``{topic}``: the whole topic with ``/`` replaced by ``.``.

So filter ``ate/+/handler/#`` with channel ``{1}.handler.{#}`` makes
``ate/ate-01/handler/temp`` the channel ``ate-01.handler.temp``.  ``{{`` and ``}}`` are
literal braces.  Templates are checked when the config is loaded; a level that a ``#``
topic does not have is an error for that message only (counted like a bad payload).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    pass


def compile_template(template: str, topic_filter: str) -> Callable[[str], str]:
    """A function topic -> channel name; raises TemplateError for a bad template."""
    levels = topic_filter.split("/")
    multi = levels[-1] == "#"
    fixed = len(levels) - 1 if multi else len(levels)
    parts: list[str | Callable[[list[str], str], str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(template[pos:m.start()])
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        if m.group(1) is None:
            raise TemplateError(f"unbalanced {token!r} in channel template {template!r}")
        name = m.group(1)
        if name == "topic":
            parts.append(lambda lv, topic: topic.replace("/", "."))
        elif name == "#":
            if not multi:
                raise TemplateError(f"{{#}} needs a filter ending in '#', not {topic_filter!r}")
            parts.append(lambda lv, topic, n=fixed: ".".join(lv[n:]))  # type: ignore[misc]
        elif re.fullmatch(r"-?\d+", name):
            idx = int(name)
            if not multi and not -fixed <= idx < fixed:
                raise TemplateError(
                    f"{{{idx}}}: topics matching {topic_filter!r} have {fixed} levels "
                    f"(use 0..{fixed - 1} or -1..-{fixed})")
            if multi and idx < 0:
                raise TemplateError(f"{{{idx}}}: counting from the end is ambiguous under '#'"
                                    " (use {#})")
            parts.append(lambda lv, topic, i=idx: _level(lv, i, topic))  # type: ignore[misc]
        else:
            raise TemplateError(
                f"unknown placeholder {{{name}}} in channel template {template!r} "
                "(use {0}, {1}, ..., {-1}, {#} or {topic})")
    parts.append(template[pos:])
    consts = [p for p in parts if isinstance(p, str)]
    if len(consts) == len(parts):
        text = "".join(consts)
        return lambda topic: text

    def channel(topic: str) -> str:
        lv = topic.split("/")
        return "".join(p if isinstance(p, str) else p(lv, topic) for p in parts)

    return channel


def _level(levels: list[str], i: int, topic: str) -> str:
    try:
        return levels[i]
    except IndexError:
        raise TemplateError(f"topic {topic!r} has no level {i}") from None
