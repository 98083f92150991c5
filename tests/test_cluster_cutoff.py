"""A cluster node cut off from Redis (a TCP proxy in between stops forwarding: no RST, no
FIN, requests simply get no answer) stops serving live data and says so: /healthz answers
503 ``unavailable`` (a load balancer moves its clients elsewhere), its /ws/live clients get
a ``status`` ``cluster_unavailable``, and its partitions are given up; when the link is
back it is healthy again and its clients are told ``ok``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio
from cluster_redis import TcpProxy, redis_server  # noqa: F401  (the fixture)

from tests.cluster_haproxy import NodeSet
from tests.cluster_live import LiveFollower
from tests.processes import wait_for

NODE_TOML = """\
[hub]
listen = "127.0.0.1"
port = {port}
data_dir = "@DATA@/{node}"

[hub.cluster]
node_id = "{node}"
postgres_dsn = "@DSN@"
redis_url = "redis://127.0.0.1:@PROXY@/0"
key_prefix = "cut"
partitions = 4
lease_ttl_s = 2.0
stale_after_s = 1.5
"""


class Proxy(TcpProxy):
    """tests/cluster_redis.py's proxy, its pumps tolerant of a peer already gone when it
    forwards an EOF (seen when the link is restored: the cut connections are torn down)."""

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream,
                    gate: trio.Event) -> None:
        try:
            await super()._pump(src, dst, gate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def owned(port: int) -> list[int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=3) as r:
        result: list[int] = json.loads(r.read())["cluster"]["ownership"]["owned"]
    return result


async def test_node_cut_off_from_redis_says_so_and_recovers(
        tmp_path: Path, pg_dsn: str, redis_server: Any) -> None:  # noqa: F811
    proxy = Proxy(redis_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        text = (NODE_TOML.replace("@DATA@", str(tmp_path / "data")).replace("@DSN@", pg_dsn)
                .replace("@PROXY@", str(proxy.port)))
        with NodeSet(tmp_path / "nodes", 1, lambda i: text) as nodes:
            await trio.to_thread.run_sync(lambda: nodes.start_all(timeout=90))
            port = nodes.ports[0]
            await trio.to_thread.run_sync(lambda: wait_for(lambda: len(owned(port)) == 4,
                                                           timeout=30))
            follower = LiveFollower(port, ["#"])
            nursery.start_soon(follower.run)
            await follower.connected.wait()
            await trio.sleep(0.5)

            proxy.cut()
            _, body = await trio.to_thread.run_sync(lambda: wait_for(
                lambda: (h := healthz(port))[0] == 503 and h, timeout=20))
            assert body["status"] == "unavailable" and "Redis" in body["detail"]
            with trio.fail_after(20):
                while not any(m.get("code") == "cluster_unavailable"
                              for m in follower.status_items):
                    await trio.sleep(0.1)
            # a node that cannot prove its leases owns nothing
            await trio.to_thread.run_sync(lambda: wait_for(lambda: owned(port) == [],
                                                           timeout=20))

            proxy.restore()
            _, body = await trio.to_thread.run_sync(lambda: wait_for(
                lambda: (h := healthz(port))[0] == 200 and h, timeout=30))
            assert body["status"] == "ok"
            with trio.fail_after(30):
                while not (follower.status_items
                           and follower.status_items[-1].get("code") == "ok"):
                    await trio.sleep(0.1)
            await trio.to_thread.run_sync(lambda: wait_for(lambda: len(owned(port)) == 4,
                                                           timeout=30))
            assert follower.silent_gaps == []
        nursery.cancel_scope.cancel()
