"""Failure boundaries (docs/reliability.md): an unexpected exception in one unit -- a
source, a format plugin's parser, a consumer of applied frames, a webhook delivery, a
/ws/live request -- is logged, counted in ``edgegw_internal_errors_total{where=...}`` and
ends only that unit.  The services keep running and the other units are untouched.

The failing parts are real extension points used the way a third party would: plugins
installed through entry points (a dist-info directory on ``sys.path``, as pip leaves it),
a consumer registered with ``Hub.add_consumer``, webhook configs that pass validation but
cannot be delivered.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import gateway_config, http_get, hub_config, start_hub
from shared_data import METIS, stdf_bytes
from test_webhooks import HookServer, event, wait_for
from wsclient import WsClient

from edgegw.gateway import Gateway
from edgegw.hub import Hub
from edgegw.hub.alerts import WebhookConfig, WebhookSender, shown_url
from edgegw.hub.store import unpack_body
from edgegw.metrics import Metrics, internal_errors
from edgegw.protocol import Hello, decode_body, encode, encode_body
from edgegw.records import SensorReading

PLUGINS = '''
import dataclasses

import trio

from edgegw.records import SensorReading
from edgegw.stdf.format import STDF

RUNS = []  # the checkpoint each run of FlakySource started from


@dataclasses.dataclass(frozen=True)
class FlakyConfig:
    readings: int = 30
    fail_at: int = 10  # the first run raises here


class FlakySource:
    """Puts readings three at a time, each put checkpointed with the index after it (a
    replay position); its first run fails part-way."""

    Config = FlakyConfig
    replays = True

    def __init__(self, name, config, context):
        self.name, self.config, self.context = name, config, context

    async def run(self, sink, *, task_status=trio.TASK_STATUS_IGNORED):
        start = self.context.checkpoint or 0
        RUNS.append(start)
        task_status.started()
        for i in range(start, self.config.readings, 3):
            if len(RUNS) == 1 and i >= self.config.fail_at:
                raise RuntimeError("sensor bus fell over")
            end = min(i + 3, self.config.readings)
            await sink.put([SensorReading(self.name, float(j), "flaky", float(j))
                            for j in range(i, end)], checkpoint=end)
            await trio.sleep(0)


class _BuggyParser:
    """STDF, but an IndexError (a bug) on any record with BOOM in a field."""

    def __init__(self):
        self.inner = STDF.new_parser()

    @property
    def position(self):
        return self.inner.position

    def feed(self, data):
        self.inner.feed(data)

    def _check(self, records):
        for rec in records:
            if any("BOOM" in str(v) for v in rec.fields.values()):
                raise IndexError("list index out of range (a plugin bug)")
            yield rec

    def records(self):
        return self._check(self.inner.records())

    def close(self):
        return self._check(self.inner.close())

    def state(self):
        return self.inner.state()


class BuggyFormat:
    name = "buggy-stdf"
    description = "STDF through a parser with a bug"
    suffixes = (".std",)

    def new_parser(self):
        return _BuggyParser()


BUGGY = BuggyFormat()
'''


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[Any]:
    """Install a plugin distribution the way pip would: a module and its dist-info."""
    site = tmp_path / "site"
    info = site / "edgegw_boundary_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "edgegw_boundary_plugins.py").write_text(PLUGINS)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: edgegw-boundary-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [edgegw.sources]
        flaky = edgegw_boundary_plugins:FlakySource

        [edgegw.formats]
        buggy-stdf = edgegw_boundary_plugins:BUGGY
        """))
    sys.path.insert(0, str(site))
    try:
        import edgegw_boundary_plugins  # type: ignore[import-not-found]

        yield edgegw_boundary_plugins
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("edgegw_boundary_plugins", None)


async def stored_records(hub: Any) -> list[list[Any]]:
    rows = await hub.store.query("SELECT codec, body FROM frames ORDER BY id")
    return [r for codec, body in rows for r in decode_body(unpack_body(codec, body), 1 << 30)[2]]


async def test_a_failing_source_is_restarted_at_its_checkpoint_and_reported(
        tmp_path: Path, plugins: Any) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        cfg = gateway_config(tmp_path / "gw", port, sources=[
            {"name": "bus", "type": "flaky", "readings": 30, "fail_at": 10}],
            batch={"max_records": 5, "max_delay_ms": 50})  # puts split across frames
        gateway = Gateway(cfg)
        gateway.source_backoff_s = (0.01, 0.05)
        await nursery.start(gateway.run)
        with trio.fail_after(20):
            while sum(1 for r in await stored_records(hub) if r[0] == 11) < 30:
                await trio.sleep(0.02)
        records = await stored_records(hub)
        # every reading exactly once: the restarted source resumed at its checkpoint
        assert [r[4] for r in records if r[0] == 11] == [float(i) for i in range(30)]
        assert plugins.RUNS == [0, 12]
        [failed] = [r for r in records if r[0] == 13 and r[4] == "source_failed"]
        assert failed[3] == "error" and "sensor bus fell over" in failed[5]
        assert failed[6]["source"] == "bus" and failed[6]["restarts"] == 1
        assert internal_errors(gateway.metrics).get(where="source") == 1
        assert gateway.m_source_restarts.get(source="bus") == 1
        nursery.cancel_scope.cancel()


async def test_a_format_plugin_bug_abandons_that_file_only(tmp_path: Path, plugins: Any) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = stdf_bytes(METIS)
    assert good.count(b"spm3f_dual") == 1
    (inbox / "a-bad.std").write_bytes(good.replace(b"spm3f_dual", b"BOOM3_dual"))
    (inbox / "b-good.std").write_bytes(good)
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        cfg = gateway_config(tmp_path / "gw", port, sources=[
            {"name": "tester", "type": "stdf", "format": "buggy-stdf", "paths": [str(inbox)],
             "poll_interval": 0.05}])
        gateway = Gateway(cfg)
        await nursery.start(gateway.run)
        with trio.fail_after(20):
            while sum(1 for r in await stored_records(hub) if r[0] == 2) < 1:  # LotEnd
                await trio.sleep(0.05)
        records = await stored_records(hub)
        # the good file whole (22 parts, both sites), the bad one reported and abandoned
        assert sum(1 for r in records if r[0] == 5) == 22
        [corrupt] = [r for r in records if r[0] == 13 and r[4] == "source_corrupt"]
        assert "a-bad.std" in corrupt[5] and "IndexError" in corrupt[5]
        assert internal_errors(gateway.metrics).get(where="format_parser") == 1
        assert internal_errors(gateway.metrics).get(where="source") == 0  # not restarted
        tail = gateway.sources[0][1]
        assert tail.files[str(inbox / "a-bad.std")].done  # never retried
        nursery.cancel_scope.cancel()


class BrokenConsumer:
    """A consumer of applied frames with a bug: it fails on every third frame."""

    def __init__(self) -> None:
        self.frames = 0

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        self.frames += 1
        if self.frames % 3 == 0:
            raise ZeroDivisionError("consumer bug")

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        raise KeyError(gateway_id)


async def test_a_failing_consumer_misses_frames_but_ingest_goes_on(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        broken = BrokenConsumer()
        hub.add_consumer(broken)
        gateway = Gateway(gateway_config(tmp_path / "gw", port,
                                         batch={"max_records": 5, "max_delay_ms": 1000}))
        await nursery.start(gateway.run)
        await gateway.sink.put([SensorReading("s", float(i), "c", float(i)) for i in range(30)],
                               source="s")
        assert await gateway.drain(10)
        assert hub.stats()["gateways"]["ate-01"]["records_applied"] == 30
        assert broken.frames == 6
        errors = internal_errors(hub.metrics)
        assert errors.get(where="hub_consumer") == 2 + 1  # two frames, one connect
        nursery.cancel_scope.cancel()


class BrokenColumnsConsumer:
    """A consumer that reads columnar frames (as the live state does), with a bug there."""

    def __init__(self) -> None:
        self.frames = 0

    def on_columns(self, gateway_id: str, first_rid: int, columns: Any) -> None:
        self.frames += 1
        raise ZeroDivisionError("columns consumer bug")

    def on_records(self, gateway_id: str, first_rid: int, records: list[Any]) -> None:
        pass

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        pass


async def test_a_consumers_error_is_logged_with_the_method_that_failed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import edgegw.metrics as metrics_module
    monkeypatch.setattr(metrics_module, "_last_logged", {})  # log limits: start afresh
    async with trio.open_nursery() as nursery:
        hub, port = await start_hub(nursery, hub_config(tmp_path / "hub"))
        broken = BrokenColumnsConsumer()
        hub.add_consumer(broken)
        gateway = Gateway(gateway_config(tmp_path / "gw", port,
                                         uplink={"max_protocol_version": 2}))
        await nursery.start(gateway.run)
        await gateway.sink.put([SensorReading("s", float(i), "c", float(i)) for i in range(5)],
                               source="s")
        assert await gateway.drain(10)
        await wait_for(lambda: broken.frames >= 1)
        assert internal_errors(hub.metrics).get(where="hub_consumer") >= 1
        [line] = [r.getMessage() for r in caplog.records
                  if "internal error at hub_consumer" in r.getMessage()]
        assert "BrokenColumnsConsumer.on_columns(gateway ate-01, rids " in line
        nursery.cancel_scope.cancel()


async def test_an_undeliverable_webhook_fails_that_delivery_not_the_hub() -> None:
    good = HookServer()
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        url = await good.serve(nursery)
        sender = WebhookSender([
            # both pass config validation; both raise inside the HTTP client
            WebhookConfig(url=url, headers={"X-Token": "line\nbreak"}),
            WebhookConfig(url="http://127.0.0.1:99999/hooks"),
            WebhookConfig(url=url),
        ], metrics=metrics)
        await nursery.start(sender.run)
        for i in range(3):
            sender.submit(event(f"w{i}"))
        await wait_for(lambda: len(good.accepted) == 3)
        await wait_for(lambda: sender.pending() == 0)
        assert [r["json"]["alert"]["id"] for r in good.accepted] == ["w0", "w1", "w2"]
        assert internal_errors(metrics).get(where="webhook") == 6
        assert sender.m_failed.get(url=shown_url(url), reason="internal_error") == 3
        nursery.cancel_scope.cancel()


async def test_a_live_request_whose_id_json_cannot_hold_is_answered(tmp_path: Path) -> None:
    """A CBOR request on a JSON connection whose ``id`` has an array as a map key: the
    reply could not be encoded, and the TypeError reached serve_tcp and ended the hub."""
    app = Hub(hub_config(tmp_path))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        client = await WsClient.connect(port, "/ws/live", subprotocols=["edgegw.live.v1.json"])
        assert '"hello"' in await client.recv()
        await client.send(cbor2.dumps({"type": "ping", "id": {(1, 2): 3}}))
        assert await client.recv() == '{"type":"pong","id":{"(1, 2)":3}}'
        deep = "[" * 990 + "]" * 990
        await client.send('{"type": "ping", "id": ' + deep + "}")
        reply = await client.recv()
        # (Python 3.13's json reads and writes it: the id is echoed as any other)
        assert reply in ('{"type":"pong","id":null}', '{"type":"pong","id":' + deep + "}",
                         '{"type":"error","id":null,"code":"bad_message",'
                         '"message":"not valid JSON/CBOR: maximum recursion depth exceeded'
                         ' while decoding a JSON array from a unicode string"}')
        assert await client.close() == (1000, "")
        status, _ = await http_get(port, "/healthz")
        assert status == 200 and internal_errors(app.metrics).total() == 0
        nursery.cancel_scope.cancel()


async def test_ping_before_hello_leaves_the_hub_serving(tmp_path: Path) -> None:
    """Issue 10 finding 1: this killed the hub process (IndexError), 8 of 8 tries."""
    async with trio.open_nursery() as nursery:
        _hub, port = await start_hub(nursery, hub_config(tmp_path))
        client = await WsClient.connect(port, "/ws/gateway")
        await client.send(cbor2.dumps([7, 1.0]))
        assert await client.close_reason() == (4004, "expected HELLO, got PING")
        client = await WsClient.connect(port, "/ws/gateway")  # and it still takes gateways
        await client.send(encode(Hello("ate-01", "s3cret", "e", 1)))
        assert cbor2.loads(await client.recv())[0] == 2  # WELCOME
        await client.send(encode_body(1, []))  # a body where a message belongs: 4004
        assert (await client.close_reason())[0] == 4004
        nursery.cancel_scope.cancel()
