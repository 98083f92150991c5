"""The hub's live state: what the dashboards look at, kept in memory, built from records.

``LiveState`` is a consumer of applied records (``on_records``) and of gateway
connection changes (``on_gateway``).  It is sans-IO: it never touches a socket or a file;
time is passed in (or read from an injected ``clock``); every change goes out through the
``publish(topic, delta)`` callback given at construction, and ``snapshot(topic)`` answers
what a new subscriber starts from.  Topic names come from ``edgegw.hub.topics``; the
snapshot and delta shape of each is specified in ``docs/live-topics.md``.

Invariants worth knowing before reading the code:

* **A die is its location.**  On a wafer a die is keyed by X/Y; a part without X/Y is
  keyed by its head and PART_ID (and a part with neither is its own die).  A site is its
  head and site (``models.site_key``): a dual-head tester numbers both heads' sites
  from 0.  Of several results for one die, the *final* one is the newest: greatest rid
  from the same gateway (rids grow in creation order even when frames are applied out of
  order after an outage), record time across gateways.  A retest flagged ``supersedes``
  is the common case, but real files retest without the flag (galaxy-a530-lot2 retests
  113 dies at the end of the wafer with PART_FLG 0), so the flag is not required: a later
  result at the same location always replaces the earlier one.  Yield counts each die's
  final result once.
* **Two kinds of bin count.**  ``hard_bins``/``soft_bins`` count final dies (the wafer
  map); ``hard_bins_tested``/``soft_bins_tested`` count every part result, which is what
  the tester's own HBR/SBR/PCR report.  Both are kept, so the live figures can be checked
  against the file's own.
* **Incremental.**  Every applied part changes counters by +1/-1 (a replaced result is
  subtracted, its replacement added); nothing is recomputed over a wafer, so replay
  after a restart costs the same per record as live data.
* **Bounded, whatever the size of a lot.**  About ``max_lots`` lots are live.  Over the
  cap, a closed lot (MRR seen) is evicted from memory first (it stays in the hub's store),
  then a lot idle for ``idle_lot_s`` of its own gateways' record time; a lot still being
  tested is not evicted unless lots exceed 4 x ``max_lots`` (counted), and then one of
  the gateway in the most lots.  ``on_evict`` receives the evicted lot's full figures
  (``lot_archive``) so the history API can still serve them.  Within a lot at most
  ``max_wafers_per_lot`` wafers are live: a new wafer over the cap sends the least
  recently updated closed wafer (an open one, of the gateway that made the most, only
  when none is closed) to ``on_wafer_archive`` and out of memory; the lot's own counts
  keep every wafer.  So a lot of 1,000 wafers stays live, its newest wafers on the
  dashboard, its older ones in the history API.  A retest under the id of a lot (wafer)
  that left memory -- the MIR (WIR) of its next pass, ``Passes.reopens`` -- brings it
  back: a wafer as it left (the lot keeps the final dies of ``max_wafers_per_lot``
  archived wafers, compact: ``WaferRest``), so the lot's counts take each retested die
  once; an evicted lot with its passes and its wafers' (``LotRest``, kept with its id in
  ``evicted``), its counts from that pass on (``counts_from``: the history store merges
  its archives, ``edgegw.hub.archive_merge``).  A wafer keeps at most
  ``max_dies_per_wafer`` dies of each gateway's (a new one beyond is not applied), and its
  and its lot's counts by site and bin at most ``TALLY_KEYS`` keys of each gateway's:
  invented X/Y, site or bin numbers cannot grow a map, a snapshot or every delta.  At
  most ``max_sensors`` sensor channels; sensor history and per-gateway event lists are
  bounded deques; per test only running sums are kept (Welford).
* **Nothing is dropped silently.**  A record the state cannot apply -- its lot evicted,
  its wafer archived, a field of the wrong type, a test or sensor over its cap -- changes
  no count; it is counted in ``hub_state_records_ignored_total{reason}``, logged (the
  first of each reason at once, then one line per reason per ``log_interval_s`` with the
  count since), and kept in ``not_applied`` by reason, which the ``hub/state`` topic (the
  dashboard's warning) and ``/api/stats`` show.
* One delta per changed topic per ``on_records`` call: a batch of 2,000 parts on one
  wafer publishes one wafer delta with the changed dies, not 2,000.
* **No update nobody reads.**  Given ``wanted(topic)`` (the single hub's fan-out), a
  batch's update of a topic nobody follows is not built, only counted
  (``hub_live_updates_skipped_total``): a later subscriber starts from ``snapshot``, built
  from the state.  Alerts read the state, not the updates (docs/live-topics.md,
  "Unwatched topics").
* **A frame at a time, to the same state.**  ``on_records`` keeps a frame's parametric
  values per test and adds them a test at a time (``_apply_batched``), in their order and
  under the limits they came with, so every figure -- to the last bit of every float --
  is what applying the records one at a time gives (``batch_apply=False``, the reference
  ``tests/test_live_batch.py`` holds it to).  Records still apply in the order given:
  anything that could read a test's figures comes after its values are in.
  ``on_columns`` does the same for a columnar frame without building its parametric
  results as records: it reads their fields from the frame's columns.
* **A part's values by record id, not by arrival.**  A part's results are the records of
  its (gateway, head, site) between its previous part result and its own, by rid.  Frames
  applied in rid order form a stretch (``Run``) whose sites' values wait in
  ``LotState.pending_of`` (by gateway) for the next part result, as in STDF; a frame that
  does not follow the last one (after an outage the gateway sends its newest frames
  first) starts or extends another stretch, and when stretches meet the values owed at
  the left one's end go to the right one's first part result of their site
  (``_switch_run``, ``_join_right``).  Waiting stretches are capped per gateway
  (``max_waiting_runs``), the values given up counted.  Frames in order never leave the
  old path, and a switch moves the gateway's own lists whole: its cost does not grow
  with the values waiting.
* **Every cap a gateway can fill is its own.**  Lots are shared (a lot's gateways are
  ``LotState.gateways``), so the caps on what a gateway's invented site numbers make are
  per gateway: waiting lists per lot (``PENDING_SITES_PER_LOT``), a test's sites
  (``SITES_PER_TEST``, counted by the gateway that brought the site), waiting stretches
  and their first part results (``max_waiting_runs``, ``RUN_HEADS``), a lot's tests
  (``max_tests_per_lot``), a wafer's dies and die values, a count's keys (``Keys``).  One
  gateway at its caps leaves another's values, tests, dies and keys their room; those
  caps multiply by the gateways sending to one lot or wafer (only configured gateways
  connect).  Hub-wide caps evict rather than refuse another gateway: a new sensor
  channel over ``max_sensors`` pushes out the oldest of the gateway holding the most;
  a closed or idle lot or wafer leaves memory only for a gateway holding as many, and
  what leaves while every lot or wafer is being tested is of the gateway holding the most
  (docs/live-topics.md, "Caps: what one gateway can fill").

Why one module of this size: ``LiveState`` is one class whose record handlers share the
open batch, the caps, the eviction policy and the observer; the entities are in
``models.py``, the field checks in ``checks.py``, the observer protocol in ``observer.py``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from edgegw.hub import topics
from edgegw.metrics import Metrics
from edgegw.records import (
    BinSummary,
    FunctionalResult,
    GatewayEvent,
    LotEnd,
    LotStart,
    MultiPinResult,
    ParametricResult,
    PartCount,
    PartResult,
    RawRecord,
    SensorReading,
    SensorWindow,
    WaferEnd,
    WaferStart,
)

from .checks import (
    BAD_PARM_FLAGS,
    BAD_VALUE_FLAGS,
    NOT_EXECUTED,
    BadRecord,
    NotApplied,
    is_int,
    is_num,
    is_text,
    num_list,
    opt_bool,
    opt_int,
    opt_num,
    wrong_fields,
)
from .models import (
    DIE_VALUES_PER_WAFER,
    DIES_PER_WAFER,
    PENDING_PER_SITE,
    PENDING_SITES_PER_LOT,
    RUN_HEADS,
    WAITING_RUNS,
    Die,
    GatewayState,
    LotRest,
    LotState,
    Run,
    SensorState,
    TestStats,
    WaferRest,
    WaferState,
    lot_archive,
    site_key,
)
from .observer import StateObserver

if TYPE_CHECKING:
    from edgegw.protocol import Columns

Publish = Callable[[str, dict[str, Any]], None]

log = logging.getLogger("edgegw.hub.state")


def _check_range(*numbers: Any) -> None:
    """Before anything is counted: an int no float can hold (10**400 decodes from CBOR)
    would poison a test's figures (every later snapshot of it would raise)."""
    for n in numbers:
        if type(n) is int and not -1.7e308 < n < 1.7e308:
            raise BadRecord(f"a number out of the float range ({str(n)[:12]}...)")


#: the widest integer a record field may hold (docs/protocol.md section 2: a signed 64-bit
#: column).  CBOR carries any (a bignum): one of 20,000 digits as a part's hard bin was
#: counted, and every later snapshot of its lot raised (Python prints no int past 4,300
#: digits) -- the fan-out's tick, every client's, failed from then on.
_INT_LIMIT = (1 << 63) - 1
_INT_MIN = -_INT_LIMIT - 1


def _check_ints(rec: Any) -> None:
    """Before anything is counted: no top-level field an integer past 64 bits."""
    for v in rec:
        if type(v) is int and not _INT_MIN <= v <= _INT_LIMIT:
            i = next(i for i, w in enumerate(rec) if w is v)  # (named only when bad)
            name = rec._fields[i] if hasattr(rec, "_fields") else f"field {i}"
            raise BadRecord(f"{name}: an integer past 64 bits ({v.bit_length()} bits)")


#: the fields a record's handler checks before it counts anything, and their rules (the
#: message of a bad record names those broken: ``checks.wrong_fields``)
_PART_FIELDS = {"ts": is_num, "lot_id": is_text, "wafer_id": is_text, "head": is_int,
                "site": is_int, "x": opt_int, "y": opt_int, "hard_bin": opt_int,
                "soft_bin": opt_int, "passed": opt_bool}
_TEST_FIELDS = {"ts": is_num, "lot_id": is_text, "test_num": is_int, "test_flag": is_int}
_PARM_TEST_FIELDS = {**_TEST_FIELDS, "parm_flag": is_int}
_PARAMETRIC_FIELDS = {"value": opt_num, "lo_limit": opt_num, "hi_limit": opt_num}
_MULTI_PIN_FIELDS = {"values": num_list, "lo_limit": opt_num, "hi_limit": opt_num}
_READING_FIELDS = {"channel": is_text, "ts": is_num, "value": is_num}
_WINDOW_FIELDS = {"channel": is_text, "ts": is_num, **{
    f: is_num for f in ("last", "min", "max", "mean", "t0", "t1")}}


class LiveState:
    """Per lot, wafer, test, sensor channel and gateway: the live figures, and their deltas.

    ``publish(topic, delta)`` is called synchronously from ``on_records``/``on_gateway``/
    ``tick``; it must not block (hub-fanout queues the delta).  ``alerts`` (optional) is
    the ``StateObserver`` (the alert engine) fed from the same state.
    """

    def __init__(
        self,
        publish: Publish,
        *,
        alerts: StateObserver | None = None,
        clock: Callable[[], float] = time.time,
        max_lots: int = 16,
        idle_lot_s: float = 3600.0,
        max_wafers_per_lot: int = 25,
        max_tests_per_lot: int = 20_000,
        max_sensors: int = 5_000,
        sensor_history: int = topics.SENSOR_HISTORY,
        metrics: Metrics | None = None,
        on_evict: Callable[[str, dict[str, Any]], None] | None = None,
        on_wafer_archive: Callable[[str, str, dict[str, Any]], None] | None = None,
        log_interval_s: float = 60.0,
        batch_apply: bool = True,
        max_waiting_runs: int = WAITING_RUNS,
        max_dies_per_wafer: int = DIES_PER_WAFER,
        wanted: Callable[[str], bool] | None = None,
    ) -> None:
        if max_lots < 1:
            raise ValueError("max_lots must be at least 1")
        if max_wafers_per_lot < 1:
            raise ValueError("max_wafers_per_lot must be at least 1")
        if max_dies_per_wafer < 1:
            raise ValueError("max_dies_per_wafer must be at least 1")
        self._publish = publish
        #: ``wanted(topic)``: whether anyone reads ``topic``'s updates now; a batch's
        #: update of a wafer, lot, test, sensor or gateway nobody wants is not built (most
        #: of ``_flush``'s cost: a wafer's tally, a test's snapshot).  Only a consumer that
        #: knows all its readers may give it -- the single hub's fan-out, whose snapshot
        #: path builds from this state, not from past deltas; None (a cluster owner, whose
        #: publish feeds other nodes): every update is built (docs/live-topics.md)
        self._wanted = wanted
        #: False: every record through its handler, one at a time (the reference the
        #: batched apply is tested against, and ``bench/live_state.py``'s "before")
        self.batch_apply = batch_apply
        #: stretches of a gateway's rids kept waiting for their neighbours when frames
        #: come out of order (docs/live-topics.md, "Frames out of order")
        self.max_waiting_runs = max_waiting_runs
        self._on_evict = on_evict
        self._on_wafer_archive = on_wafer_archive
        self.log_interval_s = log_interval_s
        self.alerts = alerts
        self._clock = clock
        self.max_lots = max_lots
        self.idle_lot_s = idle_lot_s
        self.max_wafers_per_lot = max_wafers_per_lot
        #: dies a wafer keeps: a part result of a new die beyond it is not applied
        #: (``too_many_dies``); the wafer keeps the dies it has, and their retests
        self.max_dies_per_wafer = max_dies_per_wafer
        self.max_tests_per_lot = max_tests_per_lot
        self.max_sensors = max_sensors
        self.sensor_history = sensor_history
        self.lots: dict[str, LotState] = {}
        self.evicted: deque[str] = deque(maxlen=1024)
        self._evicted_set: set[str] = set()
        #: of those, what a retest under the lot id continues from (``LotRest``): its
        #: passes and its wafers'
        self.gone: dict[str, LotRest] = {}
        self.sensors: dict[str, SensorState] = {}
        #: gateway -> the channels it made, oldest first (``_new_sensor``)
        self._sensors_of: dict[str, dict[str, SensorState]] = {}
        self.gateways: dict[str, GatewayState] = {}
        self._now = 0.0
        metrics = metrics or Metrics()
        self._m_records = metrics.counter(
            "hub_state_records_total", "records given to the live state"
        )
        self._m_ignored = metrics.counter(
            "hub_state_records_ignored_total",
            "records the live state could not apply, by reason (evicted_lot, archived_wafer, "
            "bad_record, too_many_tests, too_many_sensors, too_many_dies, unknown_kind)",
        )
        self._m_values_skipped = metrics.counter(
            "hub_state_test_values_skipped_total",
            "test values left out of the statistics: flagged unusable by the tester "
            "(TEST_FLG bits 0-5, PARM_FLG bits 0-2), missing or not finite (the result "
            "itself is counted: an execution, or not executed)",
        )
        self._m_values_dropped = metrics.counter(
            "hub_state_part_values_dropped_total",
            "test values that never reached their wafer's figures or die (the lot's test "
            "statistics have them): over the caps of values waiting for a site's part result "
            "(per site, and sites per lot), "
            "waiting in a stretch of out-of-order frames over the cap, their part's wafer "
            "or lot left memory before they came (or while they waited for it), or their "
            "part result was not applied",
        )
        self._m_site_values_dropped = metrics.counter(
            "hub_state_site_values_dropped_total",
            "test values left out of their test's per-site figures (sites): the gateway "
            "that sent them already made as many sites of the test as a test keeps per "
            "gateway (the test's own figures have them)",
        )
        self._m_test_num_shared = metrics.counter(
            "hub_state_test_numbers_shared_total",
            "tests (a lot's test number) whose results came with a second TEST_TXT: a "
            "tester reusing a test number for another test, whose figures the hub mixes "
            "(it keys a test by its number; the test's test_txts lists the names)",
        )
        self._m_tally_keys_dropped = metrics.counter(
            "hub_state_tally_keys_dropped_total",
            "site or bin numbers of part results left out of a wafer's or lot's counts by "
            "site or bin (each counts at most 1,024 distinct ones; its totals count every "
            "part)",
        )
        self._m_sensors_evicted = metrics.counter(
            "hub_state_sensors_evicted_total",
            "sensor channels that left memory at max_sensors for another gateway's new "
            "channel: the oldest of the gateway holding the most")
        self._m_wafers_archived = metrics.counter(
            "hub_state_wafers_archived_total", "wafers that left memory for the history store")
        self._m_evicted = metrics.counter("hub_state_lots_evicted_total", "lots evicted")
        self._m_lots_reopened = metrics.counter(
            "hub_state_lots_reopened_total",
            "lots back in memory after they left it: tested again under their lot id")
        self._m_wafers_reopened = metrics.counter(
            "hub_state_wafers_reopened_total",
            "wafers back in memory after they left it: tested again under their wafer id")
        self._m_skipped = metrics.counter(
            "hub_live_updates_skipped_total",
            "updates of the live state not built because nobody follows their topic now "
            "(wanted), by kind (wafer, lot, test, sensor, gateway)")
        self._m_over_cap = metrics.counter(
            "hub_state_lots_over_cap_total",
            "new lots kept beyond max_lots because every other lot was still active, or "
            "closed or idle but of gateways holding fewer live lots than the new lot's",
        )
        self._m_bad = metrics.counter(
            "hub_state_bad_records_total", "records with fields the live state cannot use, by kind"
        )
        #: the latest bad record, for health pages and logs
        self.last_error: str | None = None
        #: records not applied since the start, by reason: {"count", "last", "last_at"}
        self.not_applied: dict[str, dict[str, Any]] = {}
        self.not_applied_total = 0
        # per reason: (when the last line was logged, how many since then unlogged)
        self._logged: dict[str, tuple[float, int]] = {}

    # ------------------------------------------------------------------ consumer API

    def on_records(
        self, gateway_id: str, first_rid: int, records: list[Any], now: float | None = None
    ) -> None:
        """Apply one applied frame's records; record i has rid ``first_rid + i``."""
        now = self._clock() if now is None else now
        gw, batch = self._begin(gateway_id, first_rid, len(records), now)
        if self.batch_apply:
            batch.values, batch.wafer_values = {}, {}
            try:
                self._apply_batched(gateway_id, first_rid, records, batch)
            finally:
                self._apply_deferred(batch)
        else:
            for i, rec in enumerate(records):
                self._apply_one(gateway_id, first_rid + i, rec, batch)
        if gw.waiting:
            self._join_right(gw, batch)
        self._end(gw, batch, now)

    def on_columns(self, gateway_id: str, first_rid: int, frame: Columns,
                   now: float | None = None) -> None:
        """``on_records(gateway_id, first_rid, frame.records())`` -- the same state, deltas
        and order -- for a columnar frame, without building its parametric results: their
        fields are read from the frame's columns (``Columns.columns``), and their types
        checked a column at a time.  The hub's live feeder calls this."""
        ptr = frame.columns(ParametricResult) if self.batch_apply else None
        if ptr is None:
            self.on_records(gateway_id, first_rid, frame.records(), now)
            return
        now = self._clock() if now is None else now
        gw, batch = self._begin(gateway_id, first_rid, frame.n, now)
        # (the lists are as long as the table, checked; a value sent once repeats)
        its: dict[type, Iterator[Any]] = {ParametricResult: zip(
            *[_repeat(c[0]) if type(c) is tuple else c for c in ptr], strict=False)}
        rows = []
        for cls, count in frame.runs():
            it = its.get(cls)
            if it is None:
                it = its[cls] = iter(frame.rows(cls))
            rows.append(_islice(it, count))
        batch.values, batch.wafer_values = {}, {}
        try:
            self._apply_batched(gateway_id, first_rid, _chain(rows), batch,
                                plain=_plain_parametric(ptr))
        finally:
            self._apply_deferred(batch)
        if gw.waiting:
            self._join_right(gw, batch)
        self._end(gw, batch, now)

    def _begin(self, gateway_id: str, first_rid: int, n: int, now: float
               ) -> tuple[GatewayState, _Batch]:
        """A frame of ``n`` records begins: the gateway's counts, and the frame's batch."""
        self._now = now
        gw = self._gateway(gateway_id)
        gw.records += n
        gw.frames += 1
        self._m_records.inc(n)
        if gw.online:
            # Only frames from a connected gateway make its live rate and "last seen": the
            # replay after a restart (gateway not connected yet) would otherwise show as a
            # burst, seen now.
            gw.last_seen = now
            gw.count(n, now)
        last_rid = first_rid + n - 1
        if n:
            if gw.last_rid is None or last_rid > gw.last_rid:
                gw.last_rid = last_rid
            run = gw.run
            if run is not None and first_rid == run.hi + 1:
                run.hi = last_rid  # the next frame: the same stretch
            elif run is None:
                gw.run = Run(first_rid, last_rid)
            else:
                self._switch_run(gw, first_rid, last_rid)
        batch = _Batch(gateway_id)
        batch.gateways[gw] = None
        batch.run = gw.run
        return gw, batch

    # ------------------------------------------------------------- frames out of order

    def _switch_run(self, gw: GatewayState, first_rid: int, last_rid: int) -> None:
        """A frame that does not follow the last one: the stretch it leaves waits (with
        the values its sites still owe, the gateway's lists taken out of its lots'
        ``pending_of`` whole); the frame extends the waiting stretch it follows, if any,
        or starts one.  Its cost is the gateway's own lots and stretches, not how many
        values wait in the lots (another gateway's, or its own)."""
        gid = gw.gateway_id
        run = gw.run
        assert run is not None
        lots = self.lots
        owed = run.owed  # (empty: a current stretch's values wait in the lots)
        for lot_id in gw.pending_lots:
            lot = lots.get(lot_id)
            if lot is not None:
                mine = lot.pending_of.pop(gid, None)
                if mine:
                    owed[lot_id] = mine
        gw.pending_lots.clear()
        waiting = gw.waiting
        waiting.append(run)
        left = next((r for r in waiting if r.hi == first_rid - 1), None)
        if left is None:
            gw.run = Run(first_rid, last_rid)
        else:
            waiting.remove(left)
            gw.run = left
            left.hi = last_rid
            owed, left.owed = left.owed, {}
            for lot_id, mine in owed.items():
                lot = lots.get(lot_id)
                if lot is None:
                    self._m_values_dropped.inc(sum(len(v) for v in mine.values()))
                else:
                    # (its lists were within the gateway's cap when they left the lot,
                    # and the gateway has none there now: they just went to ``run``)
                    lot.pending_of[gid] = mine
                    gw.pending_lots.add(lot_id)
        while len(waiting) > self.max_waiting_runs:
            oldest = min(waiting, key=lambda r: r.lo)
            waiting.remove(oldest)
            dropped = sum(len(v) for owed in oldest.owed.values() for v in owed.values())
            if dropped:
                self._m_values_dropped.inc(dropped)

    def _join_right(self, gw: GatewayState, batch: _Batch) -> None:
        """After a frame: if a waiting stretch starts right after the current one, they
        are one stretch now.  The values the current one's sites owe go to the waiting
        one's first part results there; its own owed values join the current ones."""
        run = gw.run
        assert run is not None
        right = next((r for r in gw.waiting if r.lo == run.hi + 1), None)
        if right is None:
            return
        gw.waiting.remove(right)
        gid = gw.gateway_id
        lots = self.lots
        keep_heads = run.lo > 1
        for key, head in right.heads.items():
            lot_id, h, site = key
            lot = lots.get(lot_id)
            if lot is not None:
                mine = lot.pending_of.get(gid)
                values = mine.pop((h, site), None) if mine else None
                if values:
                    self._late_values(lot, gid, head, values, batch)
            if keep_heads and key not in run.heads and len(run.heads) < RUN_HEADS:
                run.heads[key] = head  # no part result of its site in the current one
        dropped = 0
        for lot_id, theirs in right.owed.items():
            lot = lots.get(lot_id)
            if lot is None:
                dropped += sum(len(v) for v in theirs.values())
                continue
            mine = lot.pending_of.get(gid)
            if not mine:  # nothing of the current stretch waits there: theirs as they are
                lot.pending_of[gid] = theirs
                gw.pending_lots.add(lot_id)
                continue
            for hs, values in theirs.items():
                pending = mine.get(hs)
                if pending is None:
                    if len(mine) >= PENDING_SITES_PER_LOT:
                        dropped += len(values)
                        continue
                    pending = mine[hs] = []
                room = max(PENDING_PER_SITE - len(pending), 0)
                pending.extend(values[:room])
                if len(values) > room:
                    dropped += len(values) - room
        if dropped:
            self._m_values_dropped.inc(dropped)
        run.hi = right.hi

    def _late_values(self, lot: LotState, gateway_id: str, head: tuple[Any, ...],
                     values: list[tuple[TestStats, float]], batch: _Batch) -> None:
        """A part's values that arrived after its part result (``head``): into its wafer's
        figures and, if it is still its die's final result, the die's."""
        wafer_id, rid, x, y = head
        if not wafer_id:
            return  # (no wafer: the in-order apply uses them for nothing either)
        wafer = lot.wafers.get(wafer_id)
        if wafer is None:
            self._m_values_dropped.inc(len(values))
            return
        die = wafer.dies.get((x, y)) if x is not None and y is not None else None
        final = die is not None and die.gateway == gateway_id and die.rid == rid
        for stats, value in values:
            stats.add_wafer_value(wafer_id, value)
            if final:
                wafer.add_die_value(stats.test_num, (x, y), value, gateway_id)
            batch.tests[stats] = None

    def _end(self, gw: GatewayState, batch: _Batch, now: float) -> None:
        if not gw.online and batch.ts and (gw.last_seen is None or batch.ts > gw.last_seen):
            gw.last_seen = batch.ts  # replayed: the records' own time
        self._flush(batch, now)

    def on_gateway(self, gateway_id: str, connected: bool, now: float) -> None:
        """A gateway connected (True) or went away (False)."""
        gw = self._gateway(gateway_id)
        gw.online = connected
        gw.last_seen = now
        if connected:
            gw.connected_at = now
        else:
            gw.disconnected_at = now
        self._publish(gw.topic, {
            "online": connected, "last_seen": now, "connected_at": gw.connected_at,
            "disconnected_at": gw.disconnected_at, "records_per_s": gw.records_per_s(now),
        })
        if self.alerts is not None:
            self.alerts.on_gateway(gateway_id, connected, now)

    def tick(self, now: float) -> None:
        """Call about once a second: gateway rates decay, alerts escalate or fire on time,
        records not applied since the last log line of their reason are logged."""
        for reason, (logged_at, unlogged) in list(self._logged.items()):
            if unlogged and now - logged_at >= self.log_interval_s:
                self._log_drop(reason, now)
        for gw in self.gateways.values():
            if not gw.online and gw.disconnected_at is None:
                # Known from replayed records but not connected since the hub started:
                # offline from now on, so a gateway that never comes back is noticed.
                gw.disconnected_at = now
                if self.alerts is not None:
                    self.alerts.on_gateway(gw.gateway_id, False, now)
            if gw.per_second and gw.rate_now < now - 1:
                rate = gw.records_per_s(now)
                self._publish(gw.topic, {"records_per_s": rate})
                if rate == 0:
                    gw.per_second.clear()
                gw.rate_now = now
        if self.alerts is not None:
            self.alerts.tick(now)

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        """The full state of ``topic`` for a new subscriber, or None if there is none."""
        parts = topics.split(topic)
        head, n = parts[0], len(parts)
        if head == "lot":
            lot = self.lots.get(parts[1]) if n in (2, 4) else None
            if lot is None:
                return None
            if n == 2:
                return lot.snapshot()
            if parts[2] != "wafer":
                return None
            wafer = lot.wafers.get(parts[3])
            return wafer.snapshot() if wafer else None
        if head == "test" and n == 3:
            lot = self.lots.get(parts[1])
            try:
                stats = lot.tests.get(int(parts[2])) if lot else None
            except ValueError:
                return None
            return stats.snapshot() if stats else None
        if head == "sensor" and n == 2:
            sensor = self.sensors.get(parts[1])
            return sensor.snapshot() if sensor else None
        if head == "gateway" and n == 2:
            gw = self.gateways.get(parts[1])
            return gw.snapshot() if gw else None
        if head == "alert" and n == 3 and self.alerts is not None:
            return self.alerts.snapshot(parts[1], parts[2])
        if topic == topics.HUB_STATE:
            return self.warnings()
        return None

    def warnings(self) -> dict[str, Any]:
        """The ``hub/state`` topic: records not applied, in all and by reason."""
        return {"not_applied": self.not_applied_total,
                "reasons": {r: dict(v) for r, v in sorted(self.not_applied.items())}}

    def health(self) -> dict[str, Any]:
        """For ``/api/stats``: what is live, what left memory, what was not applied."""
        return {
            "lots_live": len(self.lots),
            "wafers_live": sum(len(lot.wafers) for lot in self.lots.values()),
            "wafers_archived": self._m_wafers_archived.total(),
            "lots_evicted": self._m_evicted.total(),
            **self.warnings(),
        }

    def topics(self) -> list[str]:
        """Every topic that currently has a snapshot."""
        out: list[str] = []
        for lot in self.lots.values():
            out.append(lot.topic)
            out.extend(w.topic for w in lot.wafers.values() if w.wafer_id)
            out.extend(t.topic for t in lot.tests.values())
        out.extend(s.topic for s in self.sensors.values())
        out.extend(g.topic for g in self.gateways.values())
        out.append(topics.HUB_STATE)
        if self.alerts is not None:
            out.extend(self.alerts.topics())
        return out

    # ------------------------------------------------------------------ internals

    def _apply_one(self, gateway_id: str, rid: int, rec: Any, batch: _Batch) -> None:
        """One record through its handler: what every record's apply means."""
        handler = self._handlers.get(type(rec))
        if handler is None:
            if type(rec) is not RawRecord:  # raw tester records are for the archive
                self._drop(batch, "unknown_kind", gateway_id, rid, rec,
                           "no live figures for this kind of record")
            return
        try:
            _check_ints(rec)
            handler(self, gateway_id, rid, rec, batch)
            if rec.ts > batch.ts:
                batch.ts = rec.ts
        except NotApplied as exc:
            self._drop(batch, exc.reason, gateway_id, rid, rec, str(exc))
        except (BadRecord, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # A record the hub accepted but this state cannot use: count it, say which
            # one, keep going -- one bad field must not stop a gateway's stream.
            self._m_bad.inc(kind=type(rec).__name__)
            self.last_error = (f"gateway {gateway_id} rid {rid} "
                               f"{type(rec).__name__}: {exc}")
            self._drop(batch, "bad_record", gateway_id, rid, rec, str(exc))

    def _apply_batched(self, gateway_id: str, first_rid: int, records: Iterable[Any],
                       batch: _Batch, plain: bool = False) -> None:
        """A frame's records, with the same resulting state as ``_apply_one`` on each in
        turn, at a fraction of the cost per record.

        A parametric result of an existing test in an existing lot, with fields of the
        plain types, is counted here inline, and its value is kept for its test
        (``batch.values``); the part result that follows keeps the part's values for
        the tests' per-wafer figures (``batch.wafer_values``).  Each test then takes its
        values in one call (``TestStats.add_values``), in their order, under the limits
        they came with: the same float operations in the same order, so the same
        figures.  Whatever could read a test's figures runs only after its values are in
        (``_apply_deferred``): a limit change first applies the values under the old
        limits, and any record not taken inline (other kinds, a new lot, wafer or test,
        an odd field) first applies every kept value and then goes through its handler.

        From ``on_columns`` a parametric result comes as a plain tuple of its fields (a
        row of its table's columns, made into a record only if it is not taken inline),
        and ``plain`` says its columns were checked to hold only the plain types.
        """
        lots = self.lots
        values = batch.values
        assert values is not None  # (set by the batched apply)
        tests = batch.tests
        parametric, part = ParametricResult, PartResult
        num, bad_flags, isfinite = (float, int), BAD_VALUE_FLAGS, math.isfinite
        bad_parm = BAD_PARM_FLAGS
        lo_int, hi_int = _INT_MIN, _INT_LIMIT
        ts_max = batch.ts
        skipped = dropped = 0
        # the pending list of the last parametric result's (lot, head, site); forgotten
        # at any other record (a part result pops it)
        p_lot: Any = None
        p_head = p_site = -1
        # (Any: a stats found means its lot was, which a type checker cannot follow)
        pending: Any = []
        lot: Any
        for i, rec in enumerate(records):
            kind = type(rec)
            if kind is parametric or kind is tuple:
                (_, ts, lot_id, head, site, _, test_num, test_txt, value, lo, hi, units,
                 passed, test_flag, parm_flag) = rec
                lot = stats = None
                # (head and site make its site's key, the test's text and units are kept:
                # all shown in snapshots -- a bignum site broke every later tick; a frame's
                # columns are checked a column at a time, ``_plain_parametric``)
                if plain or (type(lot_id) is str and type(test_num) is int
                             and type(ts) in num and type(head) is int
                             and type(site) is int and type(test_flag) is int
                             and type(parm_flag) is int
                             and type(test_txt) is str and type(units) is str
                             and (value is None or type(value) is float)
                             and (lo is None or type(lo) in num)
                             and (hi is None or type(hi) in num)
                             and lo_int <= head <= hi_int and lo_int <= site <= hi_int
                             and lo_int <= test_flag <= hi_int
                             and lo_int <= parm_flag <= hi_int
                             and (type(ts) is float or lo_int <= ts <= hi_int)):
                    lot = lots.get(lot_id)
                    if lot is not None:
                        stats = lot.tests.get(test_num)
                if stats is not None:
                    # a limit given that is not the test's own object (the same object: a
                    # column sent once, the usual case); new or equal, it is checked
                    s_lo, s_hi = stats.lo, stats.hi
                    new_lo = lo is not s_lo and lo is not None
                    new_hi = hi is not s_hi and hi is not None
                    if (new_lo or new_hi) and (
                            (new_lo and type(lo) is not float and not -1.7e308 < lo < 1.7e308)
                            or (new_hi and type(hi) is not float
                                and not -1.7e308 < hi < 1.7e308)):
                        stats = None  # an int limit no float holds: the bad-record path
                if stats is not None:
                    if test_txt and test_txt != stats.test_txt and stats.name(test_txt):
                        self._m_test_num_shared.inc()
                    if test_flag & 0x10:  # NOT_EXECUTED: no execution, no pass/fail
                        stats.not_executed += 1
                    else:
                        stats.executions += 1
                        if passed is False:
                            stats.fails += 1
                    if new_lo or new_hi:
                        if ((new_lo and (lo != s_lo or type(lo) is not type(s_lo)))
                                or (new_hi and (hi != s_hi or type(hi) is not type(s_hi)))):
                            # new limits: the values so far go in under the old ones (an
                            # equal limit, even 0.0 for -0.0, changes no histogram figure)
                            kept = values.pop(stats, None)
                            if kept:
                                not_kept = stats.add_values(kept, gateway_id)
                                if not_kept:
                                    self._m_site_values_dropped.inc(not_kept)
                        if new_lo:
                            stats.lo = lo
                        if new_hi:
                            stats.hi = hi
                    if units:
                        stats.units = units
                    if value is not None and not test_flag & bad_flags \
                            and not parm_flag & bad_parm and isfinite(value):
                        kept = values.get(stats)
                        key = site if head == 1 else (head, site)  # site_key, inline
                        if kept is None:
                            values[stats] = [value, key]
                        else:
                            kept.append(value)
                            kept.append(key)
                        # a part's results come together: its site's list again
                        if site != p_site or head != p_head or lot is not p_lot:
                            p_site, p_head, p_lot = site, head, lot
                            mine = lot.pending_of.get(gateway_id)
                            pending = mine.get((head, site)) if mine is not None else None
                            if pending is None:
                                pending = self._new_pending(lot, gateway_id, head, site)
                        if len(pending) < PENDING_PER_SITE:
                            pending.append((stats, value))
                        else:
                            dropped += 1
                    else:
                        skipped += 1
                    tests[stats] = None
                    if ts > ts_max:
                        ts_max = ts
                    continue
                if kind is tuple:  # a row of the columns: the record, for its handler
                    rec = _new(parametric, rec)
            p_lot = None
            if kind is part:
                lot = lots.get(rec.lot_id) if type(rec.lot_id) is str else None
                if lot is not None and type(rec.wafer_id) is str \
                        and rec.wafer_id in lot.wafers:
                    # no lot or wafer made (and so none evicted or archived): the kept
                    # values need not be in yet
                    batch.ts = ts_max
                    self._apply_one(gateway_id, first_rid + i, rec, batch)
                    ts_max = batch.ts
                    continue
            elif kind in _NO_TEST_READS:
                batch.ts = ts_max
                self._apply_one(gateway_id, first_rid + i, rec, batch)
                ts_max = batch.ts
                continue
            self._apply_deferred(batch)
            batch.ts = ts_max
            self._apply_one(gateway_id, first_rid + i, rec, batch)
            ts_max = batch.ts
        batch.ts = ts_max
        if skipped:
            self._m_values_skipped.inc(skipped)
        if dropped:
            self._m_values_dropped.inc(dropped)

    def _apply_deferred(self, batch: _Batch) -> None:
        """The values kept by ``_apply_batched`` into their tests' figures."""
        if batch.values:
            gid = batch.gateway_id
            not_kept = 0
            for stats, kept in batch.values.items():
                not_kept += stats.add_values(kept, gid)
            batch.values.clear()
            if not_kept:
                self._m_site_values_dropped.inc(not_kept)
        if batch.wafer_values:
            for stats, kept in batch.wafer_values.items():
                stats.add_wafer_values(kept)
            batch.wafer_values.clear()

    def _drop(self, batch: _Batch, reason: str, gateway_id: str, rid: int, rec: Any,
              why: str) -> None:
        """A record not applied: counted, remembered by reason, logged (rate-limited)."""
        self._m_ignored.inc(reason=reason)
        message = f"gateway {gateway_id} rid {rid} {type(rec).__name__}: {why}"[:300]
        entry = self.not_applied.get(reason)
        if entry is None:
            entry = self.not_applied[reason] = {"count": 0, "last": "", "last_at": None}
        entry["count"] += 1
        entry["last"] = message
        entry["last_at"] = self._now
        self.not_applied_total += 1
        batch.not_applied = True
        logged_at, unlogged = self._logged.get(reason, (-math.inf, 0))
        self._logged[reason] = (logged_at, unlogged + 1)
        if self._now - logged_at >= self.log_interval_s:
            self._log_drop(reason, self._now)

    def _log_drop(self, reason: str, now: float) -> None:
        _, unlogged = self._logged[reason]
        entry = self.not_applied[reason]
        log.warning("live state: %d record(s) not applied (%s), %d since the start; last: %s",
                    unlogged, reason, entry["count"], entry["last"])
        self._logged[reason] = (now, 0)

    def _new_pending(self, lot: LotState, gateway_id: str, head: int, site: int
                     ) -> list[Any]:
        """A new list of values of ``gateway_id``'s (head, site) waiting for its part
        result in ``lot``, or ``_NO_ROOM`` when the gateway has as many such lists in the
        lot as a lot keeps of one gateway (another gateway's lists take none of its room)."""
        mine = lot.pending_of.get(gateway_id)
        if mine is None:
            mine = lot.pending_of[gateway_id] = {}
            self.gateways[gateway_id].pending_lots.add(lot.lot_id)
        elif len(mine) >= PENDING_SITES_PER_LOT:
            return _NO_ROOM
        pending: list[Any] = []
        mine[(head, site)] = pending
        return pending

    def _drop_waiting(self, lot: LotState, gateway_id: str, rec: PartResult) -> None:
        """A part result not applied: the values its site waits with were its own; they
        leave (counted) rather than join the site's next part."""
        mine = lot.pending_of.get(gateway_id)
        values = mine.pop((rec.head, rec.site), None) if mine else None
        if values:
            self._m_values_dropped.inc(len(values))

    def _gateway(self, gateway_id: str) -> GatewayState:
        gw = self.gateways.get(gateway_id)
        if gw is None:
            gw = self.gateways[gateway_id] = GatewayState(gateway_id)
        return gw

    def _lot(self, lot_id: str, ts: float, gateway_id: str) -> LotState:
        lot = self.lots.get(lot_id)
        if lot is not None:
            return lot
        if not isinstance(lot_id, str):
            raise BadRecord(f"lot id {lot_id!r} is not text")
        if lot_id in self._evicted_set:
            raise NotApplied("evicted_lot", f"lot {lot_id!r} already left memory (max_lots); "
                             "the history API serves it")
        lot = self.lots[lot_id] = LotState(lot_id)
        lot.updated = ts
        lot.gateways.add(gateway_id)  # (its maker, whatever record made it)
        while len(self.lots) > self.max_lots:
            victim = self._eviction_victim(keep=lot_id, maker=gateway_id)
            if victim is None:
                # Every other lot is still being tested: a floor with more testers than
                # max_lots must not lose live lots, so the cap bends (up to 4x) and says so.
                self._m_over_cap.inc()
                break
            self._evict(victim)
        return lot

    def _eviction_victim(self, keep: str, maker: str) -> LotState | None:
        """The lot that leaves memory for ``maker``'s new lot ``keep``: the least recently
        updated closed one; else one idle by its own gateways' record times; else (over 4
        x ``max_lots``) one of the gateway holding the most live lots.  A closed or idle
        lot goes only if one of its gateways holds as many live lots as ``maker`` or more:
        a gateway making lots by the thousand pushes out its own, not another's closed
        lots (the cap bends, then its open ones go).  Record times are the gateways' own,
        so idle is measured on each lot's gateways' clocks: another gateway's records
        dated a day ahead make no lot idle but its own."""
        others = [lot for lid, lot in self.lots.items() if lid != keep]
        if not others:
            return None
        held = Counter(g for lot in self.lots.values() for g in lot.gateways)
        mine = held[maker]
        # (a lot of no gateway -- restored from an older hub's checkpoint -- may go)
        eligible = [lot for lot in others
                   if not lot.gateways or any(held[g] >= mine for g in lot.gateways)]
        closed = [lot for lot in eligible if lot.status == "closed"]
        if closed:
            return min(closed, key=lambda lot: lot.updated)
        newest_of: dict[str, float] = {}  # gateway -> its newest live lot's time
        for lot in self.lots.values():
            for g in lot.gateways:
                if lot.updated > newest_of.get(g, -math.inf):
                    newest_of[g] = lot.updated
        newest = max(lot.updated for lot in self.lots.values())
        idle_s = self.idle_lot_s
        # (a lot of no gateway -- restored from an older hub's checkpoint -- by the newest)
        idle = [lot for lot in eligible
                if (all(newest_of[g] - lot.updated >= idle_s for g in lot.gateways)
                    if lot.gateways else newest - lot.updated >= idle_s)]
        if idle:
            return min(idle, key=lambda lot: lot.updated)
        if len(self.lots) > 4 * self.max_lots:
            # every lot is being tested: the one to go is of the gateway holding the most
            # (one making lots by the thousand makes room from its own), its lots only
            # its first, then ones it shares
            held = Counter(g for lot in others for g in lot.gateways)
            top = max(held.values(), default=0)
            tops = {g for g, n in held.items() if n == top}
            pool = ([lot for lot in others if lot.gateways <= tops]
                    or [lot for lot in others if lot.gateways & tops] or others)
            return min(pool, key=lambda lot: lot.updated)
        return None

    def _reopen_lot(self, rec: LotStart, gateway_id: str) -> None:
        """A lot that left memory, tested again under its lot id (``rec`` the start of
        its next pass, ``Passes.reopens``): back in memory, its passes and its wafers'
        continued, its counts those of the records from here on (the history store
        merges the archives of its passes).  Any other start leaves it where it is (its
        records not applied, ``evicted_lot``)."""
        rest = self.gone.get(rec.lot_id)
        if rest is None or not (is_num(rec.start_t) and rest.passes.reopens(
                float(rec.start_t), bool(rec.start_t))):
            return
        del self.gone[rec.lot_id]
        self._evicted_set.discard(rec.lot_id)
        self.evicted.remove(rec.lot_id)
        self._m_lots_reopened.inc()
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        lot.passes = rest.passes
        lot.started, lot.ended, lot.status = rest.passes.first, rest.passes.ended, "closed"
        lot.wafer_rests = rest.wafers
        lot.archived_wafers = set(rest.wafers)
        lot.counts_from = float(rec.start_t)

    def _evict(self, victim: LotState) -> None:
        del self.lots[victim.lot_id]
        waiting = 0
        for gid, mine in victim.pending_of.items():  # (a gateway in order for months: its
            gw = self.gateways.get(gid)              # set stays short)
            if gw is not None:
                gw.pending_lots.discard(victim.lot_id)
            waiting += sum(len(values) for values in mine.values())
        if waiting:  # values waiting for their part results: none will reach its wafer
            self._m_values_dropped.inc(waiting)
        if len(self.evicted) == self.evicted.maxlen:
            self._evicted_set.discard(self.evicted[0])
            self.gone.pop(self.evicted[0], None)
        self.evicted.append(victim.lot_id)
        self._evicted_set.add(victim.lot_id)
        self.gone[victim.lot_id] = LotRest.of(victim, self.max_wafers_per_lot)
        self._m_evicted.inc()
        if self._on_evict is not None:
            self._on_evict(victim.lot_id, lot_archive(victim))
        self._publish(victim.topic, {"status": "evicted"})
        for wafer in victim.wafers.values():
            wafer.archived = True
            if wafer.wafer_id:
                self._publish(wafer.topic, {"status": "archived"})

    def _wafer(self, lot: LotState, wafer_id: str, gateway_id: str,
               start: tuple[float, bool] | None = None, batch: _Batch | None = None
               ) -> WaferState:
        """``lot``'s wafer ``wafer_id``, made if new; one that left memory comes back
        only for the start (``start``: its time, and whether the tester gave it) of its
        next pass (``Passes.reopens``) -- as it left, from its ``WaferRest``."""
        wafer = lot.wafers.get(wafer_id)
        if wafer is None:
            if not isinstance(wafer_id, str):
                raise BadRecord(f"wafer id {wafer_id!r} is not text")
            rest = None
            if wafer_id in lot.archived_wafers:
                rest = lot.wafer_rests.get(wafer_id)
                if rest is None or start is None or not rest.passes.reopens(*start):
                    raise NotApplied("archived_wafer", f"wafer {wafer_id!r} of lot "
                                     f"{lot.lot_id!r} already left memory "
                                     "(max_wafers_per_lot); the history API serves it")
                # (out before another leaves for it: its rest must not be the one to go)
                del lot.wafer_rests[wafer_id]
                lot.archived_wafers.discard(wafer_id)
            while len(lot.wafers) >= self.max_wafers_per_lot:
                self._archive_wafer(lot, self._wafer_victim(lot, gateway_id))
            if rest is None:
                wafer = WaferState(lot.lot_id, wafer_id, gateway_id)
                wafer.counts_from = lot.counts_from
            else:
                wafer = rest.revive(lot.lot_id, wafer_id)
                if rest.dies is None:  # (of a lot back in memory: counted from its return)
                    wafer.counts_from = lot.counts_from
                self._m_wafers_reopened.inc()
                if batch is not None:  # its map whole: its topic was told "archived"
                    batch.dies[wafer] = [d for d in wafer.dies.values()
                                         if d.x is not None and d.y is not None]
            lot.wafers[wafer_id] = wafer
            lot.order_wafers()
        return wafer

    @staticmethod
    def _wafer_victim(lot: LotState, maker: str) -> WaferState:
        """The wafer that leaves memory for ``maker``'s new one: the least recently updated
        closed one made by a gateway that made as many of the lot's live wafers as
        ``maker`` or more; else an open one (its WRR never came) of the gateway that made
        the most.  A gateway making wafers by the hundred in a shared lot archives its
        own, not another's closed or tested ones; the "no wafer id" one last."""
        wafers = [w for w in lot.wafers.values() if w.wafer_id] or list(lot.wafers.values())
        made = Counter(w.gateway for w in wafers)
        mine = made[maker]
        closed = [w for w in wafers if w.status == "closed" and made[w.gateway] >= mine]
        if closed:
            return min(closed, key=lambda w: w.updated)
        top = max(made.values())
        return min((w for w in wafers if made[w.gateway] == top), key=lambda w: w.updated)

    def _archive_wafer(self, lot: LotState, wafer: WaferState) -> None:
        del lot.wafers[wafer.wafer_id]
        lot.order_wafers()
        lot.archived_wafers.add(wafer.wafer_id)
        # what its retest continues from: its dies, compact, as the lot's counts hold them
        rests = lot.wafer_rests
        rests.pop(wafer.wafer_id, None)
        rests[wafer.wafer_id] = WaferRest.of(wafer, counted=True)
        while len(rests) > self.max_wafers_per_lot:
            del rests[next(iter(rests))]  # (its retest: not applied, archived_wafer)
        wafer.archived = True
        self._m_wafers_archived.inc()
        if self._on_wafer_archive is not None:
            self._on_wafer_archive(lot.lot_id, wafer.wafer_id, wafer.snapshot())
        if wafer.wafer_id:
            self._publish(wafer.topic, {"status": "archived"})

    def _on_part(self, gateway_id: str, rid: int, rec: PartResult, batch: _Batch) -> None:
        # Checked before anything is counted, so a bad part never leaves half its counts
        # (the plain types first: the general checks only when one is not).
        _, ts, lot_id, wafer_id, head, site, _, x, y, hard_bin, soft_bin, passed, *_ = rec
        if not ((hard_bin is None or type(hard_bin) is int) and type(site) is int
                and type(head) is int
                and (x is None or type(x) is int) and (y is None or type(y) is int)
                and (soft_bin is None or type(soft_bin) is int) and type(ts) in _NUM
                and (passed is None or type(passed) is bool)
                and type(lot_id) is str and type(wafer_id) is str) \
            and not (opt_int(hard_bin) and is_int(site) and is_int(head) and opt_int(x)
                     and opt_int(y) and opt_int(soft_bin) and is_num(ts)
                     and passed in (True, False, None)
                     and isinstance(lot_id, str) and isinstance(wafer_id, str)):
            raise BadRecord(f"part {rec.part_id!r:.60}: {wrong_fields(rec, _PART_FIELDS)}")
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        try:
            wafer = self._wafer(lot, rec.wafer_id, gateway_id)
        except NotApplied:
            self._drop_waiting(lot, gateway_id, rec)
            raise
        if rec.x is not None and rec.y is not None:
            key: Any = (rec.x, rec.y)
        elif rec.part_id:
            # a part is its PART_ID on its head: a dual-head handler may number each head's
            # parts from 1, and head 2's part 1 is not a retest of head 1's
            key = ("part", head, rec.part_id)
        else:
            key = ("rid", gateway_id, rid)
        old = wafer.dies.get(key)
        if old is None and len(wafer.dies) >= self.max_dies_per_wafer:
            # invented X/Y (or part ids) would grow the map, its snapshot and the counts
            # every delta carries without bound; the cap is per gateway, so one gateway's
            # flood leaves another's dies their room (counted from here on only: below
            # the cap no gateway can be at it)
            dies_of = wafer.dies_of
            if dies_of is None:
                dies_of = wafer.dies_of = wafer.by_gateway(wafer.dies)
            made = dies_of.get(gateway_id, 0)
            if made >= self.max_dies_per_wafer:
                self._drop_waiting(lot, gateway_id, rec)
                raise NotApplied("too_many_dies", f"wafer {rec.wafer_id!r} of lot "
                                 f"{lot.lot_id!r} already has {made} dies of gateway "
                                 f"{gateway_id}'s (max_dies_per_wafer); die {key!r:.60} "
                                 "not kept")
            dies_of[gateway_id] = made + 1
        die = Die(gateway_id, rid, rec)
        replaced = old is not None
        final = old is None or die.newer_than(old)
        left_out = wafer.tally.count_tested(die, replaced) \
            + lot.tally.count_tested(die, replaced)
        if final:
            wafer.dies[key] = die
            if old is None or not (old.passed is die.passed and old.hard_bin == die.hard_bin
                                   and old.soft_bin == die.soft_bin and old.site == die.site
                                   and old.head == die.head):
                if old is not None:
                    wafer.tally.count_final(old, -1)
                    lot.tally.count_final(old, -1)
                left_out += wafer.tally.count_final(die, +1) + lot.tally.count_final(die, +1)
            # (a retest with the outcome, bins and site of the result it replaces changes
            # no final count: -1 then +1 of the same keys)
            if die.x is not None and die.y is not None:
                batch.dies.setdefault(wafer, []).append(die)
        if left_out:
            self._m_tally_keys_dropped.inc(left_out)
        times = lot.part_times
        if not times or ts >= times[-1]:
            times.append(ts)
        else:  # a part older than the newest: its place by time (frames out of order)
            _keep_time(times, ts)
        if rec.test_time_ms is not None:
            lot.test_time_sum += rec.test_time_ms
            lot.test_time_n += 1
        lot.gateways.add(gateway_id)
        # each its own latest record time: a wafer's older parts arriving after a later
        # wafer's (a gateway's backlog after an outage) must not take the lot's
        if ts > wafer.updated:
            wafer.updated = ts
        if ts > lot.updated:
            lot.updated = ts
        batch.wafers[wafer] = None
        batch.lots[lot] = None
        run = batch.run
        if run is not None and run.lo > 1:
            # the stretch's first part result of its site: values at the end of a stretch
            # to the left, applied later, may be its own
            hkey = (lot.lot_id, rec.head, rec.site)
            if hkey not in run.heads and len(run.heads) < RUN_HEADS:
                run.heads[hkey] = (rec.wafer_id, rid, rec.x, rec.y)
        self._assign_values(lot, wafer, gateway_id, rec, final, batch)
        if self.alerts is not None:
            self.alerts.on_part(lot, wafer, rec, gateway_id, self._now)

    @staticmethod
    def _assign_values(lot: LotState, wafer: WaferState, gateway_id: str, rec: PartResult,
                       final: bool, batch: _Batch) -> None:
        """The part's test values (sent before it) join their wafer's figures and, for the
        final result of a die with X/Y, the die's value for the map by test value."""
        mine = lot.pending_of.get(gateway_id)
        pending = mine.pop((rec.head, rec.site), None) if mine else None
        if not pending or not rec.wafer_id:
            return
        xy = (rec.x, rec.y) if final and rec.x is not None and rec.y is not None else None
        deferred = batch.wafer_values
        if deferred is None:  # one record at a time
            for stats, value in pending:
                stats.add_wafer_value(rec.wafer_id, value)
                if xy is not None:
                    wafer.add_die_value(stats.test_num, xy, value, gateway_id)
                batch.tests[stats] = None
            return
        wafer_id = rec.wafer_id
        tests = batch.tests
        by_test = wafer.values
        for stats, value in pending:
            kept = deferred.get(stats)
            if kept is None:
                deferred[stats] = [wafer_id, value]
            else:
                kept.append(wafer_id)
                kept.append(value)
            if xy is not None:  # wafer.add_die_value, inline
                by_die = by_test.get(stats.test_num)
                if by_die is None:
                    by_die = by_test[stats.test_num] = {}
                if xy in by_die:
                    by_die[xy] = value
                elif wafer.value_count < DIE_VALUES_PER_WAFER \
                        or wafer.own_value(gateway_id):
                    wafer.value_count += 1
                    by_die[xy] = value
            tests[stats] = None

    def _test(self, rec: Any, kind: str, gateway_id: str) -> TestStats:
        if not (is_int(rec.test_num) and isinstance(rec.lot_id, str) and is_num(rec.ts)
                and is_int(rec.test_flag)
                and (kind == "functional" or is_int(rec.parm_flag))):
            rules = _TEST_FIELDS if kind == "functional" else _PARM_TEST_FIELDS
            raise BadRecord(f"{kind} test result: {wrong_fields(rec, rules)}")
        if kind != "functional" and not (
            opt_num(rec.lo_limit) and opt_num(rec.hi_limit)
            and (opt_num(rec.value) if kind == "parametric"
                 else isinstance(rec.values, list) and all(opt_num(v) for v in rec.values))
        ):
            rules = _PARAMETRIC_FIELDS if kind == "parametric" else _MULTI_PIN_FIELDS
            raise BadRecord(f"test {rec.test_num} result: {wrong_fields(rec, rules)}")
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        stats = lot.tests.get(rec.test_num)
        if stats is None:
            # per gateway: lots are shared, and one gateway's invented test numbers must
            # leave another's new tests their room
            made = lot.tests_of.get(gateway_id, 0)
            if made >= self.max_tests_per_lot:
                raise NotApplied("too_many_tests", f"lot {lot.lot_id!r} already has "
                                 f"{made} tests of gateway {gateway_id}'s "
                                 f"(max_tests_per_lot); test {rec.test_num} not kept")
            lot.tests_of[gateway_id] = made + 1
            stats = lot.tests[rec.test_num] = TestStats(rec.lot_id, rec.test_num, kind,
                                                         lot.wafer_order)
        if rec.test_txt and rec.test_txt != stats.test_txt and stats.name(rec.test_txt):
            self._m_test_num_shared.inc()
        if rec.test_flag & NOT_EXECUTED:
            # (a PTR of defaults only, or a test the flow skipped: its limits still count)
            stats.not_executed += 1
        else:
            stats.executions += 1
            if rec.passed is False:
                stats.fails += 1
        return stats

    def _on_parametric(self, gateway_id: str, rid: int, rec: ParametricResult,
                       batch: _Batch) -> None:
        _check_range(rec.value, rec.lo_limit, rec.hi_limit)
        stats = self._test(rec, "parametric", gateway_id)
        self._limits(stats, rec)
        if rec.value is not None and not rec.test_flag & BAD_VALUE_FLAGS \
                and not rec.parm_flag & BAD_PARM_FLAGS and math.isfinite(rec.value):
            stats.add_value(rec.value)
            if is_int(rec.site) and is_int(rec.head):
                if not stats.add_site_value(site_key(rec.head, rec.site), rec.value,
                                            gateway_id):
                    self._m_site_values_dropped.inc()
                lot = self.lots[rec.lot_id]
                mine = lot.pending_of.get(gateway_id)
                pending = mine.get((rec.head, rec.site)) if mine is not None else None
                if pending is None:
                    pending = self._new_pending(lot, gateway_id, rec.head, rec.site)
                if len(pending) < PENDING_PER_SITE:
                    pending.append((stats, rec.value))
                else:
                    self._m_values_dropped.inc()
        else:
            self._m_values_skipped.inc()
        batch.tests[stats] = None

    def _on_multipin(self, gateway_id: str, rid: int, rec: MultiPinResult,
                     batch: _Batch) -> None:
        _check_range(rec.lo_limit, rec.hi_limit)
        if type(rec.values) in (list, tuple):
            _check_range(*rec.values)
        stats = self._test(rec, "multipin", gateway_id)
        self._limits(stats, rec)
        if not rec.test_flag & BAD_VALUE_FLAGS and not rec.parm_flag & BAD_PARM_FLAGS:
            for value in rec.values:
                if value is not None and math.isfinite(value):
                    stats.add_value(value)
                    if is_int(rec.site) and is_int(rec.head) and not stats.add_site_value(
                            site_key(rec.head, rec.site), value, gateway_id):
                        self._m_site_values_dropped.inc()
        batch.tests[stats] = None

    def _on_functional(self, gateway_id: str, rid: int, rec: FunctionalResult,
                       batch: _Batch) -> None:
        batch.tests[self._test(rec, "functional", gateway_id)] = None

    @staticmethod
    def _limits(stats: TestStats, rec: ParametricResult | MultiPinResult) -> None:
        # The decoder resolves per-test PTR defaults; the latest non-missing limit wins.
        if rec.lo_limit is not None:
            stats.lo = rec.lo_limit
        if rec.hi_limit is not None:
            stats.hi = rec.hi_limit
        if rec.units:
            stats.units = rec.units

    def _on_lot_start(self, gateway_id: str, rid: int, rec: LotStart, batch: _Batch) -> None:
        if rec.lot_id in self._evicted_set and rec.lot_id not in self.lots:
            self._reopen_lot(rec, gateway_id)
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        for name in ("part_type", "node_name", "tester_type", "job_name"):
            value = getattr(rec, name)
            if value:
                lot.info[name] = value
        # a retest keeps its lot id: a start after the lot's end reopens it (``Passes``);
        # ``started`` stays the first pass's
        passes = lot.passes
        passes.start(float(rec.start_t) if rec.start_t else rec.ts, bool(rec.start_t))
        lot.started = passes.first
        lot.status = passes.status
        lot.gateways.add(gateway_id)
        lot.updated = max(lot.updated, rec.ts)
        batch.lots[lot] = None

    def _on_lot_end(self, gateway_id: str, rid: int, rec: LotEnd, batch: _Batch) -> None:
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        passes = lot.passes
        passes.end(float(rec.finish_t) if rec.finish_t else rec.ts, bool(rec.finish_t))
        lot.ended = passes.ended
        lot.status = passes.status  # (a late MRR of an earlier pass leaves a retest open)
        lot.updated = max(lot.updated, rec.ts)
        batch.lots[lot] = None

    def _on_wafer_start(self, gateway_id: str, rid: int, rec: WaferStart,
                        batch: _Batch) -> None:
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        start = float(rec.start_t) if rec.start_t else rec.ts
        wafer = self._wafer(lot, rec.wafer_id, gateway_id, (start, bool(rec.start_t)), batch)
        passes = wafer.passes
        passes.start(start, bool(rec.start_t))
        wafer.started = passes.first  # (its place among the lot's stays its first start)
        wafer.status = passes.status
        lot.order_wafers()  # its place among the lot's wafers is by start
        wafer.updated = max(wafer.updated, rec.ts)
        batch.wafers[wafer] = None
        batch.lots[lot] = None

    def _on_wafer_end(self, gateway_id: str, rid: int, rec: WaferEnd, batch: _Batch) -> None:
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        wafer = self._wafer(lot, rec.wafer_id, gateway_id)
        passes = wafer.passes
        passes.end(float(rec.finish_t) if rec.finish_t else rec.ts, bool(rec.finish_t))
        wafer.ended = passes.ended
        wafer.status = passes.status
        if rec.part_count is not None:
            wafer.reported["part_count"] = rec.part_count
        if rec.good_count is not None:
            wafer.reported["good_count"] = rec.good_count
        wafer.updated = max(wafer.updated, rec.ts)
        batch.wafers[wafer] = None
        if wafer.status == "closed":
            batch.closed_wafers.append(wafer)

    def _on_bin_summary(self, gateway_id: str, rid: int, rec: BinSummary,
                        batch: _Batch) -> None:
        # Only the all-sites summary (HEAD_NUM 255) is the lot's own figure; per-site
        # summaries would double count if added together.
        if rec.head != 255:
            return
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        target = lot.reported_hard if rec.bin_kind == "H" else lot.reported_soft
        target[str(rec.bin_num)] = rec.count
        batch.lots[lot] = None

    def _on_part_count(self, gateway_id: str, rid: int, rec: PartCount, batch: _Batch) -> None:
        if rec.head != 255:
            return
        lot = self._lot(rec.lot_id, rec.ts, gateway_id)
        for name in ("part_count", "retest_count", "abort_count", "good_count", "func_count"):
            value = getattr(rec, name)
            if value is not None:
                lot.reported_counts[name] = value
        batch.lots[lot] = None

    def _on_sensor(self, gateway_id: str, rid: int, rec: SensorWindow | SensorReading,
                   batch: _Batch) -> None:
        values = (rec.last, rec.min, rec.max, rec.mean, rec.t0, rec.t1) \
            if isinstance(rec, SensorWindow) else (rec.value,)
        if not (isinstance(rec.channel, str) and is_num(rec.ts)
                and all(is_num(v) for v in values)):
            rules = _WINDOW_FIELDS if isinstance(rec, SensorWindow) else _READING_FIELDS
            raise BadRecord(f"sensor record: {wrong_fields(rec, rules)}")
        sensor = self.sensors.get(rec.channel)
        if sensor is None:
            sensor = self._new_sensor(rec.channel, gateway_id)
        point = sensor.add(rec)
        batch.sensors.setdefault(sensor, []).append(point)
        if self.alerts is not None:
            self.alerts.on_sensor(rec, self._now)

    def _new_sensor(self, channel: str, gateway_id: str) -> SensorState:
        """A new channel of ``gateway_id``'s.  At ``max_sensors`` channels the oldest one
        of the gateway holding the most leaves memory (counted, its topic told
        "evicted") if that gateway holds at least two more than this one; else the new
        channel is not kept (``too_many_sensors``).  So the hub holds at most
        ``max_sensors`` channels, and a gateway inventing names takes its share of them,
        not another's: the shares end up within one of each other."""
        by_gw = self._sensors_of
        mine = by_gw.get(gateway_id)
        if len(self.sensors) >= self.max_sensors:
            held = len(mine) if mine else 0
            top_gw, theirs = max(by_gw.items(), key=lambda kv: len(kv[1]), default=("", {}))
            if len(theirs) < held + 2:
                raise NotApplied("too_many_sensors", f"{len(self.sensors)} sensor channels "
                                 f"already, {held} of gateway {gateway_id}'s (max_sensors; "
                                 f"no gateway holds two more); {channel!r:.80} not kept")
            victim = theirs.pop(next(iter(theirs)))
            if not theirs:
                del by_gw[top_gw]
            del self.sensors[victim.channel]
            self._m_sensors_evicted.inc()
            self._publish(victim.topic, {"status": "evicted"})
        sensor = SensorState(channel, self.sensor_history, gateway_id)
        self.adopt_sensor(sensor)
        return sensor

    def adopt_sensor(self, sensor: SensorState) -> None:
        """``sensor`` into the state, its maker's (``sensor.gateway``): a new channel, or
        one restored from a checkpoint."""
        self.sensors[sensor.channel] = sensor
        self._sensors_of.setdefault(sensor.gateway, {})[sensor.channel] = sensor

    def _on_gateway_event(self, gateway_id: str, rid: int, rec: GatewayEvent,
                          batch: _Batch) -> None:
        gw = self._gateway(gateway_id)
        event = {"ts": rec.ts, "level": rec.level, "code": rec.code, "message": rec.message}
        gw.events.append(event)
        batch.gateway_events.append((gw, event))
        if self.alerts is not None:
            self.alerts.on_gateway_event(gateway_id, rec, self._now)

    _handlers: dict[type, Callable[..., None]] = {
        PartResult: _on_part,
        ParametricResult: _on_parametric,
        MultiPinResult: _on_multipin,
        FunctionalResult: _on_functional,
        LotStart: _on_lot_start,
        LotEnd: _on_lot_end,
        WaferStart: _on_wafer_start,
        WaferEnd: _on_wafer_end,
        BinSummary: _on_bin_summary,
        PartCount: _on_part_count,
        SensorWindow: _on_sensor,
        SensorReading: _on_sensor,
        GatewayEvent: _on_gateway_event,
    }

    def _flush(self, batch: _Batch, now: float) -> None:
        publish = self._publish
        # Where nobody follows a topic its update is not built: a subscriber that comes
        # later starts from ``snapshot``, built from this state (docs/live-topics.md).
        wanted = self._wanted or _ALL
        skipped: Counter[str] = Counter()
        for wafer in batch.wafers:
            if wafer.archived:
                continue  # left memory within this batch (its archive has the changes)
            if not wafer.wafer_id:
                continue
            if not wanted(wafer.topic):
                skipped["wafer"] += 1
                continue
            delta: dict[str, Any] = {
                "dies": [d.row() for d in batch.dies.get(wafer, ())],
                **wafer.tally.as_dict(),
                "status": wafer.status,
                **wafer.passes.as_dict(),
                "updated": wafer.updated,
            }
            if wafer.reported:
                delta["reported"] = dict(wafer.reported)
            if wafer.started is not None:
                delta["started"] = wafer.started
            if wafer.ended is not None:
                delta["ended"] = wafer.ended
            if wafer.counts_from is not None:
                delta["counts_from"] = wafer.counts_from
            publish(wafer.topic, delta)
        for lot in batch.lots:
            if lot.lot_id not in self.lots:
                continue
            if not wanted(lot.topic):
                skipped["lot"] += 1
                continue
            snap = lot.snapshot()
            snap.pop("lot_id")
            publish(lot.topic, snap)
        for stats in batch.tests:
            if stats.lot_id in self.lots:
                if wanted(stats.topic):
                    publish(stats.topic, stats.snapshot())
                else:
                    skipped["test"] += 1
        sensors = self.sensors
        for sensor, points in batch.sensors.items():
            if sensors.get(sensor.channel) is not sensor:
                continue  # left memory within this batch (its topic was told)
            if wanted(sensor.topic):
                publish(sensor.topic, {"latest": sensor.latest, "unit": sensor.unit,
                                       "append": points})
            else:
                skipped["sensor"] += 1
        for gw in batch.gateways:
            if wanted(gw.topic):
                publish(gw.topic, {
                    "online": gw.online, "last_seen": gw.last_seen, "records": gw.records,
                    "frames": gw.frames, "last_rid": gw.last_rid,
                    "records_per_s": gw.records_per_s(now),
                })
            else:
                skipped["gateway"] += 1
        for gw, event in batch.gateway_events:
            if wanted(gw.topic):
                publish(gw.topic, {"event": event})
        for kind, n in skipped.items():
            self._m_skipped.inc(n, kind=kind)
        if batch.not_applied:
            publish(topics.HUB_STATE, self.warnings())
        if self.alerts is not None:
            ts = batch.ts
            for wafer in batch.closed_wafers:
                its_lot = self.lots.get(wafer.lot_id)
                if its_lot is not None:
                    self.alerts.wafer_closed(its_lot, wafer)
            for wafer in batch.wafers:
                its_lot = self.lots.get(wafer.lot_id)
                if its_lot is not None and not wafer.archived:
                    self.alerts.evaluate_wafer(its_lot, wafer, ts, now)
            for lot in batch.lots:
                if lot.lot_id in self.lots:
                    self.alerts.evaluate_lot(lot, ts, now)
            for stats in batch.tests:
                if stats.lot_id in self.lots:
                    self.alerts.evaluate_test(stats, ts, now)


_NUM = (float, int)


def _ALL(topic: str) -> bool:
    """``wanted`` when none is given: every topic (each update is built)."""
    return True
_new = tuple.__new__
_repeat = itertools.repeat
_islice = itertools.islice
_chain = itertools.chain.from_iterable

#: the types each field of a parametric result's may have for the inline apply: by index
#: in the record (ts, lot id, head, site, test number and text, value, limits, units, test
#: flags)
_PLAIN_PARAMETRIC: dict[int, set[type]] = {
    1: {float, int}, 2: {str}, 3: {int}, 4: {int}, 6: {int}, 7: {str},
    8: {float, type(None)}, 9: {float, int, type(None)},
    10: {float, int, type(None)}, 11: {str}, 13: {int}, 14: {int}}
#: those whose integers must fit 64 bits, checked a column at a time: ts, head, site and
#: flags (a test number past them names no test the lot has: not inline, so checked per
#: record; a limit past the float range is checked inline)
_RANGED = frozenset({1, 3, 4, 13, 14})


def _keep_time(times: deque[float], ts: float) -> None:
    """``ts`` into ``times`` (a lot's newest part times, ascending, at most ``maxlen``) in
    its place: the window is the newest parts by record time whatever order they came in
    (``units_per_hour``), as a lot applied in order keeps."""
    if len(times) == times.maxlen:
        if ts <= times[0]:
            return
        times.popleft()
    times.insert(bisect.bisect_right(times, ts), ts)


#: the pending list of a (gateway, head, site) over ``PENDING_SITES_PER_LOT``: full, so
#: its values are dropped (counted) as over ``PENDING_PER_SITE``; never appended to
_NO_ROOM: list[Any] = [None] * PENDING_PER_SITE


def _plain_parametric(columns: list[Any]) -> bool:
    """Whether a frame's parametric results' columns hold only the types the inline apply
    takes without a check per record (most frames: one ``map`` per column, in C), and
    their integers only integers of 64 bits (docs/protocol.md section 2: a CBOR bignum as
    a site was counted inline, and every later tick of the fan-out raised): ``min`` and
    ``max`` of a column that holds any, in C, not a comparison per record in Python."""
    for i, allowed in _PLAIN_PARAMETRIC.items():
        col = columns[i]
        if type(col) is tuple:
            t = type(col[0])
            if t not in allowed or (t is int and i in _RANGED
                                    and not _INT_MIN <= col[0] <= _INT_LIMIT):
                return False
        else:
            types = set(map(type, col))
            if not types <= allowed:
                return False
            if int in types and i in _RANGED:
                # (ints among floats -- a time -- are rare: a Python pass)
                ints = col if len(types) == 1 else [v for v in col if type(v) is int]
                if min(ints) < _INT_MIN or max(ints) > _INT_LIMIT:
                    return False
    return True


#: kinds whose apply neither reads a test's figures nor makes a lot or wafer (which could
#: evict or archive one, reading its tests): the values kept need not be in before them
_NO_TEST_READS = frozenset({SensorReading, SensorWindow, GatewayEvent, RawRecord})


class _Batch:
    """What one on_records call changed, so each topic gets one delta."""

    __slots__ = ("closed_wafers", "dies", "gateway_events", "gateway_id", "gateways", "lots",
                 "not_applied", "run", "sensors", "tests", "ts", "values", "wafer_values",
                 "wafers")

    def __init__(self, gateway_id: str) -> None:
        #: whose frame it is
        self.gateway_id = gateway_id
        self.ts = 0.0
        # dicts used as ordered sets: deltas go out in a reproducible order
        self.wafers: dict[WaferState, None] = {}
        self.dies: dict[WaferState, list[Die]] = {}
        self.lots: dict[LotState, None] = {}
        self.tests: dict[TestStats, None] = {}
        self.sensors: dict[SensorState, list[list[Any]]] = {}
        self.gateways: dict[GatewayState, None] = {}
        self.gateway_events: list[tuple[GatewayState, dict[str, Any]]] = []
        self.closed_wafers: list[WaferState] = []
        self.not_applied = False  # the hub/state topic changed
        # batched apply only (None: one record at a time): values not yet in their
        # tests' figures, test -> [value, site, ...] and test -> [wafer_id, value, ...]
        self.values: dict[TestStats, list[Any]] | None = None
        self.wafer_values: dict[TestStats, list[Any]] | None = None
        #: the gateway's stretch of rids the frame extends (its part results' heads)
        self.run: Run | None = None


def replay(state: LiveState, frames: Iterable[tuple[str, int, list[Any]]],
           now: float | None = None) -> int:
    """Feed stored frames ``(gateway_id, first_rid, records)`` through ``on_records``;
    returns the number of records.  The hub calls this after a restart."""
    n = 0
    for gateway_id, first_rid, records in frames:
        state.on_records(gateway_id, first_rid, records, now=now)
        n += len(records)
    return n
