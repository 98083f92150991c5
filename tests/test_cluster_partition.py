"""The partition rule every node must agree on (docs/cluster.md, "Partitions")."""

from __future__ import annotations

import hashlib

from edgegw.hub.cluster.partition import partition_key, partition_of, split_runs
from edgegw.records import GatewayEvent, LotStart, PartResult


def test_partition_of_is_the_documented_hash() -> None:
    # pinned values: a change here would move lots between partitions under a live cluster
    assert partition_of("LOT1", 64) == 41
    assert partition_of("gw:ate-01", 64) == 15
    assert partition_of("LOT1", 7) == 4
    for key in ("", "x", "LOT-ÄÖ", "gw:" + "g" * 200):
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        assert partition_of(key, 13) == int.from_bytes(digest, "big") % 13


def test_partition_key_lot_or_gateway() -> None:
    assert partition_key("gw1", LotStart("s", 1.0, "L7")) == "L7"
    assert partition_key("gw1", GatewayEvent("s", 1.0, "info", "c", "m")) == "gw:gw1"
    assert partition_key("gw1", object()) == "gw:gw1"


def test_split_runs_keeps_order_and_covers_every_record() -> None:
    def part(lot: str) -> PartResult:
        return PartResult("s", 1.0, lot, "W1", 1, 1, "p1", 0, 0, 1, 1, True)

    lots = ["A", "A", "B", "A", "B", "B"]
    records = [part(lot) for lot in lots] + [GatewayEvent("s", 1.0, "info", "c", "m")]
    runs = split_runs("gw", records, 4096)
    assert [(s, e) for _, s, e in runs] == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]
    pa, pb, pg = (partition_of(k, 4096) for k in ("A", "B", "gw:gw"))
    assert [p for p, _, _ in runs] == [pa, pb, pa, pb, pg]
    assert split_runs("gw", [], 8) == []
    # with one partition everything is one run
    assert split_runs("gw", records, 1) == [(0, 0, len(records))]
