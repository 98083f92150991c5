"""Keeps CPython's full garbage collections from pausing the hub's event loop.

Measured with ``bench/fanout.py`` (issue 6): the hub's live state is a large heap of
long-lived container objects (dies, wafer maps, each channel's delta history, 1,000
connections); CPython's cyclic collector walks *all* of it in a full (generation 2)
collection, which it starts on its own whenever a quarter as many objects again have
survived into the old generation.  At 10,000 records/s that is every ~15 s, and each one
holds the Trio thread for 80-240 ms (growing with the state): no frame is applied, no tick
runs, every client's latency takes the whole pause.  Nothing in that heap is cyclic garbage
-- those collections free nothing.

So, once a second, the objects that have survived the young collections are moved into the
*permanent* generation (``gc.freeze``), which the collector never walks: its automatic
collections then only look at what was allocated since, and stay short.  Objects frozen
are still freed by reference counting as usual; what freezing costs is that a reference
*cycle* that becomes garbage after it was frozen is not found until the next full sweep
(``gc.unfreeze`` and a full collection), done every ``full_every`` seconds -- one pause of
the old kind every 10 minutes by default instead of every 15 s.

The collector's state is per process: only one pacer is active in a process at a time (a
second one, as in a test that runs two hubs, does nothing), and it unfreezes everything
when it ends.
"""

from __future__ import annotations

import gc
import time

import trio

from ..metrics import Metrics

_active = False  # one pacer per process: the collector's generations are process-wide


class GcPacer:
    def __init__(self, freeze_every: float = 1.0, full_every: float = 600.0,
                 metrics: Metrics | None = None) -> None:
        if freeze_every <= 0:
            raise ValueError("freeze_every must be > 0")
        self.freeze_every = freeze_every
        self.full_every = full_every  # 0: never a full sweep (cyclic garbage then stays)
        self.freezes = 0
        self.full_sweeps = 0
        self.last_full_seconds: float | None = None
        metrics = metrics or Metrics()
        self._m_freezes = metrics.counter("hub_gc_freezes_total",
                                          "survivors moved out of the collector's way")
        self._m_sweeps = metrics.counter("hub_gc_full_sweeps_total",
                                         "full collections the pacer ran (it pauses the hub)")
        self._g_frozen = metrics.gauge("hub_gc_frozen_objects",
                                       "objects in the permanent generation")
        self._frozen_at = -1e9
        metrics.add_collector(self._collect)

    def _collect(self) -> None:
        # gc.get_freeze_count() walks the whole permanent generation (millions of objects
        # on a full hub: milliseconds): counted at most every 10 s, not on every scrape
        # (a bench polling /api/stats every 10 ms spent 6 % of the hub's time here).
        now = time.monotonic()
        if now - self._frozen_at >= 10.0:
            self._frozen_at = now
            self._g_frozen.set(gc.get_freeze_count())

    def freeze(self) -> None:
        """Young garbage collected first (short: young objects only), so that only objects
        still alive are frozen; then every survivor moved to the permanent generation."""
        gc.collect(1)
        gc.freeze()
        self.freezes += 1
        self._m_freezes.inc()

    def full_sweep(self) -> float:
        """A full collection of everything (the pause this module exists to make rare);
        returns how long it took."""
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        took = time.perf_counter() - started
        self.full_sweeps += 1
        self.last_full_seconds = took
        self._m_sweeps.inc()
        return took

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        global _active
        if _active:
            task_status.started()
            await trio.sleep_forever()
        _active = True
        try:
            self.freeze()
            task_status.started()
            last_full = trio.current_time()
            while True:
                await trio.sleep(self.freeze_every)
                if self.full_every > 0 and trio.current_time() - last_full >= self.full_every:
                    self.full_sweep()
                    last_full = trio.current_time()
                else:
                    self.freeze()
        finally:
            gc.unfreeze()
            _active = False
