"""The HAProxy fixture and the node harness the cluster tests stand on (tests/cluster_haproxy.py):
a real HAProxy in TCP mode spreads connections over real hub processes round robin, marks
a SIGKILLed node down by its /healthz check within about a second, keeps serving through
the others, and takes the node back when it is restarted."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_haproxy import HAProxy, NodeSet, haproxy_binary
from tests.processes import wait_for

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None and os.environ.get("CI") != "true",
    reason="haproxy not installed (scripts/test.sh installs it as root)")

# a plain single-process hub per node (its own SQLite store): what is tested here is the
# balancer and the harness, not the cluster
NODE_TOML = """\
[hub]
listen = "127.0.0.1"
port = {port}
data_dir = "DATA/{node}"
checkpoint_interval_s = 0

[gateways.ate-01]
token = "s3cret"
"""


def _through(proxy: HAProxy) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/healthz", timeout=3) as r:
        return r.status


def test_round_robin_failover_and_return(tmp_path: Path) -> None:
    text = NODE_TOML.replace("DATA", str(tmp_path / "data"))
    with NodeSet(tmp_path, 3, lambda i: text) as nodes:
        nodes.start_all()
        with HAProxy(tmp_path / "lb", nodes.backends) as proxy:
            proxy.wait_states({"n0": "UP", "n1": "UP", "n2": "UP"})
            before = _sessions(proxy)
            for _ in range(9):
                assert _through(proxy) == 200
            after = _sessions(proxy)
            # round robin, no stickiness: every node got some of the nine connections
            assert all(after[n] > before[n] for n in ("n0", "n1", "n2")), (before, after)

            nodes.kill(1)
            proxy.wait_states({"n1": "DOWN"}, timeout=10)
            # the two others answer every request (a refused connect is redispatched)
            for _ in range(6):
                assert _through(proxy) == 200

            nodes.restart(1)
            proxy.wait_states({"n1": "UP"}, timeout=20)
            mid = _sessions(proxy)
            for _ in range(6):
                assert _through(proxy) == 200
            assert _sessions(proxy)["n1"] > mid["n1"]


def _sessions(proxy: HAProxy) -> dict[str, int]:
    """Total sessions per backend server (HAProxy's ``stot``), health checks not counted."""
    lines = proxy.command("show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    px, sv, stot = (header.index(k) for k in ("pxname", "svname", "stot"))
    out = {}
    for line in lines[1:]:
        cols = line.split(",")
        if len(cols) > stot and cols[px] == "nodes" and cols[sv].startswith("n"):
            out[cols[sv]] = int(cols[stot] or 0)
    return out


def test_sigkill_cuts_sessions_promptly(tmp_path: Path) -> None:
    """A long-lived TCP session (what a WebSocket is) to a node that is SIGKILLed ends at
    once for its client, which can then reconnect through the same address to a live one."""
    text = NODE_TOML.replace("DATA", str(tmp_path / "data"))
    with NodeSet(tmp_path, 2, lambda i: text) as nodes:
        nodes.start_all()
        with HAProxy(tmp_path / "lb", nodes.backends) as proxy:
            proxy.wait_states({"n0": "UP", "n1": "UP"})

            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            # which node holds it: the one whose current sessions went up
            held = wait_for(lambda: [n for n, c in _current(proxy).items() if c > 0], 5)
            victim = int(held[0][1:])
            nodes.kill(victim)
            # closed by the balancer (a FIN or a reset), not left hanging for its 1 h
            # timeouts; 20 s leaves room for a loaded machine
            s.settimeout(20)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()
            proxy.wait_states({f"n{victim}": "DOWN"}, timeout=10)
            assert _through(proxy) == 200


def _current(proxy: HAProxy) -> dict[str, int]:
    lines = proxy.command("show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    px, sv, scur = (header.index(k) for k in ("pxname", "svname", "scur"))
    out = {}
    for line in lines[1:]:
        cols = line.split(",")
        if len(cols) > scur and cols[px] == "nodes" and cols[sv].startswith("n"):
            out[cols[sv]] = int(cols[scur] or 0)
    return out
