"""A live state fed as the hub feeds it (frames of record ids per gateway), for tests."""

from __future__ import annotations

from typing import Any

from edgegw.hub.live import LiveState
from edgegw.metrics import Metrics


class Feed:
    """Each gateway's records with the next record ids, in frames of at most ``frame``
    records (None: one frame a call)."""

    def __init__(self, state: LiveState, frame: int | None = None) -> None:
        self.state = state
        self.frame = frame
        self.rid: dict[str, int] = {}

    def __call__(self, gateway: str, records: list[Any]) -> None:
        step = self.frame or len(records) or 1
        for k in range(0, max(len(records), 1), step):  # (no records: one empty frame)
            chunk = records[k:k + step]
            first = self.rid.get(gateway, 1)
            self.state.on_records(gateway, first, chunk, now=1.0)
            self.rid[gateway] = first + len(chunk)


def made(metrics: Metrics, frame: int | None = None, **caps: Any
         ) -> tuple[LiveState, Feed, list[tuple[str, Any]]]:
    """A live state (clock at 1.0, ``caps`` its settings), its feed and what it published."""
    published: list[tuple[str, Any]] = []
    state = LiveState(lambda topic, delta: published.append((topic, delta)),
                      metrics=metrics, clock=lambda: 1.0, **caps)
    return state, Feed(state, frame), published
