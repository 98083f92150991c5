"""Hostile input over real sockets: the hub stays up, answers /healthz, and counts no
internal error for input that is merely invalid.

One real hub process (``edgegw hub``) takes every case of every test in this module, in
sequence, so a case also meets whatever the cases before it left behind.  Hypothesis
generates the cases from a fixed seed (``derandomize=True``): the suite runs the same
cases every time, bounded in number.  After each case the hub must be the same process,
``/healthz`` must answer 200, ``edgegw_internal_errors_total`` must still be 0 and the
hub's log must hold no traceback -- invalid input is a protocol error (a close code, an
error reply, a rejected frame), never an internal one.

The longer run (docs/reliability.md): ``EDGEGW_FUZZ_EXAMPLES=2000 .venv/bin/python -m
pytest -q -p no:cacheprovider tests/test_fuzz_sockets.py`` (examples per test; add
``EDGEGW_FUZZ_RANDOM=1`` for fresh random cases instead of the fixed ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hubtools import http_get
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ports import free_port
from processes import spawn, stop, wait_for
from wsclient import NO_CLOSE_FRAME, WsClient

from edgegw.protocol import (
    Ack,
    Data,
    Hello,
    Lost,
    Ping,
    Pong,
    Refuse,
    Welcome,
    decode,
    encode,
)
from edgegw.records import RECORD_TYPES

EXAMPLES = int(os.environ.get("EDGEGW_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=not os.environ.get("EDGEGW_FUZZ_RANDOM"),
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
TOKEN = "fuzz-token"
MAX_FRAME_BYTES = 64 * 1024
LIVE_MAX_MESSAGE = 256 * 1024

#: close codes the hub documents for peer faults (docs/protocol.md section 8,
#: docs/live-protocol.md); 1011 (internal error) is deliberately absent.
GATEWAY_CODES = {1000, 1002, 1007, 1009, 4004, 4006}
LIVE_CODES = {1000, 1002, 1007, 1009, 4008}


@dataclass
class HubProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    log_seen: int = 0

    def new_log(self) -> str:
        text = self.log.read_text(errors="replace")
        new, self.log_seen = text[self.log_seen:], len(text)
        return new


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-hub")
    port = free_port()
    config = tmp / "hub.toml"
    config.write_text(f"""
[hub]
port = {port}
data_dir = "{tmp / 'data'}"
max_frame_bytes = {MAX_FRAME_BYTES}
max_records_per_frame = 50
max_holes = 4
hello_timeout_s = 2.0

[gateways.fuzz]
token = "{TOKEN}"

[live]
queue_frames = 8
""")
    log = tmp / "hub.log"
    proc = spawn("hub", "--config", str(config), log=log)
    try:
        wait_for(lambda: _healthz(port) == 200, timeout=30)
        yield HubProcess(proc, port, log)
    finally:
        stop(proc)


def _healthz(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        return r.status


async def assert_unharmed(hub: HubProcess, case: Any) -> None:
    assert hub.proc.poll() is None, f"the hub exited ({hub.proc.returncode}) on {case!r:.300}"
    status, _ = await http_get(hub.port, "/healthz")
    assert status == 200
    _, stats = await http_get(hub.port, "/api/stats")
    internal = stats["metrics"].get("internal_errors_total") or {}
    log = hub.new_log()
    if internal:  # hypothesis replays the case while shrinking: show the first traceback
        whole = hub.log.read_text(errors="replace")
        first = whole.find("Traceback")
        log = whole[max(0, first - 500):first + 4000] if first >= 0 else log
    assert not internal, f"internal errors {internal} after {case!r:.300}\n{log[-4500:]}"
    assert "Traceback" not in log, f"a traceback after {case!r:.300}\n{log[-3000:]}"


# --------------------------------------------------------------------------- strategies

leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
          | st.binary(max_size=20))
cbor_values = st.recursive(
    leaves,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=8) | st.integers(), children,
                                        max_size=5)),
    max_leaves=20)


@dataclass(frozen=True)
class Raw:
    """Bytes written to the socket as they are, outside any WebSocket frame."""

    data: bytes


@dataclass(frozen=True)
class Frame:
    """One hand-made WebSocket frame (any opcode, masked or not)."""

    opcode: int
    payload: bytes
    masked: bool


def wire_record() -> st.SearchStrategy[list[Any]]:
    """A record's positional wire form: a known kind (mostly), a source index (mostly in
    range), a time, then fields of any type -- the wrong number, the wrong types."""
    return st.builds(
        lambda kind, src, ts, fields: [kind, src, ts, *fields],
        st.integers(1, 14) | st.integers(),
        st.integers(0, 1) | st.integers(),
        st.floats() | st.integers() | leaves,
        st.lists(leaves | st.integers(-5, 300) | st.sampled_from(["L1", "W1", "H", "P"]),
                 max_size=18))


def _values_of(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a record field's declared type, edges included (huge ints, NaN, ...)."""
    args = typing.get_args(tp)
    if type(None) in args:
        return st.none() | _values_of(next(a for a in args if a is not type(None)))
    origin = typing.get_origin(tp)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-3, 300) | st.integers()
    if tp is float:
        return st.floats() | st.integers(-10, 10)
    if tp is str:
        return st.sampled_from(["L1", "W1", "1", "H", "S", "P", "F", "c", ""]) | st.text(max_size=8)
    if origin is list:
        return st.lists(_values_of(args[0]), max_size=6)
    return st.dictionaries(st.text(max_size=6), leaves, max_size=3)


def typed_record(cls: Any) -> st.SearchStrategy[list[Any]]:
    """A record of ``cls`` with fields of the declared types: valid on the wire, and as
    hostile as its types allow (the live state and the alert engine see these)."""
    hints = typing.get_type_hints(cls)
    fields = [_values_of(hints[name]) for name in cls._fields[1:]]  # ts onwards
    return st.tuples(*fields).map(lambda values: [cls.KIND, 0, *values])


typed_records = st.sampled_from(RECORD_TYPES).flatmap(typed_record)

bodies = st.one_of(
    st.builds(lambda rid, records: cbor2.dumps([rid, ["src"], records]),
              st.integers(1, 10**6), st.lists(typed_records, min_size=1, max_size=8)),
    st.builds(lambda rid, sources, records: cbor2.dumps([rid, sources, records]),
              st.integers(1, 10**6) | st.integers(), st.lists(st.text(max_size=6), max_size=3),
              st.lists(wire_record(), max_size=8)),
    cbor_values.map(cbor2.dumps),
    st.binary(max_size=100),
)

gateway_messages = st.one_of(
    st.builds(lambda seq, body: encode(Data(seq, 1.0, body)), st.integers(1, 30), bodies),
    st.builds(lambda seq, body: cbor2.dumps([4, seq, 1.0, body]), leaves, leaves),
    cbor_values.map(lambda v: cbor2.dumps(v)),
    st.binary(max_size=200),
    st.text(max_size=50),
    st.integers(MAX_FRAME_BYTES - 64, MAX_FRAME_BYTES + 64).map(
        lambda n: encode(Data(1, 1.0, bytes(n)))),
    st.sampled_from([encode(Ping(1.0)), encode(Pong(2.0)), encode(Ack(1, [])),
                     encode(Hello("fuzz", TOKEN, "e", 1))]),
    # LOST (section 4) amid the frames: valid, and with any value
    st.builds(lambda n: encode(Lost(n)), st.integers(1, 40)),
    st.builds(lambda v: cbor2.dumps([9, v]), leaves),
    st.builds(Frame, st.integers(0, 15), st.binary(max_size=130), st.booleans()),
    st.binary(min_size=1, max_size=40).map(Raw),
)

topics = (st.sampled_from(["#", "lot/+", "lot/+/wafer/+", "sensor/+", "gateway/+", "alert/#",
                           "test/+/+"])
          | st.text(alphabet="ab/+#%", max_size=12) | leaves)
requests = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ack", "ping", "bogus"]) | leaves},
    optional={
        "id": cbor_values,
        "topics": st.lists(topics, max_size=4) | leaves,
        "resume": st.dictionaries(st.text(max_size=12), st.lists(leaves, max_size=3) | leaves,
                                  max_size=3) | leaves,
        "alert": leaves,
        "by": leaves,
    })


def as_json(value: Any) -> str | None:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


live_messages = st.one_of(
    requests.map(cbor2.dumps),
    requests.map(as_json).filter(lambda t: t is not None),
    cbor_values.map(cbor2.dumps),
    st.binary(max_size=200),
    st.text(max_size=100),
    st.just("x" * (LIVE_MAX_MESSAGE + 1)),
    # request ids the reply cannot simply repeat: a map key JSON lacks, deep nesting
    st.just(cbor2.dumps({"type": "ping", "id": {(1, 2): {"k": b"v"}}})),
    st.integers(1, 3000).map(lambda d: '{"type": "ping", "id": ' + "[" * d + "]" * d + "}"),
    st.builds(Frame, st.integers(0, 15), st.binary(max_size=130), st.booleans()),
    st.binary(min_size=1, max_size=40).map(Raw),
)


def sent_close(messages: list[Any]) -> bool:
    """The case holds a close frame of its own: the hub echoes whatever code it carried."""
    return any(isinstance(m, Frame) and m.opcode == 0x8 for m in messages)


async def play(client: WsClient, messages: list[Any]) -> tuple[int, str]:
    """Send the case; then close (or, after raw bytes that may have broken the framing,
    just end the TCP stream).  Returns the hub's close (code, reason)."""
    framing_intact = True
    try:
        for m in messages:
            if isinstance(m, Raw):
                framing_intact = False
                await client.send_raw(m.data)
            elif isinstance(m, Frame):
                framing_intact = False  # a bad length may swallow what follows
                await client.send_frame(m.opcode, m.payload, masked=m.masked)
            else:
                await client.send(m)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the hub closed the connection meanwhile
    if framing_intact and client.closed is None:
        try:
            return await client.close(1000, "done")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return await client.finish()


# --------------------------------------------------------------------------- the tests


@FUZZ
@given(epoch=st.sampled_from(["e1", "e2"]) | st.text(min_size=1, max_size=8),
       messages=st.lists(gateway_messages, min_size=1, max_size=8))
async def test_random_messages_after_a_valid_hello_on_ws_gateway(
        hub: HubProcess, epoch: str, messages: list[Any]) -> None:
    with trio.fail_after(30):
        while True:  # the previous case's connection may still be being released
            client = await WsClient.connect(hub.port, "/ws/gateway")
            await client.send(encode(Hello("fuzz", TOKEN, epoch, 1)))
            reply = decode(await client.recv())
            if isinstance(reply, Welcome):
                break
            assert isinstance(reply, Refuse) and reply.code == 4003, reply
            await client.close_reason()
            await trio.sleep(0.01)
        code, _ = await play(client, messages)
    assert code in GATEWAY_CODES | {NO_CLOSE_FRAME} or sent_close(messages), (code, messages)
    await assert_unharmed(hub, messages)


@FUZZ
@given(subprotocol=st.sampled_from([None, "edgegw.live.v1.json", "edgegw.live.v1.cbor"]),
       messages=st.lists(live_messages, min_size=1, max_size=8))
async def test_random_messages_on_ws_live(hub: HubProcess, subprotocol: str | None,
                                          messages: list[Any]) -> None:
    with trio.fail_after(30):
        client = await WsClient.connect(hub.port, "/ws/live",
                                        subprotocols=[subprotocol] if subprotocol else [])
        code, _ = await play(client, messages)
    assert code in LIVE_CODES | {NO_CLOSE_FRAME} or sent_close(messages), (code, messages)
    await assert_unharmed(hub, messages)


PATHS = [b"/", b"/healthz", b"/api/stats", b"/metrics", b"/ws/gateway", b"/ws/live",
         b"/api/live/stats", b"/api/lots", b"/api/lots/L1", b"/api/tests/L1/1", b"/api/alerts",
         b"/api/alerts/a1/ack", b"/static/app.js", b"*"]
HEADERS = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Upgrade", b"Connection",
           b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Sec-WebSocket-Protocol"]


def http_request(method: bytes, target: bytes, query: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [method + b" " + target + (b"?" + query if query else b"") + b" " + version]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


http_garbage = st.one_of(
    st.binary(max_size=400),
    st.builds(
        http_request,
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"BREW"]) | st.binary(max_size=6),
        st.sampled_from(PATHS) | st.binary(max_size=20),
        st.sampled_from([b"", b"limit=5", b"limit=x", b"clients=0", b"since=-1",
                         b"x=%ff%00"]) | st.binary(max_size=16),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1\x00"]),
        st.lists(st.tuples(st.sampled_from(HEADERS) | st.binary(max_size=12),
                           st.sampled_from([b"websocket", b"Upgrade", b"13", b"chunked", b"5",
                                            b"-1", b"99999999999", b"dGhlIHNhbXBsZSBub25jZQ=="])
                           | st.binary(max_size=24)),
                 max_size=6),
        st.binary(max_size=64)),
)


@FUZZ
@given(data=http_garbage)
async def test_raw_http_garbage_to_the_port(hub: HubProcess, data: bytes) -> None:
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
        try:
            await stream.send_all(data)
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass  # the hub closed on us (a reset): fine, it is the hub's health that counts
        finally:
            await stream.aclose()
    await assert_unharmed(hub, data)


def test_the_fuzzed_hub_is_still_the_same_process(hub: HubProcess) -> None:
    """Runs last in this module: every case above went to this one process."""
    assert hub.proc.poll() is None
    assert _healthz(hub.port) == 200
