"""Fidelity: the real galaxy-a530-lot2 file, decoded and mapped the way the gateway does and
applied to LiveState in frames the way the hub does, gives a wafer map and bin counts equal
to what the file itself says (its WRR, HBR, SBR, PCR and PRR records) -- fed directly, fed
out of order, and streamed for real through gateway and hub (then rebuilt after a hub
restart from the hub's store).

The file retests 113 dies at the end of the wafer without setting PART_FLG's supersede
bits; the tester's HBR/SBR count every part (1,569), the wafer map has one final result
per die (1,456 distinct X/Y).  Both figures are checked.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from shared_data import GALAXY, stdf_bytes, stdf_path

from edgegw.config import build
from edgegw.gateway import Gateway, GatewayConfig
from edgegw.hub import HubConfig, Ingest, topics
from edgegw.hub.live import LiveState
from edgegw.stdf import RecordMapper, StdfDecoder

FRAME_RECORDS = 500


@pytest.fixture(scope="module")
def galaxy() -> tuple[list[Any], list[Any]]:
    """(raw STDF records, mapped edgegw records) of the galaxy file."""
    decoder = StdfDecoder()
    decoder.feed(stdf_bytes(GALAXY))
    raw = list(decoder.records())
    mapper = RecordMapper("galaxy")
    mapped = mapper.map_all(raw, 1_000.0) + mapper.close(1_000.0)
    return raw, mapped


def frames(records: list[Any]) -> list[tuple[int, list[Any]]]:
    """The mapped records cut into frames, numbered as a gateway numbers them (rid from 1)."""
    return [(i + 1, records[i : i + FRAME_RECORDS]) for i in range(0, len(records), FRAME_RECORDS)]


def file_figures(raw: list[Any]) -> dict[str, Any]:
    """What the file itself says, from its raw records, without LiveState or the mapper."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rec in raw:
        by_name.setdefault(rec.name, []).append(rec.fields)
    prrs = by_name["PRR"]
    final: dict[tuple[int, int], dict[str, Any]] = {}
    for prr in prrs:  # file order: a later result at the same X/Y is the retest
        final[(prr["X_COORD"], prr["Y_COORD"])] = prr
    (wrr,) = by_name["WRR"]
    (pcr,) = by_name["PCR"]
    return {
        "lot_id": by_name["MIR"][0]["LOT_ID"],
        "wafer_id": by_name["WIR"][0]["WAFER_ID"],
        "hbr": {str(h["HBIN_NUM"]): h["HBIN_CNT"] for h in by_name["HBR"]
                if h["HEAD_NUM"] == 255},
        "sbr": {str(s["SBIN_NUM"]): s["SBIN_CNT"] for s in by_name["SBR"]
                if s["HEAD_NUM"] == 255},
        "wrr_part_cnt": wrr["PART_CNT"],
        "pcr_part_cnt": pcr["PART_CNT"],
        "prr_count": len(prrs),
        "map": {xy: (p["HARD_BIN"], p["SOFT_BIN"], not p["PART_FLG"] & 0x08)
                for xy, p in final.items()},
    }


def apply(order: list[tuple[int, list[Any]]]) -> LiveState:
    state = LiveState(lambda topic, delta: None)
    for first_rid, batch in order:
        state.on_records("galaxy-gw", first_rid, batch, now=2_000.0)
    return state


def check_against_file(state: LiveState, fig: dict[str, Any]) -> None:
    lot = state.snapshot(topics.lot(fig["lot_id"]))
    wafer = state.snapshot(topics.wafer(fig["lot_id"], fig["wafer_id"]))
    assert lot is not None and wafer is not None

    # every part result counted, as the tester's own HBR/SBR/WRR/PCR count them
    assert wafer["parts"] == lot["parts"] == fig["wrr_part_cnt"] == fig["pcr_part_cnt"]
    assert wafer["parts"] == fig["prr_count"] == 1569
    assert lot["hard_bins_tested"] == wafer["hard_bins_tested"] == fig["hbr"]
    assert lot["soft_bins_tested"] == wafer["soft_bins_tested"] == fig["sbr"]
    assert lot["reported"]["hard_bins"] == fig["hbr"]  # the HBRs themselves, as received
    assert lot["reported"]["soft_bins"] == fig["sbr"]
    assert lot["reported"]["part_count"] == fig["pcr_part_cnt"]
    assert wafer["reported"]["part_count"] == fig["wrr_part_cnt"]

    # the wafer map: one final result per distinct X/Y, the file's last one there
    assert wafer["die_count"] == len(wafer["dies"]) == len(fig["map"]) == 1456
    live_map = {(x, y): (hb, sb, passed) for x, y, hb, sb, passed, _site in wafer["dies"]}
    assert live_map == fig["map"]
    assert wafer["retests"] == fig["prr_count"] - len(fig["map"]) == 113
    final_hard = Counter(str(hb) for hb, _, _ in fig["map"].values())
    assert wafer["hard_bins"] == dict(sorted(final_hard.items(), key=lambda kv: int(kv[0])))
    good = sum(1 for _, _, passed in fig["map"].values() if passed)
    assert wafer["good"] == lot["good"] == good
    assert wafer["yield"] == pytest.approx(good / len(fig["map"]))
    assert wafer["status"] == "closed" and lot["status"] == "closed"


def test_galaxy_lot_in_file_order_matches_the_file(galaxy: tuple[list[Any], list[Any]]) -> None:
    raw, mapped = galaxy
    check_against_file(apply(frames(mapped)), file_figures(raw))


def test_galaxy_lot_applied_out_of_order_matches_the_file(
        galaxy: tuple[list[Any], list[Any]]) -> None:
    """After an outage the hub applies live frames before the backlog: the second half of
    the frames first.  The rids still order the retests after the first tests."""
    raw, mapped = galaxy
    fs = frames(mapped)
    half = len(fs) // 2
    check_against_file(apply(fs[half:] + fs[:half]), file_figures(raw))


def test_galaxy_test_statistics_match_a_direct_computation(
        galaxy: tuple[list[Any], list[Any]]) -> None:
    raw, mapped = galaxy
    state = apply(frames(mapped))
    lot_id = file_figures(raw)["lot_id"]
    values: dict[int, list[float]] = {}
    for rec in mapped:
        # STDF V4 (PTR, "RESULT"): a value is useful only if TEST_FLG bits 0-5 and PARM_FLG
        # bits 0-2 are 0 (the file's 15 alarmed values are instrument clamps, -10 mA ...)
        if type(rec).__name__ == "ParametricResult" and rec.value is not None \
                and not rec.test_flag & 0x3F and not rec.parm_flag & 0x07:
            values.setdefault(rec.test_num, []).append(rec.value)
    assert len(values) > 50
    for test_num, vals in values.items():
        stats = state.snapshot(topics.test(lot_id, test_num))
        assert stats is not None and stats["count"] == len(vals)
        mean = sum(vals) / len(vals)
        assert stats["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-9)
        if len(vals) > 1:
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
            assert stats["sigma"] == pytest.approx(var**0.5, rel=1e-6, abs=1e-9)


async def test_galaxy_streamed_through_gateway_and_hub_then_rebuilt_after_restart(
        tmp_path: Path, galaxy: tuple[list[Any], list[Any]]) -> None:
    """The whole path: the gateway tails the file, frames go over the wire protocol to the
    hub, the hub applies them durably and feeds LiveState.  Then the hub restarts and
    rebuilds LiveState from its store: the same figures."""
    raw, _ = galaxy
    fig = file_figures(raw)
    inbox = tmp_path / "tester"
    inbox.mkdir()
    shutil.copy(stdf_path(GALAXY), inbox)
    hub_cfg = build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp_path / "hub")},
                                "gateways": {"ate-galaxy": {"token": "secret"}}})
    lot_topic = topics.lot(fig["lot_id"])

    def lot_done(state: LiveState) -> bool:
        lot = state.snapshot(lot_topic)
        return bool(lot) and lot["status"] == "closed" and lot["parts"] == fig["prr_count"]

    state = LiveState(lambda topic, delta: None)
    hub = Ingest(hub_cfg)
    hub.add_consumer(state)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        gw_cfg = build(GatewayConfig, {
            "gateway": {"id": "ate-galaxy", "token": "secret",
                        "state_dir": str(tmp_path / "gateway"),
                        "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
            "sources": [{"name": "a530", "type": "stdf", "paths": [str(inbox)],
                         "poll_interval": 0.1, "read_size": 1 << 20}],
        })
        await nursery.start(Gateway(gw_cfg).run)
        with trio.fail_after(60):
            while not lot_done(state):  # polling the consumer's state
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    check_against_file(state, fig)
    assert state.snapshot(topics.gateway("ate-galaxy"))["records"] == len(galaxy[1])

    rebuilt = LiveState(lambda topic, delta: None)
    hub2 = Ingest(hub_cfg)
    hub2.add_consumer(rebuilt)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub2.run)  # replays the stored frames before it listens
        nursery.cancel_scope.cancel()
    check_against_file(rebuilt, fig)
    wafer_topic = topics.wafer(fig["lot_id"], fig["wafer_id"])
    assert rebuilt.snapshot(wafer_topic) == state.snapshot(wafer_topic)
