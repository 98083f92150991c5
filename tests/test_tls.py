"""TLS on the hub's port, client certificates for gateways, pinning, and SIGHUP reload --
with real certificates (trustme), real sockets, the real gateway service."""

from __future__ import annotations

import json
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hubtools import gateway_config
from sectools import GATEWAY_TOKEN, Pki, http, hub_config, running
from trio_websocket import open_websocket_url

from edgegw.gateway import Gateway
from edgegw.hub import Hub
from edgegw.tls import fingerprint


def copy_file(src: str, dst: str) -> None:
    Path(dst).write_bytes(Path(src).read_bytes())


def der_of(pem_file: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(pem_file).read_text())


async def wait_for(condition: Any, what: str, within: float = 60) -> None:
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.05)


def gateway(tmp: Path, port: int, name: str, gw_id: str = "ate-01", **uplink: Any) -> Gateway:
    cfg = gateway_config(tmp / name, port, gw_id=gw_id, token=GATEWAY_TOKEN,
                         sources=[{"name": "tester", "type": "simulated"}],
                         uplink=uplink)
    cfg = type(cfg)(**{**cfg.__dict__, "gateway": type(cfg.gateway)(**{
        **cfg.gateway.__dict__, "hub_url": f"wss://127.0.0.1:{port}/ws/gateway"})})
    return Gateway(cfg)


def uplink_error(gw: Gateway) -> str:
    return (gw.uplink.last_error or "") if gw.uplink is not None else ""


async def test_the_hub_speaks_tls_only(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    async with running(hub_config(tmp_path, pki)) as app:
        port = app.ingest.port
        reply = await http(port, "GET", "/healthz", ctx=pki.client_context())
        assert reply.status == 200 and reply.json()["tls"] is True
        # plain HTTP on the TLS port: no answer, the handshake failure is counted
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200" not in await stream.receive_some(1024)
            await stream.aclose()
        # a client that does not trust the hub's CA refuses it
        with pytest.raises(trio.BrokenResourceError) as broken:
            await http(port, "GET", "/healthz", ctx=ssl.create_default_context())
        assert isinstance(broken.value.__cause__, ssl.SSLCertVerificationError)
        await wait_for(lambda: app.metrics.as_dict().get(
            "http_tls_handshake_failures_total"), "failures counted")


async def test_gateway_over_mtls_with_a_wrong_certificate_is_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    stranger = Pki(tmp_path / "other-pki")  # another CA: not trusted by the hub
    cfg = hub_config(tmp_path, pki, tls={"client_ca_file": pki.ca_file})
    async with running(cfg) as app, trio.open_nursery() as nursery:
        port = app.ingest.port
        good_cert = pki.issue("ate-01", "ate-01")
        gw = gateway(tmp_path, port, "good", ca_file=pki.ca_file, cert_file=good_cert[0],
                     key_file=good_cert[1])
        await nursery.start(gw.run)
        await wait_for(lambda: "ate-01" in app.ingest.connected, "ate-01 connected over mTLS")
        await wait_for(lambda: app.ingest.store.stats.get("ate-01") is not None
                       and app.ingest.store.stats["ate-01"].records_applied > 0, "records")
        gw_cancel = nursery.cancel_scope
        # the right CA, but the certificate of another gateway
        other_cert = pki.issue("ate-02", "ate-02")
        thief = gateway(tmp_path, port, "thief", ca_file=pki.ca_file,
                        cert_file=other_cert[0], key_file=other_cert[1])
        # a certificate from a CA the hub does not trust
        forged_cert = stranger.issue("ate-01", "ate-01")
        forger = gateway(tmp_path, port, "forger", ca_file=pki.ca_file,
                         cert_file=forged_cert[0], key_file=forged_cert[1])
        # no certificate at all
        bare = gateway(tmp_path, port, "bare", ca_file=pki.ca_file)
        async with trio.open_nursery() as attackers:
            for g in (thief, forger, bare):
                await attackers.start(g.run)
            await wait_for(lambda: "is not gateway 'ate-01'" in uplink_error(thief), "thief")
            await wait_for(lambda: "client certificate is required" in uplink_error(bare),
                           "bare")
            await wait_for(lambda: app.metrics.as_dict().get(
                "http_tls_handshake_failures_total"), "forger's handshake failed")
            assert forger.uplink is not None and not forger.uplink.connected
            attackers.cancel_scope.cancel()
        assert "(code 4001)" in uplink_error(thief)
        # the real one was never displaced
        assert "ate-01" in app.ingest.connected
        assert not app.metrics.as_dict().get("hub_connections_replaced_total")
        gw_cancel.cancel()


async def test_a_pinned_fingerprint_is_insisted_on(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    hub_der = der_of(pki.cert_file)
    async with running(hub_config(tmp_path, pki)) as app, trio.open_nursery() as nursery:
        port = app.ingest.port
        wrong = gateway(tmp_path, port, "wrong-pin", ca_file=pki.ca_file, pin_sha256="00" * 32)
        await nursery.start(wrong.run)
        await wait_for(lambda: "pinned" in uplink_error(wrong) or "TLS" in uplink_error(wrong),
                       "the pin refused")
        assert "ate-01" not in app.ingest.connected
        nursery.cancel_scope.cancel()
    async with running(hub_config(tmp_path, pki)) as app, trio.open_nursery() as nursery:
        pin = ":".join(f"{b:02X}" for b in bytes.fromhex(fingerprint(hub_der)))
        right = gateway(tmp_path, app.ingest.port, "right-pin", ca_file=pki.ca_file,
                        pin_sha256=pin)
        await nursery.start(right.run)
        await wait_for(lambda: "ate-01" in app.ingest.connected, "connected with the pin")
        nursery.cancel_scope.cancel()


async def test_sighup_reloads_the_certificate_without_dropping_connections(
        tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    old_ctx = pki.client_context()
    async with running(hub_config(tmp_path, pki)) as app:
        port = app.ingest.port
        async with open_websocket_url(f"wss://127.0.0.1:{port}/ws/live", old_ctx,
                                      subprotocols=["edgegw.live.v1.json"]) as ws:
            assert json.loads(await ws.get_message())["type"] == "hello"
            # a new CA and certificate written over the files, then SIGHUP to this process
            renewed = Pki(tmp_path / "renewed", trustme.CA())
            for src, dst in ((renewed.cert_file, pki.cert_file),
                             (renewed.key_file, pki.key_file)):
                copy_file(src, dst)
            os.kill(os.getpid(), signal.SIGHUP)
            security = app.ingest.security
            assert security.tls is not None
            await wait_for(lambda: security.tls.reloads == 1, "reloaded")
            # new handshakes get the new certificate ...
            reply = await http(port, "GET", "/healthz", ctx=renewed.client_context())
            assert reply.status == 200
            with pytest.raises(trio.BrokenResourceError):
                await http(port, "GET", "/healthz", ctx=old_ctx)
            # ... and the connection opened before the reload is still served
            await ws.send_message(json.dumps({"type": "ping", "id": 7}))
            with trio.fail_after(30):
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg.get("type") == "pong":
                        break
            assert msg["id"] == 7


async def test_a_broken_certificate_file_keeps_the_old_one(tmp_path: Path,
                                                            caplog: Any) -> None:
    pki = Pki(tmp_path / "pki")
    app = Hub(hub_config(tmp_path, pki))
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        await trio.Path(pki.cert_file).write_text("-----BEGIN CERTIFICATE-----\nhalf\n")
        assert await app.ingest.security.reload_tls() is False
        reply = await http(app.ingest.port, "GET", "/healthz", ctx=pki.client_context())
        assert reply.status == 200
        assert any("keeping the current certificate" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()
