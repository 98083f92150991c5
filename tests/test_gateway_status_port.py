"""The gateway's status port has no sign-in, so it must not be readable through DNS
rebinding (docs/security.md): a page on an attacker's domain pointing its own name at
127.0.0.1 makes the tester host's browser send that name as ``Host``.  Real requests on a
real gateway's status port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import gateway_config
from ports import free_port
from sectools import http

from edgegw.config import ConfigError
from edgegw.gateway import Gateway


async def _status_port(nursery: trio.Nursery, tmp: Path, **gateway: Any) -> Gateway:
    cfg = gateway_config(tmp / "gw", free_port(), gateway={"status_port": free_port(),
                                                           **gateway})
    gw = Gateway(cfg)
    await nursery.start(gw.run)
    assert gw.status_port
    return gw


def _denied(gw: Gateway) -> float:
    return gw.metrics.counter("gateway_status_requests_denied_total").values.get(
        (("reason", "host"),), 0)


async def test_the_status_port_refuses_a_host_name_an_attacker_can_rebind(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        gw = await _status_port(nursery, tmp_path)
        port = gw.status_port
        assert port is not None
        evil = f"evil.example:{port}"
        for path in ("/api/stats", "/metrics"):
            refused = await http(port, "GET", path, headers={"host": evil})
            assert refused.status == 403, path
            assert "gateway.status_allowed_hosts" in refused.json()["error"]
            assert b"ate-01" not in refused.body  # nothing of the stats leaks
        assert _denied(gw) == 2
        # health stays open (as the hub's) and says nothing but ok/why
        assert (await http(port, "GET", "/healthz", headers={"host": evil})).status == 200
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", "localhost",
                     f"[::1]:{port}", "ate-01"):
            reply = await http(port, "GET", "/api/stats", headers={"host": host})
            assert reply.status == 200, host
            assert reply.json()["gateway"] == "ate-01"
        scraped = await http(port, "GET", "/metrics", headers={"host": "localhost"})
        assert scraped.status == 200
        # the status server's own connection counters are among the gateway's metrics
        assert b"edgegw_http_connections_open 1" in scraped.body
        assert _denied(gw) == 2
        nursery.cancel_scope.cancel()


async def test_a_monitoring_system_scraping_by_a_dotted_name_lists_it(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        gw = await _status_port(nursery, tmp_path,
                                status_allowed_hosts=["ate-01.fab.example"])
        port = gw.status_port
        assert port is not None
        for host in (f"ate-01.fab.example:{port}", "ATE-01.fab.example"):
            reply = await http(port, "GET", "/metrics", headers={"host": host})
            assert reply.status == 200, host
        other = await http(port, "GET", "/metrics", headers={"host": "ate-02.fab.example"})
        assert other.status == 403
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("name", ["http://ate-01.fab.example", "ate-01.fab.example:9100",
                                  "ate 01", ""])
def test_allowed_hosts_are_bare_host_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.status_allowed_hosts: not a host name"):
        gateway_config(tmp_path, free_port(), gateway={"status_allowed_hosts": [name]})
