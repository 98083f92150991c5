"""The parts of a frame split for the hub reach its live state in record order.

A gateway cuts a stored frame that is over the hub's limits as it sends it: the frame
keeps its first part, the other parts are stored as new frames at the end of the sequence
space (docs/protocol.md, "Frames over the hub's limits").  The gateway sends the parts
right after the frame they were cut from, before the frames stored after it, so that a
hub gets each gateway's records in record order (a hub that ties a part's parametric
results to its part result by arrival would otherwise give a PRR cut away from its PTRs
the wrong die's values; edgegw's live state ties them by record id since, and takes its
cheap in-order path).

Here a gateway stores a wafer's records while its hub is away, in frames of 50 records;
the hub takes 7 records a frame, so every frame is cut, mostly between a part's PTRs and
its PRR.  The hub's live state must be what the same records give applied in order,
unsplit.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from disktools import HeldCommits
from hubtools import gateway_config, hub_config
from ports import free_port
from trio_websocket import open_websocket_url

from edgegw.gateway import Gateway
from edgegw.hub import Hub
from edgegw.hub.history import die_values
from edgegw.hub.live import LiveState
from edgegw.protocol import Ack, GatewayConnection, to_rows
from edgegw.sim import SimulatedConfig, simulated_batches
from edgegw.spool import DiskSpool, SpoolConfig
from tests.cluster_reference import comparable, lot_topics

SOURCE = {"seed": 3, "sites": 4, "wafers": 1, "tests_per_part": 4, "lots": 1,
          "wafer_diameter_dies": 6, "lot_id": "L3"}
FRAME_RECORDS = 50  # what the gateway stores in a frame


def a_wafers_records() -> list[Any]:
    ticks = itertools.count()
    return [r for batch, _ in simulated_batches(SimulatedConfig(**SOURCE), "tester",
                                                clock=lambda: 1.7e9 + next(ticks) * 0.01)
            for r in batch]


def in_order(records: list[Any]) -> LiveState:
    """The live state of the records applied in order, in the frames they were stored in."""
    state = LiveState(lambda topic, delta: None)
    for i in range(0, len(records), FRAME_RECORDS):
        state.on_records("ate-01", i + 1, records[i:i + FRAME_RECORDS], now=1.7e9)
    return state


async def spool_while_the_hub_is_away(tmp: Path, spool_dir: Path, records: list[Any]) -> int:
    """Store ``records`` in frames of ``FRAME_RECORDS`` with no hub to send them to; the
    number of frames stored."""
    cfg = gateway_config(tmp, 1, spool={"dir": str(spool_dir)},
                         batch={"max_records": FRAME_RECORDS, "max_delay_ms": 3_600_000})
    gateway = Gateway(cfg)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await gateway.sink.put(records, source="tester")
            await gateway.flush()
            while gateway.store.next_seq <= -(-len(records) // FRAME_RECORDS):
                await trio.sleep(0.01)
            n = gateway.store.next_seq - 1
            nursery.cancel_scope.cancel()
    return n


class SnapshotSpool(DiskSpool):
    """The real spool; a copy of its directory right after frame ``at`` is durable is what
    a SIGKILL at that point leaves behind."""

    def __init__(self, config: SpoolConfig, at: int, image: Path) -> None:
        super().__init__(config)
        self.at, self.image = at, image

    async def append(self, body: bytes, n_records: int, checkpoints: dict[str, Any],
                     **kwargs: Any) -> int:
        seq = await super().append(body, n_records, checkpoints, **kwargs)
        if seq == self.at:
            await trio.to_thread.run_sync(shutil.copytree, self.directory, self.image)
        return seq


async def hub_state_after_sending(tmp: Path, records: list[Any], spool_dir: Path,
                                  snapshot: tuple[int, Path] | None = None, **hub: Any
                                  ) -> tuple[LiveState, Gateway]:
    """A fresh hub's live state once a gateway sent it what ``spool_dir`` holds (and
    every record of ``records`` was applied).  ``snapshot``: the gateway's spool is copied
    right after that frame is durable."""
    async with trio.open_nursery() as nursery:
        the_hub = Hub(hub_config(tmp / "hub", checkpoint_interval_s=0, **hub))
        port = await nursery.start(the_hub.run)
        cfg = gateway_config(tmp / "gw", port, spool={"dir": str(spool_dir)},
                             uplink={"probe_interval_s": 0.1, "backoff_max_s": 0.1},
                             batch={"max_records": FRAME_RECORDS})
        assert cfg.spool is not None
        store = None if snapshot is None else SnapshotSpool(cfg.spool, *snapshot)
        gateway = Gateway(cfg, store=store)
        await nursery.start(gateway.run)
        await all_sent_and_fed(gateway, the_hub, len(records))
        nursery.cancel_scope.cancel()
    assert the_hub.ingest.records_fed == len(records), "each record once"
    return the_hub.state, gateway


async def all_sent_and_fed(gateway: Gateway, hub: Hub, n: int) -> None:
    """Wait until the gateway has every frame acknowledged and the hub fed ``n`` records."""
    with trio.fail_after(20):
        while not (gateway.store.first_unacked >= gateway.store.next_seq
                   and hub.ingest.records_fed >= n):
            await trio.sleep(0.02)


def assert_same_state(got: LiveState, want: LiveState) -> None:
    want_topics = comparable(lot_topics(want), set())
    got_topics = comparable(lot_topics(got), set())
    assert sorted(got_topics) == sorted(want_topics)
    for topic, view in want_topics.items():
        assert got_topics[topic] == view, topic
    # and each die's test values (the wafer map by test value): the PTRs of its own part
    n_values = 0
    for lot_id, lot in want.lots.items():
        for wafer_id in lot.wafers:
            for test_num in lot.tests:
                _, dies = die_values(want, lot_id, wafer_id, str(test_num))
                _, got_dies = die_values(got, lot_id, wafer_id, str(test_num))
                assert sorted(got_dies["dies"]) == sorted(dies["dies"]), (wafer_id, test_num)
                n_values += len(dies["dies"])
    assert n_values > 0


@pytest.mark.parametrize("max_records", [100_000, 7], ids=["whole", "split"])
async def test_the_hubs_live_state_is_the_in_order_state_whether_or_not_frames_are_split(
        tmp_path: Path, max_records: int) -> None:
    records = a_wafers_records()
    assert len(records) > 3 * FRAME_RECORDS
    frames = await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    assert frames == -(-len(records) // FRAME_RECORDS)
    state, gateway = await hub_state_after_sending(tmp_path, records, tmp_path / "spool",
                                                   max_records_per_frame=max_records)
    split = gateway.metrics.counter("uplink_frames_split_total").total()
    assert split == (0 if max_records > FRAME_RECORDS else frames)
    assert_same_state(state, in_order(records))


async def test_after_a_crash_in_the_middle_of_a_split_the_parts_still_follow_their_frame(
        tmp_path: Path) -> None:
    """The gateway stopped (a crash image) with frame 1 cut and 4 of its 7 parts stored
    as frames 5 to 8.  Restarted, towards a hub that has nothing: it sends frame 1's first
    part, stores the other 3 parts, sends all 7 in record order, and only then frame 2.
    The split's progress names the parts stored before the crash: without it they would
    go after frames 2 to 4."""
    records = a_wafers_records()
    frames = await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    image = tmp_path / "image"
    await hub_state_after_sending(tmp_path / "a", records, tmp_path / "spool",
                                  (frames + 4, image), max_records_per_frame=7)
    assert image.exists()
    state, gateway = await hub_state_after_sending(tmp_path / "b", records, image,
                                                   max_records_per_frame=7)
    assert_same_state(state, in_order(records))
    assert gateway.metrics.counter("uplink_frames_rejected_total").total() == 0


class RecentFrom(DiskSpool):
    """The real spool, whose frames from ``recent`` on count as made in the last 2 s (the
    uplink sends them first, as live, on the next connection)."""

    def __init__(self, config: SpoolConfig, recent: int) -> None:
        super().__init__(config)
        self.recent = recent

    def first_seq_since(self, age_s: float) -> int:
        return min(self.recent, super().first_seq_since(age_s))


async def test_parts_made_just_before_a_reconnect_still_wait_for_their_frame(
        tmp_path: Path) -> None:
    """Frame 1 was cut and its 8 parts stored just before the link went: on the next
    connection they are live (made in the last 2 s), frame 1 is backlog.  The live lane
    goes first and passes them; they go right after frame 1.  (The hub takes 6 records a
    frame: frame 1's first part ends between the first die's PTRs and its PRR.)"""
    records = a_wafers_records()
    frames = await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    image = tmp_path / "image"
    await hub_state_after_sending(tmp_path / "a", records, tmp_path / "spool",
                                  (frames + 8, image), max_records_per_frame=6)
    async with trio.open_nursery() as nursery:
        the_hub = Hub(hub_config(tmp_path / "hub", checkpoint_interval_s=0,
                                 max_records_per_frame=6))
        port = await nursery.start(the_hub.run)
        cfg = gateway_config(tmp_path / "gw", port, spool={"dir": str(image)},
                             uplink={"probe_interval_s": 0.1},
                             batch={"max_records": FRAME_RECORDS})
        assert cfg.spool is not None
        gateway = Gateway(cfg, store=RecentFrom(cfg.spool, frames + 1))
        await nursery.start(gateway.run)
        await all_sent_and_fed(gateway, the_hub, len(records))
        nursery.cancel_scope.cancel()
    assert the_hub.ingest.records_fed == len(records), "each record once"
    assert gateway.uplink is not None and gateway.uplink.scheduler is not None
    assert gateway.uplink.scheduler.live_from == frames + 1, "the parts were live"
    assert_same_state(the_hub.state, in_order(records))


async def test_a_hub_that_takes_no_sequence_gap_gets_every_record_once(tmp_path: Path) -> None:
    """Parts sent right after their frame leave a gap (the frames stored between them)
    for a moment; a hub with ``max_holes = 0`` closes the link for it.  The gateway then
    sends the parts in sequence order, as any frame, and every record arrives once (their
    order then is that of the sequence numbers)."""
    records = a_wafers_records()
    await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    _, gateway = await hub_state_after_sending(tmp_path, records, tmp_path / "spool",
                                               max_records_per_frame=7, max_holes=0)
    assert gateway.uplink.parts_in_seq_order
    # closed once for that gap, not again and again on the next connections for the parts
    # (or any frame) sent ahead of frames stored before them
    assert gateway.metrics.counter("uplink_failures_total").total() == 1


async def send_frames(port: int, epoch: str, frames: list[tuple[int, bytes]]) -> None:
    """What a gateway whose link died after them sent: these DATA frames, each applied
    (acknowledged) before the link goes."""
    url = f"ws://127.0.0.1:{port}/ws/gateway"
    async with open_websocket_url(url) as ws:
        conn = GatewayConnection("ate-01", "s3cret", epoch, 1, heartbeat=5.0, now=0.0)
        await ws.send_message(conn.hello(trio.current_time()))
        while conn.welcome is None:
            conn.receive(await ws.get_message(), trio.current_time())
        for seq, body in frames:
            await ws.send_message(conn.data(seq, body, trio.current_time()))
        acked = 0
        while acked < max(seq for seq, _ in frames):
            for ev in conn.receive(await ws.get_message(), trio.current_time())[0]:
                if isinstance(ev, Ack):
                    acked = ev.watermark


async def test_the_parts_of_a_frame_the_hub_already_has_go_first_on_the_next_connection(
        tmp_path: Path) -> None:
    """The link went down after the hub applied frame 1 (cut) and before its parts: on
    the next connection (here after a restart) the parts go first, before frame 2."""
    records = a_wafers_records()
    frames = await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    image = tmp_path / "image"
    await hub_state_after_sending(tmp_path / "a", records, tmp_path / "spool",
                                  (frames + 7, image), max_records_per_frame=7)
    async with DiskSpool.open(SpoolConfig(dir=str(image))) as spool:
        epoch = spool.epoch
        stored = spool.frames_from(1, 1)[0]
        cut = spool.checkpoints["__split__"]["1"][0]  # its progress (docs/protocol.md)
    first_rid, sources, rows = to_rows(cbor2.loads(stored.body))
    assert cut == 7 and first_rid == 1
    frame_1_cut = cbor2.dumps([first_rid, sources, rows[:cut]])

    async with trio.open_nursery() as nursery:
        the_hub = Hub(hub_config(tmp_path / "hub", checkpoint_interval_s=0,
                                 max_records_per_frame=7))
        port = await nursery.start(the_hub.run)
        with trio.fail_after(10):
            await send_frames(port, epoch, [(1, frame_1_cut)])
        cfg = gateway_config(tmp_path / "gw", port, spool={"dir": str(image)},
                             uplink={"probe_interval_s": 0.1},
                             batch={"max_records": FRAME_RECORDS})
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        await all_sent_and_fed(gateway, the_hub, len(records))
        nursery.cancel_scope.cancel()
    assert the_hub.ingest.records_fed == len(records), "each record once"
    assert_same_state(the_hub.state, in_order(records))


class StopAt:
    """A hub consumer that stops its hub (cancels ``scope``) once it was fed ``n`` records:
    the hub goes down in the middle of the gateway's sending, its frames in flight."""

    def __init__(self, n: int, scope: trio.CancelScope) -> None:
        self.n, self.fed, self.scope = n, 0, scope

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        self.fed += len(records)
        if self.fed >= self.n:
            self.scope.cancel()

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass


async def test_a_hub_restarted_in_the_middle_of_the_splits_gets_them_in_order_once(
        tmp_path: Path) -> None:
    """Three wafers stored while the hub was away, every frame cut for it; the hub stops
    when a third of the records are in and starts again (its live state rebuilt from its
    store, in the order frames arrived).  The gateway reconnects and sends the rest: the
    frames and parts it had in flight again, the parts of frames the hub has first, held
    parts after their frame.  The live state is the in-order one, each record once."""
    source = {**SOURCE, "wafers": 3}
    ticks = itertools.count()
    records = [r for batch, _ in simulated_batches(SimulatedConfig(**source), "tester",
                                                   clock=lambda: 1.7e9 + next(ticks) * 0.01)
               for r in batch]
    await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    port = free_port()
    hub_cfg = hub_config(tmp_path / "hub", port=port, checkpoint_interval_s=0,
                         max_records_per_frame=7)
    cfg = gateway_config(tmp_path / "gw", port, spool={"dir": str(tmp_path / "spool")},
                         uplink={"probe_interval_s": 0.1, "backoff_max_s": 0.1},
                         batch={"max_records": FRAME_RECORDS})
    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        first_hub = Hub(hub_cfg)
        with trio.fail_after(20):
            async with trio.open_nursery() as first_run:  # until StopAt cancels it
                first_hub.ingest.add_consumer(StopAt(len(records) // 3, first_run.cancel_scope))
                await first_run.start(first_hub.run)
                await nursery.start(gateway.run)
        assert first_hub.ingest.records_fed < len(records), "stopped midway"
        the_hub = Hub(hub_cfg)
        await nursery.start(the_hub.run)
        await all_sent_and_fed(gateway, the_hub, len(records))
        nursery.cancel_scope.cancel()
    assert the_hub.ingest.records_fed == len(records), "each record once"
    assert_same_state(the_hub.state, in_order(records))



async def test_a_part_not_yet_durable_when_the_link_goes_is_not_stored_again(
        tmp_path: Path) -> None:
    """The hub (``max_holes = 0``) closes the link for the gap frame 1's parts leave while
    the gateway stores the first part of frame 2, appended and not yet durable (the split's
    progress with it).  On the next connection the gateway goes on from that progress once
    it is durable: it does not store the part's records again under another seq, which the
    hub's dedup by seq cannot recognise (7 records fed twice)."""
    records = a_wafers_records()
    frames = await spool_while_the_hub_is_away(tmp_path / "gw-a", tmp_path / "spool", records)
    frame_1_parts = -(-FRAME_RECORDS // 7) - 1
    async with trio.open_nursery() as nursery:
        the_hub = Hub(hub_config(tmp_path / "hub", checkpoint_interval_s=0,
                                 max_records_per_frame=7, max_holes=0))
        port = await nursery.start(the_hub.run)
        cfg = gateway_config(tmp_path / "gw", port, spool={"dir": str(tmp_path / "spool")},
                             uplink={"probe_interval_s": 0.1, "backoff_max_s": 0.1},
                             batch={"max_records": FRAME_RECORDS})
        assert cfg.spool is not None

        def reconnected() -> bool:  # frame 2's first part is durable from then on
            return gateway.metrics.counter("uplink_connects_total").total() >= 2

        gateway = Gateway(cfg, store=HeldCommits(cfg.spool, frames + frame_1_parts + 1,
                                                 reconnected, backlog_only=True))
        await nursery.start(gateway.run)
        await all_sent_and_fed(gateway, the_hub, len(records))
        nursery.cancel_scope.cancel()
    assert the_hub.ingest.records_fed == len(records), "each record once"
    assert gateway.metrics.counter("uplink_connects_total").total() >= 2
