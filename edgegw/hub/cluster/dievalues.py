"""Per-die test values on every cluster node (``GET /api/lots/<lot>/wafers/<w>/tests/<n>``,
docs/cluster.md "Per-die test values").

A wafer's per-die values (one test's value on each die, for a map coloured by a test) are
kept only in the live state of the lot's partition, on its owner, and change with every
part: they are neither a topic (a lot has thousands of tests) nor in PostgreSQL in a form
cheaper than replaying the lot.  So the owner answers: a node that owns the lot's
partition answers from its own state; any other node asks over Redis --

1. ``dv? <id> <json [lot, wafer, test]>`` on the notice channel (every node hears it; only
   the owner of the lot's partition, rebuilt to the head of its log, answers);
2. the owner computes the single hub's answer (``edgegw.hub.history.die_values``) and
   leaves it under ``{prefix}:reply:<id>`` for ``reply_ttl_s`` (``ClusterBus.put_reply``),
   then sends ``dv= <id>``;
3. the asking node takes it (``take_reply``) and answers its client.

No answer within ``timeout_s`` (the partition is moving to a new owner, which is
rebuilding it; Redis is away): **503** ``{"error": ..., "retry": true}`` -- never a wrong or
partial answer; the dashboard asks again.  Two owners for a moment (one that has not yet
noticed its lease expired) give the same answer; the last one stands.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable
from typing import Any

import trio

from edgegw.hub.history import Result, die_values
from edgegw.hub.live import LiveState

from .partition import partition_of

log = logging.getLogger("edgegw.hub.cluster.dievalues")


class DieValues:
    """Asks and answers per-die values across nodes (module docstring).  ``state_for(p)``
    is this node's rebuilt live state of partition ``p``, or None."""

    def __init__(self, bus: Any, state_for: Callable[[int], LiveState | None],
                 n_partitions: int, *, timeout_s: float = 3.0,
                 reply_ttl_s: float = 10.0) -> None:
        self.bus = bus
        self.state_for = state_for
        self.n_partitions = n_partitions
        self.timeout_s = timeout_s
        self.reply_ttl_s = reply_ttl_s
        self._waiting: dict[str, trio.Event] = {}
        self._send, self._receive = trio.open_memory_channel[tuple[str, str, str, str]](
            math.inf)  # requests to answer: few (a user opens a map), never dropped
        self.answered = 0
        self.asked = 0

    async def ask(self, lot: str, wafer: str, test: str) -> Result:
        """The single hub's answer, from whichever node owns the lot's partition."""
        state = self.state_for(partition_of(lot, self.n_partitions))
        if state is not None:
            return die_values(state, lot, wafer, test)
        request_id = secrets.token_hex(8)
        event = self._waiting[request_id] = trio.Event()
        self.asked += 1
        try:
            await self.bus.notify("notice", b"dv? " + request_id.encode() + b" "
                                  + json.dumps([lot, wafer, test]).encode())
            with trio.move_on_after(self.timeout_s):
                await event.wait()
            # (also after a timeout: the "dv=" notice may be what got lost)
            raw = await self.bus.take_reply(request_id)
        except Exception as exc:  # Redis away
            log.debug("die values: asking the owner failed: %s", exc)
            raw = None
        finally:
            self._waiting.pop(request_id, None)
        if raw is None:
            return 503, {"error": f"the owner of lot {lot!r} did not answer within "
                                  f"{self.timeout_s:g} s (its partition may be moving to "
                                  "another node); try again", "retry": True}
        status, body = json.loads(raw)
        return int(status), body

    def on_notice(self, kind: str, rest: str) -> None:
        """A ``dv?`` or ``dv=`` notice (the bus's task: quick, the work is queued)."""
        request_id, _, payload = rest.partition(" ")
        if kind == "dv=":
            event = self._waiting.get(request_id)
            if event is not None:
                event.set()
            return
        try:
            lot, wafer, test = (str(x) for x in json.loads(payload))
        except (ValueError, TypeError):
            log.warning("die values: request not understood: %r", rest[:100])
            return
        if self.state_for(partition_of(lot, self.n_partitions)) is not None:
            self._send.send_nowait((request_id, lot, wafer, test))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        async for request_id, lot, wafer, test in self._receive:
            state = self.state_for(partition_of(lot, self.n_partitions))
            if state is None:
                continue  # the partition left this node meanwhile: its new owner answers
            status, body = die_values(state, lot, wafer, test)
            try:
                await self.bus.put_reply(request_id, json.dumps([status, body]).encode(),
                                         self.reply_ttl_s)
                await self.bus.notify("notice", b"dv= " + request_id.encode())
                self.answered += 1
            except Exception as exc:  # Redis away: the asker answers 503
                log.debug("die values: answer not left: %s", exc)


__all__ = ["DieValues"]
