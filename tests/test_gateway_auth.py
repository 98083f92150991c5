"""Gateway handshakes on the hub (docs/security.md): failures limited per address, tokens
stored as hashes, never logged or answered, example tokens warned about."""

from __future__ import annotations

import hashlib
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import start_tester
from sectools import http, running
from wsclient import WsClient

from edgegw.config import build
from edgegw.hub import HubConfig
from edgegw.protocol import Hello, Refuse, Welcome, decode, encode


def config(tmp: Path, gateways: dict[str, Any], **hub: Any) -> HubConfig:
    return build(HubConfig, {"hub": {"port": 0, "data_dir": str(tmp / "hub"), **hub},
                             "gateways": gateways})


async def hello(port: int, gw: str, token: str) -> Any:
    client = await WsClient.connect(port, "/ws/gateway")
    await client.send(encode(Hello(gw, token, "e", 1)))
    with trio.fail_after(30):
        return decode(await client.recv())


async def upgrade_status(port: int) -> tuple[int, dict[str, str]]:
    """The status of a bare upgrade request on /ws/gateway (101 when accepted)."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"GET /ws/gateway HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
    head = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


async def test_failed_handshakes_are_limited_per_address(tmp_path: Path, caplog: Any) -> None:
    cfg = config(tmp_path, {"ate-01": {"token": "right-token"}}, gateway_failures_burst=3,
                 gateway_failures_per_minute=0.01)
    async with running(cfg) as app:
        port = app.ingest.port
        for _ in range(3):
            assert isinstance(await hello(port, "ate-01", "guess"), Refuse)
        for _ in range(3):  # used up: refused before any handshake, even the right token
            status, headers = await upgrade_status(port)
            assert status == 429 and int(headers["retry-after"]) > 60
        with pytest.raises(ConnectionError, match="429"):
            await hello(port, "ate-01", "right-token")
        assert app.metrics.as_dict()["hub_gateway_handshakes_limited_total"] == 4
        probe = await http(port, "GET", "/ws/gateway")  # the readiness probe stays open
        assert probe.status == 200
    lines = [r.getMessage() for r in caplog.records if "failed handshakes" in r.getMessage()]
    # logged once per 10 s interval, not per attempt (4 refusals: 2 lines at most even if
    # this machine is so slow that they straddle an interval)
    assert 1 <= len(lines) <= 2


async def test_the_hub_config_may_hold_the_tokens_sha256(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"right-token").hexdigest()
    async with running(config(tmp_path, {"ate-01": {"token_sha256": digest}})) as app:
        assert isinstance(await hello(app.ingest.port, "ate-01", "right-token"), Welcome)
        refused = await hello(app.ingest.port, "ate-01", digest)  # the hash is not the token
        assert refused == Refuse(4001, "wrong token for gateway 'ate-01'")


async def test_no_token_in_any_log_line_or_api_answer(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    token = f"tok-{secrets.token_hex(8)}"
    guess = f"guess-{secrets.token_hex(8)}"
    cfg = config(tmp_path, {"ate-01": {"token": token}})
    async with running(cfg) as app, trio.open_nursery() as nursery:
        port = app.ingest.port
        gw = await start_tester(nursery, tmp_path, port, token=token)
        with trio.fail_after(60):
            while "ate-01" not in app.ingest.connected:
                await trio.sleep(0.05)
        assert isinstance(await hello(port, "ate-01", guess), Refuse)
        assert isinstance(await hello(port, "nobody", guess), Refuse)
        answers = [(await http(port, "GET", path)).body for path in (
            "/healthz", "/api/stats", "/api/live/stats", "/metrics", "/api/lots")]
        assert gw.uplink is not None
        nursery.cancel_scope.cancel()
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "refused gateway 'ate-01'" in text  # the log did see the failures
    for secret in (token, guess):
        assert secret not in text
        assert not [a for a in answers if secret.encode() in a]


async def test_an_example_token_is_warned_about(tmp_path: Path, caplog: Any) -> None:
    async with running(config(tmp_path, {"ate-01": {"token": "change-me-ate-01"}})) as app:
        health = (await http(app.ingest.port, "GET", "/healthz")).json()
    warning = "gateways.ate-01.token is still an example token (change-me-...): replace it"
    assert warning in health["warnings"]
    assert warning in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "change-me-ate-01" not in str(health)


async def test_a_hub_without_gateways_says_so(tmp_path: Path, caplog: Any) -> None:
    async with running(config(tmp_path, {})) as app:
        health = (await http(app.ingest.port, "GET", "/healthz")).json()
    assert "no [gateways] configured: every gateway will be refused" in health["warnings"]


async def test_a_gateway_with_a_wrong_token_says_why_it_is_not_connected(
        tmp_path: Path) -> None:
    """A gateway the hub refuses keeps trying (at the slowest pace), and says so where an
    operator looks: ``last_error`` names the refusal, and
    ``edgegw_uplink_failures_total{reason="unauthorized"}`` counts it apart from lost links,
    so an alert tells a token to fix from a network to check."""
    cfg = config(tmp_path, {"ate-01": {"token": "right-token"}})
    async with running(cfg) as app, trio.open_nursery() as nursery:
        gw = await start_tester(nursery, tmp_path, app.ingest.port, token="wrong-token")
        with trio.fail_after(30):
            while not gw.stats()["metrics"].get("uplink_failures_total"):
                await trio.sleep(0.02)
        stats = gw.stats()
        failures = stats["metrics"]["uplink_failures_total"]
        assert list(failures) == ["reason=unauthorized"] and failures["reason=unauthorized"] >= 1
        assert not stats["connected"]
        assert "wrong token for gateway 'ate-01'" in stats["last_error"]
        nursery.cancel_scope.cancel()
