"""One tester file through the real pipeline: tail source -> gateway -> hub, in-process.

``run_tail`` starts a hub (``Hub``: ingest, live state, the dashboard's topics) on a
free loopback port with its store in a scratch directory, and a gateway with a disk spool
and one tail source on the format under test; writes the file in pieces as a tester
would; waits until the tail has finished the file and the hub has acknowledged every
frame; and returns what the hub then holds.  Real sockets, a real spool, no mocks: what
the test sees is what a dashboard would.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import trio

from ..config import build
from ..gateway.config import GatewayConfig
from ..gateway.service import Gateway
from ..hub.app import Hub
from ..hub.config import HubConfig
from ..sources import get_format

_GATEWAY = "kit-gw"
_TOKEN = "kit-token"
_SOURCE = "kit-tail"


@dataclasses.dataclass
class HubHolds:
    """What the hub holds after ``run_tail``: the live state's snapshots, as the
    dashboard gets them (docs/live-topics.md)."""

    #: lot id -> the ``lot/<lot>`` snapshot
    lots: dict[str, dict[str, Any]]
    #: (lot id, wafer id) -> the ``lot/<lot>/wafer/<wafer>`` snapshot
    wafers: dict[tuple[str, str], dict[str, Any]]
    #: (lot id, test number) -> the ``test/<lot>/<num>`` snapshot
    tests: dict[tuple[str, int], dict[str, Any]]
    #: the gateway's events the hub received (``gateway/<id>`` topic): source errors
    #: (a corrupt file, with its offset) show here
    events: list[dict[str, Any]]
    #: how the tail ended the file: "MRR", "complete", "idle", "corrupt: ..."
    file_end: str
    #: the tail's record count for the file (``tail_records``)
    records_read: int

    def test(self, lot_id: str, name: str) -> dict[str, Any]:
        """The test of ``lot_id`` whose TEST_TXT is ``name`` (KeyError if none)."""
        for (lot, _num), snap in self.tests.items():
            if lot == lot_id and snap.get("test_txt") == name:
                return snap
        raise KeyError(f"no test named {name!r} in lot {lot_id!r} "
                       f"(tests: {sorted(str(s.get('test_txt')) for s in self.tests.values())})")


async def run_tail(workdir: Path, format: str, data: bytes, *, file_name: str | None = None,
                   options: dict[str, Any] | None = None, pieces: int = 3,
                   idle_timeout: float = 600.0) -> HubHolds:
    """Tail one file of ``format`` holding ``data`` into an in-process hub; return what the
    hub holds once the file is finished and every frame acknowledged.

    ``workdir`` (a test's ``tmp_path``) gets the hub's store, the gateway's spool and the
    watched directory.  The file (``file_name``, default ``lot`` + the format's first
    suffix) is written in ``pieces`` appends, each read by the tail before the next, so a
    record cut between appends is exercised.  ``options`` is the source's ``options``
    table.  The file must end by itself -- its MRR, or the parser saying ``complete`` --
    unless a short ``idle_timeout`` is given.  It waits as long as that takes: wrap the
    call in ``trio.fail_after`` for a deadline."""
    fmt = get_format(format)
    workdir = Path(workdir)
    watched = workdir / "tester-files"
    await trio.Path(watched).mkdir(parents=True, exist_ok=True)
    path = watched / (file_name or f"lot{fmt.suffixes[0]}")
    hub_cfg = build(HubConfig, {
        "hub": {"port": 0, "listen": "127.0.0.1", "data_dir": str(workdir / "hub")},
        "gateways": {_GATEWAY: {"token": _TOKEN}}})
    app = Hub(hub_cfg)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        gw_cfg = build(GatewayConfig, {
            "gateway": {"id": _GATEWAY, "token": _TOKEN, "state_dir": str(workdir / "gw"),
                        "hub_url": f"ws://127.0.0.1:{port}/ws/gateway"},
            "uplink": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5},
            "batch": {"max_records": 1000, "max_delay_ms": 20},
            "spool": {},
            "sources": [{"name": _SOURCE, "type": "tail", "paths": [str(watched)],
                         "format": format, "poll_interval": 0.02,
                         "idle_timeout": idle_timeout, "options": options or {}}]})
        gateway = Gateway(gw_cfg)
        await nursery.start(gateway.run)
        source = gateway.sources[0][1]
        await _write_in_pieces(path, data, max(1, pieces), source)
        # Finished means: the tail marked the file done, the batch carrying that mark is
        # in a frame (the stored checkpoint says done), and the hub acknowledged every
        # frame.  Polled: the tail source signals nothing when a file is finished.
        while not (_finished(source, str(path))  # noqa: ASYNC110
                   and _stored_done(gateway, str(path))
                   and await gateway.drain(1.0)):
            await trio.sleep(0.02)
        holds = _holds(app, source, str(path))
        nursery.cancel_scope.cancel()
    return holds


async def _write_in_pieces(path: Path, data: bytes, pieces: int, source: Any) -> None:
    step = math.ceil(len(data) / pieces) if data else 0
    await trio.Path(path).write_bytes(b"")
    for start in range(0, len(data), step or 1):
        async with await trio.open_file(path, "ab") as f:
            await f.write(data[start:start + step])
        written = min(len(data), start + step)
        # the next piece only once the tail has read this one (or finished the file)
        while (not _finished(source, str(path))  # noqa: ASYNC110 (polled, as above)
               and _fed(source, str(path)) < written):
            await trio.sleep(0.02)


def _fed(source: Any, path: str) -> int:
    f = source.files.get(path)
    return f.fed if f is not None else 0


def _finished(source: Any, path: str) -> bool:
    f = source.files.get(path)
    return f is not None and f.done


def _stored_done(gateway: Gateway, path: str) -> bool:
    checkpoint = gateway.store.checkpoints.get(_SOURCE) or {}
    return bool(checkpoint.get("files", {}).get(path, {}).get("done"))


def _holds(app: Hub, source: Any, path: str) -> HubHolds:
    state = app.state
    lots: dict[str, dict[str, Any]] = {}
    wafers: dict[tuple[str, str], dict[str, Any]] = {}
    tests: dict[tuple[str, int], dict[str, Any]] = {}
    for topic in state.topics():
        snap = state.snapshot(topic)
        if snap is None:
            continue
        if topic.startswith("lot/") and "wafer_id" in snap:
            wafers[(snap["lot_id"], snap["wafer_id"])] = snap
        elif topic.startswith("lot/"):
            lots[snap["lot_id"]] = snap
        elif topic.startswith("test/"):
            tests[(snap["lot_id"], snap["test_num"])] = snap
    gw = state.snapshot(f"gateway/{_GATEWAY}") or {}
    f = source.files[path]
    return HubHolds(lots, wafers, tests, list(gw.get("events", [])), f.reason,
                    int(source.read_records.total()))
