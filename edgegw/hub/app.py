"""The whole hub (``Hub``), assembled: ingest, live state, alerts, fan-out, dashboard,
history API.

``Ingest`` (ingest.py) accepts gateways and applies frames; everything a person looks at
hangs off it as a consumer or a route.  The order in ``run`` matters: the alert service
restores its persisted alerts before the hub replays its stored frames into the live
state, or the replay would raise every old alert again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from ..metrics import Metrics
from ..startup import check_data_dirs
from .alerts.service import AlertService
from .checkpoint import Checkpointer
from .config import HubConfig
from .dashboard import Dashboard
from .fanout import LiveFanout
from .gcpacing import GcPacer
from .history import HistoryApi
from .ingest import Ingest
from .live import LiveState


class Hub:
    def __init__(self, config: HubConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.ingest = Ingest(config, metrics)
        metrics = self.ingest.metrics
        self.fanout = LiveFanout(config.live, metrics=metrics)
        self.alerts = AlertService(config.alerts, self.fanout.publish,
                                   Path(config.hub.data_dir) / "history.sqlite3",
                                   metrics=metrics)
        self.state = LiveState(self.fanout.publish, alerts=self.alerts.engine,
                               on_evict=self.alerts.archive_lot,
                               on_wafer_archive=self.alerts.archive_wafer, metrics=metrics,
                               max_dies_per_wafer=config.live.max_dies_per_wafer,
                               max_sensors=config.live.max_sensors,
                               max_tests_per_lot=config.live.max_tests_per_lot,
                               # the fan-out is the only reader of its updates here
                               wanted=self.fanout.wanted)
        self.fanout.attach(self.state, on_ack=lambda alert_id, user:
                           self.alerts.engine.ack(alert_id, user, time.time()))
        self.ingest.add_consumer(self.state)
        h = config.hub
        self.checkpointer = Checkpointer(
            self.ingest, self.state, Path(h.data_dir), interval_s=h.checkpoint_interval_s,
            max_records=h.checkpoint_records, alerts=self.alerts,
            metrics=self.ingest.metrics) if h.checkpoint_interval_s > 0 else None
        self.fanout.alert_lot = self._alert_lot
        self.fanout.ingest_lag = self.ingest.lag  # ticks wait while the gateways' records do
        self.fanout.install(self.ingest.http)
        Dashboard().install(self.ingest.http)
        HistoryApi(self.state, self.alerts.engine, self.alerts.store,
                   held=self.alerts).install(self.ingest.http)
        # /api/stats with the live state's health (records not applied, by reason)
        self.ingest.stats_sections["live_state"] = self.state.health
        self.ingest.stats_sections["checkpoint"] = self._checkpoint_stats
        self.ingest.health_problems.append(self.alerts.health_problem)
        self.ingest.history_pruner = self.alerts.store.prune  # hub.retain_history_days
        self.ingest.alerts_pruner = self.alerts.store.prune_alerts
        reloader = self.ingest.reloader  # SIGHUP (edgegw/hub/sighup.py)
        reloader.alerts_reloader = self.alerts.reconfigure
        reloader.auth_rechecks.append(
            lambda: self.fanout.recheck(self.ingest.security.still_signed_in))

    def _alert_lot(self, alert_id: str) -> str | None:
        """The lot an alert is about (None: not a lot's), for lot-scoped operators."""
        alert = self.alerts.engine.alerts.get(alert_id)
        lot = alert.context.get("lot_id") if alert is not None else None
        return str(lot) if lot is not None else None

    @property
    def metrics(self) -> Metrics:
        return self.ingest.metrics

    def _checkpoint_stats(self) -> dict[str, Any] | None:
        if self.checkpointer is None:
            return None
        return {"loaded_from": self.checkpointer.loaded_from,
                "frame_id": self.checkpointer.position}

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await check_data_dirs({"hub.data_dir": str(self.config.hub.data_dir)}, self.metrics)
        await self.alerts.open()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.alerts.run, self.state)
            port = await nursery.start(self.ingest.run)
            if self.checkpointer is not None:  # after the replay: it checkpoints the result
                await nursery.start(self.checkpointer.run)
            await nursery.start(self.fanout.run)
            h = self.config.hub
            if h.gc_freeze_s > 0:
                # After the replay: the rebuilt state is frozen at once.
                await nursery.start(GcPacer(h.gc_freeze_s, h.gc_full_sweep_s,
                                            metrics=self.metrics).run)
            task_status.started(port)
