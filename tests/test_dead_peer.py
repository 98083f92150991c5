"""A peer host that vanishes without a reset is found promptly (docs/protocol.md, "Dead
peers"): a pulled cable between network namespaces.

The hub and the test run in one fresh network namespace, the gateway (or a dashboard) in
another, and a third one routes between them -- the cable.  A ``tbf`` qdisc on the router
that drops every packet both ways (no packet fits its one-byte bucket) pulls the cable:
nothing arrives, no RST, no error, as with a power cut.

* A gateway, while the hub's first commit hangs (``hub.mid_commit=1:sleep=...``): its
  apply queue fills and its receiver stops reading, so silence cannot be judged; only TCP
  can tell -- the hub's PINGs go unacknowledged and ``TCP_USER_TIMEOUT`` (2 x heartbeat)
  ends the connection in the kernel.  Before, the hub showed the gateway connected until
  the commit returned, then 2 x heartbeat more (its kernel retransmitting meanwhile).
* An idle dashboard: keepalive probes with ``TCP_USER_TIMEOUT`` (``live.stall_timeout`` +
  ``live.close_grace``).
  Before, nothing was written to it, so nothing ever failed.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), ``unshare``, ``nsenter``, ``ip``, ``tc`` and
veth and tbf in the kernel: skipped with the reason without them, failed under CI.  Each
scenario runs in its namespace as this file's ``__main__``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultkit import (
    Gateway,
    Hub,
    assert_exactly_once,
    expected_records,
    source_settings,
    wait_all_applied,
)
from processes import get_json, wait_for

from edgegw.deadpeer import give_up_after

HUB_IP, ROUTER_A = "10.231.1.1", "10.231.1.2"  # this host's network, the router on it
GW_IP, ROUTER_B, NET_B = "10.231.2.1", "10.231.2.2", "10.231.2.0/24"  # the other host's
SOURCE = {"parts_per_second": 1000, "max_parts": 6000, "seed": 11, "wafers": 200}
HEARTBEAT_S = 1.0  # faultkit's, at both ends
HUNG_S = 10.0  # the hub's first commit: longer than the bound below, and then some
#: from the cable's cut to the hub reporting the gateway gone: TCP_USER_TIMEOUT
#: (2 x heartbeat), the next PING's write (1 heartbeat), room for a busy machine.  On the
#: code before: HUNG_S after the first commit, then 2 x heartbeat of reading
GONE_WITHIN_S = 2 * HEARTBEAT_S + HEARTBEAT_S + 4.0
STALL_S = 2.0  # live.stall_timeout in the dashboard scenario
GRACE_S = 1.0  # live.close_grace in the dashboard scenario
#: TCP_USER_TIMEOUT (stall_timeout + close_grace), a keepalive interval (stall_timeout / 3,
#: at least 1 s), room for a busy machine; on the code before: never, nothing is written
DROPPED_WITHIN_S = STALL_S + GRACE_S + 1.0 + 4.0
DROP_ALL = "tbf rate 1kbit burst 1 latency 1ms"  # a bucket no packet fits: all dropped


def netns_problem() -> str | None:
    """Why this machine cannot run the scenario, or None."""
    missing = [t for t in ("unshare", "nsenter", "ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link add v0 type veth peer name v1 && "
         f"tc qdisc add dev v0 root {DROP_ALL}"], capture_output=True, text=True)
    if probe.returncode:
        return ("needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN and veth and tbf in the "
                f"kernel: {probe.stderr.strip() or probe.returncode}")
    return None


def in_namespace(scenario: str, tmp_path: Path) -> None:
    problem = netns_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    run = subprocess.run(["unshare", "-n", sys.executable, __file__, scenario, str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    print(run.stdout, run.stderr, sep="\n")
    assert run.returncode == 0, f"the scenario failed:\n{run.stdout}\n{run.stderr}"


def test_a_gateway_whose_cable_is_pulled_while_a_commit_hangs_is_reported_gone_promptly(
        tmp_path: Path) -> None:
    """The cable is pulled while the hub's first commit hangs: the hub reports the gateway
    gone within TCP_USER_TIMEOUT and a PING, the commit still hanging, found by TCP, not by
    silence.  The gateway finds the hub silent (it reads on) and reconnects once the cable
    is back; every record reaches the hub once."""
    in_namespace("cable_pulled_while_a_commit_hangs", tmp_path)


def test_a_dashboard_whose_cable_is_pulled_on_a_quiet_floor_is_dropped_promptly(
        tmp_path: Path) -> None:
    """A /ws/live client idles (nothing changes: the hub writes it nothing) and its cable
    is pulled: keepalive probes go unanswered and the hub drops it about
    ``live.stall_timeout`` later.  Before, nothing was ever written to it, nothing ever
    failed, and it stayed among the clients until the next write's stall."""
    in_namespace("idle_dashboard_cable_pulled", tmp_path)


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
def test_a_connected_tcp_socket_gets_the_timeout_in_ms_and_keepalive_in_whole_seconds() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        assert give_up_after(sock, 2.5, keepalive_s=0.4)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1  # at least 1 s
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1


def test_no_socket_or_a_closed_one_is_a_connection_without_the_bound_not_an_error() -> None:
    assert not give_up_after(None, 2.0)
    closed = socket.socket()
    closed.close()
    assert not give_up_after(closed, 2.0, keepalive_s=1.0)


# ---------------------------------------------------------------- in the namespace

def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def namespace_holder() -> tuple[subprocess.Popen[bytes], tuple[str, ...]]:
    """A new network namespace, held by a sleeping process: it and the command prefix that
    runs a program in it."""
    holder = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    mine = os.readlink("/proc/self/ns/net")
    wait_for(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != mine, timeout=10)
    at = ("nsenter", "-t", str(holder.pid), "-n")
    sh(*at, "ip", "link", "set", "lo", "up")
    return holder, at


@contextlib.contextmanager
def another_host() -> Iterator[tuple[tuple[str, ...], Callable[[bool], None]]]:
    """A second host (GW_IP) one router away from this one (HUB_IP): three network
    namespaces, two veth pairs.  Yields the command prefix that runs a program on that
    host and ``cable(pulled)``, which makes the router drop every packet, both ways, or
    stop.  Dropped at the router, not at either end: an end's own qdisc dropping its
    packets tells its kernel (keepalive takes it for local congestion and retries)."""
    sh("ip", "link", "set", "lo", "up")
    holders: list[subprocess.Popen[bytes]] = []
    try:
        router, at_router = namespace_holder()
        holders.append(router)
        host, at_host = namespace_holder()
        holders.append(host)
        sh("ip", "link", "add", "a0", "type", "veth", "peer", "name", "a1",
           "netns", str(router.pid))
        sh(*at_router, "ip", "link", "add", "b1", "type", "veth", "peer", "name", "b0",
           "netns", str(host.pid))
        sh("sh", "-c", f"ip addr add {HUB_IP}/24 dev a0 && ip link set a0 up && "
           f"ip route add {NET_B} via {ROUTER_A}")
        sh(*at_router, "sh", "-c", f"ip addr add {ROUTER_A}/24 dev a1 && ip link set a1 up && "
           f"ip addr add {ROUTER_B}/24 dev b1 && ip link set b1 up && "
           "sysctl -qw net.ipv4.ip_forward=1")
        sh(*at_host, "sh", "-c", f"ip addr add {GW_IP}/24 dev b0 && ip link set b0 up && "
           f"ip route add default via {ROUTER_B}")

        def cable(pulled: bool) -> None:
            for dev in ("a1", "b1"):
                if pulled:
                    sh(*at_router, "tc", "qdisc", "add", "dev", dev, "root", *DROP_ALL.split())
                else:
                    sh(*at_router, "tc", "qdisc", "del", "dev", dev, "root")

        yield at_host, cable
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def cable_pulled_while_a_commit_hangs(tmp: Path) -> None:
    with another_host() as (at_host, cable):
        class GatewayOverTheCable(Gateway):
            prefix = at_host
            status_host = GW_IP

        hub = Hub(tmp).start(f"hub.mid_commit=1:sleep={HUNG_S}", True, "hub.apply_queue_frames=2",
                             "hub.listen=0.0.0.0", 'auth.mode="none"')
        gw = GatewayOverTheCable(tmp, hub.port, *source_settings(**SOURCE),
                                 "--set", f"gateway.hub_url=ws://{HUB_IP}:{hub.port}/ws/gateway",
                                 "--set", f"gateway.status_listen={GW_IP}")
        gw.start()
        try:
            # frames sent, none acknowledged: the first commit hangs, the hub's reading stopped
            wait_for(lambda: gw.stats()["metrics"].get("uplink_frames_sent_total", 0) >= 4
                     and hub.stats().get("connected"), timeout=60, interval=0.05)
            cable(pulled=True)
            cut = time.monotonic()
            wait_for(lambda: not hub.stats().get("connected"), timeout=GONE_WITHIN_S,
                     interval=0.05)
            print(f"hub reported the gateway gone {time.monotonic() - cut:.2f} s after the cut")
            assert hub.metric("edgegw_hub_frame_apply_seconds_count") == 0  # still hung
            assert hub.metric("edgegw_hub_protocol_errors_total",
                          'reason="heartbeat_timeout"') == 0  # found by TCP, not by silence
            time.sleep(2 * HEARTBEAT_S + 1)  # the gateway's own verdict: the hub is silent
            cable(pulled=False)
            expected = expected_records(**SOURCE)
            wait_all_applied(hub, gw, len(expected))
            gw_metrics = gw.stats()["metrics"]
            print("gateway:", {k: v for k, v in gw_metrics.items() if k.startswith("uplink_")})
            assert gw_metrics["uplink_connects_total"] >= 2, gw_metrics  # it noticed, came back
            assert hub.stats()["frames_lost"] == 0
            assert_exactly_once(hub.dir, expected)
        finally:
            hub.kill()
            gw.kill()


#: a dashboard on the other host: opens /ws/live, reads the upgrade's answer, then idles
#: (a quiet floor: nothing changes, so the hub writes it nothing)
IDLE_DASHBOARD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET /ws/live HTTP/1.1\\r\\nHost: hub\\r\\nUpgrade: websocket\\r\\n"
          b"Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
          b"Sec-WebSocket-Version: 13\\r\\n\\r\\n")
print(s.recv(4096).split(b"\\r\\n")[0].decode(), flush=True)
time.sleep(600)
"""


def idle_dashboard_cable_pulled(tmp: Path) -> None:
    with another_host() as (at_host, cable):
        hub = Hub(tmp).start("", True, "hub.listen=0.0.0.0", 'auth.mode="none"',
                             f"live.stall_timeout={STALL_S}", f"live.close_grace={GRACE_S}")
        dashboard = subprocess.Popen([*at_host, sys.executable, "-c", IDLE_DASHBOARD,
                                      HUB_IP, str(hub.port)])

        def clients() -> int:
            return int(get_json(f"{hub.url}/api/live/stats?clients=0")["clients"])

        try:
            wait_for(lambda: clients() == 1, timeout=30)
            time.sleep(STALL_S)  # idle: the hub has nothing more to write it
            cable(pulled=True)
            cut = time.monotonic()
            wait_for(lambda: clients() == 0, timeout=DROPPED_WITHIN_S, interval=0.05)
            print(f"hub dropped the dashboard {time.monotonic() - cut:.2f} s after the cut")
            # ended by the kernel, with no close from either side: counted as lost
            assert hub.metric("edgegw_live_connections_lost_total") == 1
        finally:
            dashboard.kill()
            dashboard.wait()
            hub.kill()


SCENARIOS = {"cable_pulled_while_a_commit_hangs": cable_pulled_while_a_commit_hangs,
             "idle_dashboard_cable_pulled": idle_dashboard_cable_pulled}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
