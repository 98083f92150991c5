"""The cluster tests' reference (tests/cluster_reference.py) is what a real single hub
shows: a gateway process streams a seeded simulated tester to a hub process, a /ws/live
client follows every lot topic, and its views equal the in-process reference field by field
(the clock-dependent fields aside)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from tests.cluster_live import LiveFollower
from tests.cluster_reference import comparable, lot_topics, reference_state, volatile_fields
from tests.hubtools import hub_config, start_tester

SOURCE: dict[str, Any] = {"parts_per_second": 3000, "max_parts": 1200, "seed": 11,
                          "wafers": 3, "lot_id": "REF1", "lots": 1}


async def test_reference_equals_what_a_single_hub_shows(tmp_path: Path) -> None:
    from edgegw.hub import Hub

    expected = lot_topics(reference_state({"ate-01": SOURCE}))
    volatile = volatile_fields({"ate-01": SOURCE})
    assert expected and volatile  # (some fields do depend on the clock)
    hub = Hub(hub_config(tmp_path / "hub"))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        follower = LiveFollower(port, ["lot/#", "test/#"])
        nursery.start_soon(follower.run)
        await follower.connected.wait()
        await start_tester(nursery, tmp_path, port, **SOURCE)
        want = comparable(expected, volatile)
        with trio.move_on_after(60):
            while comparable(follower.views, volatile) != want:
                await trio.sleep(0.2)
        got = comparable(follower.views, volatile)
        assert set(got) == set(want)
        for topic in want:
            assert got[topic] == want[topic], topic
        assert follower.silent_gaps == []
        nursery.cancel_scope.cancel()
