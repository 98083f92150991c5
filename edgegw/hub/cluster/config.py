"""``[hub.cluster]``: the cluster settings (docs/cluster.md, "Configuration").

The section's dataclass is ``edgegw.hub.config.ClusterSection`` (re-exported here as
``ClusterConfig``): the hub's config must not import this package (see its docstring).
"""

from __future__ import annotations

import os
import socket
import ssl
from urllib.parse import urlsplit, urlunsplit

from ...startup import StartupError
from ...tls import client_context
from ..config import ClusterSection

ClusterConfig = ClusterSection


def node_id_of(cfg: ClusterSection) -> str:
    """The node's id: ``node_id`` when set, else ``<host name>-<pid>`` (unique among live
    nodes, but a restarted node is a new node: its old leases simply expire)."""
    return cfg.node_id or f"{socket.gethostname()}-{os.getpid()}"


def redis_tls(cfg: ClusterSection) -> ssl.SSLContext | None:
    """The client context for the rediss:// shards, from ``redis_tls_*`` (None: no
    files given -- the system's CAs, no client certificate).  A file that cannot be
    read or is no certificate or key stops the start with one line naming the key."""
    if not (cfg.redis_tls_ca_file or cfg.redis_tls_cert_file):
        return None
    try:
        return client_context(cfg.redis_tls_ca_file, cfg.redis_tls_cert_file,
                              cfg.redis_tls_key_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        keys = [f"hub.cluster.{k} {getattr(cfg, k)!r}" for k in (
            "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
            if getattr(cfg, k)]
        raise StartupError(f"{', '.join(keys)}: cannot use {'it' if len(keys) == 1 else 'them'}"
                           f" for TLS to Redis: {exc}") from None


def without_password(url: str) -> str:
    """``url`` as a log line or an error may show it: its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


__all__ = ["ClusterConfig", "node_id_of", "redis_tls", "without_password"]
