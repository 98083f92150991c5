"""The web dashboard in a real headless Chromium, driven over the DevTools protocol.

A simulated tester streams through a gateway into a real hub; the page, loaded from the
hub, must draw the dies the hub has applied -- and draw them again after the hub restarts.
A screenshot is saved to test-artifacts/ for people to look at.

Needs Debian's ``chromium`` package (``apt-get install -y chromium chromium-driver``);
without it the test is skipped, except under CI=true where it must run.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hubtools import gateway_config, start_tester
from sectools import Pki
from trio_websocket import open_websocket_url

from edgegw.config import build
from edgegw.gateway import Gateway
from edgegw.hub import STATIC_DIR, Dashboard, HubConfig, Ingest
from edgegw.hub.alerts import AlertEngine, AlertsConfig
from edgegw.hub.fanout import LiveConfig, LiveFanout
from edgegw.hub.history import HistoryApi
from edgegw.hub.live import LiveState
from edgegw.hub.topics import split
from edgegw.records import SensorReading

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "s3cret"
WAFER_TOPIC = re.compile(r"lot/[^/]+/wafer/[^/]+")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium not installed (apt-get install -y chromium chromium-driver)",
)


def test_the_dashboard_loads_nothing_from_the_internet() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|(src|href)=\"//|@import|url\(", text), path.name


# --------------------------------------------------------------------------- a hub


class LiveHub:
    """Hub + live state + alerts + fan-out + dashboard + history API, startable and
    stoppable on a fixed port."""

    def __init__(self, data_dir: Path, auth: dict[str, Any] | None = None,
                 tls: dict[str, Any] | None = None,
                 rules: list[dict[str, Any]] | None = None,
                 live: dict[str, Any] | None = None) -> None:
        self.data_dir = data_dir
        self.live = live or {}  # LiveState's caps (max_wafers_per_lot, ...)
        # A rule that trips on the simulated wafers: 2 fails in a row on one site.
        self.rules = rules or [
            {"name": "site_fails", "kind": "consecutive_fails", "priority": "P1", "count": 2}]
        self.auth = auth  # the hub config's [auth] and [tls] sections, if any
        self.tls = tls
        self.port = 0
        self.state: LiveState | None = None
        self.fanout: LiveFanout | None = None
        self.alerts: AlertEngine | None = None
        self.ingest: Ingest | None = None
        self._scope: trio.CancelScope | None = None
        self.stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        hub = Ingest(build(HubConfig, {"hub": {"port": self.port, "data_dir": str(self.data_dir)},
                                    "gateways": {"ate-01": {"token": TOKEN}},
                                    **({"auth": self.auth} if self.auth else {}),
                                    **({"tls": self.tls} if self.tls else {})}))
        fanout = LiveFanout(LiveConfig(), metrics=hub.metrics)
        alerts = AlertEngine(build(AlertsConfig, {"rules": self.rules}), fanout.publish,
                             metrics=hub.metrics)
        state = LiveState(fanout.publish, alerts=alerts, metrics=hub.metrics, **self.live)
        fanout.attach(state, on_ack=lambda alert_id, user: alerts.ack(alert_id, user,
                                                                      time.time()))
        hub.add_consumer(state)
        fanout.install(hub.http)
        Dashboard().install(hub.http)
        HistoryApi(state, alerts).install(hub.http)
        hub.reloader.auth_rechecks.append(lambda: fanout.recheck(hub.security.still_signed_in))
        self.state, self.fanout, self.alerts, self.ingest = state, fanout, alerts, hub
        self.stopped = trio.Event()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(hub.run)
                await nursery.start(fanout.run)
                task_status.started(self.port)
        self.stopped.set()

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self.stopped.wait()

    def wafer_dies(self, topic: str) -> int:
        assert self.state is not None
        snap = self.state.snapshot(topic)
        return len(snap["dies"]) if snap else -1

    def wafer_positions(self) -> dict[str, list[Any]]:
        """Every wafer topic the live state holds -> the [epoch, offset] its channel is at:
        what a page that applied all the hub published of its wafers holds."""
        assert self.state is not None and self.fanout is not None
        core = self.fanout.core
        return {t: [core.epoch, core.channels[t].offset if t in core.channels else None]
                for t in self.state.topics() if WAFER_TOPIC.fullmatch(t)}


# --------------------------------------------------------------------------- a browser


class Browser:
    """Headless Chromium and one page, over the DevTools protocol (CDP) on a WebSocket."""

    def __init__(self, proc: trio.Process, ws: Any) -> None:
        self.proc = proc
        self.ws = ws
        self._id = 0
        self.console: list[str] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self.ws.send_message(json.dumps({"id": self._id, "method": method,
                                               "params": params}))
        with trio.fail_after(30):
            while True:
                msg = json.loads(await self.ws.get_message())
                if msg.get("method") == "Runtime.consoleAPICalled":
                    self.console.append(" ".join(
                        str(a.get("value", a.get("description", ""))) for a in
                        msg["params"]["args"]))
                if msg.get("id") == self._id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

    async def eval(self, expression: str, await_promise: bool = False) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def page(self) -> dict[str, Any]:
        return await self.eval(
            "(() => { const c = document.getElementById('wafer-map');"
            # still parsing (a busy machine): the later panels are not in the DOM yet
            " if (!c || !document.body.dataset || document.readyState === 'loading')"
            "   return {topic: '', dies: -1, conn: 'loading'};"
            " return {topic: c.dataset.topic, dies: Number(c.dataset.dieCount),"
            " conn: document.getElementById('conn').dataset.state,"
            " frames: Number(document.body.dataset.frames || 0),"
            " resyncs: Number(document.body.dataset.resyncs || 0),"
            " snapshots: Number(document.body.dataset.snapshots || 0),"
            " reconnects: Number(document.body.dataset.reconnects || 0),"
            " restarted: document.body.dataset.hubRestarted === 'true',"
            " alerts: document.querySelectorAll('#alerts li[data-alert-id]').length,"
            " acked: [...document.querySelectorAll('#alerts li[data-acknowledged=\"true\"]')]"
            "   .map(li => li.dataset.alertId),"
            " gateways: [...document.querySelectorAll('#gateways tr[data-gateway]')]"
            "   .map(r => r.dataset.gateway + ':' + r.cells[1].textContent),"
            " pareto: document.querySelectorAll('#pareto .row').length,"
            " sensors: [...document.querySelectorAll('#sensors .sensor')]"
            "   .map(d => d.dataset.topic.slice(7)),"
            " sensor_text: document.getElementById('sensors').textContent,"
            " sites: document.querySelectorAll('#sites .row').length}; })()")

    async def screenshot(self, path: Path, full_page: bool = False) -> None:
        extra: dict[str, Any] = {}
        if full_page:  # the whole page, below the fold too
            size = (await self.call("Page.getLayoutMetrics"))["cssContentSize"]
            extra = {"captureBeyondViewport": True, "clip": {
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}
        shot = await self.call("Page.captureScreenshot", format="png", **extra)
        await trio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await trio.Path(path).write_bytes(base64.b64decode(shot["data"]))


async def http_json(port: int, path: str) -> Any:
    return (await http_json_status(port, path))[1]


async def http_json_status(port: int, path: str) -> tuple[int, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                              "Connection: close\r\n\r\n".encode())
        data = b""
        length = None
        while length is None or len(data.partition(b"\r\n\r\n")[2]) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            m = re.search(rb"(?i)content-length:\s*(\d+)", data.partition(b"\r\n\r\n")[0])
            if m and b"\r\n\r\n" in data:
                length = int(m.group(1))
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@contextlib.asynccontextmanager
async def open_browser(profile: Path, *flags: str) -> AsyncIterator[Browser]:
    assert CHROMIUM is not None, "chromium is required under CI=true"
    proc = await trio.lowlevel.open_process(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
         f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "--window-size=1600,1000", *flags,
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.fail_after(30):
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with {proc.returncode}")
                await trio.sleep(0.1)
        devtools_port = int(port_file.read_text().split()[0])
        with trio.fail_after(10):
            while True:
                pages = [t for t in await http_json(devtools_port, "/json/list")
                         if t.get("type") == "page"]
                if pages:
                    break
                await trio.sleep(0.1)
        async with open_websocket_url(pages[0]["webSocketDebuggerUrl"],
                                      max_message_size=64 << 20) as ws:
            browser = Browser(proc, ws)
            await browser.call("Page.enable")
            await browser.call("Runtime.enable")
            yield browser
    finally:
        # Chromium is a tree of processes: end its whole group (its own session), always.
        with trio.CancelScope(shield=True):
            _signal_group(proc.pid, signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- the test


async def wait_page(browser: Browser, predicate: Any, seconds: float, what: str) -> dict:
    page: dict[str, Any] = {}
    try:
        with trio.fail_after(seconds):
            while True:
                page = await browser.page()
                if predicate(page):
                    return page
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}; page: {page}; "
                             f"console: {browser.console[-5:]}") from None

#: The [epoch, offset] the page holds each wafer it shows at, the wafer it follows (the one
#: updated last) and the one the map was last drawn for.
HELD_JS = """(() => { const held = {};
  for (const [t, o] of offsets) if (isWafer(t) && views.has(t)) held[t] = [epochs.get(t), o];
  return {held, followed: selectedWafer() || '', drawn: canvas.dataset.topic}; })()"""


async def wait_caught_up(browser: Browser, hub: LiveHub, seconds: float, what: str) -> dict:
    """Wait until the page has applied every delta the hub published of every wafer the hub
    holds (the same [epoch, offset] per wafer topic) and has drawn the wafer it follows, as
    many dies as the hub holds of it -> ``browser.page()``.  A die count alone is not
    enough: a page still behind shows an earlier wafer with all its dies, the hub's count
    for it, before that wafer's last deltas (retests: the same dies, other bins) and the
    next wafer reach it -- and then moves on to the next wafer."""
    held: dict[str, Any] = {}
    try:
        with trio.fail_after(seconds):
            while True:
                held = await browser.eval(HELD_JS)
                if (held["held"] and held["held"] == hub.wafer_positions()
                        and held["followed"] == held["drawn"]):
                    page = await browser.page()
                    if (page["topic"] == held["drawn"]
                            and page["dies"] == hub.wafer_dies(page["topic"])):
                        return page
                await trio.sleep(0.1)
    except trio.TooSlowError:
        pass
    raise AssertionError(f"timed out waiting for {what}; page holds {held}, hub has "
                         f"{hub.wafer_positions()}; console: {browser.console[-5:]}")


async def hover_die(browser: Any, pick: str) -> tuple[list[Any], str]:
    """Move the mouse over the die of the shown map that the JavaScript expression ``pick``
    (over ``v``, the map's view) selects -> (its row, the die tip's text)."""
    die = await browser.eval(
        "(() => { const v = views.get(mapGeom.topic); const d = " + pick + ";"
        " const r = canvas.getBoundingClientRect(); const k = r.width / canvas.width;"
        " return {row: d, x: r.left + (mapGeom.ox + (d[0] - mapGeom.minX + 0.5)"
        "   * mapGeom.cell) * k, y: r.top + (mapGeom.oy + (d[1] - mapGeom.minY + 0.5)"
        "   * mapGeom.cell) * k}; })()")
    await browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=die["x"], y=die["y"])
    return die["row"], await browser.eval("document.getElementById('die-tip').textContent")



@needs_chromium
async def test_the_wafer_map_shows_the_dies_the_hub_applied_even_across_a_restart(
        tmp_path: Path) -> None:
    hub = LiveHub(tmp_path / "hub")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        async with open_browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            await wait_page(browser, lambda p: p["conn"] == "live", 15, "the page to connect")

            # The tester starts after the page: everything the page draws came live.
            gateway = await start_tester(nursery, tmp_path, port, TOKEN, parts_per_second=400,
                                         wafer_diameter_dies=18, max_parts=420)
            source = gateway.sources[0][1]
            page = await wait_page(browser, lambda p: p["dies"] > 0, 15, "the first dies")
            assert page["topic"].startswith("lot/LOT0001/wafer/")
            with trio.fail_after(30):
                await source.finished.wait()
                await gateway.flush()
                # every frame acknowledged by the hub: its state is final
                while gateway.store.first_unacked < gateway.store.next_seq:
                    await trio.sleep(0.05)
            page = await wait_caught_up(browser, hub, 15,
                                        "the page to draw every die the hub applied")
            assert page["dies"] > 100
            # Die by die, what the page holds is what the hub's API says of the wafer.
            _, lot_id, _, wafer_id = split(page["topic"])
            status, api = await http_json_status(port, f"/api/lots/{lot_id}/wafers/{wafer_id}")
            assert status == 200
            drawn_rows = await browser.eval(
                f"[...views.get({json.dumps(page['topic'])}).dies.values()]")
            assert sorted(map(tuple, drawn_rows)) == sorted(map(tuple, api["dies"]))
            assert len(api["dies"]) == page["dies"]
            assert page["frames"] > 5, page  # it was updated live, many times
            assert page["pareto"] >= 2 and page["sites"] == 4
            assert "ate-01:online" in page["gateways"]

            # Sensor readings as the hub applies them from an MQTT-fed gateway.
            assert hub.state is not None
            hub.state.on_records("ate-01", 10_000_000, [
                SensorReading("mqtt", time.time() - 30 + i, "handler/1/temp",
                              30 + (i % 7) * 0.3, "degC") for i in range(30)])
            await wait_page(browser, lambda p: p["sensors"] == ["handler%2F1%2Ftemp"], 10,
                            "the sensor trend")

            # Hovering a die shows it.
            row, tip = await hover_die(browser, "[...v.dies.values()][7]")
            x, y, hard_bin, _soft, _passed, site = row
            assert f"x {x}  y {y}" in tip and f"hard bin {hard_bin}" in tip
            assert f"site {site}" in tip

            # Alerts arrive live; acknowledging one in the page reaches the alert engine
            # and comes back to the page as an "acknowledged" event.
            assert hub.alerts is not None and hub.alerts.alerts
            page = await wait_page(browser, lambda p: p["alerts"] > 0, 10, "alerts")
            await browser.eval("document.getElementById('user').value = 'maria'")
            alert_id = await browser.eval(
                "(() => { const li = document.querySelector("
                "'#alerts li[data-acknowledged=\"false\"]');"
                " li.querySelector('button').click(); return li.dataset.alertId; })()")
            await wait_page(browser, lambda p: hub.alerts.alerts[alert_id].acknowledged, 10,
                            "the acknowledgement")
            assert hub.alerts.alerts[alert_id].acked_by == "maria"
            acked = await wait_page(browser, lambda p: alert_id in p["acked"], 10,
                                    "the page to show it acknowledged")
            await browser.screenshot(ARTIFACTS / "dashboard.png")
            del acked

            # The connection drops (the hub keeps running): the page reconnects and resumes
            # from its offsets -- it is sent what it missed and no snapshot at all.
            before = await browser.page()
            await browser.eval("ws.close()")
            await wait_page(browser, lambda p: p["reconnects"] > before["reconnects"], 10,
                            "the page to reconnect")
            hub.state.on_records("ate-01", 10_000_100, [
                SensorReading("mqtt", time.time(), "handler/1/temp", 99.5, "degC")])
            await wait_page(browser, lambda p: p["conn"] == "live" and p["frames"] > before[
                "frames"] and "99.5" in p["sensor_text"], 10, "the update after resuming")
            page = await browser.page()
            assert page["snapshots"] == before["snapshots"]  # resumed, not re-snapshotted
            assert (page["topic"], page["dies"]) == (before["topic"], before["dies"])

            # Hub restart on the same port: the page reconnects by itself, learns the
            # new epoch, is sent fresh snapshots marked resync (the hub rebuilt its state
            # from its store) and redraws the same wafer.
            drawn = await browser.page()
            await hub.stop()
            await wait_page(browser, lambda p: p["conn"] != "live", 10, "the page to notice")
            await nursery.start(hub.run)
            await wait_page(browser, lambda p: p["conn"] == "live" and p["restarted"]
                            and p["resyncs"] > 0, 30, "the page to learn of the restart")
            page = await wait_caught_up(browser, hub, 30, "the page to recover")
            assert (page["topic"], page["dies"]) == (drawn["topic"], drawn["dies"])
            await browser.screenshot(ARTIFACTS / "dashboard-after-restart.png")
        nursery.cancel_scope.cancel()


#: Per panel, what shows it holds data: its chart's marks or its rows (read in the page).
PANELS_JS = """(() => {
  const n = (sel) => document.querySelectorAll(sel).length;
  const marks = (id) => Number((document.querySelector('#' + id + ' svg') || {dataset: {}})
    .dataset.marks || 0);
  const map = document.getElementById('wafer-map');
  return {
    wafer: Number(map.dataset.dieCount),
    yield_trend: marks('yield-trend'),
    threshold_line: n('#yield-trend svg line.rule'),
    pareto: n('#pareto .row'), sites: n('#sites .row'),
    histogram: marks('histogram'), limit_lines: n('#histogram svg line.limit'),
    control: marks('control'),
    tests: n('#tests tbody tr[data-test]'),
    sensors: [...document.querySelectorAll('#sensors .sensor')].filter(d =>
      (views.get(d.dataset.topic).history || []).length >= 2).length,
    alerts: n('#alerts li[data-alert-id]'),
    gateways: n('#gateways tr[data-gateway]'),
    mode: map.dataset.mode, valued: Number(map.dataset.valued || 0),
    hist_test: (document.querySelector('#histogram svg') || {dataset: {}}).dataset.test,
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    wide: [...document.querySelectorAll('main > *, main *')].filter(e =>
      e.getBoundingClientRect().right > window.innerWidth + 0.5).map(e =>
      e.tagName + '#' + e.id + '.' + e.className).slice(0, 5),
    wrapped: [...document.querySelectorAll('#pareto .num')].filter(e =>
      e.getClientRects().length > 1 || e.offsetHeight > 20).length,
  };
})()"""


async def panels(browser: Browser) -> dict[str, Any]:
    return await browser.eval(PANELS_JS)


async def wait_panels(browser: Browser, predicate: Any, seconds: float, what: str) -> dict:
    state: dict[str, Any] = {}
    try:
        with trio.fail_after(seconds):
            while True:
                state = await panels(browser)
                if predicate(state):
                    return state
                await trio.sleep(0.2)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}; panels: {state}; "
                             f"console: {browser.console[-5:]}") from None


#: ~30 s of a demo floor at 150 parts/s, as a person would first see it: the test makes
#: these parts at 600/s and stops the tester there (the same wafers and bin counts on the
#: page without waiting 30 s; the last wafer, part-tested, then holds still)
FLOOR_PARTS = 150 * 30


def floor_wafers() -> int:
    """The wafers the first FLOOR_PARTS parts of the simulated tester touch (the seeded model
    is deterministic)."""
    from edgegw.records import PartResult
    from edgegw.sim import SimulatedConfig, simulated_batches

    config = SimulatedConfig(wafer_diameter_dies=16, max_parts=FLOOR_PARTS)
    return len({r.wafer_id for batch, _ in simulated_batches(config, "t", clock=lambda: 0.0)
                for r in batch if isinstance(r, PartResult)})


FLOOR_WAFERS = floor_wafers()


def every_panel_filled(p: dict[str, Any]) -> bool:
    return all(p[k] > 0 for k in ("wafer", "yield_trend", "threshold_line", "pareto", "sites",
                                  "histogram", "control", "tests", "alerts", "gateways")) \
        and p["yield_trend"] >= 2 and p["sensors"] >= 3


@needs_chromium
async def test_every_panel_fills_with_demo_data_at_700_px_and_on_a_wall_screen(
        tmp_path: Path) -> None:
    """A demo-like floor (the simulated tester's first ~30 s of parts, FLOOR_PARTS, and the
    simulated sensors through one gateway); then each panel must hold its chart or rows, at
    700 px wide and at 1920x1080, and nothing may stick out sideways at 700 px."""
    from hubtools import gateway_config

    from edgegw.gateway import Gateway

    hub = LiveHub(tmp_path / "hub", rules=[
        {"name": "wafer-yield", "kind": "wafer_yield", "priority": "P1", "threshold": 0.9,
         "min_parts": 50},
        {"name": "site_fails", "kind": "consecutive_fails", "priority": "P2", "count": 3}])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        cfg = gateway_config(tmp_path / "gw", port, token=TOKEN, batch={"max_records": 500},
                             sources=[{"name": "tester", "type": "simulated",
                                       "parts_per_second": 600, "wafer_diameter_dies": 16,
                                       "max_parts": FLOOR_PARTS},
                                      {"name": "sensors", "type": "simulated-sensors",
                                       "tester": "ate-01", "rate": 20, "window_s": 0.5}])
        await nursery.start(Gateway(cfg).run)
        async with open_browser(tmp_path / "profile", "--window-size=700,900") as browser:
            await browser.call("Emulation.setDeviceMetricsOverride", width=700, height=900,
                               deviceScaleFactor=1, mobile=False)
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            await wait_page(browser, lambda p: p["conn"] == "live", 15, "the page to connect")
            # the whole floor on the page: its last wafer is in the yield trend
            state = await wait_panels(
                browser, lambda p: every_panel_filled(p) and p["yield_trend"] >= FLOOR_WAFERS,
                90, "every panel to fill with the floor's wafers")

            # A row of the Tests table chooses the histogram's and control chart's test.
            test_num = await browser.eval(
                "(() => { const rows = document.querySelectorAll('#tests tbody tr[data-test]');"
                " const tr = rows[Math.min(2, rows.length - 1)]; tr.click();"
                " return tr.dataset.test; })()")
            state = await wait_panels(browser, lambda p: p["hist_test"] == test_num
                                      and every_panel_filled(p), 10, "the clicked test's charts")
            assert state["limit_lines"] == 2  # the simulated tests have both limits
            # The wafer map coloured by that test's value, from the history API.
            await browser.eval(f"(() => {{ const s = document.getElementById('color-by');"
                               f" s.value = '{test_num}';"
                               " s.dispatchEvent(new Event('change')); })()")
            state = await wait_panels(browser, lambda p: p["mode"] == f"test:{test_num}"
                                      and p["valued"] > 50 and p["wafer"] > 0, 15,
                                      "the wafer map by test value")

            await browser.eval("window.scrollTo(0, 0)")
            await browser.screenshot(ARTIFACTS / "dashboard-700.png")
            await browser.screenshot(ARTIFACTS / "dashboard-700-full.png", full_page=True)
            state = await panels(browser)
            assert every_panel_filled(state), state
            assert state["overflow"] <= 0 and not state["wide"], state
            assert state["wrapped"] == 0, state  # a bin's count stays on one line

            # The same page on a 1080p wall screen.
            await browser.call("Emulation.setDeviceMetricsOverride", width=1920, height=1080,
                               deviceScaleFactor=1, mobile=False)
            state = await wait_panels(browser, every_panel_filled, 10, "the wide layout")
            assert state["overflow"] <= 0, state
            columns = await browser.eval(
                "getComputedStyle(document.querySelector('main')).gridTemplateColumns"
                ".split(' ').length")
            assert columns == 4
            await browser.screenshot(ARTIFACTS / "dashboard-1080p.png")
        nursery.cancel_scope.cancel()


async def wait_state(browser: Browser, predicate: Any, seconds: float, what: str) -> dict:
    state: dict[str, Any] = {}
    try:
        with trio.fail_after(seconds):
            while True:
                try:
                    state = await browser.eval(
                        "document.readyState === 'complete' ? "
                        "({path: location.pathname, title: document.title,"
                        " signin: !!document.getElementById('signin'),"
                        " map: !!document.getElementById('wafer-map'), cookie: document.cookie,"
                        " user: document.body.dataset.user || '',"
                        " error: (document.getElementById('error') || {}).textContent || ''})"
                        " : null") or {}
                except RuntimeError:  # the page is navigating
                    state = {}
                if state and predicate(state):
                    return state
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}; state: {state}; "
                             f"console: {browser.console[-5:]}") from None


def spki_sha256(cert_file: str) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 of the SHA-256 of
    the certificate's SubjectPublicKeyInfo."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def start_tls_tester(nursery: trio.Nursery, tmp: Path, port: int, ca_file: str) -> Any:
    """The simulated tester's gateway, over wss:// to a hub with TLS."""
    from hubtools import gateway_config

    from edgegw.gateway import Gateway

    cfg = gateway_config(tmp / "gw", port, token=TOKEN, batch={"max_records": 500},
                         uplink={"ca_file": ca_file},
                         sources=[{"name": "tester", "type": "simulated",
                                   "parts_per_second": 400, "wafer_diameter_dies": 18,
                                   "max_parts": 200, "base_yield": 0.7}])  # alerts trip
    cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(
        cfg.gateway, hub_url=f"wss://127.0.0.1:{port}/ws/gateway"))
    gateway = Gateway(cfg)
    await nursery.start(gateway.run)
    return gateway


@needs_chromium
async def test_the_dashboard_signs_in_and_without_a_token_shows_only_the_sign_in_page(
        tmp_path: Path) -> None:
    from edgegw.auth import mint

    secret = "a-dashboard-test-secret-of-32-chars!"
    # Over TLS: the hub's certificate from a test CA; Chromium trusts exactly its key.
    pki = Pki(tmp_path / "pki")
    hub = LiveHub(tmp_path / "hub", auth={"mode": "jwt", "hs256_secret": secret},
                  tls={"cert_file": pki.cert_file, "key_file": pki.key_file})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        trust = f"--ignore-certificate-errors-spki-list={spki_sha256(pki.cert_file)}"
        async with open_browser(tmp_path / "profile", trust) as browser:
            # No token: the dashboard is the sign-in page, and the page can read no data.
            await browser.call("Page.navigate", url=f"https://127.0.0.1:{port}/")
            state = await wait_state(browser, lambda s: s["signin"], 15, "the sign-in page")
            assert state["path"] == "/login" and not state["map"]
            assert state["title"] == "edgegw - sign in"
            status = await browser.eval("fetch('/api/lots').then(r => r.status)", True)
            assert status == 401
            await browser.screenshot(ARTIFACTS / "dashboard-sign-in.png")

            # A wrong token is refused on the page; the right one signs in.
            await browser.eval("document.getElementById('token').value = 'not-a-token';"
                               "document.getElementById('submit').click()")
            state = await wait_state(browser, lambda s: s["error"], 10, "the refusal")
            assert "malformed token" in state["error"] and state["path"] == "/login"
            token = mint(secret, "olga", "operator", 600)
            await browser.eval(f"document.getElementById('token').value = '{token}';"
                               "document.getElementById('submit').click()")
            state = await wait_state(browser, lambda s: s["map"] and s["user"], 15,
                                     "the dashboard, signed in")
            assert state["path"] == "/" and state["user"] == "olga"
            assert token not in state["cookie"]  # HttpOnly: the page's script cannot read it
            cookies = (await browser.call("Network.getAllCookies"))["cookies"]
            (session,) = [c for c in cookies if c["name"] == "edgegw_session"]
            assert (session["httpOnly"], session["secure"], session["sameSite"]) == (
                True, True, "Strict")

            # Live data reaches the signed-in page over /ws/live (the cookie authenticates).
            await wait_page(browser, lambda p: p["conn"] == "live", 15, "the page to connect")
            await start_tls_tester(nursery, tmp_path, port, pki.ca_file)
            page = await wait_page(browser, lambda p: p["dies"] > 50 and p["frames"] > 2, 30,
                                   "live dies on the signed-in page")
            assert page["topic"].startswith("lot/LOT0001/wafer/")

            # The acknowledgement is in the signed-in user's name, whatever the field says.
            page = await wait_page(browser, lambda p: p["alerts"] > 0, 30, "alerts")
            readonly = await browser.eval("document.getElementById('user').readOnly")
            assert readonly is True
            alert_id = await browser.eval(
                "(() => { const li = document.querySelector("
                "'#alerts li[data-acknowledged=\"false\"]');"
                " li.querySelector('button').click(); return li.dataset.alertId; })()")
            assert hub.alerts is not None
            await wait_page(browser, lambda p: hub.alerts.alerts[alert_id].acknowledged, 10,
                            "the acknowledgement")
            assert hub.alerts.alerts[alert_id].acked_by == "olga"
            await browser.screenshot(ARTIFACTS / "dashboard-signed-in.png")

            # Signing out: back to the sign-in page, and the dashboard is closed again.
            await browser.eval("document.getElementById('signout').click()")
            await wait_state(browser, lambda s: s["signin"], 15, "the sign-in page again")
            status = await browser.eval("fetch('/api/lots').then(r => r.status)", True)
            assert status == 401

            # The sign-in page goes back only to a path of this hub: "/\\host" would be
            # another site to the browser.
            await browser.call("Page.navigate",
                               url=f"https://127.0.0.1:{port}/login?next=/%5Cevil.example/x")
            await wait_state(browser, lambda s: s["signin"], 15, "the sign-in page")
            await browser.eval(f"document.getElementById('token').value = '{token}';"
                               "document.getElementById('submit').click()")
            await wait_state(browser, lambda s: s["map"], 15, "the dashboard")
            where = await browser.eval("location.host + location.pathname")
            assert where == f"127.0.0.1:{port}/"
        nursery.cancel_scope.cancel()


@needs_chromium
async def test_a_page_whose_role_changes_on_a_reload_reconnects_and_one_whose_key_goes_signs_in(
        tmp_path: Path) -> None:
    """The hub reloads its [auth] (SIGHUP): a signed-in page whose token now maps to another
    role is closed (4401 "sign-in changed") and reconnects on its own as that role; once the
    secret it was signed with is withdrawn it is closed (4401 "token no longer accepted")
    and shows the sign-in page."""
    import jwt

    first, second = "first-dashboard-secret-" + "a" * 16, "second-dashboard-secret-" + "b" * 16

    def auth(secret: str, leads: str) -> dict[str, Any]:
        return {"mode": "jwt", "hs256_secret": secret, "role_map": {"leads": leads}}

    hub = LiveHub(tmp_path / "hub", auth=auth(first, "operator"))
    lead = jwt.encode({"sub": "lee", "role": "leads", "exp": time.time() + 600}, first,
                      algorithm="HS256")

    async def reload(secret: str, leads: str) -> None:
        assert hub.ingest is not None
        hub.ingest.reloader.config_source = lambda: build(HubConfig, {
            "hub": {"port": hub.port, "data_dir": str(hub.data_dir)},
            "gateways": {"ate-01": {"token": TOKEN}}, "auth": auth(secret, leads)})
        assert await hub.ingest.reloader.reload_config()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        async with open_browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/login")
            await wait_state(browser, lambda s: s["signin"], 15, "the sign-in page")
            await browser.eval(f"document.getElementById('token').value = '{lead}';"
                               "document.getElementById('submit').click()")
            await wait_state(browser, lambda s: s["map"] and s["user"], 15, "signed in")
            before = await wait_page(browser, lambda p: p["conn"] == "live", 15, "live")
            role = "document.getElementById('user').title"
            assert await browser.eval(role) == "signed in as lee (operator)"

            await reload(first, "viewer")
            page = await wait_page(browser, lambda p: p["conn"] == "live"
                                   and p["reconnects"] > before["reconnects"], 20,
                                   "the page connected again")
            assert await browser.eval("location.pathname") == "/"
            assert await browser.eval(role) == "signed in as lee (viewer)"

            await reload(second, "viewer")
            state = await wait_state(browser, lambda s: s["signin"], 20, "the sign-in page")
            assert state["path"] == "/login" and page["reconnects"] >= 1
        nursery.cancel_scope.cancel()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@needs_chromium
async def test_parametric_only_data_shows_yield_and_bins_not_applicable_and_tests_by_name(
        tmp_path: Path) -> None:
    """A WAT CSV file (plugins/edgegw-wat: no pass/fail, no bins, tests known by name)
    tailed by a real gateway: the page says "n/a", never 0 %, and names the tests."""
    wat = ("WATCSV,1,WATLOT,DEV,ET-3,wat.prg,2024-09-23 10:08:20,1\n"
           "WAFER,WATLOT-W01,3\n"
           "SITE,X,Y,vth_n[V],idds[A]\n"
           "1,0,3,0.452,645.65e-12\n2,3,0,0.448,612.5e-12\n3,-3,0,0.455,601.0e-12\n")
    watched = tmp_path / "wat"
    watched.mkdir()
    (watched / "lot.wat.csv").write_text(wat)
    hub = LiveHub(tmp_path / "hub")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        async with open_browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            await wait_page(browser, lambda p: p["conn"] == "live", 15, "the page to connect")
            cfg = gateway_config(tmp_path / "gw", port, token=TOKEN, sources=[
                {"name": "wat", "type": "tail", "format": "wat", "paths": [str(watched)],
                 "poll_interval": 0.05}])
            await nursery.start(Gateway(cfg).run)
            page = await wait_page(browser, lambda p: p["dies"] == 3, 30, "the 3 WAT sites")
            assert page["topic"] == "lot/WATLOT/wafer/WATLOT-W01"

            async def shown() -> Any:
                return await browser.eval(
                    "({figures: document.getElementById('wafer-figures').textContent,"
                    " pareto: document.getElementById('pareto').textContent,"
                    " sites: document.getElementById('sites').textContent,"
                    " tests: [...document.querySelectorAll('#tests tbody tr')]"
                    "   .map(r => r.cells[0].textContent + '|' + r.cells[1].textContent)})")

            with trio.fail_after(15):
                while (view := await shown())["tests"] != ["idds|3", "vth_n|3"]:
                    await trio.sleep(0.1)
            assert "yield n/a" in view["figures"] and "good n/a" in view["figures"]
            assert "0.0 %" not in view["figures"]
            assert view["pareto"] == "bins not applicable (parametric data)"
            assert view["sites"] == "yield not applicable (no pass/fail)"
            await browser.screenshot(ARTIFACTS / "dashboard-parametric.png")
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def page_of_a_tailed_file(tmp_path: Path, name: str, data: bytes,
                                live: dict[str, Any] | None = None
                                ) -> AsyncIterator[tuple[Browser, int]]:
    """A hub (``live``: its LiveState's caps), the dashboard open on it in Chromium
    (connected), and a real gateway tailing a directory holding ``name``.stdf with
    ``data``: the (browser, hub port)."""
    watched = tmp_path / name
    watched.mkdir()
    (watched / f"{name}.stdf").write_bytes(data)
    hub = LiveHub(tmp_path / "hub", live=live)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        async with open_browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
            await wait_page(browser, lambda p: p["conn"] == "live", 15, "the page to connect")
            cfg = gateway_config(tmp_path / "gw", port, token=TOKEN, sources=[
                {"name": name, "type": "tail", "paths": [str(watched)],
                 "poll_interval": 0.05}])
            await nursery.start(Gateway(cfg).run)
            yield browser, port
        nursery.cancel_scope.cancel()


@needs_chromium
async def test_a_final_test_lot_shows_its_tests_and_says_it_has_no_wafers(
        tmp_path: Path) -> None:
    """An STDF file of packaged parts (no WIR/WRR) tailed by a real gateway: the page shows
    the lot's tests (one number used by two tests marked), and its yield trend says the lot
    has no wafers -- no wafer named ""."""
    from edgegw.stdf import StdfWriter

    w = StdfWriter("<")
    recs = [("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}),
            ("MIR", {"SETUP_T": 1, "START_T": 2, "STAT_NUM": 1, "LOT_ID": "FTLOT",
                     "PART_TYP": "DEV", "NODE_NAM": "ate", "TSTR_TYP": "J750",
                     "JOB_NAM": "ft"})]
    for n in range(4):
        recs += [("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}),
                 ("PTR", {"TEST_NUM": 100, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                          "PARM_FLG": 0, "RESULT": 1.0 + n, "TEST_TXT": "VDD",
                          "OPT_FLAG": 0x0E, "LO_LIMIT": 0.0, "HI_LIMIT": 10.0, "UNITS": "V"}),
                 ("PTR", {"TEST_NUM": 101, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                          "PARM_FLG": 0, "RESULT": 2.0,
                          "TEST_TXT": "IDD" if n else "IDDQ"}),  # one number, two tests
                 ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0x08 if n == 3 else 0,
                          "NUM_TEST": 1, "HARD_BIN": 2 if n == 3 else 1,
                          "SOFT_BIN": 2 if n == 3 else 1, "PART_ID": str(n + 1)})]
    recs.append(("MRR", {"FINISH_T": 9}))
    data = b"".join(w.encode(name, f) for name, f in recs)
    async with page_of_a_tailed_file(tmp_path, "ft", data) as (browser, _port):
        async def shown() -> Any:
            return await browser.eval(
                "({trend: document.getElementById('yield-trend').textContent,"
                " lot: (document.getElementById('lot-title') || {}).textContent || '',"
                " final: !!document.querySelector('#yield-trend [data-final-test]'),"
                " tests: [...document.querySelectorAll('#tests tbody tr')]"
                "   .map(r => r.cells[0].textContent)})")

        with trio.fail_after(30):
            while not (view := await shown())["final"] or len(view["tests"]) < 2:
                await trio.sleep(0.1)
        assert "no wafers" in view["trend"] and "75.0 %" in view["trend"]
        assert view["tests"] == ["100 VDD", "101 IDD ⚠ 2 names"]
        assert view["lot"] == "lot FTLOT · DEV · closed · final test (no wafers)"
        await browser.screenshot(ARTIFACTS / "dashboard-final-test.png")


#: the tester's clock at the first pass's start (START_T)
T0 = 1764130000


def dual_head_retest_stdf() -> bytes:
    """A wafer probed on two heads (sites 0 and 1 of each; head 2's site 0 fails, and skips
    test 101: not executed), then the lot tested again under its id: a second MIR and WIR
    after the MRR, one die retested, the lot in test again."""
    from edgegw.stdf import StdfWriter

    w = StdfWriter("<")
    recs: list[tuple[str, dict[str, Any]]] = []

    def part(head: int, site: int, x: int, y: int, ran_101: bool) -> None:
        good = (head, site) != (2, 0)
        recs.extend([
            ("PIR", {"HEAD_NUM": head, "SITE_NUM": site}),
            ("PTR", {"TEST_NUM": 100, "HEAD_NUM": head, "SITE_NUM": site, "TEST_FLG": 0,
                     "PARM_FLG": 0, "RESULT": 1.0 + x, "TEST_TXT": "VDD", "OPT_FLAG": 0x0E,
                     "LO_LIMIT": 0.0, "HI_LIMIT": 10.0, "UNITS": "V"}),
            ("PTR", {"TEST_NUM": 101, "HEAD_NUM": head, "SITE_NUM": site,
                     "TEST_FLG": 0 if ran_101 else 0x10, "PARM_FLG": 0, "RESULT": 2.0,
                     "TEST_TXT": "IDD"}),
            ("PRR", {"HEAD_NUM": head, "SITE_NUM": site, "PART_FLG": 0 if good else 0x08,
                     "NUM_TEST": 2, "HARD_BIN": 1 if good else 5, "SOFT_BIN": 1 if good else 5,
                     "X_COORD": x, "Y_COORD": y, "PART_ID": f"{head}.{x}.{y}"})])

    for start, heads in ((T0, (1, 2)), (T0 + 7200, (1,))):  # two lots back to back in a file
        recs.append(("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}))
        recs.append(("MIR", {"SETUP_T": start, "START_T": start, "STAT_NUM": 1,
                             "LOT_ID": "DHLOT", "PART_TYP": "DEV", "NODE_NAM": "prober",
                             "TSTR_TYP": "J750", "JOB_NAM": "sort"}))
        recs += [("WIR", {"HEAD_NUM": h, "START_T": start, "WAFER_ID": "DHLOT-W1"})
                 for h in heads]
        if start == T0:
            for head in (1, 2):
                for site in (0, 1):
                    for y in (0, 1):
                        part(head, site, 2 * (head - 1) + site, y, ran_101=head == 1)
            recs += [("WRR", {"HEAD_NUM": h, "FINISH_T": T0 + 100, "PART_CNT": 4,
                              "WAFER_ID": "DHLOT-W1"}) for h in heads]
            recs.append(("MRR", {"FINISH_T": T0 + 100}))
        else:
            part(1, 0, 0, 0, ran_101=True)  # the second pass: retested, the lot open again
    return b"".join(w.encode(name, f) for name, f in recs)


#: the Tests rows (test|n) once both passes are applied: head 1's 4 parts and the retest
#: ran test 101, head 2's 4 did not
TESTS_AFTER_PASS_2 = ["100 VDD|9", "101 IDD|5+4 not run"]


@needs_chromium
async def test_a_dual_head_lot_tested_again_shows_heads_passes_and_tests_not_run(
        tmp_path: Path) -> None:
    """What the hub's live topics say and an operator must see: the lot header and the
    wafer's title give the pass under test ("pass 2"), the site bars and a die's hover name
    its head ("site 2/0"), the Tests table the results not executed; /api/lots the passes."""
    async with page_of_a_tailed_file(tmp_path, "dh", dual_head_retest_stdf()) as (browser,
                                                                               port):
        async def shown() -> Any:
            return await browser.eval(
                "(() => { const t = (id) => (document.getElementById(id) || {}).textContent;"
                " return {lot: t('lot-title'), wafer: t('wafer-title'),"
                " lot_starts: (document.querySelector('#lot-title [data-starts]')"
                "   || {dataset: {}}).dataset.starts || '',"
                " sites: [...document.querySelectorAll('#sites .row')]"
                "   .map(r => r.firstChild.textContent + ' ' + r.lastChild.textContent),"
                " tests: [...document.querySelectorAll('#tests tbody tr')]"
                "   .map(r => r.cells[0].textContent + '|' + r.cells[1].textContent)}; })()")

        view: dict[str, Any] = {}
        try:
            with trio.fail_after(30):
                # every record applied (the tail may cut the file into several frames)
                while not ((view := await shown())["lot_starts"] == "2"
                           and "pass 2" in view["wafer"] and len(view["sites"]) == 4
                           and view["tests"] == TESTS_AFTER_PASS_2):
                    await trio.sleep(0.1)
        except trio.TooSlowError:
            raise AssertionError(f"the lot's second pass not shown: {view}") from None
        assert "lot DHLOT" in view["lot"] and "open" in view["lot"]
        assert "pass 2 · reopened" in view["lot"] and "pass 2 · reopened" in view["wafer"]
        assert view["sites"] == ["site 1/0 100.0 %", "site 1/1 100.0 %",
                                 "site 2/0 0.0 %", "site 2/1 100.0 %"]

        # Hovering a head 2 die names its head, as its site bar does.
        row, tip = await hover_die(
            browser, "[...v.dies.values()].find(r => r[6] === 2 && r[5] === 0)")
        assert f"x {row[0]}  y {row[1]}" in tip and "site 2/0  FAIL" in tip
        await browser.screenshot(ARTIFACTS / "dashboard-dual-head-retest.png")

        lots = (await http_json(port, "/api/lots"))["lots"]
        assert [(r["lot_id"], r["status"], r["starts"], r["reopened_at"]) for r in lots] \
            == [("DHLOT", "open", 2, T0 + 7200)]


def wafer_pass(w: Any, wafer_id: str, start: int, dies: list[tuple[int, int]]) -> bytes:
    """One pass of wafer ``wafer_id`` (its WIR's START_T ``start``): a good die at each
    X/Y, then its WRR."""
    recs: list[tuple[str, dict[str, Any]]] = [
        ("WIR", {"HEAD_NUM": 1, "START_T": start, "WAFER_ID": wafer_id})]
    for x, y in dies:
        recs += [("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}),
                 ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0, "NUM_TEST": 0,
                          "HARD_BIN": 1, "SOFT_BIN": 1, "X_COORD": x, "Y_COORD": y})]
    recs.append(("WRR", {"HEAD_NUM": 1, "FINISH_T": start + 100, "PART_CNT": len(dies),
                         "WAFER_ID": wafer_id}))
    return b"".join(w.encode(name, f) for name, f in recs)


@needs_chromium
@pytest.mark.parametrize("seen_live", [True, False], ids=["seen-live", "archived-at-once"])
async def test_a_wafer_archived_and_tested_again_comes_back_on_the_page_without_a_reconnect(
        tmp_path: Path, seen_live: bool) -> None:
    """A hub that keeps one wafer of a lot live: wafer W1 is archived when W2 starts, and
    comes back when its retest starts (docs/live-topics.md).  Its topic's next delta after
    ``{"status": "archived"}`` is its whole map: the page takes it as the wafer's new
    snapshot and shows its second pass -- the page had dropped the wafer with its offset,
    saw a gap in the topic's deltas and reconnected (every operator screen blinking).
    ``seen_live``: the page drew W1 before it was archived; else W1 and W2 come in one
    frame, and the page's first item of W1 is an empty snapshot (already archived)."""
    from edgegw.stdf import StdfWriter

    w = StdfWriter("<")
    head = b"".join(w.encode(name, f) for name, f in [
        ("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}),
        ("MIR", {"SETUP_T": T0, "START_T": T0, "STAT_NUM": 1, "LOT_ID": "RTLOT",
                 "PART_TYP": "DEV", "NODE_NAM": "prober", "TSTR_TYP": "J750",
                 "JOB_NAM": "sort"})])
    w1, w2 = "lot/RTLOT/wafer/W1", "lot/RTLOT/wafer/W2"
    async with page_of_a_tailed_file(
            tmp_path, "rt", head + wafer_pass(w, "W1", T0, [(0, 0), (1, 0)])
            + (b"" if seen_live else wafer_pass(w, "W2", T0 + 200, [(0, 0)])),
            live={"max_wafers_per_lot": 1}) as (browser, _port):
        stdf = tmp_path / "rt" / "rt.stdf"

        async def shown() -> dict[str, Any]:
            page = await browser.page()
            page.update(await browser.eval(
                "({wafers: [...document.getElementById('wafer-select').options].slice(1)"
                "   .map(o => o.value),"
                " title: (document.getElementById('wafer-title') || {}).textContent || ''})"))
            return page

        async def wait_shown(predicate: Any, what: str) -> dict[str, Any]:
            view: dict[str, Any] = {}
            try:
                with trio.fail_after(30):
                    while not predicate(view := await shown()):
                        await trio.sleep(0.1)
            except trio.TooSlowError:
                raise AssertionError(f"timed out waiting for {what}: {view}") from None
            return view

        async def append(data: bytes) -> None:
            def write() -> None:
                with stdf.open("ab") as f:
                    f.write(data)
            await trio.to_thread.run_sync(write)

        if seen_live:
            await wait_shown(lambda v: v["wafers"] == [w1] and v["dies"] == 2, "wafer W1")
            await append(wafer_pass(w, "W2", T0 + 200, [(0, 0)]))
        before = await wait_shown(lambda v: v["wafers"] == [w2] and v["topic"] == w2,
                                  "W1 archived, W2 shown")
        # W1 tested again: its WIR starts after every start and end of W1 so far.
        await append(wafer_pass(w, "W1", T0 + 400, [(2, 0)]))
        after = await wait_shown(lambda v: v["reconnects"] > before["reconnects"]
                                 or (v["topic"] == w1 and "pass 2" in v["title"]),
                                 "W1 back with its second pass (or a reconnect)")
        assert after["reconnects"] == before["reconnects"], after
        assert after["topic"] == w1 and after["dies"] == 3  # its first pass's dies and the new
        assert after["wafers"] == [w1] and "pass 2 · reopened" in after["title"]


@needs_chromium
async def test_a_wafer_of_a_lot_whose_id_holds_url_characters_is_coloured_by_a_test(
        tmp_path: Path) -> None:
    """Lot and wafer ids are the tester's free text: "?", "#", "&", "/", "%" and spaces all
    occur.  The wafer map coloured by a test reads each die's value from the history API;
    the page must address the lot and wafer as ids (percent-encoded), not paste the topic's
    levels into the URL (a "?" there starts a query string and the request reads another
    path)."""
    from edgegw.stdf import StdfWriter

    lot, wafer = "Q?7#A&B/1 50%", "W?1 #2"
    w = StdfWriter("<")
    recs: list[tuple[str, dict[str, Any]]] = [
        ("FAR", {"CPU_TYPE": 2, "STDF_VER": 4}),
        ("MIR", {"SETUP_T": T0, "START_T": T0, "STAT_NUM": 1, "LOT_ID": lot,
                 "PART_TYP": "DEV", "NODE_NAM": "prober", "TSTR_TYP": "J750",
                 "JOB_NAM": "sort"}),
        ("WIR", {"HEAD_NUM": 1, "START_T": T0, "WAFER_ID": wafer})]
    dies = [(0, 0), (1, 0), (0, 1)]
    for x, y in dies:
        recs += [("PIR", {"HEAD_NUM": 1, "SITE_NUM": 0}),
                 ("PTR", {"TEST_NUM": 100, "HEAD_NUM": 1, "SITE_NUM": 0, "TEST_FLG": 0,
                          "PARM_FLG": 0, "RESULT": 1.0 + x + 2 * y, "TEST_TXT": "VDD",
                          "OPT_FLAG": 0x0E, "LO_LIMIT": 0.0, "HI_LIMIT": 10.0, "UNITS": "V"}),
                 ("PRR", {"HEAD_NUM": 1, "SITE_NUM": 0, "PART_FLG": 0, "NUM_TEST": 1,
                          "HARD_BIN": 1, "SOFT_BIN": 1, "X_COORD": x, "Y_COORD": y})]
    recs.append(("WRR", {"HEAD_NUM": 1, "FINISH_T": T0 + 100, "PART_CNT": len(dies),
                         "WAFER_ID": wafer}))
    data = b"".join(w.encode(name, f) for name, f in recs)
    async with page_of_a_tailed_file(tmp_path, "odd", data) as (browser, _port):
        await wait_panels(browser, lambda p: p["wafer"] == len(dies) and p["tests"] == 1, 30,
                          "the wafer's dies and its test")
        with trio.fail_after(10):
            while not await browser.eval(
                    "[...document.getElementById('color-by').options]"
                    ".some(o => o.value === '100')"):
                await trio.sleep(0.1)
        await browser.eval("(() => { const s = document.getElementById('color-by');"
                           " s.value = '100'; s.dispatchEvent(new Event('change')); })()")
        state = await wait_panels(browser, lambda p: p["valued"] == len(dies), 15,
                                  "every die coloured by test 100's value")
        assert state["mode"] == "test:100"
