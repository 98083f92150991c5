"""SIGHUP reads the hub's config file again and takes its [gateways] table: a tester is
added, a token rotated or revoked, without restarting the hub (docs/operations.md,
"Reload").  A connection its new table no longer admits is closed with 4001 at once; every
other connection stays; a file that cannot be read changes nothing."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import http_get
from peer_gateway import REFUSE, WELCOME, PeerGateway, data, rows, sensor
from ports import free_port
from processes import spawn, stop, wait_for
from test_webhooks import HookServer
from wsclient import Closed

from edgegw.config import load
from edgegw.hub import Hub, HubConfig, Ingest


def write_config(path: Path, gateways: dict[str, str], heartbeat_s: float = 5.0,
                 port: int = 0, alerts: str = "") -> None:
    lines = ["[hub]", f"port = {port}", f'data_dir = "{path.parent / "hub-data"}"',
             f"heartbeat_s = {heartbeat_s}"]
    for gw, token in gateways.items():
        lines += [f"[gateways.{gw}]", f'token = "{token}"']
    path.write_text("\n".join(lines) + "\n" + alerts)


async def sighup_and_wait(app: Hub, outcome: str) -> None:
    """SIGHUP to this process (the hub runs in its main thread), then until it is done."""
    def reloads() -> float:  # (the metric itself: /api/stats may need a token)
        return app.metrics.counter("hub_config_reloads_total").get(outcome=outcome)
    before = reloads()
    os.kill(os.getpid(), signal.SIGHUP)
    with trio.fail_after(10):
        while reloads() == before:
            await trio.sleep(0.02)


async def acked(gw: PeerGateway, seq: int) -> None:
    await gw.send(data(seq, rows(seq, [sensor("chuck", 25.0 + seq)])))
    with trio.fail_after(10):
        await gw.until_acked(seq)


#: a sensor reading's record time, an hour apart per seq (``reading``)
T0 = 1764130000.0


async def reading(gw: PeerGateway, seq: int, value: float, within: float = 10) -> None:
    """Frame ``seq``: the chuck's temperature ``value``, acknowledged.  Readings are an
    hour of record time apart: none falls in another's alert de-duplication window."""
    await gw.send(data(seq, rows(seq, [sensor("chuck", value, ts=T0 + 3600 * seq)])))
    with trio.fail_after(within):
        await gw.until_acked(seq)


async def closed_by_hub(gw: PeerGateway) -> Closed:
    with trio.fail_after(10), pytest.raises(Closed) as info:
        while True:
            await gw.next()
    return info.value


async def test_a_reload_admits_a_new_gateway_and_closes_one_whose_token_changed(
        tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one", "ate-03": "token-three"})
    app = Hub(load(HubConfig, path))
    app.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        newcomer = await PeerGateway.connect(port, "ate-02", "token-two")
        assert newcomer.first[0] == REFUSE and "unknown gateway id" in newcomer.first[2]
        one = await PeerGateway.connect(port, "ate-01", "token-one")
        three = await PeerGateway.connect(port, "ate-03", "token-three")
        await acked(one, 1)
        await acked(three, 1)

        # the tester ate-02 joins the floor, ate-01's token is rotated; [hub] changes too
        write_config(path, {"ate-01": "token-one-rotated", "ate-02": "token-two",
                            "ate-03": "token-three"}, heartbeat_s=7.0)
        await sighup_and_wait(app, "ok")

        closed = await closed_by_hub(one)
        assert closed.code == 4001
        assert "gateway 'ate-01': its token was changed (hub config reloaded)" in closed.reason
        # ate-03's connection was not touched: its next frame is acknowledged
        await acked(three, 2)
        # the old token is refused from now on; the new one finds frame 1 applied
        stale = await PeerGateway.connect(port, "ate-01", "token-one")
        assert stale.first[0] == REFUSE and "wrong token" in stale.first[2]
        rotated = await PeerGateway.connect(port, "ate-01", "token-one-rotated")
        assert rotated.first[0] == WELCOME and rotated.welcome["applied"] == [[1, 1]]
        await acked(rotated, 2)
        joined = await PeerGateway.connect(port, "ate-02", "token-two")
        assert joined.first[0] == WELCOME
        await acked(joined, 1)

        _, stats = await http_get(port, "/api/stats")
        assert stats["metrics"]["hub_connections_revoked_total"] == 1
        assert stats["gateways"]["ate-01"]["records_applied"] == 2
        # [hub] was read, not applied: the running hub still has the heartbeat it began with
        assert app.ingest.config.hub.heartbeat_s == 5.0
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert "gateways reloaded: added ate-02; token changed ate-01" in log
        assert "connections closed (4001): ate-01" in log
        assert "[hub] changed in the config file: not applied until the hub restarts" in log
        assert "token-one" not in log  # a token is never in a log line

        # ate-03 removed from the table: its open connection is closed too
        write_config(path, {"ate-01": "token-one-rotated", "ate-02": "token-two"})
        await sighup_and_wait(app, "ok")
        closed = await closed_by_hub(three)
        assert closed.code == 4001 and "gateway 'ate-03': no longer configured" in closed.reason
        await acked(joined, 2)
        nursery.cancel_scope.cancel()


class _Nothing:
    """A consumer: only so that the hub replays (its ``before_replay`` runs)."""

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        pass

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass


async def test_a_sighup_while_the_hub_starts_is_a_reload_once_it_runs(tmp_path: Path) -> None:
    """SIGHUP's default action ends a process: one that comes while the hub opens its
    store and replays (seconds to minutes on a big store) must wait for the hub, not end
    it.  (Before, the handler came after the replay: this test's process died.)"""
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one"})
    ingest = Ingest(load(HubConfig, path))
    ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)
    ingest.add_consumer(_Nothing())
    replaying, hupped = trio.Event(), trio.Event()

    async def before_replay() -> int:
        replaying.set()
        await hupped.wait()
        return 0

    ingest.before_replay = before_replay
    write_config(path, {"ate-01": "token-one", "ate-02": "token-two"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run)
        await replaying.wait()
        os.kill(os.getpid(), signal.SIGHUP)
        await trio.sleep(0.2)  # delivered meanwhile: to the hub's receiver
        hupped.set()
        reloads = ingest.metrics.counter("hub_config_reloads_total")
        with trio.fail_after(10):
            while reloads.get(outcome="ok") != 1:
                await trio.sleep(0.02)
        assert sorted(ingest.config.gateways) == ["ate-01", "ate-02"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("damage", ["not TOML", "a bad value", "no file"])
async def test_a_config_file_that_cannot_be_read_on_reload_changes_nothing(
        tmp_path: Path, caplog: Any, damage: str) -> None:
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one"})
    app = Hub(load(HubConfig, path))
    app.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        one = await PeerGateway.connect(port, "ate-01", "token-one")
        await acked(one, 1)
        if damage == "not TOML":
            path.write_text("[gateways.ate-01\ntoken = 'other'\n")
        elif damage == "a bad value":  # valid TOML, no token
            path.write_text(path.read_text().replace('token = "token-one"', 'token = ""'))
        else:
            path.unlink()
        await sighup_and_wait(app, "failed")

        # the running table stands: the connection goes on, the same token is admitted
        await acked(one, 2)
        again = await PeerGateway.connect(port, "ate-01", "token-one", epoch="epoch-2")
        assert again.first[0] == WELCOME
        expected = {"not TOML": "not valid TOML", "a bad value": "gateways.ate-01",
                    "no file": "cannot read"}[damage]
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("not reloaded, the running one stays" in e and expected in e
                   for e in errors), errors

        # mended, the next SIGHUP takes it
        write_config(path, {"ate-01": "token-one", "ate-02": "token-two"})
        await sighup_and_wait(app, "ok")
        joined = await PeerGateway.connect(port, "ate-02", "token-two")
        assert joined.first[0] == WELCOME
        nursery.cancel_scope.cancel()


def test_systemctl_reload_of_the_hub_service_admits_a_gateway_added_to_its_file(
        tmp_path: Path) -> None:
    """The real command: ``edgegw hub --config FILE`` and SIGHUP (the unit's ExecReload)."""
    port = free_port()
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one"}, port=port)
    log_path = tmp_path / "hub.log"
    proc = spawn("hub", "--config", str(path), log=log_path)
    try:
        wait_for(lambda: "listening on" in log_path.read_text(), timeout=30)

        async def hello(gateway: str, token: str) -> int:
            gw = await PeerGateway.connect(port, gateway, token)
            await gw.client.close()
            return int(gw.first[0])

        assert trio.run(hello, "ate-02", "token-two") == REFUSE
        write_config(path, {"ate-01": "token-one", "ate-02": "token-two"}, port=port)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "gateways reloaded: added ate-02" in log_path.read_text(), timeout=20)
        assert trio.run(hello, "ate-02", "token-two") == WELCOME
        assert proc.poll() is None  # SIGHUP did not end it
    finally:
        stop(proc)


HOT_AT_50 = """
[[alerts.rules]]
name = "chuck-hot"
kind = "sensor_range"
priority = "P1"
channel = "chuck"
high = 50.0
"""


async def test_a_reload_takes_new_alert_rules_and_webhooks_and_keeps_the_alerts_raised(
        tmp_path: Path, caplog: Any) -> None:
    """A threshold tuned, a rule and a webhook added on a running hub: the readings after
    the SIGHUP are judged by the new rules and their alerts reach the new webhook, the
    alert raised before stays listed; a webhook removed by the next SIGHUP gets nothing
    more."""
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one"}, alerts=HOT_AT_50)
    app = Hub(load(HubConfig, path))
    app.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)
    hook = HookServer()

    async def alerts(port: int) -> list[tuple[str, float]]:
        _, body = await http_get(port, "/api/alerts")
        return sorted((a["rule"], a["value"]) for a in body["alerts"])

    def hooked() -> list[tuple[str, str]]:
        return [(r["json"]["alert"]["rule"], r["json"]["event"]) for r in hook.accepted]

    async with trio.open_nursery() as nursery:
        url = await hook.serve(nursery)
        port = await nursery.start(app.run)
        gw = await PeerGateway.connect(port, "ate-01", "token-one")
        await reading(gw, 1, 60.0)
        with trio.fail_after(10):
            while await alerts(port) != [("chuck-hot", 60.0)]:
                await trio.sleep(0.02)

        cold = HOT_AT_50.replace("high = 50.0", "high = 100.0") + """
[[alerts.rules]]
name = "chuck-cold"
kind = "sensor_range"
priority = "P2"
channel = "chuck"
low = 10.0
"""
        write_config(path, {"ate-01": "token-one"}, alerts=cold + f"""
[[alerts.webhooks]]
url = "{url}"
""")
        await sighup_and_wait(app, "ok")
        _, rules = await http_get(port, "/api/alerts/rules")
        assert {r["name"]: r["priority"] for r in rules["rules"]} == {
            "chuck-hot": "P1", "chuck-cold": "P2"}

        await reading(gw, 2, 80.0)  # hot under the old rule, not under the new one
        await reading(gw, 3, 5.0)   # cold: only the new rule sees it
        with trio.fail_after(10):
            while await alerts(port) != [("chuck-cold", 5.0), ("chuck-hot", 60.0)]:
                await trio.sleep(0.02)
        with trio.fail_after(10):  # the webhook taken by the reload gets the new alert
            while hooked() != [("chuck-cold", "raised")]:
                await trio.sleep(0.02)

        write_config(path, {"ate-01": "token-one"}, alerts=cold)  # the webhook removed
        await sighup_and_wait(app, "ok")
        await reading(gw, 4, 150.0)  # the changed rule still raises above its new limit
        with trio.fail_after(10):
            while len(await alerts(port)) != 3:
                await trio.sleep(0.02)
        assert await alerts(port) == [
            ("chuck-cold", 5.0), ("chuck-hot", 60.0), ("chuck-hot", 150.0)]
        await app.alerts.wait_persisted()
        await trio.sleep(0.5)  # a POST on its way would have arrived
        assert hooked() == [("chuck-cold", "raised")]
        assert app.alerts.config.webhooks == []

        log = "\n".join(r.getMessage() for r in caplog.records)
        assert ("alert rules reloaded: added chuck-cold; changed chuck-hot; webhooks: added "
                "http://127.0.0.1:") in log
        assert "webhooks: removed http://127.0.0.1:" in log
        assert "not applied until the hub restarts" not in log
        nursery.cancel_scope.cancel()



async def test_a_webhook_whose_ca_file_cannot_be_used_makes_the_reload_change_nothing(
        tmp_path: Path, caplog: Any) -> None:
    """The new file adds a rule and an https webhook whose ``ca_file`` is missing: the
    reload is refused whole (counted, logged naming the file): the rules stay as they ran,
    the webhook list too."""
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one"}, alerts=HOT_AT_50)
    app = Hub(load(HubConfig, path))
    app.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        missing = tmp_path / "no-such-ca.pem"
        write_config(path, {"ate-01": "token-one"}, alerts=HOT_AT_50.replace(
            "high = 50.0", "high = 100.0") + f"""
[[alerts.webhooks]]
url = "https://127.0.0.1:9/hook"
ca_file = "{missing}"
""")
        await sighup_and_wait(app, "failed")
        _, rules = await http_get(port, "/api/alerts/rules")
        assert [r["name"] for r in rules["rules"]] == ["chuck-hot"]
        assert app.alerts.config.rules[0].high == 50.0  # not the file's 100
        assert app.alerts.config.webhooks == []
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert "the config file was not reloaded, the running one stays: " \
               "[alerts.webhooks]" in log and str(missing) in log
        nursery.cancel_scope.cancel()


async def test_a_reload_of_auth_takes_new_keys_and_roles_and_closes_live_connections_it_no_longer_admits(  # noqa: E501
        tmp_path: Path, caplog: Any) -> None:
    """[auth] on a running hub (sign-in on before and after): a role mapped anew closes the
    /ws/live connections it changes (4401), a rotated secret refuses the old tokens on every
    request and closes the connections opened with them; key files that cannot be read
    change nothing; turning sign-in off waits for a restart."""
    import jwt
    from trio_websocket import ConnectionClosed, open_websocket_url

    from edgegw.auth import mint

    first, second = "first-secret-" + "a" * 32, "second-secret-" + "b" * 32
    secret = tmp_path / "secret"
    secret.write_text(first)
    path = tmp_path / "hub.toml"

    def write(role_map: str, secret_file: Path = secret, mode: str = "jwt") -> None:
        write_config(path, {"ate-01": "token-one"}, alerts=(
            f'[auth]\nmode = "{mode}"\nhs256_secret_file = "{secret_file}"\n'
            f'role_map = {{ floor-leads = "{role_map}" }}\n'))

    write("operator")
    app = Hub(load(HubConfig, path))
    app.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)

    async def status(bearer: str | None) -> int:
        port = app.ingest.port or 0
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
            await stream.send_all(f"GET /api/lots HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
                                  "Connection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                head += await stream.receive_some(4096)
        return int(head.split()[1])

    async def closed(ws: Any) -> tuple[int, str]:
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
        return info.value.reason.code, info.value.reason.reason

    old_viewer = mint(first, "vic", "viewer", 3600)
    # an identity provider's group name, mapped to a role by auth.role_map
    lead = jwt.encode({"sub": "lee", "role": "floor-leads", "exp": time.time() + 3600}, first,
                      algorithm="HS256")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        url = f"ws://127.0.0.1:{port}/ws/live"
        async with open_websocket_url(url, subprotocols=["edgegw.live.v1.json"], extra_headers=[
                (b"authorization", f"Bearer {old_viewer}".encode())]) as viewer_ws, \
                open_websocket_url(url, subprotocols=["edgegw.live.v1.json"], extra_headers=[
                    (b"authorization", f"Bearer {lead}".encode())]) as lead_ws:
            for ws in (viewer_ws, lead_ws):  # both admitted: the hub says hello
                with trio.fail_after(10):
                    assert '"hello"' in await ws.get_message()

            write("viewer")  # the floor leads may no longer acknowledge
            await sighup_and_wait(app, "ok")
            assert await closed(lead_ws) == (4401, "sign-in changed (hub config reloaded)")

            secret.write_text(second)  # the secret rotated: tokens signed with it only
            await sighup_and_wait(app, "ok")
            assert await closed(viewer_ws) == (
                4401, "token no longer accepted (hub config reloaded)")
        assert await status(old_viewer) == 401
        assert await status(mint(second, "vic", "viewer", 3600)) == 200

        write("viewer", secret_file=tmp_path / "no-such-file")
        await sighup_and_wait(app, "failed")
        assert await status(mint(second, "vic", "viewer", 3600)) == 200

        write("viewer", mode="none")  # sign-in off: not while the hub runs
        await sighup_and_wait(app, "ok")
        assert await status(None) == 401

        assert app.metrics.as_dict()["live_signed_out_total"] == 2
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert "sign-in ([auth]) reloaded; /ws/live connections closed (4401): 1" in log
        assert "auth.hs256_secret_file" in log
        assert "[auth] changed in the config file: not applied until the hub restarts" in log
        assert first not in log and second not in log and old_viewer not in log
        nursery.cancel_scope.cancel()


async def test_a_reload_that_fails_on_a_bug_ends_that_reload_not_the_hub(
        tmp_path: Path, caplog: Any) -> None:
    """A failure boundary (docs/reliability.md, ``hub_reload``): an exception in a reload
    is logged and counted; the hub, its connections and the next SIGHUP go on."""
    path = tmp_path / "hub.toml"
    write_config(path, {"ate-01": "token-one"}, alerts=HOT_AT_50)
    app = Hub(load(HubConfig, path))
    app.ingest.reloader.config_source = functools.partial(load, HubConfig, path, None)

    def broken(alerts: Any) -> str:
        raise RuntimeError("a bug in the alert reload")

    reloader, app.ingest.reloader.alerts_reloader = app.ingest.reloader.alerts_reloader, broken
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        gw = await PeerGateway.connect(port, "ate-01", "token-one")
        await acked(gw, 1)
        write_config(path, {"ate-01": "token-one"}, alerts=HOT_AT_50.replace("50.0", "70.0"))
        await sighup_and_wait(app, "failed")
        assert app.metrics.counter("internal_errors_total").get(where="hub_reload") == 1
        await acked(gw, 2)  # the connection goes on

        app.ingest.reloader.alerts_reloader = reloader  # mended: the next SIGHUP takes the rules
        await sighup_and_wait(app, "ok")
        assert any("alert rules reloaded: changed chuck-hot" in r.getMessage()
                   for r in caplog.records)
        nursery.cancel_scope.cancel()
