"""The live tail source on real files: a tester writing while the gateway reads."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from shared_data import GALAXY, METIS, stdf_path

from edgegw.config import ConfigError, build
from edgegw.metrics import Metrics
from edgegw.records import GatewayEvent, LotEnd, LotStart, ParametricResult, PartResult
from edgegw.sim import stdf_chunks, stdf_file_bytes, write_files
from edgegw.sim.tester import TesterProfile
from edgegw.sources import SourceContext, TailConfig, TailSource, source_type
from edgegw.stdf import RecordMapper, StdfDecoder, StdfWriter

SMALL = TesterProfile(sites=4, wafer_diameter_dies=8, tests_per_part=4, seed=7)


class CollectingSink:
    """The real sink interface: batches of records with the checkpoint after them."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.checkpoint: Any = None
        self.batches = 0
        self._changed = trio.Event()

    async def put(self, records: Any, checkpoint: Any = None) -> None:
        self.records.extend(records)
        self.checkpoint = checkpoint
        self.batches += 1
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        with trio.fail_after(within):
            while not condition():
                self._changed = trio.Event()
                await self._changed.wait()

    def of(self, cls: type) -> list[Any]:
        return [r for r in self.records if isinstance(r, cls)]


def tail(paths: list[Path | str], checkpoint: Any = None, metrics: Metrics | None = None,
         state_dir: Path | None = None, **config: Any) -> TailSource:
    config.setdefault("poll_interval", 0.01)
    cfg = TailConfig(paths=[str(p) for p in paths], **config)
    return TailSource("tester1", cfg, SourceContext(
        "gw1", metrics or Metrics(), checkpoint,
        state_dir=None if state_dir is None else str(state_dir)))


def expected(data: bytes, source: str = "tester1", **kw: Any) -> list[Any]:
    """What mapping the whole file in one go gives (timestamps zeroed)."""
    dec = StdfDecoder()
    dec.feed(data)
    mapper = RecordMapper(source, **kw)
    out = []
    for rec in dec.records():
        out.extend(mapper.map(rec, 0.0))
    out.extend(mapper.close(0.0))
    return out


def no_ts(records: list[Any]) -> list[Any]:
    return [r._replace(ts=0.0) for r in records]


async def test_records_arrive_while_the_simulator_writes(tmp_path: Path) -> None:
    sink = CollectingSink()
    source = tail([tmp_path])
    written: list[Path] = []
    parts_seen_while_writing = 0
    tester_done = trio.Event()

    async def tester() -> None:
        # the first half of the lot at the tester's pace, then (on a busy machine the tail
        # may simply not have run yet) a wait for the tail to forward a part before the
        # file is finished: what is checked is that it does, not how soon
        nonlocal parts_seen_while_writing
        chunks = list(stdf_chunks(SMALL, start_time=1_700_000_000, parts_per_second=400))
        half = len(chunks) // 2
        written.extend(await write_files(tmp_path, iter(chunks[:half]), parts_per_second=400))
        with trio.fail_after(30):
            await sink.wait_until(lambda: bool(sink.of(PartResult)))
        parts_seen_while_writing = len(sink.of(PartResult))
        async with await trio.open_file(written[0], "ab") as f:
            for chunk in chunks[half:]:
                await f.write(chunk.data)
                await f.flush()
        tester_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, sink)
        nursery.start_soon(tester)
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        await tester_done.wait()  # the tail may see the last record before write_files returns
        nursery.cancel_scope.cancel()

    data = stdf_file_bytes(SMALL, start_time=1_700_000_000, parts_per_second=400)
    assert written == [tmp_path / "LOT0001.stdf"]
    assert written[0].read_bytes() == data
    # live: parts were forwarded while the file was still being written
    assert 0 < parts_seen_while_writing
    assert no_ts(sink.records) == expected(data)
    entry = sink.checkpoint["files"][str(written[0])]
    assert entry["done"] and entry["reason"] == "MRR" and entry["offset"] == len(data)
    assert entry["state"] == {"byte_order": "<"}
    json.dumps(sink.checkpoint)  # the gateway persists it


async def test_a_record_cut_at_the_end_is_waited_for(tmp_path: Path) -> None:
    data = stdf_file_bytes(SMALL)
    # cut in the middle of the second PRR
    dec = StdfDecoder()
    dec.feed(data)
    prrs = [r.offset for r in dec.records() if r.name == "PRR"]
    cut = prrs[1] + 5
    path = tmp_path / "lot.stdf"
    path.write_bytes(data[:cut])
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], metrics=metrics).run, sink)
        await sink.wait_until(lambda: len(sink.of(PartResult)) == 1)
        await trio.sleep(0.1)  # many polls: the cut record neither appears nor is an error
        assert len(sink.of(PartResult)) == 1
        assert sink.checkpoint["files"][str(path)]["offset"] == prrs[1]
        with path.open("ab") as f:
            f.write(data[cut:])
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(data)
    assert metrics.counter("source_errors_total").total() == 0


@pytest.mark.parametrize("cut_fraction", [0.05, 0.37, 0.81])
async def test_restart_from_the_checkpoint_neither_resends_nor_skips(
        tmp_path: Path, cut_fraction: float) -> None:
    profile = TesterProfile(sites=3, wafer_diameter_dies=10, tests_per_part=5, seed=3)
    data = stdf_file_bytes(profile, byte_order=">")
    want = expected(data, forward_raw=True)
    path = tmp_path / "lot.stdf"
    cut = int(len(data) * cut_fraction)  # anywhere: mid-record, mid-part
    path.write_bytes(data[:cut])

    first = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], forward_raw=True).run, first)
        await first.wait_until(lambda: first.checkpoint is not None)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()  # the gateway stops (or dies) here
    saved = json.loads(json.dumps(first.checkpoint))  # what a durable store gives back
    offset = saved["files"][str(path)]["offset"]
    assert 0 < offset <= cut and not saved["files"][str(path)]["done"]

    with path.open("ab") as f:  # the tester went on meanwhile
        f.write(data[cut:])
    second = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], checkpoint=saved, forward_raw=True).run, second)
        await second.wait_until(lambda: bool(second.of(LotEnd)))
        nursery.cancel_scope.cancel()

    assert no_ts(first.records) + no_ts(second.records) == want
    assert len(first.records) + len(second.records) == len(want)


async def test_restarts_while_the_tester_keeps_writing_lose_and_repeat_nothing(
        tmp_path: Path) -> None:
    """The gateway is stopped twice while the simulator writes two lots; each start
    resumes from the checkpoint the previous run last handed over."""
    profile = TesterProfile(sites=4, wafer_diameter_dies=12, tests_per_part=4, seed=21)
    kw: dict[str, Any] = dict(lots=2, start_time=1_700_000_000, parts_per_second=800)
    got: list[Any] = []
    checkpoint: Any = None
    async with trio.open_nursery() as outer:
        outer.start_soon(lambda: write_files(tmp_path, stdf_chunks(profile, **kw),
                                             parts_per_second=800))
        resumed_mid_file = 0
        for last_run in (False, False, True):
            sink = CollectingSink()
            async with trio.open_nursery() as nursery:
                await nursery.start(tail([tmp_path], checkpoint=checkpoint).run, sink)
                if last_run:
                    lots_before = sum(isinstance(r, LotEnd) for r in got)
                    await sink.wait_until(
                        lambda s=sink, n=lots_before: len(s.of(LotEnd)) + n == 2)
                else:  # stop once this run has forwarded a few parts
                    await sink.wait_until(lambda s=sink: len(s.of(PartResult)) >= 10)
                nursery.cancel_scope.cancel()
            got.extend(sink.records)
            checkpoint = json.loads(json.dumps(sink.checkpoint))
            resumed_mid_file += any(0 < e["offset"] and not e["done"]
                                    for e in checkpoint["files"].values())
    assert resumed_mid_file >= 1  # (almost always 2: both stops in the middle of a file)
    want: list[Any] = []
    names: list[str] = []
    for chunk in stdf_chunks(profile, **kw):
        if chunk.file_name not in names:
            names.append(chunk.file_name)
    for name in names:
        want += expected((tmp_path / name).read_bytes())
    assert no_ts(got) == want


async def test_unmapped_record_types_around_a_checkpoint_are_skipped_and_counted(
        tmp_path: Path) -> None:
    """Without forward_raw the tail does not decode the record types the mapper does not
    read (DTR, GDR, ...): a checkpoint can then fall among them, and a restart at it
    still finds it a record boundary and sends exactly the rest.  The skipped records
    still count as parsed."""
    w = StdfWriter()
    ptr = {"HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0, "PARM_FLG": 0, "RESULT": 1.5,
           "TEST_TXT": "VDD", "ALARM_ID": "", "OPT_FLAG": 0x0E, "RES_SCAL": 0,
           "LLM_SCAL": 0, "HLM_SCAL": 0, "LO_LIMIT": 1.0, "HI_LIMIT": 2.0, "UNITS": "V"}
    dtr = ("DTR", {"TEXT_DAT": "tester log"})
    gdr = ("GDR", {"GEN_DATA": [(10, "x"), (5, 7)]})
    before = [("FAR", {}), ("MIR", {"LOT_ID": "L1"}), ("PIR", {"HEAD_NUM": 1, "SITE_NUM": 1}),
              ("PTR", {"TEST_NUM": 1, **ptr}), dtr, gdr]
    after = [dtr, ("PTR", {"TEST_NUM": 2, **ptr, "RESULT": 9.0}),
             ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 1, "PART_FLG": 0, "NUM_TEST": 2,
                      "HARD_BIN": 1, "SOFT_BIN": 1, "PART_ID": "P1"}), gdr, ("MRR", {})]
    head = b"".join(w.encode(n, f) for n, f in before)
    data = head + b"".join(w.encode(n, f) for n, f in after)
    path = tmp_path / "lot.stdf"
    path.write_bytes(head)

    metrics = Metrics()
    first = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], metrics=metrics).run, first)
        await first.wait_until(lambda: first.checkpoint is not None)
        nursery.cancel_scope.cancel()
    saved = json.loads(json.dumps(first.checkpoint))
    assert saved["files"][str(path)]["offset"] == len(head)  # just after the skipped ones
    assert metrics.counter("tail_records_total").total() == len(before)

    path.write_bytes(data)
    second = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], checkpoint=saved).run, second)
        await second.wait_until(lambda: bool(second.of(LotEnd)))
        nursery.cancel_scope.cancel()
    assert not second.of(GatewayEvent)
    assert no_ts(first.records) + no_ts(second.records) == expected(data)
    assert [r.test_num for r in second.of(ParametricResult)] == [1, 2]


async def test_a_restart_keeps_the_defaults_and_open_parts_from_before_the_checkpoint(
        tmp_path: Path) -> None:
    """Two sites, PTR defaults only in the first PTR of each test, a checkpoint between
    the PIRs and the PRRs: after the restart the results still get limits, units and the
    part id of their PRR."""
    w = StdfWriter()
    head = b"".join([
        w.encode("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}),
        w.encode("MIR", {"LOT_ID": "L1", "START_T": 5}),
        w.encode("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}),
        w.encode("PIR", {"HEAD_NUM": 1, "SITE_NUM": 1}),
        w.encode("PTR", {"TEST_NUM": 7, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                         "PARM_FLG": 0, "RESULT": 1.5, "TEST_TXT": "VDD", "ALARM_ID": "",
                         "OPT_FLAG": 0x0E, "RES_SCAL": 0, "LLM_SCAL": 0, "HLM_SCAL": 0,
                         "LO_LIMIT": 1.0, "HI_LIMIT": 2.0, "UNITS": "V"}),
    ])
    tail_bytes = b"".join([
        w.encode("PTR", {"TEST_NUM": 7, "HEAD_NUM": 1, "SITE_NUM": 1, "TEST_FLG": 0x80,
                         "PARM_FLG": 0, "RESULT": 2.5}),
        w.encode("PRR", {"HEAD_NUM": 1, "SITE_NUM": 1, "PART_FLG": 0x08, "NUM_TEST": 1,
                         "HARD_BIN": 5, "SOFT_BIN": 65535, "X_COORD": -32768,
                         "Y_COORD": -32768, "TEST_T": 0, "PART_ID": "B"}),
        w.encode("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0, "NUM_TEST": 1,
                         "HARD_BIN": 1, "SOFT_BIN": 1, "X_COORD": 3, "Y_COORD": 4,
                         "TEST_T": 12, "PART_ID": "A"}),
        w.encode("MRR", {"FINISH_T": 9}),
    ])
    path = tmp_path / "lot.std"
    path.write_bytes(head)
    first = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path]).run, first)
        await first.wait_until(lambda: first.checkpoint is not None)
        nursery.cancel_scope.cancel()
    assert [type(r) for r in first.records] == [LotStart]  # the PTR waits for its part
    assert first.checkpoint["files"][str(path)]["offset"] == len(head)

    path.write_bytes(head + tail_bytes)
    second = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], checkpoint=first.checkpoint).run, second)
        await second.wait_until(lambda: bool(second.of(LotEnd)))
        nursery.cancel_scope.cancel()
    site1, site0 = second.of(ParametricResult)
    assert (site1.part_id, site1.value, site1.lo_limit, site1.hi_limit, site1.units,
            site1.passed, site1.test_txt) == ("B", 2.5, 1.0, 2.0, "V", False, "VDD")
    assert (site0.part_id, site0.value, site0.passed) == ("A", 1.5, True)
    b, a = second.of(PartResult)
    assert (b.lot_id, b.part_id, b.x, b.y, b.soft_bin, b.passed, b.test_time_ms) == (
        "L1", "B", None, None, None, False, None)
    assert (a.part_id, a.x, a.y, a.soft_bin, a.passed, a.test_time_ms) == (
        "A", 3, 4, 1, True, 12)


async def test_a_new_file_per_lot_and_per_wafer(tmp_path: Path) -> None:
    profile = TesterProfile(sites=2, wafer_diameter_dies=6, tests_per_part=2, wafers=2)
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path / "*.stdf"]).run, sink)
        files = await write_files(tmp_path, stdf_chunks(profile, lots=2, per_wafer=True,
                                                        parts_per_second=2000),
                                  parts_per_second=2000)
        await sink.wait_until(lambda: len(sink.of(LotEnd)) == 4)
        nursery.cancel_scope.cancel()
    assert [p.name for p in files] == ["LOT0001_W01.stdf", "LOT0001_W02.stdf",
                                       "LOT0002_W01.stdf", "LOT0002_W02.stdf"]
    assert [r.lot_id for r in sink.of(LotStart)] == ["LOT0001", "LOT0001", "LOT0002",
                                                     "LOT0002"]
    assert [r.wafer_id for r in sink.of(PartResult)][-1] == "LOT0002-W02"
    want: list[Any] = []
    for p in files:
        want += expected(p.read_bytes())
    assert no_ts(sink.records) == want
    assert all(e["done"] and e["reason"] == "MRR" for e in sink.checkpoint["files"].values())


async def test_a_file_renamed_while_it_is_written_is_not_read_twice(tmp_path: Path) -> None:
    data = stdf_file_bytes(SMALL)
    first = tmp_path / "lot.stdf"
    first.write_bytes(data[: len(data) // 2])
    sink = CollectingSink()
    source = tail([tmp_path])
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, sink)
        await sink.wait_until(lambda: len(sink.of(PartResult)) > 0)
        first.rename(tmp_path / "lot_final.stdf")
        with (tmp_path / "lot_final.stdf").open("ab") as f:
            f.write(data[len(data) // 2:])
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        # the lot's end is read through the open file, before a scan sees the new name (a
        # busy machine may run none for a while): the checkpoint names it once one has
        with trio.fail_after(10):
            while list(source.checkpoint()["files"]) != [str(tmp_path / "lot_final.stdf")]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(data)
    # a restart from the checkpoint last sent (which may still name the old path)
    again = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], checkpoint=sink.checkpoint).run, again)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert again.records == []


async def test_a_corrupt_file_is_reported_and_the_source_keeps_going(tmp_path: Path) -> None:
    good = stdf_file_bytes(SMALL)
    dec = StdfDecoder()
    dec.feed(good)
    # the first PIR of the third touchdown
    third_pir = [r.offset for r in dec.records() if r.name == "PIR"][2 * SMALL.sites]
    # a PIR header claiming 60000 bytes of fields: impossible, the file is corrupt there
    bad = good[:third_pir] + struct.pack("<HBB", 60000, 5, 10) + b"\x01" * 64
    (tmp_path / "a_bad.stdf").write_bytes(bad)
    os.utime(tmp_path / "a_bad.stdf", (1, 1))  # older: read first
    (tmp_path / "b_not_stdf.stdf").write_bytes(b"this is a text file, not STDF\n" * 4)
    os.utime(tmp_path / "b_not_stdf.stdf", (2, 2))
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], metrics=metrics).run, sink)
        await sink.wait_until(lambda: len(sink.of(GatewayEvent)) == 2)
        (tmp_path / "c_good.stdf").write_bytes(good)  # the next lot, after the bad ones
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        nursery.cancel_scope.cancel()
    ev_bad, ev_text = sink.of(GatewayEvent)
    assert ev_bad.level == "error" and ev_bad.code == "source_corrupt"
    assert ev_bad.detail == {"path": str(tmp_path / "a_bad.stdf"), "offset": third_pir,
                             "format": "stdf"}
    assert "impossible REC_LEN 60000" in ev_bad.message and "abandoned" in ev_bad.message
    assert ev_text.detail["offset"] == 0 and "not STDF" in ev_text.message
    assert metrics.counter("source_errors_total").get(source="tester1", kind="corrupt") == 2
    # the records before the corruption were delivered; then the good file in full
    before = expected(good[:third_pir])
    parts_before = [r for r in before if isinstance(r, PartResult)]
    assert len(parts_before) == 2 * SMALL.sites  # two touchdowns complete
    assert no_ts([r for r in sink.records if not isinstance(r, GatewayEvent)]) == (
        before + expected(good))
    files = sink.checkpoint["files"]
    assert files[str(tmp_path / "a_bad.stdf")]["done"]
    assert files[str(tmp_path / "a_bad.stdf")]["reason"].startswith("corrupt: impossible")


async def test_an_stdf_v3_file_is_reported_not_sent_as_v4_and_the_next_lot_arrives(
        tmp_path: Path) -> None:
    # STDF V3 lays its records out otherwise: read as V4 its bins and values are wrong,
    # so the file is refused as `edgegw stdf` refuses it (it was mapped and sent as V4)
    good = stdf_file_bytes(SMALL)
    v3 = bytearray(good)
    v3[5] = 3  # FAR: REC_LEN, REC_TYP, REC_SUB, CPU_TYPE, STDF_VER
    (tmp_path / "a_v3.stdf").write_bytes(bytes(v3))
    os.utime(tmp_path / "a_v3.stdf", (1, 1))  # older: read first
    (tmp_path / "b_good.stdf").write_bytes(good)
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], metrics=metrics).run, sink)
        await sink.wait_until(lambda: bool(sink.of(LotEnd)) and bool(sink.of(GatewayEvent)))
        nursery.cancel_scope.cancel()
    (event,) = sink.of(GatewayEvent)
    assert event.code == "source_corrupt" and event.detail["offset"] == 0
    assert "STDF_VER 3 in the FAR" in event.message
    assert metrics.counter("source_errors_total").get(source="tester1", kind="corrupt") == 1
    assert no_ts([r for r in sink.records if not isinstance(r, GatewayEvent)]) == expected(good)


async def test_records_a_short_rec_len_swallows_are_counted_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a PTR's REC_LEN 10 bytes short: its rest reads as headers of unknown type, one of
    # which swallows the next PTRs; the file reads on to its MRR (no error to report),
    # so the skipped records are what says it (nothing did)
    good = stdf_path(METIS).read_bytes()  # (where the swallowing ends at a record)
    dec = StdfDecoder()
    dec.feed(good)
    ptr = next(r for r in dec.records() if r.name == "PTR")
    data = bytearray(good)
    (rec_len,) = struct.unpack_from("<H", data, ptr.offset)
    struct.pack_into("<H", data, ptr.offset, rec_len - 10)
    (tmp_path / "short_ptr.stdf").write_bytes(bytes(data))
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], metrics=metrics).run, sink)
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        nursery.cancel_scope.cancel()
    skipped = StdfDecoder()
    skipped.feed(bytes(data))
    list(skipped.records())
    assert skipped.unknown_count > 0
    assert metrics.counter("tail_unknown_records_total").get(
        source="tester1") == skipped.unknown_count
    assert any("records of unknown type skipped" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


async def test_closed_gzip_files_are_read(tmp_path: Path) -> None:
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path]).run, sink)
        files = await write_files(tmp_path, stdf_chunks(SMALL, lots=2, parts_per_second=5000),
                                  parts_per_second=5000, gzip_closed=True)
        await sink.wait_until(lambda: len(sink.of(LotEnd)) == 2)
        nursery.cancel_scope.cancel()
    assert [p.name for p in files] == ["LOT0001.stdf.gz", "LOT0002.stdf.gz"]
    assert sorted(os.listdir(tmp_path)) == ["LOT0001.stdf.gz", "LOT0002.stdf.gz"]
    want = expected(gzip.decompress(files[0].read_bytes())) + expected(
        gzip.decompress(files[1].read_bytes()))
    assert no_ts(sink.records) == want


async def test_a_gzip_file_is_followed_while_it_is_written(tmp_path: Path) -> None:
    data = stdf_file_bytes(SMALL)
    packed = gzip.compress(data)
    path = tmp_path / "lot.stdf.gz"
    path.write_bytes(packed[: len(packed) // 2])
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path]).run, sink)
        await sink.wait_until(lambda: len(sink.of(PartResult)) > 0)
        assert not sink.of(LotEnd)
        with path.open("ab") as f:
            f.write(packed[len(packed) // 2:])
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(data)


async def test_a_gzip_stream_cut_short_is_an_error_once_idle(tmp_path: Path) -> None:
    packed = gzip.compress(stdf_file_bytes(SMALL))
    (tmp_path / "cut.stdf.gz").write_bytes(packed[: len(packed) // 2])
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], idle_timeout=0.1, metrics=metrics).run, sink)
        await sink.wait_until(lambda: bool(sink.of(GatewayEvent)))
        nursery.cancel_scope.cancel()
    (event,) = sink.of(GatewayEvent)
    assert "gzip stream is truncated" in event.message
    assert metrics.counter("source_errors_total").get(source="tester1", kind="corrupt") == 1
    assert sink.of(PartResult)  # what could be read was delivered


async def test_a_gzip_file_cut_inside_its_header_is_corrupt_once_and_never_said_to_grow(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    packed = gzip.compress(stdf_file_bytes(SMALL))
    (tmp_path / "a_header.stdf.gz").write_bytes(packed[:10])  # no data decompressed yet
    (tmp_path / "b_magic.stdf.gz").write_bytes(packed[:2])
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], idle_timeout=0.1, metrics=metrics).run, sink)
        await sink.wait_until(lambda: len(sink.of(GatewayEvent)) == 2)
        await trio.sleep(0.3)  # scans after the verdict, the files unchanged
        nursery.cancel_scope.cancel()
    assert all("gzip stream is truncated" in e.message for e in sink.of(GatewayEvent))
    assert metrics.counter("source_errors_total").get(source="tester1", kind="corrupt") == 2
    assert not [r for r in caplog.records if "grew" in r.getMessage()]


async def test_bytes_after_the_gzip_data_of_a_whole_lot_end_it_as_after_a_plain_mrr(
        tmp_path: Path) -> None:
    # zero fill (a block-padded copy) or a transfer tool's trailer after the last gzip
    # member: the lot is whole at its MRR, as with the same bytes after a plain file's MRR
    # (they made the file "corrupt": an error event and source_errors_total, a false alarm)
    good = stdf_file_bytes(SMALL)
    (tmp_path / "a_padded.stdf.gz").write_bytes(gzip.compress(good) + bytes(512))
    (tmp_path / "b_trailer.stdf.gz").write_bytes(gzip.compress(good) + b"END OF TRANSFER\n")
    (tmp_path / "c_plain.stdf").write_bytes(good)
    for age, name in enumerate(sorted(os.listdir(tmp_path))):
        os.utime(tmp_path / name, (age + 1, age + 1))
    metrics = Metrics()
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], metrics=metrics).run, sink)
        await sink.wait_until(lambda: len(sink.of(LotEnd)) == 3
                              and len(sink.checkpoint["files"]) == 3
                              and all(e["done"] for e in sink.checkpoint["files"].values()))
        nursery.cancel_scope.cancel()
    assert sink.of(GatewayEvent) == []
    assert metrics.counter("source_errors_total").get(source="tester1", kind="corrupt") == 0
    assert no_ts(sink.records) == expected(good) * 3
    assert {e["reason"] for e in sink.checkpoint["files"].values()} == {"MRR"}


async def test_the_real_gzip_file_is_tailed_in_full(tmp_path: Path) -> None:
    real = stdf_path(GALAXY)
    shutil.copy(real, tmp_path / real.name)
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], read_size=1 << 20).run, sink)
        await sink.wait_until(lambda: bool(sink.of(LotEnd)), within=60)
        nursery.cancel_scope.cancel()
    assert len(sink.of(PartResult)) == 1569
    assert len(sink.of(ParametricResult)) == 52403


async def test_a_file_without_mrr_is_complete_after_the_idle_timeout(tmp_path: Path) -> None:
    data = stdf_file_bytes(SMALL)
    dec = StdfDecoder()
    dec.feed(data)
    # the tester died after the PTRs of the second touchdown, before its PRRs
    cut = [r.offset for r in dec.records() if r.name == "PRR"][SMALL.sites]
    (tmp_path / "lot.stdf").write_bytes(data[:cut])
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], idle_timeout=0.2).run, sink)
        await sink.wait_until(lambda: sink.checkpoint is not None
                       and sink.checkpoint["files"][str(tmp_path / "lot.stdf")]["done"])
        nursery.cancel_scope.cancel()
    entry = sink.checkpoint["files"][str(tmp_path / "lot.stdf")]
    assert entry["reason"] == "idle" and entry["offset"] == cut
    # the results of the unfinished parts are delivered, without a part id
    orphans = [r for r in sink.of(ParametricResult) if r.part_id == ""]
    assert len(orphans) == SMALL.sites * SMALL.tests_per_part
    assert no_ts(sink.records) == expected(data[:cut])


async def test_new_only_ignores_the_files_already_there(tmp_path: Path) -> None:
    data = stdf_file_bytes(SMALL)
    (tmp_path / "old.stdf").write_bytes(data)
    sink = CollectingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(tail([tmp_path], start="new_only").run, sink)
        await trio.sleep(0.05)
        assert sink.records == []
        (tmp_path / "new.stdf").write_bytes(data)
        await sink.wait_until(lambda: bool(sink.of(LotEnd)))
        nursery.cancel_scope.cancel()
    assert no_ts(sink.records) == expected(data)
    assert set(sink.checkpoint["files"]) == {str(tmp_path / "old.stdf"),
                                             str(tmp_path / "new.stdf")}


def test_the_tail_is_the_stdf_source_type_and_its_config_is_checked() -> None:
    assert source_type("stdf") is TailSource
    cfg = build(TailConfig, {"paths": ["/data/ate1/*.stdf"], "start": "new_only"})
    assert cfg.format == "stdf" and cfg.start == "new_only"
    with pytest.raises(ConfigError) as err:
        build(TailConfig, {"paths": [], "start": "middle", "poll_interval": 0}, "gw.toml")
    text = str(err.value)
    assert "gw.toml: start: expected 'beginning' or 'new_only', got string 'middle'" in text
