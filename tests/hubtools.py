"""Start a real hub (and gateways) inside a test's Trio run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from peer_hub import PeerHub, Session

from edgegw.config import build
from edgegw.gateway import Gateway, GatewayConfig
from edgegw.hub import HubConfig, Ingest


def hub_config(tmp: Path, port: int = 0, tokens: dict[str, str] | None = None,
               **hub: Any) -> HubConfig:
    return build(HubConfig, {
        "hub": {"port": port, "data_dir": str(tmp), **hub},
        "gateways": {gw: {"token": t} for gw, t in (tokens or {"ate-01": "s3cret"}).items()},
    })


def gateway_config(tmp: Path, port: int, gw_id: str = "ate-01", token: str = "s3cret",
                   sources: list[dict[str, Any]] | None = None, **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "gateway": {"id": gw_id, "token": token, "state_dir": str(tmp),
                    "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
        "uplink": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "heartbeat_s": 1.0},
        "batch": {"max_records": 100, "max_delay_ms": 20},
        "sources": sources or [],
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return build(GatewayConfig, data)


async def start_tester(nursery: trio.Nursery, tmp: Path, port: int, token: str = "s3cret",
                       **sim: Any) -> Gateway:
    """A gateway with a simulated tester source (``sim``: its config keys; one lot unless
    ``lots`` says otherwise), running."""
    sim.setdefault("lots", 1)
    cfg = gateway_config(tmp / "gw", port, token=token, batch={"max_records": 500},
                         sources=[{"name": "tester", "type": "simulated", **sim}])
    gateway = Gateway(cfg)
    await nursery.start(gateway.run)
    return gateway


async def gateway_welcomed(nursery: trio.Nursery, tmp: Path, peer: PeerHub,
                           answer: list[Any], **sections: Any) -> tuple[Gateway, Session]:
    """A gateway (``sections``: its config tables) started against the independent peer
    hub ``peer`` (started here), its first HELLO answered with ``answer`` (a WELCOME)."""
    port = await nursery.start(peer.run)
    gw = Gateway(gateway_config(tmp, port, **sections))
    await nursery.start(gw.run)
    session = await peer.sessions.receive()
    await session.recv()  # HELLO
    await session.send(answer)
    return gw, session


async def start_hub(nursery: trio.Nursery, cfg: HubConfig) -> tuple[Ingest, int]:
    hub = Ingest(cfg)
    port = await nursery.start(hub.run)
    return hub, port


async def http_get(port: int, path: str) -> tuple[int, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              .encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body
