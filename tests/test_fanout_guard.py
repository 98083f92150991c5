"""The fan-out tick as a failure boundary per topic, and the bounds of a client's resumes.

One topic whose snapshot or delta the hub cannot build or encode (a hub bug, or a value no
check caught: a CBOR bignum as a parametric result's site once broke every later tick, for
every client) is that topic's failure: counted (``edgegw_live_topic_errors_total``), logged,
its subscriber resynced (``resync: "hub_error"``) -- every other topic keeps streaming to
every client, every tick (docs/live-protocol.md, "Failure boundaries")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import trio
from hubtools import http_get
from test_live_protocol import DictState, Viewer
from test_protocol_audit import JSON as JSON_PROTOCOL
from test_protocol_audit import hello, running_hub
from trio_websocket import open_websocket_url

from edgegw.hub.fanout import CBOR, JSON, LiveConfig, LiveHub
from edgegw.metrics import Metrics

BIG = 2**20000  # a CBOR bignum: past the 4,300 digits Python will print (or JSON write)


class OneBroken(DictState):
    """A live state whose snapshot of one topic raises (a bug in building it)."""

    broken = "lot/L2"

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        if topic == self.broken:
            raise RuntimeError("a bug in this topic's snapshot")
        return super().snapshot(topic)


def make_hub() -> tuple[OneBroken, LiveHub]:
    state = OneBroken()
    hub = LiveHub(state, LiveConfig(), epoch="E1", metrics=Metrics())
    state.hub = hub
    return state, hub


def test_a_topic_that_cannot_be_built_or_encoded_stops_only_itself() -> None:
    """A delta JSON cannot write (a bignum) and a snapshot that raises: each is its topic's
    failure for the client it was for; the other topics reach both clients every tick,
    and the broken topic comes back, marked ``resync: hub_error``, once it can be sent."""
    state, hub = make_hub()
    for topic in ("lot/L1", "lot/L2", "test/L1/1000"):
        state.change(topic, {"n": 1})
    as_json, as_cbor = Viewer(hub, JSON), Viewer(hub, CBOR)
    for viewer in (as_json, as_cbor):
        viewer.send({"type": "subscribe", "id": 1, "topics": ["#"]})
    hub.tick(0.0, 0.0)
    state.change("test/L1/1000", {"n": BIG})  # JSON has no number this long
    for t in range(1, 6):
        state.change("lot/L1", {"n": t + 1})
        state.change("test/L1/1000", {"n": BIG + t})
        hub.tick(t * 0.05, t * 0.05)
        for viewer in (as_json, as_cbor):
            viewer.drain()
            assert viewer.views["lot/L1"] == {"n": t + 1}, "every tick, to both"
    errors = hub.metrics.counter("live_topic_errors_total")
    assert errors.get(stage="snapshot") >= 1 and errors.get(stage="encode") >= 1
    assert "lot/L2" not in as_json.views and "lot/L2" not in as_cbor.views
    assert as_cbor.views["test/L1/1000"] == {"n": BIG + 5}  # CBOR carries it: no failure
    assert as_json.views["test/L1/1000"] == {"n": 1}  # as before: nothing it could read
    # The topic can be sent again: a snapshot, marked as what it is.
    state.change("test/L1/1000", {"n": 7})
    hub.tick(1.0, 1.0)
    hub.tick(1.05, 1.05)
    as_json.drain()
    assert as_json.views["test/L1/1000"] == {"n": 7}
    resent = [i for i in as_json.items() if i["topic"] == "test/L1/1000"]
    assert resent[-1]["type"] == "snapshot" and resent[-1]["resync"] == "hub_error"
    assert hub.metrics.counter("live_resyncs_total").get(reason="hub_error") >= 1


# --------------------------------------------------------------------------- a real hub


def ptr(
    test_num: int,
    site: Any = 1,
    head: Any = 1,
    flag: Any = 0,
    parm_flag: Any = 0,
    text: Any = "t",
    units: Any = "V",
    ts: Any = 1.5,
) -> list[Any]:
    """A parametric result (v1 row) of lot L1, part p."""
    return [6, 0, ts, "L1", head, site, "p", test_num, text, 1.0, 0.0, 2.0, units, True,
            flag, parm_flag]  # fmt: skip


def columnar(first_rid: int, records: list[list[Any]]) -> list[Any]:
    """v1 rows of one kind as a v2 columnar body: a column of values per field."""
    kind = records[0][0]
    return [
        first_rid,
        ["s"],
        [kind, len(records)],
        [[kind, [list(col) for col in zip(*records, strict=True)][1:]]],
    ]


async def test_a_bignum_site_head_or_flag_of_an_existing_test_is_a_bad_record(
    tmp_path: Path,
) -> None:
    """docs/protocol.md section 2: every integer fits 64 bits.  A parametric result of a
    test the lot has is counted inline (the batched apply), where its site, head and
    flags were not checked: a bignum site or head was counted, its test's every later
    snapshot and delta raised, and the fan-out's tick failed for every client from then
    on.  Now each such record is a bad record -- in rows (v1) and in columns (v2) --, its
    test's figures are unchanged and every topic streams.  (Its text and units, kept for
    its snapshot, and the record's time, were not type- or range-checked there either.)"""
    bad = [ptr(1000, site=BIG), ptr(1000, head=BIG), ptr(1000, flag=BIG),
           ptr(1000, parm_flag=BIG), ptr(1000, site=-BIG), ptr(1000, text=BIG),
           ptr(1000, units=BIG), ptr(1000, ts=BIG)]  # fmt: skip
    async with running_hub(tmp_path) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/gateway") as gw:
            await gw.send_message(hello([1, 2]))
            assert cbor2.loads(await gw.get_message())[0] == 2
            first = [
                [1, 0, 1.0, "L1"],
                [3, 0, 1.0, "L1", "W1"],
                ptr(1000),
                ptr(2000),
                [5, 0, 1.5, "L1", "W1", 1, 1, "p", 1, 0, 1, 1, True],
            ]
            bodies = [[100, ["s"], first]]
            for i, record in enumerate(bad):
                bodies.append([200 + 10 * i, ["s"], [record, ptr(2000)]])  # rows
                bodies.append(columnar(400 + 10 * i, [ptr(2000), record]))  # columns
            for seq, body in enumerate(bodies, start=1):
                await gw.send_message(cbor2.dumps([4, seq, 1.0, cbor2.dumps(body)]))
                assert cbor2.loads(await gw.get_message()) == [5, seq, []]
        url = f"ws://127.0.0.1:{port}/ws/live"
        async with open_websocket_url(url, subprotocols=[JSON_PROTOCOL]) as ws:
            await ws.send_message('{"type": "subscribe", "id": 1, "topics": ["#"]}')
            views: dict[str, Any] = {}
            with trio.fail_after(10):
                while not {"test/L1/1000", "test/L1/2000", "hub/state"} <= views.keys():
                    message = json.loads(await ws.get_message())
                    views.update(
                        (i["topic"], i["data"])
                        for i in message.get("items", [])
                        if i["type"] == "snapshot"
                    )
        assert views["test/L1/1000"]["count"] == 1, views["test/L1/1000"]
        assert views["test/L1/2000"]["count"] == 1 + 2 * len(bad)
        assert views["hub/state"]["reasons"]["bad_record"]["count"] == 2 * len(bad)
        _, stats = await http_get(port, "/api/stats")
        assert stats["live_state"]["not_applied"] == 2 * len(bad)


# --------------------------------------------------------------------------- resumes


def kept_size(client: Any) -> int:
    """What a client's kept resume entries hold: characters of their topics and epochs,
    bytes of their offsets."""
    return sum(
        len(topic) + (len(epoch) if isinstance(epoch, str) else 0) + offset.bit_length() // 8
        for topic, (epoch, offset) in client.resume_later.items()
    )


def test_resume_entries_of_topics_the_hub_lacks_are_bounded_per_client() -> None:
    """docs/live-protocol.md, "subscribe": a resume entry of a topic the hub does not have
    is kept until the topic appears -- at most 1,024 per client, the oldest dropped
    (counted), none for a topic past 1,024 characters, and an epoch that is no hub's (a
    string past 128 characters, or not a string) or an offset past 2^63 not kept as sent.
    Before, every entry of every request was kept as sent: 256 patterns, each subscribed
    in a 256 KiB request, held hundreds of MB for one client."""
    state, hub = make_hub()
    viewer = Viewer(hub, CBOR)
    for n in range(4):  # each request a new pattern, with 2,000 entries
        resume = {f"lot/L{n}/wafer/W{i}": ["E1", i] for i in range(2000)}
        resume[f"lot/L{n}/wafer/{'x' * 5000}"] = ["E1", 1]
        resume[f"lot/L{n}/wafer/big-epoch"] = ["e" * 100_000, 1]
        resume[f"lot/L{n}/wafer/big-offset"] = ["E1", 2**200_000]
        viewer.send({"type": "subscribe", "id": n, "topics": [f"lot/L{n}/#"], "resume": resume})
        assert viewer.drain()[-1]["type"] == "subscribed"
    client = viewer.client
    assert len(client.resume_later) == 1024
    assert kept_size(client) < 100_000  # (before: over 300 KB for the epochs alone)
    dropped = hub.metrics.counter("live_resumes_dropped_total").total()
    assert dropped == 4 * 2003 - 1024  # (the 4 topics past 1,024 characters among them)
    # The newest are kept, and apply when their topic appears.
    state.change("lot/L3/wafer/W1999", {"n": 1})
    state.change("lot/L3/wafer/big-epoch", {"n": 1})
    state.change("lot/L3/wafer/big-offset", {"n": 1})
    state.change("lot/L0/wafer/W0", {"n": 1})  # dropped: a plain snapshot
    hub.tick(0.0, 0.0)
    viewer.drain()
    got = {i["topic"]: i.get("resync") for i in viewer.items()}
    assert got == {
        "lot/L3/wafer/W1999": "offset_ahead",
        "lot/L3/wafer/big-epoch": "epoch_changed",
        "lot/L3/wafer/big-offset": "offset_ahead",
        "lot/L0/wafer/W0": None,
    }
