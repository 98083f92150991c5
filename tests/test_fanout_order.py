"""The order of a /ws/live client's frames when its socket is full: a tick writes straight to
a client's socket only while the client's sender is parked with nothing left over
(edgegw/hub/fanout/service.py, ``LiveFanout._write``).

A tick that finds a client's socket full leaves the frame it could not write for the
client's sender task and wakes it; until that task runs, the sender still counts as parked.
A tick right behind (the next one, when a tick took longer than the UI interval) must not
write to that socket itself: it would send a later frame before the one left over, or --
with the socket still full -- leave its own frame in the left-over's place, and the first
one would be lost.  Here the ticks run back to back (``LiveFanout.tick`` does not yield), so
no sender runs between them, against a real client that stops reading.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import cbor2
import trio
from test_fanout import RawClient, start_live_hub, wait_for

TOPIC = "sensor/a"


def client_stats(fanout: Any) -> dict[str, Any]:
    (client,) = fanout.stats()["clients"]
    return client


def frame_length(payload: bytes) -> int:
    """The bytes a server frame with this payload took on the wire (unmasked)."""
    n = len(payload)
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


async def test_ticks_behind_a_full_socket_leave_the_frames_to_the_sender_in_order(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, port, fanout, _ = await start_live_hub(
            nursery, tmp_path, queue_frames=100_000, stall_timeout=60.0)
        client = await RawClient.connect(port, [TOPIC])  # it reads nothing until the end
        await wait_for(lambda: len(fanout.stats()["clients"]) == 1
                       and client_stats(fanout)["subscriptions"])
        # A few ticks at a UI-like pace: the snapshot, then deltas, each written whole.
        for i in range(10):
            fanout.publish(TOPIC, {"n": 0, "warm_up": i})
            fanout.tick()
            await trio.sleep(0.02)
        before = client_stats(fanout)
        assert before["frames_sent"] == before["frames_queued"]

        # Ticks back to back, a small delta each, until one met the full socket and two
        # more came behind it.  (Frames far smaller than what the kernel's send queue
        # takes at once: the tick that meets the full socket writes nothing of its frame,
        # which is left over whole -- checked below.)
        n = 0
        while client_stats(fanout)["frames_queued"] - client_stats(fanout)["frames_sent"] < 3:
            n += 1
            assert n < 5_000, "the socket never filled"
            fanout.publish(TOPIC, {"n": n, "pad": "x" * 100})
            fanout.tick()
        full = client_stats(fanout)
        written = full["frames_sent"] - before["frames_sent"]  # by the ticks, whole

        # Now the client reads: the sender writes the frame left over, then the rest.
        items: list[tuple[int, dict[str, Any]]] = []  # (frame length, item) of each batch
        with trio.fail_after(10):
            async for _, payload in client.frames():
                message = cbor2.loads(payload)
                if message["type"] == "batch":
                    (item,) = message["items"]
                    items.append((frame_length(payload), item))
                    if item["type"] == "delta" and item["data"][-1]["n"] == n:
                        break
        deltas = [(length, item) for length, item in items
                  if item["type"] == "delta" and item["data"][-1]["n"] > 0]
        assert [item["data"][-1]["n"] for _, item in deltas] == list(range(1, n + 1))
        for (_, earlier), (_, later) in pairwise(items):
            assert later["from"] == earlier["offset"], "a gap in the offsets"
        # What this test is about: the tick that met the full socket wrote nothing of its
        # frame (a frame begun is finished by the sender, and no tick writes to a socket
        # whose frame is half-written; that case needs no more than this).
        assert full["bytes_sent"] - before["bytes_sent"] == sum(
            length for length, _ in deltas[:written]), \
            "the socket filled in the middle of a frame: this kernel took part of it"
        client.sock.close()
        nursery.cancel_scope.cancel()
