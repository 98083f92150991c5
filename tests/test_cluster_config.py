"""``[hub.cluster]`` (docs/configuration.md, docs/cluster.md): checked like every section."""

from __future__ import annotations

import os
import socket

import pytest

from edgegw.config import ConfigError, build
from edgegw.hub import HubConfig
from edgegw.hub.cluster import node_id_of
from edgegw.startup import describe

DSN = "postgresql://edgegw@127.0.0.1/edgegw"


def hub(cluster: dict[str, object] | None) -> HubConfig:
    data: dict[str, object] = {"hub": {"port": 0}}
    if cluster is not None:
        data["hub"] = {"port": 0, "cluster": cluster}
    return build(HubConfig, data)


def test_absent_means_a_single_hub() -> None:
    assert hub(None).hub.cluster is None


def test_defaults_and_node_id() -> None:
    cfg = hub({"postgres_dsn": DSN}).hub.cluster
    assert cfg is not None
    assert (cfg.partitions, cfg.lease_ttl_s, cfg.redis_url, cfg.key_prefix) == (
        64, 5.0, "redis://127.0.0.1:6379/0", "edgegw")
    assert node_id_of(cfg) == f"{socket.gethostname()}-{os.getpid()}"
    named = hub({"postgres_dsn": DSN, "node_id": "hub-b"}).hub.cluster
    assert named is not None and node_id_of(named) == "hub-b"


@pytest.mark.parametrize(("cluster", "message"), [
    ({}, "hub.cluster.postgres_dsn: required in cluster mode"),
    ({"postgres_dsn": DSN, "bogus": 1}, "hub.cluster.bogus: unknown key"),
    ({"postgres_dsn": DSN, "partitions": 0}, "hub.cluster.partitions: expected"),
    ({"postgres_dsn": DSN, "redis_url": "http://x"}, "hub.cluster.redis_url: expected redis://"),
    ({"postgres_dsn": DSN, "node_id": "a b"}, "hub.cluster.node_id: at most 64 of"),
    ({"postgres_dsn": DSN, "key_prefix": ""}, "hub.cluster.key_prefix: 1-64 of"),
])
def test_problems_are_named_by_key(cluster: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        hub(cluster)
    assert any(message in e for e in info.value.errors), info.value.errors


def test_a_partition_mismatch_is_one_start_up_line() -> None:
    from edgegw.hub.cluster import PartitionMismatch

    exc = PartitionMismatch("hub.cluster.partitions is 32 but the cluster ... 16")
    assert describe(exc) == "hub.cluster.partitions is 32 but the cluster ... 16"
