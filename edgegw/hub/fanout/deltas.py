"""The delta algebra of live topics: how deltas compose on the hub, and the merge rules a
client applies to a snapshot (sent to every client in ``hello``, so no client restates them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# How the live state's deltas combine (``docs/live-topics.md``): a delta's keys replace the
# same keys of the topic's state, except list keys that *add* to it -- wafer ``dies`` (rows
# upserted by X/Y, in order) and sensor ``append`` (history points) -- and ``event`` keys,
# of which each one is an event of its own (a gateway's connect/disconnect).
CONCAT_KEYS = frozenset({"dies", "append"})
EVENT_KEYS = frozenset({"event"})


def compose_deltas(
    first: dict[str, Any],
    second: dict[str, Any],
    concat_keys: frozenset[str] = CONCAT_KEYS,
    event_keys: frozenset[str] = EVENT_KEYS,
) -> dict[str, Any] | None:
    """One delta equal to applying ``first`` then ``second``, or None when there is none
    (both carry an event).  Neither argument is modified."""
    merged = coalesce([first, second], concat_keys, event_keys)
    return merged[0] if len(merged) == 1 else None


def coalesce(
    deltas: Iterable[dict[str, Any]],
    concat_keys: frozenset[str] = CONCAT_KEYS,
    event_keys: frozenset[str] = EVENT_KEYS,
) -> list[dict[str, Any]]:
    """Consecutive deltas of one channel composed into as few as say exactly the same.

    Linear in the rows: a list is copied once, when a second delta first adds to it, and
    extended in place after that (a tick may compose hundreds of wafer deltas during a
    replay).  The input deltas are never modified."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    owned: set[str] = set()  # concat keys whose list in ``current`` is our own copy
    for delta in deltas:
        if current is not None and not (event_keys & delta.keys() & current.keys()):
            for key, value in delta.items():
                before = current.get(key)
                if key in concat_keys and isinstance(value, list) and isinstance(before, list):
                    if key not in owned:
                        current[key] = before = list(before)
                        owned.add(key)
                    before.extend(value)
                else:
                    current[key] = value
                    owned.discard(key)
            continue
        if current is not None:
            out.append(current)
        current = dict(delta)
        owned = set()
    if current is not None:
        out.append(current)
    return out
