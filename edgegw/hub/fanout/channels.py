"""What the fan-out core keeps per topic and per connection: ``Channel`` (offset, bounded
history, this tick's deltas), ``Item`` (one batch item, encoded once per encoding) and
``Client``."""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from typing import Any, Protocol

from .encoding import Encoding


class ClientScope(Protocol):
    """What one client may see and do (``edgegw.hub.fanout.scope.LiveScope``): topics outside
    it are never attached to the client; acknowledgements need ``may_ack`` and are recorded
    in ``user``'s name (None: no signed-in user, the message's ``by`` is taken)."""

    user: str | None
    may_ack: bool

    def allows_topic(self, topic: str) -> bool: ...

    def may_ack_alert(self, alert_id: str) -> bool: ...


def delta_rows(delta: dict[str, Any]) -> int:
    """A delta's weight in the history: 1 plus its list rows (dies, sensor points)."""
    return 1 + sum(len(v) for v in delta.values() if isinstance(v, list))


class Channel:
    """One topic: its offset, a bounded history of deltas, and the deltas of this tick."""

    __slots__ = ("event_like", "history", "history_rows", "max_history", "max_rows", "offset",
                 "pending", "pending_from", "rows", "subscribers", "topic", "ts_max", "ts_min")

    def __init__(self, topic: str, history: int, history_rows: int, event_like: bool) -> None:
        self.topic = topic
        self.offset = 0
        self.history: deque[tuple[dict[str, Any], int]] = deque()  # (delta, rows) up to offset
        self.rows = 0
        self.max_history = history
        self.max_rows = history_rows
        self.pending: list[dict[str, Any]] = []
        self.pending_from = 0
        self.ts_min: float | None = None
        self.ts_max: float | None = None
        self.subscribers: set[Client] = set()
        self.event_like = event_like

    def remember(self, delta: dict[str, Any]) -> None:
        rows = delta_rows(delta)
        self.history.append((delta, rows))
        self.rows += rows
        while self.history and (len(self.history) > self.max_history
                                or self.rows > self.max_rows):
            self.rows -= self.history.popleft()[1]

    def deltas_after(self, offset: int) -> list[dict[str, Any]] | None:
        """The deltas after ``offset`` up to now, or None when history no longer has them."""
        missing = self.offset - offset
        if missing < 0 or missing > len(self.history):
            return None
        if missing == 0:
            return []
        return [d for d, _ in itertools.islice(self.history, len(self.history) - missing, None)]


class Item:
    """One batch item, encoded lazily once per encoding and shared by every client."""

    __slots__ = ("_encoded", "key", "message")

    def __init__(self, key: tuple[Any, ...], message: dict[str, Any]) -> None:
        self.key = key
        self.message = message
        self._encoded: dict[str, bytes | str] = {}

    def encoded(self, encoding: Encoding) -> bytes | str:
        data = self._encoded.get(encoding.name)
        if data is None:
            data = self._encoded[encoding.name] = encoding.encode(self.message)
        return data


@dataclasses.dataclass(eq=False)
class Client:
    """One ``/ws/live`` connection as the protocol sees it."""

    id: int
    encoding: Encoding
    peer: str = ""
    scope: ClientScope | None = None  # None: everything (a hub without sign-in)
    deflate: bool = False  # it agreed permessage-deflate: its frames come from prepare_deflated
    patterns: set[str] = dataclasses.field(default_factory=set)
    # topic -> offset this client has been sent up to; None: it needs a snapshot next tick
    positions: dict[str, int | None] = dataclasses.field(default_factory=dict)
    resync: dict[str, str] = dataclasses.field(default_factory=dict)  # topic -> reason
    # topic -> (epoch, offset) it resumed that this hub did not have yet: applied when the
    # topic appears (a cluster node loads it a moment later), so it never comes back bare
    resume_later: dict[str, tuple[Any, int]] = dataclasses.field(default_factory=dict)
    todo: set[str] = dataclasses.field(default_factory=set)  # topics to look at next tick
    # Unsent frames: (prepared frame, the update items it carries; 0: a control reply,
    # never dropped).  The count travels with the frame so ``items_sent`` counts only the
    # items of frames written, not those of frames conflated away.
    queue: deque[tuple[Any, int]] = dataclasses.field(default_factory=deque)
    lagging: bool = False  # its updates were dropped; it waits to drain, then gets snapshots
    in_flight: bool = False  # its sender is writing a frame
    busy_since: float | None = None  # since when it has had something unwritten
    closed: bool = False
    close_code: int | None = None
    close_reason: str = ""
    frames_sent: int = 0
    frames_queued: int = 0
    updates_dropped: int = 0  # update frames dropped while lagging
    items_sent: int = 0  # update items in frames written to it (not queued, not dropped)
    writing_items: int = 0  # the update items of the frame its sender is writing

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def follows_events(self, channels: dict[str, Channel]) -> bool:
        """Whether it is subscribed to a channel where every event matters (alerts)."""
        return any(channels[t].event_like for t in self.positions if t in channels)
