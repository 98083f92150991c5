"""Stopping cleanly: a gateway stopped by SIGTERM closes its hub connection with 1001
going away, so the hub logs a close, not "1006 connection lost" (issue 16, item 6); a hub
that stops says 1001 to its gateways."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from hubtools import gateway_config, hub_config
from processes import spawn

from edgegw.gateway import Gateway
from edgegw.hub import Hub

GATEWAY_TOML = """\
[gateway]
id = "ate-01"
token = "s3cret"
hub_url = "ws://127.0.0.1:{port}/ws/gateway"
state_dir = "{state}"

[[sources]]
name = "tester"
type = "simulated"
parts_per_second = 50
"""


def _closes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "edgegw.hub" and "ate-01 disconnected" in r.getMessage()]


async def _until(predicate: object, seconds: float = 60.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.05)


async def test_a_gateway_stopped_by_sigterm_says_going_away_to_the_hub(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgegw.hub")
    async with trio.open_nursery() as nursery:
        app = Hub(hub_config(tmp_path / "hub"))
        port = await nursery.start(app.run)
        config = tmp_path / "gateway.toml"
        config.write_text(GATEWAY_TOML.format(port=port, state=tmp_path / "gw"))
        proc = spawn("gateway", "--config", str(config), log=tmp_path / "gateway.log")
        try:
            gateways = app.state.gateways
            await _until(lambda: "ate-01" in gateways and gateways["ate-01"].records > 0)
            proc.terminate()  # SIGTERM, as systemd stops the service
            assert await trio.to_thread.run_sync(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        await _until(lambda: _closes(caplog))
        nursery.cancel_scope.cancel()
    assert _closes(caplog) == [
        "gateway ate-01 disconnected: WebSocket closed: 1001 gateway shutting down"]


async def test_a_gateway_stopped_in_process_and_a_hub_stopping_both_say_going_away(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgegw.hub")
    caplog.set_level(logging.INFO, logger="edgegw.uplink")
    async with trio.open_nursery() as outer:
        hub_scope = trio.CancelScope()

        async def run_hub(*, task_status: trio.TaskStatus[int]) -> None:
            with hub_scope:
                await Hub(hub_config(tmp_path / "hub")).run(task_status=task_status)

        port = await outer.start(run_hub)
        cfg = gateway_config(tmp_path / "gw", port,
                             sources=[{"name": "t", "type": "simulated"}])
        # the gateway stops (its nursery cancelled, as the service does on a signal)
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(Gateway(cfg).run)
            await _until(lambda: gateway.uplink.connected)
            nursery.cancel_scope.cancel()
        await _until(lambda: _closes(caplog))
        assert _closes(caplog) == [
            "gateway ate-01 disconnected: WebSocket closed: 1001 gateway shutting down"]
        # the hub stops under a connected gateway: the gateway is told 1001
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(Gateway(cfg).run)
            await _until(lambda: gateway.uplink.connected)
            hub_scope.cancel()
            await _until(lambda: not gateway.uplink.connected)
            nursery.cancel_scope.cancel()
    downs = [r.getMessage() for r in caplog.records
             if r.name == "edgegw.uplink" and "hub link down" in r.getMessage()]
    assert downs == ["hub link down: ConnectionClosed: CloseReason<code=1001, "
                     "name=GOING_AWAY, reason=hub shutting down>"]


async def test_a_gateway_stop_completes_the_close_handshake_with_a_live_hub(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway's 1001 reaches the hub, and the hub's answering close reaches the
    gateway: the stop ends on the hub's answer.  Before, the connection's reader was
    cancelled with the stop, the answer was never read, and every stop waited out the
    close timeout (0.5 s) and closed the socket unanswered (docs/protocol.md section 7)."""
    caplog.set_level(logging.INFO, logger="edgegw.hub")
    caplog.set_level(logging.INFO, logger="edgegw.uplink")
    async with trio.open_nursery() as outer:
        port = await outer.start(Hub(hub_config(tmp_path / "hub")).run)
        cfg = gateway_config(tmp_path / "gw", port, sources=[{"name": "t", "type": "simulated"}])
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(Gateway(cfg).run)
            await _until(lambda: gateway.uplink.connected and gateway.uplink.acked_watermark)
            nursery.cancel_scope.cancel()  # as the service does on SIGTERM
        await _until(lambda: _closes(caplog))
        outer.cancel_scope.cancel()
    assert _closes(caplog) == [
        "gateway ate-01 disconnected: WebSocket closed: 1001 gateway shutting down"]
    closes = [r.getMessage() for r in caplog.records
              if r.name == "edgegw.uplink" and "hub link closed" in r.getMessage()]
    # the hub's answer, echoing the gateway's close: read, not the 1000 trio-websocket
    # records for a close it started until the answer comes
    assert closes == ["hub link closed, the hub's close: CloseReason<code=1001, "
                      "name=GOING_AWAY, reason=gateway shutting down>"]
