"""The hub's frame store on disk: compact bodies, retention by bytes, old stores migrated.

Frames carry the simulated tester's records (the same STDF -> records path a gateway
tailing a file takes), so sizes are the real ones, not a toy body's."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from faultkit import expected_records
from hubtools import http_get, hub_config, start_tester

from edgegw.hub import Hub
from edgegw.hub.store import CODEC_RAW, CODEC_ZLIB, FrameToApply, HubStore, unpack_body
from edgegw.protocol import decode_body, encode_body
from edgegw.sim import stdf_chunks
from edgegw.sim.tester import TesterProfile
from edgegw.stdf import RecordMapper, StdfDecoder

GW = "ate-01"


def simulated_frames(parts_wafers: int = 1, per_frame: int = 500) -> tuple[list[bytes], int, int]:
    """(frame bodies, STDF bytes, records) of one simulated lot, mapped like a gateway."""
    chunks = [c.data for c in stdf_chunks(TesterProfile(wafers=parts_wafers), lots=1)]
    dec, mapper, records, now = StdfDecoder(), RecordMapper("tester"), [], 1.7e9
    for chunk in chunks:
        dec.feed(chunk)
        now += 0.05
        for rec in dec.records():
            records.extend(mapper.map(rec, now))
    bodies = [encode_body(i + 1, records[i:i + per_frame])
              for i in range(0, len(records), per_frame)]
    return bodies, sum(map(len, chunks)), len(records)


def frames_of(bodies: list[bytes], first_seq: int = 1) -> list[FrameToApply]:
    def frame(seq: int, body: bytes) -> FrameToApply:
        first_rid, _, records = decode_body(body, 1 << 20)  # the body's ids: the hub checks them
        return FrameToApply(GW, "e1", seq, first_rid, len(records), body)

    return [frame(first_seq + i, b) for i, b in enumerate(bodies)]


async def test_bodies_are_stored_smaller_than_the_testers_stdf_and_read_back_exactly(
        tmp_path: Path) -> None:
    bodies, stdf_bytes, n_records = simulated_frames()
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        await store.commit(frames_of(bodies))
        assert store.frame_bytes < stdf_bytes, (
            f"{store.frame_bytes / n_records:.1f} B/record stored, the STDF has "
            f"{stdf_bytes / n_records:.1f}")
        assert await store.query("SELECT DISTINCT codec FROM frames") == [(CODEC_ZLIB,)]
        stored = list(store.iter_frames_sync())
        assert [row[5] for row in stored] == bodies
        assert [row[3] for row in stored] == list(range(1, len(bodies) + 1))
    finally:
        await store.close()


async def test_the_stored_byte_count_is_kept_across_a_restart(tmp_path: Path) -> None:
    bodies, _, _ = simulated_frames()
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    await store.commit(frames_of(bodies))
    total = store.frame_bytes
    (on_disk,) = await store.query("SELECT SUM(length(body)) FROM frames")
    await store.close()
    assert on_disk == (total,)
    again = HubStore(tmp_path / "hub.sqlite3")
    await again.open()
    try:
        assert again.frame_bytes == total
    finally:
        await again.close()


async def test_retention_by_bytes_deletes_the_oldest_frames_until_under_the_limit(
        tmp_path: Path) -> None:
    bodies, _, _ = simulated_frames(parts_wafers=2)
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        await store.commit(frames_of(bodies))
        limit = store.frame_bytes // 3
        pruned = await store.prune(older_than=0.0, max_bytes=limit)
        assert pruned > 0 and store.frame_bytes <= limit
        seqs = [s for (s,) in await store.query("SELECT seq FROM frames ORDER BY id")]
        # the newest stay, the oldest went, and nothing in between
        assert seqs == list(range(len(bodies) - len(seqs) + 1, len(bodies) + 1))
        (on_disk,) = await store.query("SELECT SUM(length(body)) FROM frames")
        assert on_disk == (store.frame_bytes,)
        # a pruned frame sent again is still a duplicate: the applied set rules
        assert await store.commit(frames_of(bodies[:1])) == {(GW, "e1", 1)}
    finally:
        await store.close()


async def test_pruning_never_passes_the_position_a_checkpoint_covers(tmp_path: Path) -> None:
    bodies, _, _ = simulated_frames()
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        frames = frames_of(bodies)
        await store.commit(frames)
        covered = frames[3].id
        await store.prune(older_than=float("inf"), max_bytes=0, up_to_id=covered)
        ids = [i for (i,) in await store.query("SELECT id FROM frames ORDER BY id")]
        assert ids == [f.id for f in frames[4:]]
    finally:
        await store.close()


async def test_a_store_written_before_compact_bodies_opens_and_its_raw_bodies_replay(
        tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    bodies, _, _ = simulated_frames()
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE frames (id INTEGER PRIMARY KEY, gateway TEXT NOT NULL,
            epoch TEXT NOT NULL, seq INTEGER NOT NULL, first_rid INTEGER NOT NULL,
            n_records INTEGER NOT NULL, applied_at REAL NOT NULL, body BLOB NOT NULL,
            UNIQUE (gateway, epoch, seq));""")
    db.execute("INSERT INTO frames (gateway, epoch, seq, first_rid, n_records, applied_at,"
               " body) VALUES (?, 'e1', 1, 1, 500, 0, ?)", (GW, bodies[0]))
    db.commit()
    db.close()
    store = HubStore(path)
    await store.open()
    try:
        assert store.frame_bytes == len(bodies[0])
        await store.commit(frames_of(bodies[1:3], first_seq=2))
        got = [(row[3], row[5]) for row in store.iter_frames_sync()]
        assert got == [(1, bodies[0]), (2, bodies[1]), (3, bodies[2])]
        codecs = await store.query("SELECT codec FROM frames ORDER BY id")
        assert codecs == [(CODEC_RAW,), (CODEC_ZLIB,), (CODEC_ZLIB,)]
    finally:
        await store.close()


async def test_the_newest_frame_is_never_pruned_so_frame_ids_never_go_back(
        tmp_path: Path) -> None:
    bodies, _, _ = simulated_frames()
    store = HubStore(tmp_path / "hub.sqlite3")
    await store.open()
    try:
        frames = frames_of(bodies[:3])
        await store.commit(frames)
        await store.prune(older_than=float("inf"), max_bytes=0)
        assert await store.query("SELECT id FROM frames") == [(frames[-1].id,)]
        later = frames_of(bodies[3:4], first_seq=4)
        await store.commit(later)
        assert later[0].id > frames[-1].id  # a checkpoint at frames[-1] still sees it
    finally:
        await store.close()


def test_an_unknown_codec_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown frame body codec 7"):
        unpack_body(7, b"x")


async def test_history_api_answers_the_same_after_frames_are_pruned_and_the_hub_restarts(
        tmp_path: Path) -> None:
    """Frames pruned down to a few KB, then a restart: the lot, its wafers (archived ones
    from the history store, live ones from the checkpoint) and its tests are still served,
    exactly as before."""
    # 20 kB of stored bodies: a few frames (columnar bodies, protocol v2, store about 10
    # bytes a record compressed, so the budget holds more of them than it did of v1 rows)
    cfg = hub_config(tmp_path / "hub", retain_frames_mb=0.02, prune_interval_s=0.2,
                     checkpoint_interval_s=1, checkpoint_records=1000)
    lot = "LOTP"

    async def shown(port: int) -> dict[str, Any]:
        out = {}
        for path in ("/api/lots", f"/api/lots/{lot}/wafers", f"/api/tests/{lot}/100"):
            status, out[path] = await http_get(port, path)
            assert status == 200, (path, out[path])
        wafers = [w["wafer_id"] for w in out[f"/api/lots/{lot}/wafers"]["wafers"]]
        for wafer in (wafers[0], wafers[-1]):  # an archived one, a live one
            status, out[wafer] = await http_get(port, f"/api/lots/{lot}/wafers/{wafer}")
            assert status == 200
        return out

    async with trio.open_nursery() as nursery:
        app = Hub(cfg)
        port = await nursery.start(app.run)
        source = {"lot_id": lot, "lots": 1, "parts_per_second": 3000, "max_parts": 1500,
                  "wafers": 100, "wafer_diameter_dies": 4, "seed": 3}
        n = len(expected_records(**source))
        await start_tester(nursery, tmp_path, port, **source)
        def where() -> str:
            return (f"applied {app.ingest.store.gateway_stats('ate-01').records_applied}/{n}, "
                    f"checkpoint at {app.checkpointer.position}, fed {app.ingest.fed_id}, "
                    f"frame bytes {app.ingest.store.frame_bytes}")
        async def prunable() -> int:  # frames the older of the two checkpoints covers
            limit = app.ingest.prune_limit or 0
            (row,) = await app.ingest.store.query(
                "SELECT COUNT(*) FROM frames WHERE id <= ?", (limit,))
            return int(row[0])

        async def fed_all() -> bool:  # the live state was fed the newest frame stored
            (row,) = await app.ingest.store.query("SELECT MAX(id) FROM frames")
            return app.ingest.fed_id >= int(row[0] or 0)

        try:
            with trio.fail_after(60):
                # stored, fed to the live state (it applies behind the commit: stored is
                # not yet shown) and covered by a checkpoint
                while (app.ingest.store.gateway_stats("ate-01").records_applied < n
                       or not await fed_all()
                       or app.checkpointer.position < app.ingest.fed_id):
                    await trio.sleep(0.05)
                # pruned to the byte limit, or as far as the checkpoints allow: frames after
                # the older one stay (how many depends on where the checkpoints fell: 6 of
                # 26, 31 kB, when the machine was busy)
                while app.ingest.store.frame_bytes > 20_000 and await prunable():
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(where()) from None
        before = await shown(port)
        assert app.state.lots[lot].archived_wafers  # some wafers live in the history store
        (kept,) = await app.ingest.store.query("SELECT COUNT(*) FROM frames")
        assert 0 < kept[0] < app.ingest.store.stats["ate-01"].frames_applied / 2
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        app = Hub(cfg)
        port = await nursery.start(app.run)
        assert app.checkpointer.loaded_from == "checkpoint"
        assert await shown(port) == before
        nursery.cancel_scope.cancel()


async def test_a_checkpoint_of_another_store_is_refused_and_the_hub_replays_its_own_frames(
        tmp_path: Path) -> None:
    """Frame ids mean something only in the store that gave them: a checkpoint next to a
    replaced (or deleted) hub.sqlite3 must not decide which frames to skip."""
    source = {"lot_id": "LOTX", "lots": 1, "parts_per_second": 3000, "max_parts": 300, "seed": 2}
    n = len(expected_records(**source))
    cfg = hub_config(tmp_path / "a", checkpoint_interval_s=1)
    async with trio.open_nursery() as nursery:
        app = Hub(cfg)
        port = await nursery.start(app.run)
        await start_tester(nursery, tmp_path, port, **source)
        with trio.fail_after(60):  # applied, and covered by a written checkpoint: a stop
            # with archives still unwritten would keep the older one (by design), and this
            # test is about whose checkpoint it is, not about that race
            while (app.ingest.store.gateway_stats("ate-01").records_applied < n
                   or app.checkpointer.position != app.ingest.fed_id):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint").write_bytes((tmp_path / "a" / "checkpoint").read_bytes())
    async with trio.open_nursery() as nursery:
        app = Hub(hub_config(tmp_path / "b", checkpoint_interval_s=1))
        await nursery.start(app.run)
        assert app.checkpointer.loaded_from is None
        assert app.metrics.counter("hub_checkpoint_failures_total").total() == 1
        assert app.state.lots == {}  # nothing from the other store's checkpoint
        assert (tmp_path / "b" / "checkpoint.bad").exists()  # set aside, not overwritten
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # and its own store's checkpoint still loads
        app = Hub(cfg)
        await nursery.start(app.run)
        assert app.checkpointer.loaded_from == "checkpoint"
        assert app.ingest.replayed["records"] == 0
        parts = sum(1 for r in expected_records(**source) if r[0] == "PartResult")
        assert app.state.lots["LOTX"].tally.parts == parts
        nursery.cancel_scope.cancel()


async def test_a_torn_checkpoint_falls_back_to_the_previous_one_and_its_later_frames(
        tmp_path: Path) -> None:
    source = {"lot_id": "LOTY", "lots": 1, "parts_per_second": 3000, "max_parts": 600, "seed": 4}
    n = len(expected_records(**source))
    cfg = hub_config(tmp_path / "hub", checkpoint_interval_s=1, checkpoint_records=1000)
    async with trio.open_nursery() as nursery:
        app = Hub(cfg)
        port = await nursery.start(app.run)
        await start_tester(nursery, tmp_path, port, **source)
        with trio.fail_after(60):
            while app.ingest.store.gateway_stats("ate-01").records_applied < n:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    current = tmp_path / "hub" / "checkpoint"
    assert (tmp_path / "hub" / "checkpoint.prev").exists()
    current.write_bytes(current.read_bytes()[:-100])  # torn
    async with trio.open_nursery() as nursery:
        app = Hub(cfg)
        await nursery.start(app.run)
        assert app.checkpointer.loaded_from == "checkpoint.prev"
        assert app.ingest.replayed["records"] > 0  # the frames after the older checkpoint
        parts = sum(1 for r in expected_records(**source) if r[0] == "PartResult")
        assert app.state.lots["LOTY"].tally.parts == parts  # each once: none lost, none twice
        nursery.cancel_scope.cancel()
