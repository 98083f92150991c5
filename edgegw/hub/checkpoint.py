"""Live-state checkpoints: a restart (or, later, an ownership move) loads the live state
from a checkpoint and replays only the frames applied after it.

Design, invariants first (format: docs/storage.md, "Checkpoints"):

* **A consistent cut.**  ``capture`` copies the live state into plain data synchronously
  on the Trio thread, where every change to the state happens, so nothing changes during
  the copy.  Its position is the id (``frames.id``) of the last frame the state was fed:
  frames are fed in id order (the hub feeds each commit right after it, and commits are
  serialised), so the state holds exactly the frames up to that id.  Encoding,
  compression and the write happen in a worker thread: ingest is held up only for the
  copy, and the copy of a wafer that has not changed since the last checkpoint is reused.
* **Durable before it counts.**  The file is written to a temporary name, fsynced,
  renamed over ``checkpoint`` (the previous one becomes ``checkpoint.prev``) and the
  directory fsynced.  Archives of lots evicted before the cut are handed to the history
  store first (``AlertService.wait_persisted``), and while any archive is only held in
  memory because that store cannot be written (``AlertService.archives_unwritten``) no
  checkpoint is written at all: a checkpoint never stands for an evicted lot whose archive
  a crash could lose -- the older one stands, and the replay after a restart evicts the
  lot again and writes its archive.  (An archive dropped over the memory bound while the
  store stays unwritable is lost once a later checkpoint is written: docs/alerts.md.)
* **Frames stay until two checkpoints cover them.**  The pruner never deletes a frame
  above the *older* checkpoint's position, so falling back to ``checkpoint.prev`` (the
  newer one unreadable) still finds every frame after it.
* **Versioned and store-agnostic.**  ``encode``/``decode`` turn (position, state) into
  bytes and back; the position is an opaque small dict (here ``{"frame_id": n}``).  A
  file of another version, or one that fails its CRC, is refused with a clear error and
  the hub falls back (older checkpoint, then a full replay of the frames it has).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import cbor2
import trio

from edgegw.dirsync import fsync_dir
from edgegw.hub.live.models import (
    Die,
    GatewayState,
    Keys,
    LotRest,
    LotState,
    Passes,
    Running,
    SensorState,
    Tally,
    TestStats,
    WaferRest,
    WaferState,
    dies_blob,
    dies_from_blob,
    run_from,
    run_row,
)
from edgegw.hub.live.state import LiveState
from edgegw.metrics import Metrics, report_internal_error

if TYPE_CHECKING:
    from edgegw.hub.alerts.engine import AlertEngine
    from edgegw.hub.alerts.service import AlertService
    from edgegw.hub.ingest import Ingest as Hub
    from edgegw.hub.store import HubStore

log = logging.getLogger("edgegw.hub.checkpoint")

MAGIC = b"EGWCKPT\n"
FORMAT_VERSION = 4  # 2: a test's distribution, per-site/per-wafer figures, die values;
#                     3: dies with a pass/fail and with a bin (parametric-only formats);
#                     4: a site is (head, site): dies with their head, sites keyed by both
_HEADER = struct.Struct(">8sHI")  # magic, format version, CRC-32 of the payload
FILE = "checkpoint"
PREVIOUS = "checkpoint.prev"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (wrong format, version or checksum)."""


# --------------------------------------------------------------------------- bytes


def encode(position: dict[str, Any], data: dict[str, Any]) -> bytes:
    """A checkpoint as bytes: header + zlib(CBOR {"position", "taken_at", "state"})."""
    payload = zlib.compress(cbor2.dumps({"position": position, "taken_at": time.time(),
                                         "state": data}), 1)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(payload)) + payload


def decode(blob: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(position, state data) of a checkpoint; CheckpointError if it cannot be used."""
    if len(blob) < _HEADER.size:
        raise CheckpointError(f"checkpoint of {len(blob)} bytes is too short")
    magic, version, crc = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError("not an edgegw checkpoint (bad magic)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {version}, this hub reads {FORMAT_VERSION}")
    payload = blob[_HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise CheckpointError("checkpoint checksum mismatch (torn or corrupt file)")
    try:
        doc = cbor2.loads(zlib.decompress(payload))
        return doc["position"], doc["state"]
    except Exception as exc:
        raise CheckpointError(f"checkpoint payload unreadable: {exc}") from None


# --------------------------------------------------------------------------- the cut


def _counter(c: Counter[int]) -> dict[int, int]:
    # every key, those at 0 too: a tally's keys once there stay (``Tally``, ``TALLY_KEYS``)
    return dict(c)


def _site(key: Any) -> Any:
    # a site key (``site_key``): an int (head 1), or (head, site) as "HEAD/SITE" (a map key
    # any CBOR reader takes, and a map compares equal whatever order the sites came in)
    return key if type(key) is int else f"{key[0]}/{key[1]}"


def _site_from(key: Any) -> Any:
    if isinstance(key, str) and "/" in key:
        head, site = key.split("/")
        return (int(head), int(site))
    return int(key)


def _sites(c: Counter[Any]) -> dict[Any, int]:
    return {_site(k): v for k, v in c.items()}


def _tally(t: Tally) -> list[Any]:
    return [t.dies, t.good, t.parts, t.retests, _counter(t.hard), _counter(t.soft),
            _counter(t.hard_tested), _counter(t.soft_tested), _sites(t.site_dies),
            _sites(t.site_good), t.judged, t.binned,
            # each gateway's keys beyond the first ones (``Keys.made``)
            [t.hard.made, t.soft.made, t.hard_tested.made, t.soft_tested.made,
             t.site_dies.made]]


def _tally_from(row: list[Any]) -> Tally:
    t = Tally()
    t.dies, t.good, t.parts, t.retests = row[:4]
    t.judged, t.binned = row[10:12]
    for name, value in zip(("hard", "soft", "hard_tested", "soft_tested"), row[4:8],
                           strict=True):
        counts = Keys()
        counts.update({int(k): v for k, v in value.items()})
        setattr(t, name, counts)
    t.site_dies = Keys()
    t.site_dies.update({_site_from(k): v for k, v in row[8].items()})
    t.site_good = Counter({_site_from(k): v for k, v in row[9].items()})
    # (an older checkpoint does not say: none counted, each gateway may bring its full
    # count more)
    for keys, made in zip((t.hard, t.soft, t.hard_tested, t.soft_tested, t.site_dies),
                          row[12] if len(row) > 12 else (), strict=False):
        keys.made = dict(made)
    return t


def _dies_from(encoded: bytes) -> dict[Any, Die]:
    return dies_from_blob(encoded)


class WaferCache:
    """Each wafer's dies, encoded (CBOR, columnar) by an earlier cut and reused while the
    wafer is unchanged: most of a lot's wafers are closed and never change again, so a
    cut copies and encodes only the wafers being tested."""

    def __init__(self) -> None:
        self._by_wafer: dict[tuple[str, str], tuple[int, bytes]] = {}

    def dies(self, wafer: WaferState) -> bytes:
        key = (wafer.lot_id, wafer.wafer_id)
        mark = wafer.tally.parts  # every part applied to the wafer counts here
        hit = self._by_wafer.get(key)
        if hit is not None and hit[0] == mark:
            return hit[1]
        data = dies_blob(wafer.dies)
        self._by_wafer[key] = (mark, data)
        return data

    def prime(self, wafer: WaferState, encoded: bytes) -> None:
        """A wafer just restored from ``encoded``: the next cut reuses it."""
        self._by_wafer[(wafer.lot_id, wafer.wafer_id)] = (wafer.tally.parts, encoded)

    def keep_only(self, live: set[tuple[str, str]]) -> None:
        for key in [k for k in self._by_wafer if k not in live]:
            del self._by_wafer[key]


def _wafer(w: WaferState, cache: WaferCache) -> dict[str, Any]:
    return {"wafer_id": w.wafer_id, "gateway": w.gateway, "dies": cache.dies(w),
            "tally": _tally(w.tally),
            "status": w.status, "started": w.started, "ended": w.ended,
            **_passes(w.passes),
            "reported": w.reported, "updated": w.updated, "counts_from": w.counts_from,
            "values": [[num, [[x, y, v] for (x, y), v in by_die.items()]]
                       for num, by_die in w.values.items()],
            "value_count": w.value_count}


def _running(key: Any, r: Running) -> list[Any]:
    return [key, r.n, r.mean, r.m2]


def _running_from(row: list[Any]) -> Running:
    r = Running()
    r.n, r.mean, r.m2 = row[1:]
    return r


def _test(t: TestStats) -> list[Any]:
    h = t.histogram
    return [t.test_num, t.kind, t.test_txt, t.units, t.lo, t.hi, t.executions, t.fails,
            t.count, t.mean, t.m2, t.min, t.max,
            [h.lo, h.width, list(h.counts), h.below, h.above],
            [_running(_site(site), r) for site, r in t.by_site.items()],
            [_running(wafer, r) for wafer, r in t.by_wafer.items()],
            [[gw, n] for gw, n in t.sites_of.items()], t.not_executed, list(t.names)]


def _test_from(lot_id: str, row: list[Any]) -> TestStats:
    t = TestStats(lot_id, row[0], row[1])
    (t.test_txt, t.units, t.lo, t.hi, t.executions, t.fails, t.count, t.mean, t.m2,
     t.min, t.max) = row[2:13]
    h = t.histogram
    h.lo, h.width, counts, h.below, h.above = row[13]
    h.counts = list(counts)
    t.by_site = {_site_from(r[0]): _running_from(r) for r in row[14]}
    # whose sites they are (an older checkpoint does not say: none counted, each gateway
    # may make its full count more)
    t.sites_of = {gw: n for gw, n in row[16]} if len(row) > 16 else {}
    for r in row[15]:
        t.by_wafer[r[0]] = _running_from(r)
    # (an older checkpoint: none, and the one name it knows)
    t.not_executed = row[17] if len(row) > 17 else 0
    t.names = list(row[18]) if len(row) > 18 else [t.test_txt] if t.test_txt else []
    return t


def _lot(lot: LotState, cache: WaferCache) -> dict[str, Any]:
    return {
        "lot_id": lot.lot_id, "info": lot.info, "status": lot.status,
        "started": lot.started, "ended": lot.ended, **_passes(lot.passes),
        "counts_from": lot.counts_from,
        "gateways": sorted(lot.gateways),
        "wafers": [_wafer(w, cache) for w in lot.wafers.values()],
        "archived_wafers": sorted(lot.archived_wafers),
        # of those, what a retest under their wafer id continues from, oldest first
        "wafer_rests": [[wid, _rest(r)] for wid, r in lot.wafer_rests.items()],
        "tests": [_test(t) for t in lot.tests.values()], "tests_of": lot.tests_of,
        "tally": _tally(lot.tally),
        "part_times": list(lot.part_times), "test_time": [lot.test_time_sum, lot.test_time_n],
        "reported_hard": lot.reported_hard, "reported_soft": lot.reported_soft,
        "reported_counts": lot.reported_counts, "updated": lot.updated,
        # a part's values waiting for its PartResult (a cut may fall between them)
        "pending": [[gw, head, site, [[stats.test_num, v] for stats, v in values]]
                    for gw, mine in lot.pending_of.items()
                    for (head, site), values in mine.items()],
    }


def capture(state: LiveState, cache: WaferCache | None = None) -> dict[str, Any]:
    """The live state as plain data (a consistent cut: call on the Trio thread)."""
    cache = cache or WaferCache()
    out: dict[str, Any] = {
        "lots": [_lot(lot, cache) for lot in state.lots.values()],
        "evicted": list(state.evicted),
        # what a retest of an evicted lot continues from: its passes and its wafers'
        "evicted_rests": [[lot_id, {**_passes(r.passes), "ended": r.passes.ended},
                           [[wid, _rest(w)] for wid, w in r.wafers.items()]]
                          for lot_id, r in state.gone.items()],
        "sensors": [[s.channel, s.unit, s.latest, list(s.history), s.source]
                    for s in state.sensors.values()],
        # each channel's maker, in the same order (apart: an older hub reads the rows)
        "sensor_gateways": [s.gateway for s in state.sensors.values()],
        "gateways": [[g.gateway_id, g.last_seen, g.records, g.frames, g.last_rid,
                      list(g.events)] for g in state.gateways.values()],
        "not_applied": state.not_applied, "not_applied_total": state.not_applied_total,
        "last_error": state.last_error, "now": state._now,
        # each gateway's stretches of rids applied apart (frames out of order), with the
        # values their ends owe: a part's values join it by rid after a restore too
        "runs": [[g.gateway_id, run_row(g.run), [run_row(r) for r in g.waiting]]
                 for g in state.gateways.values() if g.run is not None],
    }
    cache.keep_only({(lot.lot_id, w.wafer_id) for lot in state.lots.values()
                     for w in lot.wafers.values()})
    engine = cast("AlertEngine | None", state.alerts)  # the hub's observer: its engine
    if engine is not None:
        out["alert_runs"] = [[*k, v] for k, v in engine._runs.items()]
        out["alert_shares"] = [[*k, list(h)] for k, h in engine._shares.items()]
    return out


def _passes(p: Passes) -> dict[str, Any]:
    return {"starts": sorted(p.starts), "timed_starts": sorted(p.timed_starts),
            "timed_end": p.timed_end}


def _rest(r: WaferRest) -> dict[str, Any]:
    # (``ended`` apart from ``_passes``: a wafer's and a lot's row keep it beside them)
    return {**_passes(r.passes), "ended": r.passes.ended, "gateway": r.gateway,
            "dies": r.dies, "tally": None if r.tally is None else _tally(r.tally),
            "reported": r.reported, "updated": r.updated, "counts_from": r.counts_from}


def _rest_from(d: dict[str, Any]) -> WaferRest:
    tally = d["tally"]
    return WaferRest(_passes_from(d), d["gateway"], d["dies"],
                     None if tally is None else _tally_from(tally), dict(d["reported"]),
                     d["updated"], d["counts_from"])


def _passes_from(d: dict[str, Any]) -> Passes:
    starts = d.get("starts")
    if starts is None:
        # an older checkpoint keeps no passes: its one start, and its times taken for the
        # tester's (as they are when the tester gives them)
        one = [] if d["started"] is None else [d["started"]]
        return Passes(one, d["ended"], one, d["ended"])
    return Passes(starts, d["ended"], d["timed_starts"], d["timed_end"])


def restore(state: LiveState, data: dict[str, Any], cache: WaferCache | None = None) -> None:
    """Load a captured state into a fresh ``LiveState`` (nothing is published: clients
    subscribing start from snapshots, as after any restart); ``cache`` is primed with
    the wafers restored, so the next cut does not encode them again."""
    for d in data["lots"]:
        lot = LotState(d["lot_id"])
        lot.info = dict(d["info"])
        lot.status, lot.started, lot.ended = d["status"], d["started"], d["ended"]
        lot.passes = _passes_from(d)
        lot.counts_from = d.get("counts_from")  # (an older checkpoint: every pass)
        lot.gateways = set(d["gateways"])
        for wd in d["wafers"]:
            # (its maker: an older checkpoint does not say -- none, as if one gateway's)
            w = WaferState(lot.lot_id, wd["wafer_id"], wd.get("gateway", ""))
            w.dies = _dies_from(wd["dies"])
            w.tally = _tally_from(wd["tally"])
            w.status, w.started, w.ended = wd["status"], wd["started"], wd["ended"]
            w.passes = _passes_from(wd)
            w.reported, w.updated = dict(wd["reported"]), wd["updated"]
            w.counts_from = wd.get("counts_from")  # (an older checkpoint: every pass)
            w.values = {num: {(x, y): v for x, y, v in rows} for num, rows in wd["values"]}
            w.value_count = wd["value_count"]
            lot.wafers[w.wafer_id] = w
            if cache is not None:
                cache.prime(w, wd["dies"])
        lot.order_wafers()  # (a checkpoint of an older hub kept them in arrival order)
        lot.archived_wafers = set(d["archived_wafers"])
        # (an older checkpoint keeps none: a retest of a wafer that left memory is not
        # applied, as on the hub that wrote it)
        lot.wafer_rests = {wid: _rest_from(r) for wid, r in d.get("wafer_rests", ())}
        for row in d["tests"]:
            t = _test_from(lot.lot_id, row)
            t.wafer_order = lot.wafer_order
            lot.tests[t.test_num] = t
        lot.tests_of = dict(d.get("tests_of", {}))
        for gw, head, site, values in d["pending"]:
            lot.pending_of.setdefault(gw, {})[(head, site)] = [(lot.tests[num], v)
                                                               for num, v in values]
        lot.tally = _tally_from(d["tally"])
        lot.part_times.extend(sorted(d["part_times"]))  # (by time; older hubs: arrival)
        lot.test_time_sum, lot.test_time_n = d["test_time"]
        lot.reported_hard = dict(d["reported_hard"])
        lot.reported_soft = dict(d["reported_soft"])
        lot.reported_counts = dict(d["reported_counts"])
        lot.updated = d["updated"]
        state.lots[lot.lot_id] = lot
    for lot_id in data["evicted"]:
        state.evicted.append(lot_id)
    state._evicted_set = set(state.evicted)
    # (an older checkpoint keeps none: a retest of a lot evicted before it is not applied,
    # as on the hub that wrote it)
    for lot_id, passes, wafers in data.get("evicted_rests", ()):
        if lot_id in state._evicted_set:
            state.gone[lot_id] = LotRest(_passes_from(passes),
                                         {wid: _rest_from(r) for wid, r in wafers})
    # (their makers: an older checkpoint does not say -- none, as if one gateway's)
    makers = data.get("sensor_gateways") or [""] * len(data["sensors"])
    for (channel, unit, latest, history, source), maker in zip(data["sensors"], makers,
                                                               strict=True):
        s = SensorState(channel, state.sensor_history, maker)
        s.unit, s.latest, s.source = unit, latest, source
        s.history.extend(history)
        state.adopt_sensor(s)
    for gw_id, last_seen, records, frames, last_rid, events in data["gateways"]:
        g = GatewayState(gw_id)  # offline until it connects, as after any restart
        g.last_seen, g.records, g.frames, g.last_rid = last_seen, records, frames, last_rid
        g.events.extend(events)
        state.gateways[gw_id] = g
    for lot in state.lots.values():  # where each gateway's current stretch's values wait
        for gw_id in lot.pending_of:
            known = state.gateways.get(gw_id)
            if known is None:  # (its frames made it: a checkpoint always has it)
                known = state.gateways[gw_id] = GatewayState(gw_id)
            known.pending_lots.add(lot.lot_id)
    for gw_id, run, waiting in data.get("runs", ()):  # (an older checkpoint has none)
        g = state.gateways[gw_id]
        g.run = run_from(run, state.lots)
        g.waiting = [r for r in (run_from(w, state.lots) for w in waiting) if r is not None]
    state.not_applied = {k: dict(v) for k, v in data["not_applied"].items()}
    state.not_applied_total = data["not_applied_total"]
    state.last_error = data["last_error"]
    state._now = data["now"]
    engine = cast("AlertEngine | None", state.alerts)  # the hub's observer: its engine
    if engine is not None:
        for *key, run in data.get("alert_runs", ()):
            engine._runs[tuple(key)] = run
        maxlen = {r.name: r.recent_wafers for r in engine.config.rules}
        for name, part_type, history in data.get("alert_shares", ()):
            engine._shares[(name, part_type)] = deque(
                ({int(k): v for k, v in h.items()} for h in history),
                maxlen=maxlen.get(name, len(history) or 1))


# --------------------------------------------------------------------------- files


def write_file_sync(directory: Path, blob: bytes) -> None:
    """Atomically replace ``checkpoint`` (the old one kept as ``checkpoint.prev``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    current = directory / FILE
    if current.exists():
        os.replace(current, directory / PREVIOUS)
    os.replace(tmp, current)
    fsync_dir(directory)


def load_file_sync(directory: Path) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """The checkpoints on disk, newest first: (file name, position, data) -- data None and
    position ``{"error": ...}`` for one that cannot be used."""
    out: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    for name in (FILE, PREVIOUS):
        path = directory / name
        if not path.exists():
            continue
        try:
            position, data = decode(path.read_bytes())
        except (OSError, CheckpointError) as exc:
            out.append((name, {"error": str(exc)}, None))
        else:
            out.append((name, position, data))
    return out


# --------------------------------------------------------------------------- Trio layer


class Checkpointer:
    """Writes checkpoints of ``state`` every ``interval_s`` (sooner after ``max_records``
    records) and once more at a clean shutdown; at start-up, loads the newest usable one
    before the hub replays (``Hub.before_replay``)."""

    def __init__(self, hub: Hub, state: LiveState, directory: Path, *, interval_s: float,
                 max_records: int, alerts: AlertService | None = None,
                 metrics: Metrics | None = None) -> None:
        self.hub = hub
        self.state = state
        self.directory = directory
        self.interval_s = interval_s
        self.max_records = max_records
        self.alerts = alerts
        self.metrics = metrics or Metrics()
        self.cache = WaferCache()
        self.position = 0  # the frame id the newest durable checkpoint covers
        self.loaded_from: str | None = None
        self._written_at_records = 0
        self._holding = False  # checkpoints wait for archives held in memory (logged once)
        self._wake = trio.Event()
        m = self.metrics
        self._m_written = m.counter("hub_checkpoints_written_total", "checkpoints written")
        self._m_failed = m.counter("hub_checkpoint_failures_total",
                                   "checkpoints that could not be written or read")
        self._m_bytes = m.gauge("hub_checkpoint_bytes", "size of the newest checkpoint")
        self._m_cut = m.gauge("hub_checkpoint_cut_seconds",
                              "time the newest checkpoint's cut held the Trio thread")
        hub.before_replay = self.load
        hub.on_fed = self._on_fed

    @property
    def store(self) -> HubStore:
        """The single hub's store, which numbers frames (a cluster node has no checkpoint
        file: its partitions' checkpoints are in PostgreSQL)."""
        return cast("HubStore", self.hub.store)

    def _on_fed(self, records_fed: int) -> None:
        if records_fed - self._written_at_records >= self.max_records:
            self._wake.set()

    async def load(self) -> int:
        """Restore the newest usable checkpoint into the state; returns its frame id (the
        hub replays the frames after it), 0 when there is none."""
        found = await trio.to_thread.run_sync(load_file_sync, self.directory)
        store_id = self.store.store_id
        for i, (name, position, data) in enumerate(found):
            last = self.store.last_frame_id
            if data is not None and (position.get("store_id") != store_id
                                     or position.get("frame_id", 0) > last):
                # frame ids of another store (its file replaced or deleted): replaying
                # "after" them would skip or repeat this store's frames
                found[i] = (name, {"error": "it covers the frames of another store"}, None)
        positions = [p["frame_id"] for _, p, d in found if d is not None]
        for name, position, data in found:
            if data is None:
                self._m_failed.inc()
                log.error("checkpoint %s not usable: %s", name, position["error"])
                if name == FILE:  # kept aside, so the next write keeps the good older one
                    await trio.to_thread.run_sync(os.replace, self.directory / FILE,
                                                  self.directory / (FILE + ".bad"))
                continue
            restore(self.state, data, self.cache)
            self.position = position["frame_id"]
            self.loaded_from = name
            # frames after the older checkpoint stay (see the module docstring)
            self.hub.prune_limit = min(positions)
            log.info("live state restored from %s (frame %d); replaying the frames after it",
                     name, self.position)
            return self.position
        self.hub.prune_limit = 0  # until two checkpoints cover them, frames stay
        return 0

    async def checkpoint(self, final: bool = False) -> bool:
        """Cut, then encode and write off the Trio thread; False if there was nothing new,
        or archives of evicted lots are not in the history store (held in memory, or at
        shutdown still queued): the older checkpoint stands."""
        if final:  # what was acknowledged and is still queued goes into the last one
            self.hub.drain_feed()
        position = self.hub.fed_id
        if position == self.position or self._archives_held():
            return False
        t0 = time.perf_counter()
        data = capture(self.state, self.cache)
        self._m_cut.set(round(time.perf_counter() - t0, 4))
        records = self.hub.records_fed
        if self.alerts is not None:  # the archives of lots evicted before the cut first
            if final and self.alerts.backlog:
                return False  # its writer may be gone already: do not wait for it
            await self.alerts.wait_persisted()
            if self._archives_held():  # (evicted before the cut, the store refused them)
                return False
        blob = await trio.to_thread.run_sync(
            encode, {"frame_id": position, "store_id": self.store.store_id}, data)
        await trio.to_thread.run_sync(write_file_sync, self.directory, blob)
        previous, self.position = self.position, position
        self.hub.prune_limit = previous  # the older of the two on disk
        self._written_at_records = records
        self._m_written.inc()
        self._m_bytes.set(len(blob))
        return True

    def _archives_held(self) -> bool:
        """Archives of evicted lots held in memory (the history store cannot be written):
        a checkpoint now could stand for their lots' eviction, and a crash would lose
        them.  None is written (nor cut: it is not needed); the older one stands, and the
        replay after a restart evicts the lots again and writes their archives."""
        held = self.alerts.archives_unwritten if self.alerts is not None else 0
        if held and not self._holding:
            log.warning("live-state checkpoints wait: %d lot/wafer archive(s) only in memory "
                        "(the history store cannot be written); a restart now replays the "
                        "frames since the last one", held)
        elif not held and self._holding:
            log.info("live-state checkpoints resume: the archives held are in the history "
                     "store")
        self._holding = bool(held)
        return bool(held)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        task_status.started()
        # Something was replayed at the start: checkpoint it now, not a minute later, so a
        # crash soon after a long replay does not replay it all again.
        if self.hub.fed_id != self.position:
            self._wake.set()
        try:
            while True:
                with trio.move_on_after(self.interval_s):
                    await self._wake.wait()
                self._wake = trio.Event()
                try:
                    await self.checkpoint()
                except OSError as exc:  # a full disk, say: the frames stay, the next tries
                    self._m_failed.inc()
                    log.error("live-state checkpoint not written: %s", exc)
                except Exception:
                    self._m_failed.inc()
                    report_internal_error(self.metrics, "hub_checkpoint", log,
                                          "writing a live-state checkpoint")
        finally:
            # a clean stop: one last checkpoint makes the next start replay nothing
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                with contextlib.suppress(Exception):
                    await self.checkpoint(final=True)


__all__ = [
    "FORMAT_VERSION", "CheckpointError", "Checkpointer", "WaferCache", "capture", "decode",
    "encode", "restore",
]
