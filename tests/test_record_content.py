"""What a record holds never stops the gateway; a tester file whose name is not UTF-8 is
read.  (docs/reliability.md, "No record content stops it either".)

CBOR text is UTF-8.  A Python string can hold lone surrogates: the bytes of a Linux file
name that are not UTF-8 (a Latin-1 lot name, ``os.fsdecode``), a JSON ``"\\udce9"``, a
plugin decoding with ``surrogateescape``.  Such a string in a record stopped the whole
gateway (the frame could not be encoded); in a source's checkpoint it restarted the source
for ever; and the STDF tail put the file's name in its checkpoint, so one such file stopped
every file of its source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import trio
from hubtools import gateway_config
from shared_data import METIS, stdf_bytes
from test_frame_limits import stored

from edgegw.gateway import Gateway
from edgegw.records import (
    GatewayEvent,
    ParametricResult,
    PartResult,
    SensorReading,
    plain_record,
    unicode_record,
    unicode_text,
)
from edgegw.stdf import StdfDecoder


def test_text_that_is_not_unicode_is_escaped_and_nothing_else_is_touched() -> None:
    assert unicode_text("lot_\udce9.stdf") == "lot_\\xe9.stdf"  # the byte E9
    assert unicode_text("é\udce9") == "é\\xe9"  # a real é stays
    assert unicode_text("a\ud800b") == "a\\ud800b"  # not a byte's surrogate
    same = SensorReading("s", 1.0, "temp", 1.0, "°C")
    assert unicode_record(same) is same
    event = GatewayEvent("s", 1.0, "error", "x", "in \udcff", {"p\udce9": ["\udc80", 3]})
    assert unicode_record(event) == GatewayEvent("s", 1.0, "error", "x", "in \\xff",
                                                 {"p\\xe9": ["\\x80", 3]})
    assert plain_record(same) is same
    assert plain_record(event._replace(detail={"o": Path("/d"), "b": b"\x01"})).detail == {
        "o": "/d", "b": b"\x01"}


class Puts:
    """Puts the given batches with checkpoints 1, 2, ...; replays from a checkpoint."""

    replays: ClassVar[bool] = True

    def __init__(self, puts: list[list[Any]], checkpoints: list[Any] | None = None) -> None:
        self.puts, self.checkpoints = puts, checkpoints
        self.done = trio.Event()

    async def run(self, sink: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for i, records in enumerate(self.puts):
            cp = self.checkpoints[i] if self.checkpoints else i + 1
            await sink.put(records, checkpoint=cp)
        self.done.set()
        await trio.sleep_forever()


async def run_until_done(tmp: Path, source: Any = None, sources: Any = None,
                         until: Any = None) -> Gateway:
    """A gateway with no hub (everything stays spooled), until ``source`` is done or
    ``until(gateway)``; then stopped cleanly."""
    cfg = gateway_config(tmp / "gw", 1, sources=sources or [],
                         spool={"dir": str(tmp / "spool")})
    gateway = Gateway(cfg, extra_sources=[("tester", source)] if source is not None else [])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            if source is not None:
                await source.done.wait()
            while until is not None and not until(gateway):
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    return gateway


async def put_through(tmp: Path, puts: list[list[Any]], checkpoints: list[Any] | None = None
                      ) -> tuple[list[Any], Any, dict[str, Any]]:
    """A gateway (no hub) run until ``Puts(puts, checkpoints)`` is done: the records
    spooled, the source's stored checkpoint, the metrics; the source never restarted."""
    gateway = await run_until_done(tmp, Puts(puts, checkpoints))
    records, stored_checkpoints, _ = await stored(tmp / "spool")
    metrics = gateway.metrics.as_dict()
    assert metrics["gateway_source_restarts_total"] == {}
    return records, stored_checkpoints.get("tester"), metrics


async def test_a_record_holding_text_that_is_not_unicode_is_sent_escaped_and_counted(
        tmp_path: Path) -> None:
    bad = SensorReading("tester", 1.0, "temp", 21.5, "\udcb0C")  # a Latin-1 degree sign
    event = GatewayEvent("tester", 1.0, "warning", "x", "file \udce9", {"path": "/d/\udce9"})
    good = [SensorReading("tester", 1.0, "temp", float(i), "C") for i in range(3)]
    records, checkpoint, metrics = await put_through(
        tmp_path, [[good[0]], [bad, good[1]], [event, good[2]]])
    assert records == [good[0], bad._replace(unit="\\xb0C"), good[1],
                       event._replace(message="file \\xe9", detail={"path": "/d/\\xe9"}),
                       good[2]]
    assert checkpoint == 3
    assert metrics["gateway_records_rewritten_total"] == {"reason=not_unicode,source=tester": 2}


async def test_a_record_holding_an_object_cbor_has_no_type_for_is_sent_with_its_str(
        tmp_path: Path) -> None:
    """A plugin that leaves an object in a GatewayEvent's ``detail`` (or a RawRecord's
    fields) stopped the gateway too: the frame could not be encoded."""

    class Vector:
        def __str__(self) -> str:
            return "vector 0x1f at cycle 88"

    odd = GatewayEvent("tester", 1.0, "warning", "x", "m", {"at": Vector(), "n": 2})
    good = SensorReading("tester", 1.0, "temp", 1.0, "C")
    records, checkpoint, metrics = await put_through(tmp_path, [[odd, good], [good]])
    assert records == [odd._replace(detail={"at": "vector 0x1f at cycle 88", "n": 2}),
                       good, good]
    assert checkpoint == 2
    assert metrics["gateway_records_rewritten_total"] == {
        "reason=no_cbor_type,source=tester": 1}


async def test_numpy_values_in_a_test_programs_records_arrive_as_python_numbers(
        tmp_path: Path) -> None:
    """A Python test program measures with numpy: ``value < limit`` is a ``numpy.bool_``,
    a mean a ``float32``, a bin from an array an ``int64``.  None is a CBOR type (a
    ``float64`` is a float and always was): the gateway stopped.  They arrive as the
    Python values they hold, the record otherwise as it was."""
    import numpy as np

    measured = np.float32(1.25)
    parametric = ParametricResult("tester", 1.0, "L1", 1, 0, "7", 100, "vdd", measured,
                                  np.float32(1.0), 1.5, "V", measured < 1.5)
    part = PartResult("tester", 1.0, "L1", "W1", 1, 0, "7", np.int64(3), np.int32(4),
                      np.int64(1), np.uint16(1), np.bool_(True))
    records, checkpoint, metrics = await put_through(tmp_path, [[parametric, part]])
    assert records == [
        ParametricResult("tester", 1.0, "L1", 1, 0, "7", 100, "vdd", 1.25, 1.0, 1.5, "V", True),
        PartResult("tester", 1.0, "L1", "W1", 1, 0, "7", 3, 4, 1, 1, True)]
    assert [type(v) for v in records[1][7:12]] == [int, int, int, int, bool]
    assert checkpoint == 1
    assert metrics["gateway_records_rewritten_total"] == {
        "reason=no_cbor_type,source=tester": 2}


async def test_what_is_not_a_record_is_refused_in_its_place_an_event_and_the_rest_flows(
        tmp_path: Path) -> None:
    """A plugin's source that puts a dict, or a record whose ``source`` is not text (the
    hub refused the frame: its other records went to the dead-letter file), stops nothing:
    the record is sent with ``str(source)``; what is not a record is refused, counted,
    and a GatewayEvent takes its place -- the source's count of records in frames, which
    a replay after a crash skips by, is unchanged."""
    good = SensorReading("tester", 1.0, "temp", 1.0, "C")
    records, checkpoint, metrics = await put_through(tmp_path, [
        [good, {"lot": "L1", "part": 7}, good], [good._replace(source=7)], [good]])
    assert len(records) == 5 and checkpoint == 3
    stand_in = records[1]
    assert isinstance(stand_in, GatewayEvent) and stand_in.code == "record_refused"
    assert stand_in.detail == {"source": "tester", "type": "dict",
                               "value": "{'lot': 'L1', 'part': 7}"}
    assert [records[0], records[2], records[3], records[4]] == [
        good, good, good._replace(source="7"), good]
    assert metrics["gateway_records_rejected_total"] == {
        "reason=not_a_record,source=tester": 1}
    assert metrics["gateway_records_rewritten_total"] == {
        "reason=source_not_text,source=tester": 1}


async def test_a_checkpoint_holding_text_that_is_not_unicode_is_refused_the_source_runs_on(
        tmp_path: Path) -> None:
    parts = [[PartResult("tester", 1.0, "L1", "W1", 1, 0, str(i), i, 0, 1, 1, True)]
             for i in range(3)]
    records, checkpoint, metrics = await put_through(
        tmp_path, parts, checkpoints=[1, {"file": "lot_\udce9"}, 3])
    assert [r for r in records if isinstance(r, PartResult)] == [p[0] for p in parts]
    assert checkpoint == 3
    assert metrics["gateway_checkpoints_rejected_total"] == {"source=tester": 1}
    told = [r for r in records if isinstance(r, GatewayEvent)]  # the hub is told, once
    assert [(e.code, e.detail["source"], e.detail["checkpoints"]) for e in told] == [
        ("checkpoint_rejected", "tester", 1)]
    assert told[0].detail["error"].startswith("UnicodeEncodeError: ")


async def test_a_tester_file_named_in_bytes_that_are_not_utf8_is_read_once_across_a_restart(
        tmp_path: Path) -> None:
    watch = tmp_path / "datalog"
    watch.mkdir()
    raw = stdf_bytes(METIS)
    name = os.fsdecode(b"LOT_\xe9_1.stdf")  # written by a Latin-1 tester host
    (watch / name).write_bytes(raw)
    sources = [{"name": "tester", "type": "tail", "paths": [str(watch)],
                "poll_interval": 0.02}]

    def finished(gateway: Gateway) -> bool:
        files = (gateway.store.checkpoints.get("tester") or {}).get("files", {})
        return any(entry["done"] for entry in files.values())

    gateway = await run_until_done(tmp_path, sources=sources, until=finished)
    assert gateway.metrics.as_dict()["gateway_source_restarts_total"] == {}
    records, checkpoints, _ = await stored(tmp_path / "spool")
    decoder = StdfDecoder()
    decoder.feed(raw)
    prr = sum(1 for r in decoder.records() if r.name == "PRR")
    assert len([r for r in records if isinstance(r, PartResult)]) == prr > 0
    (key, entry), = checkpoints["tester"]["files"].items()
    assert key == "\0" + os.fsencode(str(watch / name)).hex()
    assert entry["done"] and entry["offset"] == len(raw)

    # a restart resumes from that checkpoint: the file is known, nothing is read again
    polls = 0

    def polled_a_while(gateway: Gateway) -> bool:
        nonlocal polls
        polls += 1
        return polls > 50  # 1 s of 0.02 s polls: it would have read the file again

    gateway = await run_until_done(tmp_path, sources=sources, until=polled_a_while)
    assert gateway.metrics.as_dict()["tail_records_total"] == {}
    assert (await stored(tmp_path / "spool"))[:2] == (records, checkpoints)
