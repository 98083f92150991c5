"""The per-address connection cap counts an IPv6 host's /64 as one address (docs/http.md,
"Connection caps"): a host picks its own addresses within its /64, so a share of the cap
per address would give it a new share with every connection.

Over real sockets from several IPv6 addresses: the test binds them on the loopback of a
private network namespace (``unshare -n``; root with CAP_SYS_ADMIN and CAP_NET_ADMIN), and
its scenario runs there as this file's ``__main__``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ONE_HOST = ["fd00:1::2", "fd00:1::3", "fd00:1::4"]  # one /64
ANOTHER = "fd00:2::2"


def netns_problem() -> str | None:
    """Why this machine cannot run the scenario, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "ip", "-6", "addr", "add", "fd00:1::2/64",
                            "dev", "lo", "nodad"], capture_output=True, text=True)
    if probe.returncode:
        return f"needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN: {probe.stderr.strip()}"
    return None


def test_connections_from_several_addresses_of_one_ipv6_64_share_one_cap(
        tmp_path: Path) -> None:
    """Two busy connections from two addresses of one /64 fill a cap of 2: a third from
    a third address of it is answered 503 (``address_limit``), while a host of another /64
    is served.  Before, each address had a cap of its own and all three were taken."""
    problem = netns_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    run = subprocess.run(["unshare", "-n", sys.executable, __file__, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    print(run.stdout, run.stderr, sep="\n")
    assert run.returncode == 0, f"the scenario failed:\n{run.stdout}\n{run.stderr}"


# ---------------------------------------------------------------- in the namespace

async def scenario(tmp: Path) -> None:
    from test_http_bounds import config, connect, get, open_upgrade, read_all, statuses

    from edgegw.hub import Ingest

    cfg = config(tmp, max_connections_per_address=2)
    hub = Ingest(dataclasses.replace(cfg, hub=dataclasses.replace(cfg.hub, listen="::1")))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        busy = [await open_upgrade(port, a) for a in ONE_HOST[:2]]
        refused = await connect(port, ONE_HOST[2])
        with trio.fail_after(30):
            answer = await read_all(refused)
        assert statuses(answer) == [503], answer
        assert hub.metrics.counter("http_connections_refused_total").get(
            reason="address_limit") == 1
        other = await connect(port, ANOTHER)
        assert statuses(await get(other, "/healthz")) == [200]
        assert len(busy) == 2
        nursery.cancel_scope.cancel()


def main(tmp: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in [*ONE_HOST, ANOTHER]:
        subprocess.run(["ip", "-6", "addr", "add", f"{address}/64", "dev", "lo", "nodad"],
                       check=True)
    trio.run(scenario, tmp)


if __name__ == "__main__":  # the scenario, in its namespace
    main(Path(sys.argv[1]))


def test_an_address_bucket_is_the_ipv4_address_or_the_ipv6_64() -> None:
    from edgegw.peeraddr import address_bucket, bucket_of

    assert address_bucket("fd00:1::2") == address_bucket("fd00:1::ffff:3") == "fd00:1::/64"
    assert address_bucket("fd00:2::2") == "fd00:2::/64"
    assert address_bucket("::ffff:10.0.0.7") == "10.0.0.7"  # via a dual-stack socket
    assert address_bucket("10.0.0.7") == "10.0.0.7"
    assert address_bucket("fe80::1%lo") == "fe80::/64"
    assert bucket_of("[2001:db8:1:2::9]:40000") == "2001:db8:1:2::/64"
    assert bucket_of("192.0.2.1:40000") == "192.0.2.1"
