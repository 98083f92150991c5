"""``[hub.cluster]``: the cluster settings (docs/cluster.md, "Configuration").

The section's dataclass is ``edgegw.hub.config.ClusterSection`` (re-exported here as
``ClusterConfig``): the hub's config must not import this package (see its docstring).
"""

from __future__ import annotations

import os
import socket

from ..config import ClusterSection

ClusterConfig = ClusterSection


def node_id_of(cfg: ClusterSection) -> str:
    """The node's id: ``node_id`` when set, else ``<host name>-<pid>`` (unique among live
    nodes, but a restarted node is a new node: its old leases simply expire)."""
    return cfg.node_id or f"{socket.gethostname()}-{os.getpid()}"


__all__ = ["ClusterConfig", "node_id_of"]
