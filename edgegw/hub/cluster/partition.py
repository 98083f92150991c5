"""Which partition a record belongs to (sans-IO; the contract in docs/cluster.md).

A partition is the unit of ownership in a cluster: one node at a time computes the live
state of a partition's lots.  Records of one lot always land in one partition, so a lot's
state is computed in one place; records that belong to no lot (sensor readings, gateway
events) go with their gateway.  The hash is fixed by the design (blake2b, 8 bytes, big
endian) so every node, and every version of every node, agrees on it: changing it, or the
number of partitions, would move lots between partitions under a running cluster.
"""

from __future__ import annotations

import hashlib
from typing import Any


class PartitionFenced(Exception):
    """An owner's write of a partition refused: a newer owner has claimed the partition
    (its lease token is newer; docs/cluster.md, "A node paused")."""


def partition_key(gateway_id: str, record: Any) -> str:
    """The record's lot id when it has one (a ``str`` ``lot_id``), else ``"gw:<gateway>"``."""
    lot = getattr(record, "lot_id", None)
    return lot if isinstance(lot, str) else "gw:" + gateway_id


def partition_of(key: str, n_partitions: int) -> int:
    """The partition (0 .. n_partitions - 1) of a partition key."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_partitions


def split_runs(gateway_id: str, records: list[Any], n_partitions: int,
               ) -> list[tuple[int, int, int]]:
    """A frame's records as runs of consecutive records of one partition:
    ``(partition, start, stop)`` index ranges in record order.  A run keeps its records'
    ids consecutive (its first rid is the frame's first rid + start), and the runs of one
    partition keep the records' order.  Keys repeat (a frame is usually one lot), so each
    distinct key is hashed once."""
    runs: list[tuple[int, int, int]] = []
    memo: dict[str, int] = {}
    current = -1
    start = 0
    for i, r in enumerate(records):
        key = partition_key(gateway_id, r)
        p = memo.get(key)
        if p is None:
            p = memo[key] = partition_of(key, n_partitions)
        if p != current:
            if current >= 0:
                runs.append((current, start, i))
            current, start = p, i
    if current >= 0:
        runs.append((current, start, len(records)))
    return runs


__all__ = ["PartitionFenced", "partition_key", "partition_of", "split_runs"]
