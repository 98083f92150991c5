"""A SIGHUP that comes while ``edgegw hub`` or ``edgegw gateway`` starts -- its imports,
its config read, its start-up checks -- is a reload once the service runs, never the end
of the process (SIGHUP's default action; ``edgegw/sighup.py``).  Each process is frozen at
the failpoint ``service.starting`` (config read, service not started), signalled there,
and let go: before ``hold_sighup`` it died of the signal.  (Real processes: signals.)"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from faultkit import Gateway, Hub, source_settings, stop_all
from processes import wait_for

FROZEN_AT_START = "service.starting=stop"


def hup_while_frozen(proc: subprocess.Popen[bytes] | None) -> None:
    """Wait for ``proc`` to stop itself at its failpoint, send SIGHUP, let it go on."""
    assert proc is not None

    def frozen() -> bool:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    wait_for(frozen, proc=proc)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGCONT)


def test_a_sighup_while_the_gateway_starts_is_a_reload_once_it_runs(tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    gw = Gateway(tmp_path, hub.port, *source_settings(parts_per_second=200, seed=3))
    try:
        gw.start(FROZEN_AT_START, wait=False)
        hup_while_frozen(gw.proc)

        def reloaded_ok() -> bool:
            counts = gw.stats()["metrics"].get("gateway_config_reloads_total", {})
            return bool(counts.get("outcome=ok") == 1)

        wait_for(reloaded_ok, timeout=30, proc=gw.proc, log=tmp_path / "gw.log")
        # and it runs on: its records reach the hub
        wait_for(lambda: hub.metric("edgegw_hub_records_applied_total") > 0, timeout=30,
                 proc=gw.proc, log=tmp_path / "gw.log")
        assert gw.proc is not None and gw.proc.poll() is None
    finally:
        stop_all(hub, gw)


def test_a_sighup_while_the_hub_starts_is_a_reload_once_it_serves(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    try:
        hub.start(FROZEN_AT_START, wait=False)
        hup_while_frozen(hub.proc)
        wait_for(lambda: hub.metric("edgegw_hub_config_reloads_total", 'outcome="ok"') == 1,
                 timeout=30, proc=hub.proc, log=tmp_path / "hub.log")
        assert hub.proc is not None and hub.proc.poll() is None
    finally:
        stop_all(hub)
