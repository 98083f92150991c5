"""The cluster on the Redis setups a site may give it (docs/cluster.md, "Redis over TLS,
with a password", "Redis must not evict"):

- TLS with a password: a real redis-server with its TLS port only, client certificates
  required (its default) and ``requirepass``, certificates from a CA of the test's own
  (trustme).  Before, a ``rediss://`` URL passed the config check and was then spoken to
  in plain text, and a wrong password ended the bus with an exception group;
- a Redis that may evict keys (``maxmemory`` with an LRU policy, the default of many
  managed Redis offers): said at start, and on /metrics.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cluster_redis import RedisServer, fresh_prefix, private_redis

from edgegw.config import ConfigError, build
from edgegw.hub import HubConfig
from edgegw.hub.cluster import ClusterBus
from edgegw.hub.cluster.config import redis_tls, without_password
from edgegw.startup import StartupError

PASSWORD = "p@ss:w/rd"  # every character a URL must percent-encode
QUOTED = "p%40ss%3Aw%2Frd"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, the server's certificate (for 127.0.0.1) and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    client = ca.issue_cert("edgegw-node@example.com")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    (d / "other-ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    return {"ca": d / "ca.pem", "server": d / "server.pem", "client_cert": d / "client.pem",
            "client_key": d / "client.key", "other_ca": d / "other-ca.pem"}


@pytest.fixture(scope="module")
def tls_redis(pki: dict[str, Path]) -> Iterator[RedisServer]:
    ready = ssl.create_default_context(cafile=str(pki["ca"]))
    ready.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    with private_redis(["--tls-cert-file", str(pki["server"]), "--tls-key-file",
                        str(pki["server"]), "--tls-ca-cert-file", str(pki["ca"]),
                        "--requirepass", PASSWORD], tls=ready) as server:
        yield server


def cluster(**keys: Any) -> Any:
    return build(HubConfig, {"hub": {"cluster": {"postgres_dsn": "dbname=x", **keys}}}
                 ).hub.cluster


def tls_keys(pki: dict[str, Path], ca: str = "ca") -> dict[str, str]:
    return {"redis_tls_ca_file": str(pki[ca]), "redis_tls_cert_file": str(pki["client_cert"]),
            "redis_tls_key_file": str(pki["client_key"])}


async def test_a_node_reaches_redis_over_tls_with_a_password_and_a_client_certificate(
        tls_redis: RedisServer, pki: dict[str, Path]) -> None:
    cc = cluster(redis_url=f"rediss://:{QUOTED}@127.0.0.1:{tls_redis.port}/0",
                 **tls_keys(pki))
    bus = ClusterBus(cc.redis_url, fresh_prefix(), "a", tls=redis_tls(cc))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(bus.run)
        assert not bus.stale
        token = await bus.acquire("p1", 5.0)
        assert token is not None and await bus.lease_holder("p1") == ("a", token)
        await bus.set_presence("ate-01", 5.0, since="1")
        assert await bus.presence("ate-01") == {"node": "a", "since": "1"}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("case", ["wrong password", "unknown CA", "plain text"])
async def test_a_node_that_cannot_get_in_waits_says_why_and_never_logs_the_password(
        tls_redis: RedisServer, pki: dict[str, Path], case: str,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "wrong-s3cret" if case == "wrong password" else QUOTED
    scheme = "redis" if case == "plain text" else "rediss"
    keys = tls_keys(pki, "other_ca" if case == "unknown CA" else "ca")
    if case == "plain text":
        keys = {}
    cc = cluster(redis_url=f"{scheme}://:{secret}@127.0.0.1:{tls_redis.port}/0", **keys)
    bus = ClusterBus(cc.redis_url, fresh_prefix(), "a", tls=redis_tls(cc))
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(3):
            await nursery.start(bus.run)
            pytest.fail("the bus started without getting into Redis")
        assert bus.stale
        reason = bus.shards[0].stale_reason
        assert reason and reason != "not connected yet", reason
        nursery.cancel_scope.cancel()
    said = " ".join([reason, *(r.getMessage() for r in caplog.records)])
    assert "s3cret" not in said and PASSWORD not in said and QUOTED not in said


def test_tls_settings_need_a_tls_url_and_a_bad_file_is_one_line(
        pki: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis_tls_ca_file.*no Redis URL is rediss://"):
        cluster(redis_url="redis://127.0.0.1:6379/0", redis_tls_ca_file=str(pki["ca"]))
    with pytest.raises(ConfigError, match=r"redis_tls_key_file.*needs redis_tls_cert_file"):
        cluster(redis_url="rediss://h:6380/0", redis_tls_key_file=str(pki["client_key"]))
    assert redis_tls(cluster(redis_url="rediss://h:6380/0")) is None  # the system's CAs
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(StartupError) as err:
        redis_tls(cluster(redis_url="rediss://h:6380/0",
                          redis_tls_ca_file=str(tmp_path / "junk.pem")))
    assert "hub.cluster.redis_tls_ca_file" in str(err.value) and "\n" not in str(err.value)


def test_a_redis_url_is_shown_without_its_password() -> None:
    assert without_password(f"rediss://edgegw:{QUOTED}@redis-1:6380/0") == (
        "rediss://edgegw:***@redis-1:6380/0")
    assert without_password(f"redis://:{QUOTED}@10.0.0.5/2") == "redis://:***@10.0.0.5/2"
    assert without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
async def test_a_redis_that_may_evict_the_clusters_keys_is_named_at_start(
        policy: str, caplog: pytest.LogCaptureFixture) -> None:
    with private_redis(["--maxmemory", "64mb", "--maxmemory-policy", policy]) as server:
        bus = ClusterBus(server.url, fresh_prefix(), "a")
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(bus.run)
            nursery.cancel_scope.cancel()
    warned = [r.getMessage() for r in caplog.records if "may evict" in r.getMessage()]
    evicting = bus.metrics.gauge("cluster_redis_evicting").get(shard="0")
    if policy == "noeviction":
        assert warned == [] and evicting == 0
    else:
        assert evicting == 1 and len(warned) == 1
        assert "maxmemory 64.00M, maxmemory-policy allkeys-lru" in warned[0]
        assert "set maxmemory-policy noeviction" in warned[0]
