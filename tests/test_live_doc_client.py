"""docs/live-protocol.md's "A minimal client", run as written against a real hub holding
a wafer of 100,000 dies: the snapshot of its map is one message of about 2 MB in JSON,
past the 1 MiB that WebSocket libraries accept by default (the documented client set
no limit and was closed with 1009 before it printed a thing)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import trio
from hubtools import hub_config
from peer_gateway import PeerGateway, data, rows

from edgegw.hub import Hub

REPO = Path(__file__).resolve().parent.parent
LOT, WAFER, DIES = "LOT0001", "LOT0001-W01", 100_000


def documented_client() -> str:
    doc = (REPO / "docs" / "live-protocol.md").read_text()
    section = doc.split("## A minimal client", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the section has its Python client"
    return code.group(1)


async def a_wafer_of(port: int, dies: int) -> None:
    """One gateway's lot with one wafer of ``dies`` part results, applied."""
    gw = await PeerGateway.connect(port, "ate-01", "s3cret")
    side = int(dies ** 0.5) + 1
    records: list[list[Any]] = [[1, 0, 1.7e9, LOT, "P", "N", "T", "J", 0],
                                [3, 0, 1.7e9, LOT, WAFER, 1, 0]]
    records += [[5, 0, 1.7e9, LOT, WAFER, 1, i % 8, str(i), i % side, i // side,
                 1 + i % 3, 1 + i % 17, i % 3 == 0, False, 0, 10, 1] for i in range(dies)]
    for seq, start in enumerate(range(0, len(records), 10_000), 1):
        await gw.send(data(seq, rows(start + 1, records[start:start + 10_000],
                                     sources=("s",))))
        with trio.fail_after(60):
            await gw.until_acked(seq)


async def test_the_documented_minimal_client_receives_a_100000_die_wafer_map(
        tmp_path: Path) -> None:
    app = Hub(hub_config(tmp_path))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        await a_wafer_of(port, DIES)
        code = documented_client().replace("ws://127.0.0.1:8765/", f"ws://127.0.0.1:{port}/")
        code = code.replace("trio.run(main)", "")  # run here, in this test's Trio run
        namespace: dict[str, Any] = {}
        exec(compile(code, "live-protocol.md (A minimal client)", "exec"), namespace)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), trio.move_on_after(10) as waited:
            async with trio.open_nursery() as inner:
                inner.start_soon(namespace["main"])
                while f"snapshot lot/{LOT}/wafer/{WAFER} " not in printed.getvalue():
                    await trio.sleep(0.05)
                inner.cancel_scope.cancel()
        assert not waited.cancelled_caught, f"no wafer snapshot; printed {printed.getvalue()!r}"
        nursery.cancel_scope.cancel()
