"""SIGHUP on a hub cluster node (docs/operations.md, "Reload"): the node takes its file's
``[gateways]`` and ``[alerts]`` rules as the single hub does -- the partitions it owns judge
the records after the signal by the new rules.  One ``ClusterHub`` on a real PostgreSQL
and a real Redis, a peer gateway sending sensor readings."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Any

import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from hubtools import http_get
from peer_gateway import PeerGateway, data, rows, sensor
from test_cluster_parity import until

from edgegw.config import load
from edgegw.hub import HubConfig
from edgegw.hub.cluster.node import ClusterHub

RULE = """
[[alerts.rules]]
name = "chuck-hot"
kind = "sensor_range"
priority = "P1"
channel = "chuck"
high = {high}
"""


def write_config(path: Path, pg_dsn: str, redis_url: str, prefix: str, high: float) -> None:
    path.write_text(f"""
[hub]
port = 0
data_dir = "{path.parent / 'node'}"
[hub.cluster]
node_id = "na"
postgres_dsn = "{pg_dsn}"
redis_url = "{redis_url}"
key_prefix = "{prefix}"
partitions = 2
[gateways.ate-01]
token = "token-one"
""" + RULE.format(high=high))


async def test_a_node_judges_readings_after_a_sighup_by_its_new_alert_rules(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer,  # noqa: F811
        caplog: Any) -> None:
    path = tmp_path / "hub.toml"
    write_config(path, pg_dsn, redis_server.url, fresh_prefix(), high=50.0)
    hub = ClusterHub(load(HubConfig, path))
    hub.ingest.config_source = functools.partial(load, HubConfig, path, None)
    t0 = 1764130000.0

    async def reading(gw: PeerGateway, seq: int, value: float) -> None:
        await gw.send(data(seq, rows(seq, [sensor("chuck", value, ts=t0 + 3600 * seq)])))
        with trio.fail_after(20):
            await gw.until_acked(seq)

    async def alerts() -> list[float]:
        _, body = await http_get(hub.ingest.port or 0, "/api/alerts")
        return sorted(a["value"] for a in body["alerts"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await until(lambda: len(hub.owner.states()) == 2, 30, "both partitions owned")
        gw = await PeerGateway.connect(hub.ingest.port or 0, "ate-01", "token-one")
        await reading(gw, 1, 60.0)
        with trio.fail_after(20):
            while await alerts() != [60.0]:
                await trio.sleep(0.1)

        write_config(path, pg_dsn, redis_server.url, hub.cluster.key_prefix, high=100.0)
        reloaded = hub.metrics.counter("hub_config_reloads_total", "")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: reloaded.get(outcome="ok") == 1, 10, "the reload")

        await reading(gw, 2, 80.0)   # above the old limit, below the new one
        await reading(gw, 3, 150.0)  # above both
        with trio.fail_after(20):
            while await alerts() != [60.0, 150.0]:
                await trio.sleep(0.1)
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert "alert rules reloaded: changed chuck-hot" in log
        nursery.cancel_scope.cancel()
