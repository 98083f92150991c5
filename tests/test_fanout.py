"""/ws/live on a real hub over loopback: a simulated tester -> gateway -> hub -> live state ->
fan-out -> WebSocket clients.  Slow and stalled clients are real sockets that stop reading."""

from __future__ import annotations

import gc
import json
import socket
import time
import weakref
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import http_get, start_tester
from trio_websocket import open_websocket_url

from edgegw.config import build
from edgegw.hub import GcPacer, HubConfig, Ingest
from edgegw.hub.fanout import (
    CLOSE_TOO_SLOW,
    SUBPROTOCOL_CBOR,
    SUBPROTOCOL_JSON,
    LiveConfig,
    LiveFanout,
)
from edgegw.hub.live import LiveState

TOKEN = "s3cret"


async def start_live_hub(nursery: trio.Nursery, tmp: Path, **live: Any) -> tuple[Ingest, int,
                                                                                 LiveFanout,
                                                                                 LiveState]:
    hub = Ingest(build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp / "hub")},
                                "gateways": {"ate-01": {"token": TOKEN}}}))
    fanout = LiveFanout(LiveConfig(**live), metrics=hub.metrics)
    state = LiveState(fanout.publish, metrics=hub.metrics)
    fanout.attach(state)
    hub.add_consumer(state)
    fanout.install(hub.http)
    port = await nursery.start(hub.run)
    await nursery.start(fanout.run)
    return hub, port, fanout, state


class LiveView:
    """A /ws/live client that applies what it gets, like the dashboard does."""

    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {}
        self.offsets: dict[str, int] = {}
        self.batches: list[float] = []  # receipt times
        self.messages: list[dict[str, Any]] = []

    def apply(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        if msg["type"] != "batch":
            return
        self.batches.append(time.monotonic())
        for item in msg["items"]:
            topic = item["topic"]
            if item["type"] == "snapshot":
                view = dict(item["data"])
                view["dies"] = {(d[0], d[1]): d for d in view.get("dies", [])}
            else:
                assert self.offsets[topic] == item["from"], f"gap on {topic}"
                view = self.views[topic]
                for delta in item["data"]:
                    for key, value in delta.items():
                        if key == "dies":
                            view["dies"].update({(d[0], d[1]): d for d in value})
                        else:
                            view[key] = value
            self.views[topic] = view
            self.offsets[topic] = item["offset"]


async def follow(port: int, topics: list[str], view: LiveView, json_text: bool = False, *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    proto = SUBPROTOCOL_JSON if json_text else SUBPROTOCOL_CBOR
    async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/live", subprotocols=[proto]) as ws:
        assert ws.subprotocol == proto
        sub = {"type": "subscribe", "id": 1, "topics": topics}
        await ws.send_message(json.dumps(sub) if json_text else cbor2.dumps(sub))
        task_status.started()
        while True:
            data = await ws.get_message()
            assert isinstance(data, str) is json_text
            view.apply(json.loads(data) if json_text else cbor2.loads(data))


async def wait_for(predicate: Any, seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.02)


async def test_subscribers_get_a_snapshot_then_deltas_equal_to_the_hub_state(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _hub, port, fanout, state = await start_live_hub(nursery, tmp_path)
        early, late_json = LiveView(), LiveView()
        await nursery.start(follow, port, ["lot/+/wafer/+", "gateway/#"], early)
        gateway = await start_tester(nursery, tmp_path, port, TOKEN, parts_per_second=600,
                                     wafer_diameter_dies=16, max_parts=300)
        await wait_for(lambda: any(t.startswith("lot/") for t in early.views))
        # A client that joins mid-wafer starts from a snapshot, in JSON.
        await nursery.start(follow, port, ["lot/LOT0001/#"], late_json, True)
        source = gateway.sources[0][1]
        await wait_for(lambda: source.finished.is_set(), 20)
        wafer_topics = [t for t in state.topics() if "/wafer/" in t]
        assert wafer_topics

        def settled() -> bool:
            return all(
                {tuple(d[:2]): d for d in state.snapshot(t)["dies"]} == {
                    k: v for k, v in v.views.get(t, {}).get("dies", {}).items()}
                for t in wafer_topics for v in (early, late_json))

        await wait_for(settled, 10)
        for topic in wafer_topics:
            snap = state.snapshot(topic)
            for view in (early, late_json):
                assert view.views[topic]["good"] == snap["good"]
                assert view.views[topic]["hard_bins"] == snap["hard_bins"]
        # early saw the first snapshot and then only deltas; late got a snapshot mid-stream
        kinds = [i["type"] for m in early.messages if m["type"] == "batch"
                 for i in m["items"] if i["topic"] == wafer_topics[0]]
        assert kinds[0] == "snapshot" and set(kinds[1:]) == {"delta"}
        assert "gateway/ate-01" in early.views and early.views["gateway/ate-01"]["online"]
        assert "lot/LOT0001" in late_json.views  # '#' includes the parent level
        # never more than ui_rate frames per second per client (small slack for timing)
        span = early.batches[-1] - early.batches[0]
        assert (len(early.batches) - 1) / span <= fanout.config.ui_rate * 1.1
        nursery.cancel_scope.cancel()


class RawClient:
    """A bare WebSocket client on a trio socket with a tiny receive buffer: a client that
    stops reading makes the hub's writes to it block within a few frames."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    async def connect(cls, port: int, topics: list[str]) -> RawClient:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        self = cls(sock)
        await sock.send(b"GET /ws/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Protocol: edgegw.live.v1.cbor\r\n\r\n")
        while b"\r\n\r\n" not in self.buf:
            self.buf += await sock.recv(65536)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert b" 101 " in head
        payload = cbor2.dumps({"type": "subscribe", "id": 1, "topics": topics})
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await sock.send(bytes((0x82, 0x80 | len(payload))) + mask + masked)
        return self

    async def frames(self) -> Any:
        """(opcode, payload) of each server frame until the connection ends."""
        while True:
            while len(self.buf) >= 2:
                n = self.buf[1] & 0x7F
                at = 2
                if n == 126:
                    n, at = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(self.buf[2:10], "big"), 10
                if len(self.buf) < at + n:
                    break
                yield self.buf[0] & 0x0F, self.buf[at:at + n]
                self.buf = self.buf[at + n:]
            data = await self.sock.recv(1 << 20)
            if not data:
                return
            self.buf += data


async def publish_load(fanout: LiveFanout, topic: str, seconds: float, *,
                       per_10ms: int = 20, event: bool = False) -> int:
    """Deltas of ~8 KB at 2,000/s, published as the live state would."""
    pad = "x" * 8000
    n = 0
    t_end = trio.current_time() + seconds
    while trio.current_time() < t_end:
        for _ in range(per_10ms):
            n += 1
            delta: dict[str, Any] = {"latest": {"n": n, "t": time.time()}, "pad": pad}
            if event:
                delta["event"] = "raised"
            fanout.publish(topic, delta)
        await trio.sleep(0.01)
    return n


async def test_a_stalled_client_is_closed_and_never_slows_the_others(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port, fanout, _state = await start_live_hub(
            nursery, tmp_path, queue_frames=8, stall_timeout=1.0, close_grace=0.5)
        viewers = [LiveView() for _ in range(3)]
        for v in viewers:
            await nursery.start(follow, port, ["sensor/+"], v)
        stalled = await RawClient.connect(port, ["sensor/+"])
        await wait_for(lambda: len(fanout.core.clients) == 4)
        stalled_id = max(fanout.core.clients)

        ticks0, t0 = fanout.ticks, time.monotonic()
        async with trio.open_nursery() as load:
            load.start_soon(publish_load, fanout, "sensor/probe", 4.0)
            await trio.sleep(0.6)
            # Mid-way, the stats page shows who is behind: per-client queue depth.
            _, stats = await http_get(port, "/api/live/stats")
            depth = {c["id"]: (c["queue_depth"], c["lagging"]) for c in stats["clients"]}
            assert depth[stalled_id][0] > 0 or depth[stalled_id][1]
            assert all(d <= 1 for cid, (d, _) in depth.items() if cid != stalled_id), depth
        n = fanout.core.channels["sensor/probe"].offset
        ticks, t1 = fanout.ticks - ticks0, time.monotonic()
        await trio.sleep(0.2)

        # The stalled one was closed as too slow ...
        assert stalled_id not in fanout.core.clients
        assert hub.metrics.counter("live_slow_clients_total").get(action="closed") == 1
        # ... and the others got a frame on every tick (whatever this machine's load lets
        # the ticker do), within the UI rate, in step, with fresh data.
        assert ticks <= (t1 - t0) * fanout.config.ui_rate + 1
        for v in viewers:
            assert v.views["sensor/probe"]["latest"]["n"] == n
            # every frame of those ticks, received by now (on a loaded machine the last
            # ones arrive after t1; nothing is published after it, so none is extra)
            frames = sum(1 for t in v.batches if t >= t0)
            assert frames >= ticks - 2, (frames, ticks)
        stalled.sock.close()
        nursery.cancel_scope.cancel()


async def test_a_client_that_falls_behind_on_alerts_is_told_4008(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        _hub, port, fanout, _state = await start_live_hub(nursery, tmp_path, queue_frames=4,
                                                          close_grace=10.0)
        fanout.publish("alert/P0/yield_low", {"event": "raised", "alert": {"id": "a0"}})
        slow = await RawClient.connect(port, ["alert/#"])
        await wait_for(lambda: any(c.positions for c in fanout.core.clients.values()))
        # It reads nothing while 2 s of events pile up, then pings (the hub's pong must not
        # land inside the frame it is in the middle of) and reads everything.
        await publish_load(fanout, "alert/P0/yield_low", 2.0, event=True)
        await slow.sock.send(bytes((0x89, 0x82)) + b"\x00\x00\x00\x00" + b"hi")
        # Closed by the hub; its last write may still finish (close_grace), then 4008.
        [client] = fanout.core.clients.values()
        assert client.closed and client.close_code == CLOSE_TOO_SLOW and not client.queue
        frames = [frame async for frame in slow.frames()]
        opcode, payload = frames[-1]
        assert opcode == 0x8  # a clean close frame after the last whole message
        assert int.from_bytes(payload[:2], "big") == CLOSE_TOO_SLOW
        assert payload[2:] == b"too slow"
        # every frame whole: data frames decode, a pong (if it got out) carries the ping's
        assert all(cbor2.loads(p)["type"] for op, p in frames[:-1] if op == 0x2)
        assert {op for op, _ in frames[:-1]} <= {0x2, 0xA}
        assert all(p == b"hi" for op, p in frames if op == 0xA)
        slow.sock.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("writer", ["write_thread", "write_process"])
async def test_frames_the_writer_thread_begins_reach_slow_readers_whole_and_in_order(
        tmp_path: Path, writer: str) -> None:
    """A tick's writes can go to a worker thread, or a writer process, as one batch
    (``live.write_thread``, ``live.write_process``, off by default: docs/performance.md
    says why).  Readers that read in small
    sips make their sockets take a frame in part: the rest is written by the client's own
    sender before anything else, so every client gets every event exactly once, in order,
    in whole frames -- its pongs too -- and a client that vanishes mid-batch costs the
    others nothing."""
    async with trio.open_nursery() as nursery:
        _hub, port, fanout, _state = await start_live_hub(
            nursery, tmp_path, queue_frames=10_000, stall_timeout=30.0, **{writer: True})
        assert fanout.write_in_thread or fanout.writer.ready
        fanout.publish("alert/P0/yield_low", {"event": "raised", "n": 0})
        clients = [await RawClient.connect(port, ["alert/#"]) for _ in range(6)]
        gone = await RawClient.connect(port, ["alert/#"])
        await wait_for(lambda: sum(bool(c.positions)
                                   for c in fanout.core.clients.values()) == 7)
        received: list[list[tuple[int, bytes]]] = [[] for _ in clients]
        pings = [0] * len(clients)

        async def sip(k: int, client: RawClient) -> None:
            async for frame in client.frames():  # 4 KB buffers, and a pause per frame
                received[k].append(frame)
                await trio.sleep(0.002)

        async with trio.open_nursery() as readers:
            for k, client in enumerate(clients):
                readers.start_soon(sip, k, client)
            n = 0
            end = trio.current_time() + 1.5
            while trio.current_time() < end:
                for _ in range(4):
                    n += 1
                    fanout.publish("alert/P0/yield_low",
                                   {"event": "raised", "n": n, "pad": "x" * 6000})
                if n == 200:
                    gone.sock.close()  # mid-load, with frames on their way to it
                k = n // 4 % 6
                if n % 100 == 0:  # a ping: its pong must not land inside a frame
                    await clients[k].sock.send(
                        bytes((0x89, 0x82)) + b"\x00\x00\x00\x00" + b"hi")
                # a request: its reply is queued while a batch may hold the client's frame
                pings[k] += 1
                request = cbor2.dumps({"type": "ping", "id": pings[k]})
                await clients[k].sock.send(bytes((0x82, 0x80 | len(request)))
                                           + b"\x00\x00\x00\x00" + request)
                await trio.sleep(0.01)

            def caught_up(k: int) -> bool:  # the last event and the last reply are in
                messages = [cbor2.loads(p) for op, p in received[k] if op == 0x2]
                return (any(d.get("n") == n for m in messages[-8:] if m["type"] == "batch"
                            for i in m["items"] for d in i["data"])
                        and sum(m["type"] == "pong" for m in messages) == pings[k])

            await wait_for(lambda: all(caught_up(k) for k in range(len(clients))), 20)
            readers.cancel_scope.cancel()
        stats = fanout.stats()
        assert stats["write_batches"] > 0
        assert stats["write_batch_partial"] > 0  # the rule under test did come into play
        # the vanished one is gone, nobody else (the hub notices it in its own time: on a
        # busy machine that may be after the others have caught up)
        await wait_for(lambda: len(fanout.core.clients) <= 6, 40)
        assert len(fanout.core.clients) == 6
        for frames in received:
            events = [d["n"] for op, p in frames if op == 0x2
                      for i in cbor2.loads(p).get("items", ()) for d in i["data"]]
            assert events == list(range(events[0], n + 1))  # none lost, repeated, reordered
            pongs = [m["id"] for m in (cbor2.loads(p) for op, p in frames if op == 0x2)
                     if m["type"] == "pong"]
            assert pongs == list(range(1, len(pongs) + 1))
            assert {p for op, p in frames if op == 0xA} <= {b"hi"}
        for client in clients:
            client.sock.close()
        nursery.cancel_scope.cancel()


class _Cyclic:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


async def test_the_gc_pacer_keeps_the_live_state_out_of_full_collections() -> None:
    # Issue 6: CPython's full collections walked the hub's whole live state every ~15 s and
    # held the event loop for 80-240 ms.  Frozen objects are never walked.
    live_state = [[i] for i in range(50_000)]  # long-lived containers, like the dies
    pacer = GcPacer(freeze_every=0.05, full_every=0.6)
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        assert gc.get_freeze_count() >= len(live_state)
        walked = {id(o) for o in gc.get_objects()}  # what any collection would look at
        assert not any(id(row) in walked for row in live_state)
        # Only one pacer per process: the collector's generations are process-wide.
        second = GcPacer(freeze_every=0.01)
        await nursery.start(second.run)
        # Cyclic garbage that was frozen is not found by the ordinary collections ...
        cycle = _Cyclic()
        gone = weakref.ref(cycle)
        await trio.sleep(0.2)  # a few freezes: it is frozen now
        del cycle
        gc.collect()
        assert gone() is not None
        # ... but by the pacer's periodic full sweep.
        with trio.fail_after(5):
            while gone() is not None:
                await trio.sleep(0.05)
        assert pacer.full_sweeps >= 1 and pacer.freezes >= 3 and second.freezes == 0
        nursery.cancel_scope.cancel()
    assert gc.get_freeze_count() == 0  # everything handed back to the collector
    assert live_state[-1] == [49_999]
