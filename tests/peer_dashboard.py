"""An independent /ws/live client, written from docs/live-protocol.md and docs/live-topics.md.

Nothing of edgegw is imported.  It keeps, per topic, what the document says a client keeps
-- the epoch and offset of its last item and the view built from the snapshot and deltas
(the merge rules of the hub's ``hello``) -- and checks the document's rule for every delta:
its ``from`` is the offset the client holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from wsclient import WsClient

CBOR, JSON = "edgegw.live.v1.cbor", "edgegw.live.v1.json"


@dataclass
class Topic:
    epoch: str
    offset: int
    view: Any
    snapshots: int = 0
    deltas: int = 0
    resyncs: list[str] = field(default_factory=list)


class PeerDashboard:
    def __init__(self, client: WsClient, hello: dict[str, Any]) -> None:
        self.client = client
        self.hello = hello
        self.topics: dict[str, Topic] = {}
        self.replies: list[dict[str, Any]] = []  # everything but batches, in order
        self.batches: list[dict[str, Any]] = []
        self.frame_kinds: set[type] = set()  # str (text frames) or bytes (binary)

    @classmethod
    async def connect(cls, port: int, subprotocol: str | None = None) -> PeerDashboard:
        client = await WsClient.connect(port, "/ws/live",
                                        subprotocols=[subprotocol] if subprotocol else None)
        self = cls(client, {})
        self.hello = await self._read()
        return self

    async def _read(self) -> dict[str, Any]:
        raw = await self.client.recv()
        self.frame_kinds.add(type(raw))
        message = json.loads(raw) if isinstance(raw, str) else cbor2.loads(raw)
        assert isinstance(message, dict) and "type" in message, message
        return message

    async def request(self, message: dict[str, Any], as_json: bool = False) -> None:
        await self.client.send(json.dumps(message) if as_json else cbor2.dumps(message))

    async def subscribe(self, topics: list[str], resume: dict[str, list[Any]] | None = None,
                        id: Any = 1) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "id": id, "topics": topics}
        if resume is not None:
            message["resume"] = resume
        await self.request(message)
        return await self.reply("subscribed")

    async def reply(self, kind: str) -> dict[str, Any]:
        """Read (applying batches) until a reply of ``kind``."""
        while True:
            message = await self.read()
            if message["type"] == kind:
                return message

    async def read(self) -> dict[str, Any]:
        message = await self._read()
        if message["type"] == "batch":
            self.batches.append(message)
            for item in message["items"]:
                self.apply(item)
        else:
            self.replies.append(message)
        return message

    async def until(self, done: Any) -> None:
        """Read until ``done(self)`` (within 10 s)."""
        with trio.fail_after(10):
            while not done(self):
                await self.read()

    def apply(self, item: dict[str, Any]) -> None:
        name = item["topic"]
        if item["type"] == "snapshot":
            topic = self.topics.get(name)
            if topic is None:
                topic = self.topics[name] = Topic(item["epoch"], item["offset"], None)
            topic.epoch, topic.offset, topic.view = item["epoch"], item["offset"], item["data"]
            topic.snapshots += 1
            if "resync" in item:
                topic.resyncs.append(item["resync"])
            return
        assert item["type"] == "delta", item
        topic = self.topics[name]
        # "A client must check that `from` equals the offset it holds"
        assert item["from"] == topic.offset, (item, topic)
        assert item["epoch"] == topic.epoch
        assert item["offset"] > item["from"]
        for delta in item["data"]:
            topic.view = self.merge(name, topic.view, delta)
        topic.offset = item["offset"]
        topic.deltas += 1

    def merge(self, name: str, view: Any, delta: dict[str, Any]) -> Any:
        """live-topics.md, "Applying a delta", with the rules the hub's hello sent."""
        view = dict(view or {})
        rules = {r["key"]: r for r in self.hello.get("merge", [])
                 if matches(r["topics"], name)}
        for key, value in delta.items():
            rule = rules.get(key)
            if rule is None:
                view[key] = value
            elif rule["op"] == "append":
                view[rule["into"]] = (list(view.get(rule["into"]) or []) + value)[
                    -rule["keep"]:]
            elif rule["op"] == "prepend":
                view[rule["into"]] = [value, *(view.get(rule["into"]) or [])][
                    :rule["keep"]]
            else:  # upsert: a row already there is replaced where it is, a new one added
                view[rule["into"]] = upsert(list(view.get(rule["into"]) or []),
                                            value if isinstance(value, list) else [value],
                                            rule["by"], rule.get("order", "oldest_first"))
        return view

    async def close(self) -> tuple[int, str]:
        return await self.client.close()


def matches(pattern: str, topic: str) -> bool:
    """MQTT-style matching as live-protocol.md, "Topics and patterns", defines it."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def upsert(rows: list[Any], new: list[Any], by: Any, order: str) -> list[Any]:
    """The `upsert` rule: identity by list positions (``by`` a list) or by a field."""
    def key(row: Any) -> Any:
        return tuple(row[i] for i in by) if isinstance(by, list) else row[by]
    where = {key(row): i for i, row in enumerate(rows)}
    for row in new:
        if key(row) in where:
            rows[where[key(row)]] = row
        elif order == "newest_first":
            rows.insert(0, row)
            where = {key(r): i for i, r in enumerate(rows)}
        else:
            where[key(row)] = len(rows)
            rows.append(row)
    return rows
