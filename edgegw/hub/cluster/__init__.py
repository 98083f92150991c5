"""The hub as a cluster of nodes on PostgreSQL (durable truth) and Redis (what crosses
nodes and may be rebuilt): docs/cluster.md.

Public face: the names in ``__all__``.  They load on first use (PEP 562): the base install
has no PostgreSQL or Redis client (the ``cluster`` extra brings them), and a single hub
never imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazyface import lazy_face

_EXPORTS = {
    "ClusterConfig": "edgegw.hub.cluster.config",
    "node_id_of": "edgegw.hub.cluster.config",
    "partition_key": "edgegw.hub.cluster.partition",
    "partition_of": "edgegw.hub.cluster.partition",
    "split_runs": "edgegw.hub.cluster.partition",
    "ClusterStore": "edgegw.hub.cluster.pgstore",
    "GatewaySuperseded": "edgegw.hub.cluster.pgstore",
    "LockTimeout": "edgegw.hub.cluster.pgstore",
    "LogChunk": "edgegw.hub.cluster.pgstore",
    "PartitionMismatch": "edgegw.hub.cluster.pgstore",
    "SessionEnded": "edgegw.hub.cluster.pgstore",
    "ShardMismatch": "edgegw.hub.cluster.pgstore",
    "StoreUnavailable": "edgegw.hub.cluster.pgstore",
    "LeasePlanner": "edgegw.hub.cluster.owner",
    "PartitionOwner": "edgegw.hub.cluster.owner",
    "ClusterHub": "edgegw.hub.cluster.node",
    "BusUnavailable": "edgegw.hub.cluster.bus",
    "ClusterBus": "edgegw.hub.cluster.bus",
    "EpochChanged": "edgegw.hub.cluster.bus",
    "StreamEntry": "edgegw.hub.cluster.bus",
    "Mirror": "edgegw.hub.cluster.mirror",
    "MirrorState": "edgegw.hub.cluster.mirror",
    "TopicPublisher": "edgegw.hub.cluster.publisher",
}

#: the modules other parts of the hub (and tests) use: the PostgreSQL store and the
#: sans-IO partition rule, the config section; the Redis bus, the node's mirror of the live
#: topics, the partition owner's publisher; ownership, the node assembly, its /api; the
#: cluster's one alert feed and gateway presence; the gateway topics and per-die values;
#: its /api/stats
_SUBMODULES = ("alertfeed", "api", "bus", "config", "dievalues", "gateways", "mirror", "node",
               "owner", "partition", "pgstore", "publisher", "stats")

__all__ = [*sorted(_EXPORTS), *_SUBMODULES]

if TYPE_CHECKING:
    from .bus import BusUnavailable as BusUnavailable
    from .bus import ClusterBus as ClusterBus
    from .bus import EpochChanged as EpochChanged
    from .bus import StreamEntry as StreamEntry
    from .config import ClusterConfig as ClusterConfig
    from .config import node_id_of as node_id_of
    from .mirror import Mirror as Mirror
    from .mirror import MirrorState as MirrorState
    from .node import ClusterHub as ClusterHub
    from .owner import LeasePlanner as LeasePlanner
    from .owner import PartitionOwner as PartitionOwner
    from .partition import partition_key as partition_key
    from .partition import partition_of as partition_of
    from .partition import split_runs as split_runs
    from .pgstore import ClusterStore as ClusterStore
    from .pgstore import GatewaySuperseded as GatewaySuperseded
    from .pgstore import LockTimeout as LockTimeout
    from .pgstore import LogChunk as LogChunk
    from .pgstore import PartitionMismatch as PartitionMismatch
    from .pgstore import SessionEnded as SessionEnded
    from .pgstore import ShardMismatch as ShardMismatch
    from .pgstore import StoreUnavailable as StoreUnavailable
    from .publisher import TopicPublisher as TopicPublisher

__getattr__, __dir__ = lazy_face(__name__, globals(), _EXPORTS, _SUBMODULES)
