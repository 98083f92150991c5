"""A /ws/live client as a dashboard is, for the cluster tests (a helper module, not a
fixture file): it subscribes, applies snapshots and deltas with the merge rules the hub
sends in ``hello`` (docs/live-topics.md), and when its connection ends -- its node killed,
HAProxy cutting the session -- reconnects through the same address and resumes every topic
with ``(epoch, offset)``.

It checks the promise "no silent gap": every delta must start where the client's view of
that topic is (``from`` == the offset it holds, in the same epoch), and after a resume a
topic the client already had may come back only as the missed deltas or as a snapshot
*marked* ``resync`` (a reason given).  Anything else is recorded in ``silent_gaps``.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from wsproto.utilities import RemoteProtocolError

from edgegw.hub.fanout import SUBPROTOCOL_JSON
from edgegw.topicfilter import matches as topic_matches
from tests.wsclient import Closed, WsClient


def apply_merge(view: dict[str, Any] | None, delta: dict[str, Any], topic: str,
                rules: list[dict[str, Any]]) -> dict[str, Any]:
    """A delta applied to a topic's view by the merge rules (docs/live-topics.md)."""
    out = dict(view or {})
    special = {r["key"]: r for r in rules if topic_matches(r["topics"], topic)}
    for key, value in delta.items():
        rule = special.get(key)
        if rule is None:
            out[key] = value
            continue
        into = rule["into"]
        current = list(out.get(into) or [])
        if rule["op"] == "upsert":
            by = rule["by"]

            def ident(row: Any, by: Any = by) -> Any:
                return tuple(row[i] for i in by) if isinstance(by, list) else row.get(by)
            rows = value if isinstance(value, list) else [value]
            index = {ident(r): i for i, r in enumerate(current)}
            for row in rows:
                i = index.get(ident(row))
                if i is None:
                    if rule.get("order") == "newest_first":
                        current.insert(0, row)
                        index = {ident(r): j for j, r in enumerate(current)}
                    else:
                        index[ident(row)] = len(current)
                        current.append(row)
                else:
                    current[i] = row
        elif rule["op"] == "append":
            current.extend(value if isinstance(value, list) else [value])
            current = current[-rule["keep"]:]
        elif rule["op"] == "prepend":
            current[:0] = value if isinstance(value, list) else [value]
            current = current[:rule["keep"]]
        out[into] = current
    return out


class LiveFollower:
    """Follows ``patterns`` through ``port`` until cancelled, reconnecting on any end."""

    def __init__(self, port: int, patterns: list[str], name: str = "client") -> None:
        self.port = port
        self.patterns = patterns
        self.name = name
        self.epoch: str | None = None
        self.views: dict[str, Any] = {}
        self.offsets: dict[str, tuple[str, int]] = {}
        self.rules: list[dict[str, Any]] = []
        self.connects = 0
        self.resyncs: list[tuple[str, str]] = []  # (topic, reason): announced
        self.status_items: list[dict[str, Any]] = []  # errors/status the hub sent
        self.silent_gaps: list[str] = []
        self.items = 0
        self.connected = trio.Event()
        self._resumed: set[str] = set()  # topics resumed on this connection, not yet seen

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except (Closed, OSError, ConnectionError, trio.BrokenResourceError,
                    trio.ClosedResourceError, RemoteProtocolError):
                # (RemoteProtocolError: the load balancer closed the connection before the
                # upgrade's answer -- no node healthy at that moment, or its node went down)
                pass
            await trio.sleep(0.2)

    async def _session(self) -> None:
        ws = await WsClient.connect(self.port, "/ws/live", subprotocols=[SUBPROTOCOL_JSON])
        try:
            self.connects += 1
            resume = {t: [e, o] for t, (e, o) in self.offsets.items()}
            self._resumed = set(resume)
            await ws.send(json.dumps({"type": "subscribe", "id": self.connects,
                                      "topics": self.patterns, "resume": resume}))
            self.connected.set()
            while True:
                message = json.loads(await ws.recv())
                self._message(message)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await ws.aclose()

    def _message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "hello":
            self.epoch = message["epoch"]
            self.rules = list(message.get("merge") or [])
        elif kind == "batch":
            for item in message["items"]:
                self._item(item)
        elif kind in ("error", "status"):
            self.status_items.append(message)

    def _item(self, item: dict[str, Any]) -> None:
        self.items += 1
        topic = item.get("topic")
        if topic is None:
            self.status_items.append(item)
            return
        held = self.offsets.get(topic)
        if item["type"] == "snapshot":
            if held is not None and "resync" not in item:
                # a topic the client had came back as a bare snapshot: if it is not the
                # same position, what happened in between was skipped without a word
                if (held[0], held[1]) != (item["epoch"], item["offset"]):
                    self.silent_gaps.append(
                        f"{topic}: snapshot at {item['epoch']}/{item['offset']} without "
                        f"resync after {held[0]}/{held[1]}")
            if "resync" in item:
                self.resyncs.append((topic, item["resync"]))
            self.views[topic] = item["data"]
        elif item["type"] == "delta":
            if held is None or held[0] != item["epoch"] or held[1] != item["from"]:
                self.silent_gaps.append(
                    f"{topic}: delta {item['epoch']}/{item['from']}..{item['offset']} "
                    f"applied on {held}")
            for patch in item["data"]:
                self.views[topic] = apply_merge(self.views.get(topic), patch, topic,
                                                self.rules)
        else:
            return
        self._resumed.discard(topic)
        self.offsets[topic] = (item["epoch"], item["offset"])


__all__ = ["LiveFollower", "apply_merge"]
