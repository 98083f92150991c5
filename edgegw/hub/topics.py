"""Live topic names: the one place that spells them.

The hub's live state (``edgegw.hub.live.LiveState``) publishes each change as
``publish(topic, delta)`` and answers ``snapshot(topic)``; the subscriber protocol on
``/ws/live`` (``docs/protocol.md``) lets clients subscribe to these names with MQTT-style
wildcards (``+`` one level, ``#`` the rest).  Snapshot and delta shapes per topic are
documented in ``docs/live-topics.md``.

The topics, level by level (``/`` separates levels):

* ``lot/<lot_id>`` -- lot summary: parts, good, yield, counts per hard and soft bin, yield
  per site, units per hour.
* ``lot/<lot_id>/wafer/<wafer_id>`` -- wafer map: dies ``[x, y, hard_bin, soft_bin, passed,
  site]``, counts per bin, yield per site, yield.
* ``test/<lot_id>/<test_num>`` -- one test's statistics: count, mean, sigma, min, max, Cpk
  against its limits, units, test text.
* ``sensor/<channel>`` -- the latest sensor window and a short history.
* ``gateway/<gateway_id>`` -- online, last seen, records per second, frames applied.
* ``alert/<priority>/<rule>`` -- alert events (raised, acknowledged, escalated); priority is
  ``P0`` .. ``P3``.
* ``hub/state`` -- the live state's own health: records it could not apply, by reason (the
  dashboard's warning).

Identifiers are used verbatim except that a ``/`` inside one (which would add a level) and
the wildcard characters ``+`` and ``#`` are percent-encoded, so that every topic has a
fixed number of levels; ``%`` itself is encoded too so that the mapping is reversible.
"""

from __future__ import annotations

PRIORITIES = ("P0", "P1", "P2", "P3")

#: records the live state could not apply, by reason
HUB_STATE = "hub/state"

#: Bounds of the lists a topic's view keeps: its snapshot and the merge rules agree.
SENSOR_HISTORY = 120  # ``sensor/<channel>``: history points, oldest first
GATEWAY_EVENTS = 20  # ``gateway/<id>``: events, newest first

#: How a client applies a delta to the view it holds (docs/live-topics.md): a delta's keys
#: replace the view's, except these.  ``topics`` is a topic filter; ``upsert`` replaces or
#: adds the rows of ``into`` by identity (``by``: list positions or a field; ``order`` of
#: the snapshot's list), ``append``/``prepend`` add to the list ``into`` and keep the
#: newest ``keep``.  Sent to every ``/ws/live`` client in ``hello``, so no client restates
#: them (the dashboard applies them as given).
MERGE_RULES: tuple[dict[str, object], ...] = (
    {"topics": "lot/+/wafer/+", "key": "dies", "op": "upsert", "into": "dies", "by": [0, 1],
     "order": "oldest_first"},
    {"topics": "sensor/#", "key": "append", "op": "append", "into": "history",
     "keep": SENSOR_HISTORY},
    {"topics": "gateway/#", "key": "event", "op": "prepend", "into": "events",
     "keep": GATEWAY_EVENTS},
    {"topics": "alert/#", "key": "alert", "op": "upsert", "into": "alerts", "by": "id",
     "order": "newest_first"},
)


def _part(value: object) -> str:
    text = str(value)
    if any(c in text for c in "%/+#"):
        text = (
            text.replace("%", "%25").replace("/", "%2F").replace("+", "%2B").replace("#", "%23")
        )
    return text


def unquote(part: str) -> str:
    """Undo the encoding of one topic level (the inverse of what the builders apply)."""
    if "%" not in part:
        return part
    return part.replace("%2F", "/").replace("%2B", "+").replace("%23", "#").replace("%25", "%")


def lot(lot_id: str) -> str:
    """``lot/<lot_id>``: the lot summary."""
    return f"lot/{_part(lot_id)}"


def wafer(lot_id: str, wafer_id: str) -> str:
    """``lot/<lot_id>/wafer/<wafer_id>``: one wafer's map and counts."""
    return f"lot/{_part(lot_id)}/wafer/{_part(wafer_id)}"


def test(lot_id: str, test_num: int) -> str:
    """``test/<lot_id>/<test_num>``: one parametric/functional test's statistics in a lot."""
    return f"test/{_part(lot_id)}/{int(test_num)}"


def sensor(channel: str) -> str:
    """``sensor/<channel>``: latest window and short history of a sensor channel."""
    return f"sensor/{_part(channel)}"


def gateway(gateway_id: str) -> str:
    """``gateway/<gateway_id>``: a gateway's connection state and rates."""
    return f"gateway/{_part(gateway_id)}"


def alert(priority: str, rule: str) -> str:
    """``alert/<priority>/<rule>``: events of one alert rule at one priority (P0..P3)."""
    if priority not in PRIORITIES:
        raise ValueError(f"alert priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return f"alert/{priority}/{_part(rule)}"


def split(topic: str) -> list[str]:
    """The decoded levels of a topic name (``lot/A%2FB`` -> ``["lot", "A/B"]``)."""
    return [unquote(p) for p in topic.split("/")]


__all__ = [
    "GATEWAY_EVENTS", "HUB_STATE", "MERGE_RULES", "PRIORITIES", "SENSOR_HISTORY", "alert",
    "gateway", "lot", "sensor", "split", "test", "unquote", "wafer",
]
