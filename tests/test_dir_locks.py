"""One process per data directory: a gateway's spool, a hub's data_dir (docs/spool.md,
"One gateway per spool").

An operator starts a second gateway on the spool of a running one (a second service unit,
a copied config).  Before, it started: both processes numbered frames 1, 2, 3 ... in the
spool's one epoch, the hub applied whichever frame ``n`` came first and dropped the other
as a duplicate -- in a run of 27,038 records, 659 never reached the hub, with no error
anywhere.  A second hub on a running hub's data_dir started too, and answered the gateway
from the applied sets it read at its start: 576 of 36,026 records lost, 6 frames counted
lost.  Now the second process refuses to start, in one line, and the first loses nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
from faultkit import (
    Gateway,
    Hub,
    assert_exactly_once,
    expected_records,
    source_settings,
    stop_all,
    wait_all_applied,
)
from processes import REPO, get_json

from edgegw.spool import DiskSpool, SpoolConfig
from edgegw.startup import DirectoryInUse, leaves

SOURCE = {"parts_per_second": 1000, "max_parts": 2000, "seed": 11, "wafers": 200}


async def test_a_second_spool_on_a_directory_in_use_is_refused_until_the_first_closes(
        tmp_path: Path) -> None:
    cfg = SpoolConfig(dir=str(tmp_path / "spool"))
    async with DiskSpool.open(cfg) as first:
        with pytest.raises(BaseExceptionGroup) as refused:
            async with DiskSpool.open(cfg):
                pass
        (error,) = leaves(refused.value)
        assert isinstance(error, DirectoryInUse)
        assert f"is in use by another gateway process (pid {os.getpid()})" in str(error)
        epoch = first.epoch
    async with DiskSpool.open(cfg) as again:  # closed: the lock went with it
        assert again.epoch == epoch


async def test_a_lock_file_left_by_a_killed_process_is_no_lock(tmp_path: Path) -> None:
    """The lock is the kernel's, not the file's: a gateway SIGKILLed leaves ``lock`` behind
    (with its pid), and the next start takes the spool over as before."""
    spool = tmp_path / "spool"
    holder = await trio.run_process(
        [sys.executable, "-c",
         "import os, sys, trio\n"
         "from edgegw.spool import DiskSpool, SpoolConfig\n"
         "async def main():\n"
         f"    async with DiskSpool.open(SpoolConfig(dir={str(spool)!r})):\n"
         "        os.kill(os.getpid(), 9)\n"
         "trio.run(main)\n"], cwd=REPO, check=False)
    assert holder.returncode == -9
    assert (spool / "lock").exists()
    async with DiskSpool.open(SpoolConfig(dir=str(spool))) as spool_again:
        assert spool_again.recovered is not None and not spool_again.recovered.fresh


def test_a_second_gateway_on_a_running_gateways_spool_refuses_to_start_and_loses_nothing(
        tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(**SOURCE)).start()
    expected = expected_records(**SOURCE)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    # the same id, the same state and spool directories: an operator's copy of the unit
    second = Gateway(second_dir, hub.port, *source_settings(**SOURCE),
                     "--set", f"gateway.state_dir={gw.state}", "--set", f"spool.dir={gw.spool}")
    try:
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(30) == 3  # it never ran
        log = (second_dir / "gw.log").read_text()
        assert f"edgegw: cannot start: spool.dir: {str(gw.spool)!r} is in use by another " \
               f"gateway process (pid {gw.proc.pid})" in log  # type: ignore[union-attr]
        wait_all_applied(hub, gw, len(expected))
        assert hub.stats()["duplicates_dropped"] == 0
        assert_exactly_once(hub.dir, expected)
    finally:
        stop_all(hub, gw, second)


def test_a_second_hub_on_a_running_hubs_data_dir_refuses_to_start(tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    second = Hub(tmp_path / "second")
    second.tmp.mkdir()
    second.dir = hub.dir
    try:
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(30) == 3  # it never ran
        assert (f"edgegw: cannot start: hub.data_dir: {str(hub.dir)!r} is in use by another "
                f"hub process (pid {hub.proc.pid})") in (  # type: ignore[union-attr]
                    second.tmp / "hub.log").read_text()
        assert get_json(f"{hub.url}/healthz")["status"] == "ok"  # the first serves on
    finally:
        stop_all(hub, second)
