"""SIGHUP on a hub cluster node (docs/operations.md, "Reload"): the node takes its file's
``[gateways]``, ``[auth]`` and ``[alerts]`` rules as the single hub does -- the partitions it
owns judge the records after the signal by the new rules, its requests and open /ws/live
connections are checked against the new keys.  One ``ClusterHub`` on a real PostgreSQL and
a real Redis, a peer gateway sending sensor readings."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_redis import RedisServer, fresh_prefix, redis_server  # noqa: F401
from peer_gateway import PeerGateway
from test_cluster_parity import until
from test_hub_reload import reading
from test_webhooks import HookServer
from trio_websocket import ConnectionClosed, open_websocket_url

from edgegw.auth import mint
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


def write_config(path: Path, pg_dsn: str, redis_url: str, prefix: str, high: float,
                 extra: str = "") -> None:
    secret = path.parent / "secret"
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
[auth]
mode = "jwt"
hs256_secret_file = "{secret}"
""" + RULE.format(high=high) + extra)


async def test_a_node_judges_readings_after_a_sighup_by_its_new_alert_rules(
        tmp_path: Path, pg_dsn: str, redis_server: RedisServer,  # noqa: F811
        caplog: Any) -> None:
    path = tmp_path / "hub.toml"
    first, second = "first-secret-" + "a" * 32, "second-secret-" + "b" * 32
    (tmp_path / "secret").write_text(first)
    write_config(path, pg_dsn, redis_server.url, fresh_prefix(), high=50.0)
    hub = ClusterHub(load(HubConfig, path))
    hub.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)
    hook = HookServer()

    async def get(path: str, secret: str) -> tuple[int, Any]:
        port = hub.ingest.port or 0
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer "
                f"{mint(secret, 'vic', 'viewer', 600)}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    async def alerts() -> list[float]:
        _, body = await get("/api/alerts", first)
        return sorted(a["value"] for a in body["alerts"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await until(lambda: len(hub.owner.states()) == 2, 30, "both partitions owned")
        gw = await PeerGateway.connect(hub.ingest.port or 0, "ate-01", "token-one")
        await reading(gw, 1, 60.0, within=20)
        with trio.fail_after(20):
            while await alerts() != [60.0]:
                await trio.sleep(0.1)

        # the limit raised and a webhook added: the alert feed this node holds sends to it
        hook_url = await hook.serve(nursery)
        write_config(path, pg_dsn, redis_server.url, hub.cluster.key_prefix, high=100.0,
                     extra=f'[[alerts.webhooks]]\nurl = "{hook_url}"\n')
        reloaded = hub.metrics.counter("hub_config_reloads_total", "")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: reloaded.get(outcome="ok") == 1, 10, "the reload")

        await reading(gw, 2, 80.0, within=20)   # above the old limit, below the new one
        await reading(gw, 3, 150.0, within=20)  # above both
        with trio.fail_after(20):
            while await alerts() != [60.0, 150.0]:
                await trio.sleep(0.1)
        with trio.fail_after(20):
            while 150.0 not in [r["json"]["alert"]["value"] for r in hook.accepted]:
                await trio.sleep(0.1)
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert "alert rules reloaded: changed chuck-hot; webhooks: added http://" in log

        # the signing secret rotated: an open dashboard connection signed with the old one
        # is closed, requests with it refused, the new one admitted
        async with open_websocket_url(
                f"ws://127.0.0.1:{hub.ingest.port}/ws/live",
                subprotocols=["edgegw.live.v1.json"], extra_headers=[
                    (b"authorization", f"Bearer {mint(first, 'vic', 'viewer', 600)}".encode())]
                ) as ws:
            with trio.fail_after(10):
                assert '"hello"' in await ws.get_message()
            (tmp_path / "secret").write_text(second)
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 4401
        assert (await get("/api/alerts", first))[0] == 401
        assert (await get("/api/alerts", second))[0] == 200
        nursery.cancel_scope.cancel()
