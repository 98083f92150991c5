"""The live state's entities: lots, wafers and their dies, tests, sensors, gateways.

Each keeps running figures (counts, Welford sums, bounded histories) and answers its own
``snapshot``; none touches a socket, a file or a clock.  ``LiveState`` (``state.py``)
routes records to them and decides what to publish.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from operator import attrgetter
from typing import Any

import cbor2

from edgegw.hub import topics
from edgegw.records import PartResult, SensorReading, SensorWindow
from edgegw.stdf import test_number

#: Parts remembered per lot for the units-per-hour figure.
_UPH_WINDOW = 500
#: Seconds of arrival history behind a gateway's records-per-second figure.
RATE_WINDOW_S = 10
#: Distinct site numbers, and of each kind of bin, a wafer's or a lot's counts keep
#: (``Tally``): every wafer and lot delta carries those counts whole, so a key per site or
#: bin number a gateway invents made each delta grow with the wafer (14.5 MB of JSON and
#: 1.8 s of the hub's thread a one-part frame at 200,000 dies).  STDF numbers sites
#: 0..255; real testers use tens of bins.
TALLY_KEYS = 1_024


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


#: A site's key in the counts by site: a site is (head, site) -- a dual-head tester numbers
#: each head's sites from 0 -- kept as the plain site number on head 1, most testers' only
#: head (an int hashes fastest, and the key is built per part and per value).
SiteId = int | tuple[int, int]


def site_key(head: int, site: int) -> SiteId:
    return site if head == 1 else (head, site)


def _head_site(key: SiteId) -> tuple[int, int]:
    return (1, key) if type(key) is int else key  # type: ignore[return-value]


def site_names(keys: Any) -> list[tuple[Any, str]]:
    """``keys`` (``site_key``s) by head then site, each with its name in snapshots: the
    plain site number while they are all of one head (every single-head file, whatever its
    HEAD_NUM: 1, or 0 on a Credence D-10), else ``"HEAD/SITE"`` for every one (as
    ``edgegw stdf stats`` names them), so two heads' site 0 are two rows."""
    pairs = sorted((_head_site(k), k) for k in keys)
    if len({hs[0] for hs, _ in pairs}) <= 1:
        return [(k, str(hs[1])) for hs, k in pairs]
    return [(k, f"{hs[0]}/{hs[1]}") for hs, k in pairs]


class _New(Exception):
    """A key not in a ``Keys`` yet: nothing was counted (``Keys.add_new`` decides)."""


class Keys(Counter[Any]):
    """A ``Counter`` to which each gateway brings at most ``TALLY_KEYS`` keys (``made``:
    gateway -> keys it brought): a wafer and a lot are shared, and one gateway inventing
    site or bin numbers must leave another's new ones their keys.  Counting a key not
    there raises ``_New`` and changes nothing; the caller then asks ``add_new`` with the
    die's gateway.  The raise is in ``__missing__``, which only a key not there calls,
    so counting a key already there costs what a ``Counter``'s does.  (So a read of a
    key that may not be there is ``get(key, 0)``.)"""

    __slots__ = ("made",)

    def __init__(self, *counts: Any) -> None:
        # (``counts``: as ``Counter``'s, for its ``copy`` and pickling)
        self.made: dict[str, int] = {}
        super().__init__(*counts)

    def __missing__(self, key: SiteId) -> int:
        raise _New

    def add_new(self, key: SiteId, sign: int, gateway: str) -> bool:
        """``key``, not there, counted ``sign`` for ``gateway``'s die: False if not kept --
        ``gateway`` brought ``TALLY_KEYS`` keys already, or ``sign`` is -1 (the die's +1
        was not counted either: a key once there stays)."""
        if sign < 0:
            return False
        made = self.made.get(gateway, 0)
        if made >= TALLY_KEYS:
            return False
        self.made[gateway] = made + 1
        self[key] = sign
        return True


class Tally:
    """Counts over final dies (the map) and over every part result (what testers report).

    Each gateway brings at most ``TALLY_KEYS`` keys to each count by site and by bin
    (``Keys``): a die whose site or bin is not among them counts in the totals only
    (``dies``, ``good``, ``parts``...).  A
    key once there stays (its count may fall to 0), so a die's -1 finds its key exactly
    when its +1 was counted.
    """

    __slots__ = (
        "binned",
        "dies",
        "good",
        "hard",
        "hard_tested",
        "judged",
        "parts",
        "retests",
        "site_dies",
        "site_good",
        "soft",
        "soft_tested",
    )

    def __init__(self) -> None:
        self.dies = 0
        self.good = 0
        #: final dies with a pass/fail (PRR PART_FLG bit 4 clear) and with a hard bin
        #: (not 65535): a parametric-only format has neither, and yield and bins are then
        #: "not applicable" rather than 0 % and bin 0
        self.judged = 0
        self.binned = 0
        self.parts = 0
        self.retests = 0
        self.hard = Keys()
        self.soft = Keys()
        self.hard_tested = Keys()
        self.soft_tested = Keys()
        self.site_dies = Keys()
        #: (its keys are among ``site_dies``')
        self.site_good: Counter[SiteId] = Counter()

    def count_final(self, die: Die, sign: int) -> int:
        """``die`` in (+1) or out of (-1) the final counts; how many of its keys (site,
        bins) a +1 left out, over ``TALLY_KEYS`` (``Keys``)."""
        left_out = 0
        self.dies += sign
        if die.passed is not None:
            self.judged += sign
        if die.hard_bin is not None:
            self.binned += sign
            try:
                self.hard[die.hard_bin] += sign
            except _New:
                left_out += not self.hard.add_new(
                    die.hard_bin, sign, die.gateway) and sign > 0
        if die.soft_bin is not None:
            try:
                self.soft[die.soft_bin] += sign
            except _New:
                left_out += not self.soft.add_new(
                    die.soft_bin, sign, die.gateway) and sign > 0
        site = die.site if die.head == 1 else (die.head, die.site)  # site_key, inline
        try:
            self.site_dies[site] += sign
        except _New:
            if self.site_dies.add_new(site, sign, die.gateway):
                if die.passed:
                    self.good += sign
                    self.site_good[site] += sign
            else:
                left_out += sign > 0
                if die.passed:
                    self.good += sign
        else:
            if die.passed:
                self.good += sign
                self.site_good[site] += sign
        return left_out

    def count_tested(self, die: Die, replaced: bool) -> int:
        """A part result in the counts of every result; how many of its bins were left
        out, over ``TALLY_KEYS``."""
        left_out = 0
        self.parts += 1
        self.retests += replaced
        if die.hard_bin is not None:
            try:
                self.hard_tested[die.hard_bin] += 1
            except _New:
                left_out += not self.hard_tested.add_new(
                    die.hard_bin, 1, die.gateway)
        if die.soft_bin is not None:
            try:
                self.soft_tested[die.soft_bin] += 1
            except _New:
                left_out += not self.soft_tested.add_new(
                    die.soft_bin, 1, die.gateway)
        return left_out

    @property
    def yield_(self) -> float | None:
        """Good dies over all dies (a die without pass/fail counts as not good); None
        with no dies, or when no die has a pass/fail (not applicable)."""
        return _ratio(self.good, self.dies) if self.judged else None

    def not_applicable(self) -> list[str]:
        """What the dies cannot say: "yield" (no die has a pass/fail), "bins" (no die
        has a hard bin) -- a parametric-only format (docs/plugins.md)."""
        if not self.dies:
            return []
        return [name for name, n in (("yield", self.judged), ("bins", self.binned)) if not n]

    def site_yields(self) -> dict[str, float | None]:
        """Yield by site name (``site_names``)."""
        dies = self.site_dies
        return {name: _ratio(self.site_good[s], dies[s])
                for s, name in site_names(s for s, n in dies.items() if n)}

    def share(self, hard_bin: int) -> float | None:
        return _ratio(self.hard.get(hard_bin, 0), self.dies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "die_count": self.dies,
            "good": self.good if self.judged or not self.dies else None,
            "yield": self.yield_,
            "not_applicable": self.not_applicable(),
            "parts": self.parts,
            "retests": self.retests,
            "hard_bins": _keyed(self.hard),
            "soft_bins": _keyed(self.soft),
            "hard_bins_tested": _keyed(self.hard_tested),
            "soft_bins_tested": _keyed(self.soft_tested),
            "sites": {
                name: {
                    "dies": (n := self.site_dies[s]), "good": self.site_good[s],
                    "yield": _ratio(self.site_good[s], n),
                }
                for s, name in site_names(s for s, n in self.site_dies.items() if n)
            },
        }


def _keyed(counter: Counter[Any]) -> dict[str, int]:
    # String keys: the same snapshot goes out as CBOR and as JSON, and a JSON client
    # would otherwise see "1" where a CBOR client sees 1.
    return {str(k): v for k, v in sorted(counter.items()) if v}


class Die:
    """One part result; the final one of its location is what the map shows."""

    __slots__ = ("gateway", "hard_bin", "head", "part_id", "passed", "rid", "site", "soft_bin",
                 "ts", "x", "y")

    def __init__(self, gateway: str, rid: int, rec: PartResult) -> None:
        self.gateway = gateway
        self.rid = rid
        self.ts = rec.ts
        self.x = rec.x
        self.y = rec.y
        self.hard_bin = rec.hard_bin
        self.soft_bin = rec.soft_bin
        self.passed = rec.passed
        self.site = rec.site
        self.head = rec.head
        self.part_id = rec.part_id

    def newer_than(self, other: Die) -> bool:
        if self.gateway == other.gateway:
            return self.rid > other.rid
        return (self.ts, self.gateway) > (other.ts, other.gateway)

    def row(self) -> list[Any]:
        # The head trails, only off head 1 (as site_key): a dual-head wafer's two site 0s
        # differ on the map, and a single-head die row keeps its six elements and size.
        if self.head != 1:
            return [self.x, self.y, self.hard_bin, self.soft_bin, self.passed, self.site,
                    self.head]
        return [self.x, self.y, self.hard_bin, self.soft_bin, self.passed, self.site]


class Passes:
    """The passes of a lot (or wafer) tested again under its id: a retest on the floor
    keeps its LOT_ID (WAFER_ID), a new MIR (WIR) after the MRR (WRR).  By the tester's
    times, not arrival order (after an outage a gateway sends its newest frames first):
    the lot is closed while its latest end (FINISH_T) is at or after its latest start
    (START_T), so a late MIR of an earlier pass does not reopen it and a late MRR of an
    earlier pass does not close the pass under test.  Only the tester's own times are
    compared: a record time is the gateway's clock, and a tester's may be years off it, so
    a start or end without its time cannot reopen a lot, nor keep it open (it closes at
    any end, as before).  Start times are a set: a record applied twice is one pass."""

    __slots__ = ("ended", "starts", "timed_end", "timed_starts")

    def __init__(self, starts: Any = (), ended: float | None = None,
                 timed_starts: Any = (), timed_end: float | None = None) -> None:
        self.starts: set[float] = set(starts)  # START_T, else the record time
        self.ended = ended  # the latest end seen (FINISH_T, else the record time)
        self.timed_starts: set[float] = set(timed_starts)  # START_Ts given
        self.timed_end = timed_end  # the latest FINISH_T given

    def start(self, t: float, timed: bool) -> None:
        self.starts.add(t)
        if timed:
            self.timed_starts.add(t)

    def end(self, t: float, timed: bool) -> None:
        if self.ended is None or t > self.ended:
            self.ended = t
        if timed and (self.timed_end is None or t > self.timed_end):
            self.timed_end = t

    def reopens(self, t: float, timed: bool) -> bool:
        """Whether a start at ``t`` is a next pass: timed (the tester's own START_T), and
        after every start and end the tester gave so far.  Only such a start brings a lot
        (wafer) that left memory back (``LiveState``): a late start of a pass already
        archived, or one without its time, cannot say it came after."""
        if not timed or t in self.starts:
            return False
        end = self.timed_end
        return (end is None or t > end) and all(t > s for s in self.timed_starts)

    def copy(self) -> Passes:
        return Passes(self.starts, self.ended, self.timed_starts, self.timed_end)

    @property
    def first(self) -> float | None:
        return min(self.starts) if self.starts else None

    @property
    def status(self) -> str:
        if self.ended is None:
            return "open"
        end, starts = self.timed_end, self.timed_starts
        if end is not None and starts and max(starts) > end:
            return "open"  # tested again
        return "closed"

    def as_dict(self) -> dict[str, Any]:
        """``starts`` (passes begun) and ``reopened_at`` (the latest start when there is
        more than one) for the snapshot."""
        n = len(self.starts)
        return {"starts": n, "reopened_at": max(self.starts) if n > 1 else None}


class WaferState:
    def __init__(self, lot_id: str, wafer_id: str, gateway: str = "") -> None:
        self.lot_id = lot_id
        self.wafer_id = wafer_id
        #: the gateway whose record made it: when every live wafer of a lot is open, the
        #: one that leaves memory is of the gateway holding the most (``_wafer_victim``)
        self.gateway = gateway
        self.topic = topics.wafer(lot_id, wafer_id)
        self.dies: dict[Any, Die] = {}
        self.tally = Tally()
        self.status = "open"
        self.started: float | None = None
        self.ended: float | None = None
        #: the start times of its passes (WIRs): a wafer tested again under its id after
        #: its WRR is open again (``Passes``)
        self.passes = Passes()
        self.reported: dict[str, Any] = {}
        self.updated = 0.0
        self.archived = False  # left memory for the history store
        #: None: its figures are of every pass; else the start of the pass they count
        #: from -- a wafer of a lot back in memory after it left (``LiveState``): the
        #: history store merges them with the archive of the passes before
        self.counts_from: float | None = None
        #: test number -> {(x, y): value}: the final die's value, for a map by test value
        self.values: dict[int, dict[tuple[int, int], float]] = {}
        self.value_count = 0
        #: gateway -> its values in ``values`` (of its dies), each at most
        #: ``DIE_VALUES_PER_WAFER``: a wafer may be shared, and one gateway's invented
        #: tests or dies must leave another's die values their room.  Counted from the
        #: dies when ``value_count`` first reaches the cap (None before: nothing to pay
        #: per value below it), and from then on as values come
        self.values_of: dict[str, int] | None = None
        #: gateway -> its dies, each at most ``max_dies_per_wafer``: the same, counted
        #: when the wafer first reaches that many dies (``LiveState._on_part``)
        self.dies_of: dict[str, int] | None = None

    def add_die_value(self, test_num: int, xy: tuple[int, int], value: float,
                      gateway: str) -> None:
        by_die = self.values.get(test_num)
        if by_die is None:
            by_die = self.values[test_num] = {}
        if xy not in by_die:
            if self.value_count >= DIE_VALUES_PER_WAFER and not self.own_value(gateway):
                return
            self.value_count += 1
        by_die[xy] = value

    def own_value(self, gateway: str) -> bool:
        """A new die value of ``gateway``'s, the wafer holding ``DIE_VALUES_PER_WAFER``
        or more: whether ``gateway`` has room (counted if so)."""
        values_of = self.values_of
        if values_of is None:
            values_of = self.values_of = self.by_gateway(
                xy for by_die in self.values.values() for xy in by_die)
        made = values_of.get(gateway, 0)
        if made >= DIE_VALUES_PER_WAFER:
            return False
        values_of[gateway] = made + 1
        return True

    def by_gateway(self, keys: Any) -> dict[str, int]:
        """How many of ``keys`` (of ``dies``) are each gateway's: its final result's."""
        dies = self.dies
        made: dict[str, int] = {}
        for key in keys:
            die = dies.get(key)
            gateway = die.gateway if die is not None else ""
            made[gateway] = made.get(gateway, 0) + 1
        return made

    def snapshot(self) -> dict[str, Any]:
        return {
            "lot_id": self.lot_id,
            "wafer_id": self.wafer_id,
            "status": self.status,
            "started": self.started,
            "ended": self.ended,
            **self.passes.as_dict(),
            "dies": [d.row() for d in self.dies.values() if d.x is not None and d.y is not None],
            **self.tally.as_dict(),
            "reported": dict(self.reported),
            "updated": self.updated,
            **({} if self.counts_from is None else {"counts_from": self.counts_from}),
        }


_DIE_FIELDS = ("rid", "ts", "x", "y", "hard_bin", "soft_bin", "passed", "site", "part_id",
               "head")
_die_fields = attrgetter(*_DIE_FIELDS)


def dies_blob(dies: dict[Any, Die]) -> bytes:
    """A wafer's dies as compact bytes (CBOR, one list per field): what a checkpoint keeps,
    and what a wafer that left memory keeps for its retest (``WaferRest``), a few tens of
    bytes a die rather than a ``Die`` and its key."""
    gateways: dict[str, int] = {}
    gw_col = [gateways.setdefault(d.gateway, len(gateways)) for d in dies.values()]
    # (a row per die, then columns: in C, not a Python step per field of a die)
    cols = list(zip(*map(_die_fields, dies.values()), strict=True)) or [
        () for _ in _DIE_FIELDS]
    return cbor2.dumps({"gateways": list(gateways), "gateway": gw_col,
                       **{name: list(col) for name, col in zip(_DIE_FIELDS, cols,
                                                                strict=True)}})


def dies_from_blob(encoded: bytes) -> dict[Any, Die]:
    """``dies_blob`` back: the dies by their keys, as ``LiveState._on_part`` makes them."""
    data = cbor2.loads(encoded)
    out: dict[Any, Die] = {}
    gateways = data["gateways"]
    for i, gw_index in enumerate(data["gateway"]):
        die = Die.__new__(Die)
        die.gateway = gateways[gw_index]
        for name in _DIE_FIELDS:
            setattr(die, name, data[name][i])
        if die.x is not None and die.y is not None:
            key: Any = (die.x, die.y)
        elif die.part_id:
            key = ("part", die.head, die.part_id)
        else:
            key = ("rid", die.gateway, die.rid)
        out[key] = die
    return out


class WaferRest:
    """What a wafer that left memory leaves behind for a retest under its wafer id: its
    passes, and -- when its lot's counts still hold its dies (it left a live lot at
    ``max_wafers_per_lot``) -- its counts and its final dies, compact (``dies_blob``), so
    the retest replaces each die's result instead of counting the die twice.  ``dies``
    None: only the passes (a wafer of a lot that left memory: the lot's counts came back
    without it)."""

    __slots__ = ("counts_from", "dies", "gateway", "passes", "reported", "tally", "updated")

    def __init__(self, passes: Passes, gateway: str = "", dies: bytes | None = None,
                 tally: Tally | None = None, reported: dict[str, Any] | None = None,
                 updated: float = 0.0, counts_from: float | None = None) -> None:
        self.passes = passes
        self.gateway = gateway
        self.dies = dies
        self.tally = tally
        self.reported = reported or {}
        self.updated = updated
        self.counts_from = counts_from  # (``WaferState.counts_from``, with ``dies``)

    @classmethod
    def of(cls, wafer: WaferState, counted: bool) -> WaferRest:
        if not counted:
            return cls(wafer.passes.copy(), wafer.gateway, updated=wafer.updated)
        return cls(wafer.passes, wafer.gateway, dies_blob(wafer.dies), wafer.tally,
                   dict(wafer.reported), wafer.updated, wafer.counts_from)

    def revive(self, lot_id: str, wafer_id: str) -> WaferState:
        """The wafer back in memory as it left (its die values for the map by test value
        excepted: they stay in the history's archive)."""
        wafer = WaferState(lot_id, wafer_id, self.gateway)
        wafer.passes = self.passes.copy()
        wafer.started, wafer.ended = wafer.passes.first, wafer.passes.ended
        wafer.status = wafer.passes.status
        wafer.updated = self.updated
        if self.dies is not None:
            wafer.dies = dies_from_blob(self.dies)
            assert self.tally is not None
            wafer.tally = self.tally
            wafer.reported = dict(self.reported)
            wafer.counts_from = self.counts_from
        return wafer


class LotRest:
    """What a lot that left memory (``max_lots``) leaves behind for a retest under its lot
    id: its passes and its wafers' (``WaferRest`` without dies), at most ``wafers`` of
    them (the most recently updated)."""

    __slots__ = ("passes", "wafers")

    def __init__(self, passes: Passes, wafers: dict[str, WaferRest]) -> None:
        self.passes = passes
        self.wafers = wafers

    @classmethod
    def of(cls, lot: LotState, wafers: int) -> LotRest:
        rests = {wid: WaferRest(r.passes.copy(), r.gateway, updated=r.updated)
                 for wid, r in lot.wafer_rests.items()}
        rests.update((w.wafer_id, WaferRest.of(w, counted=False))
                     for w in lot.wafers.values())
        newest = sorted(rests.items(), key=lambda kv: kv[1].updated)[-wafers:]
        return cls(lot.passes.copy(), dict(newest))


def start_order(wafer: WaferState) -> tuple[float, str]:
    """Where a wafer goes among its lot's: in the order the wafers started (``started``,
    the WIR's start time; a wafer whose start is not known yet first), then by wafer id.
    It depends on the wafers' records only, not on the order they arrived in: after an
    outage a gateway sends its newest frames before the older ones (docs/spool.md), and a
    hub, a cluster's partition owners and ``/api`` must still list the same wafers in the
    same order as a hub that got every frame in sequence."""
    started = wafer.started
    if isinstance(started, (int, float)) and started == started:  # (not NaN)
        return (started, wafer.wafer_id)
    return (0.0, wafer.wafer_id)


class WaferOrder:
    """A lot's live wafers in start order: wafer id -> position, shared with the lot's
    tests (their per-wafer rows follow it); ``version`` changes whenever it does."""

    __slots__ = ("rank", "version")

    def __init__(self) -> None:
        self.rank: dict[str, int] = {}
        self.version = 0

    def set(self, wafer_ids: list[str]) -> None:
        rank = {w: i for i, w in enumerate(wafer_ids)}
        if rank != self.rank:
            self.rank = rank
            self.version += 1


#: Bins of a test's histogram; wafers whose per-wafer statistics a test keeps (newest).
HIST_BINS = 40
TEST_WAFERS = 50
#: Die values (test, die) a wafer keeps of each gateway's dies for "wafer map by test
#: value" (bounds its memory; ``WaferState.values_of``)
DIE_VALUES_PER_WAFER = 20_000
#: Dies a wafer keeps (``LiveState(max_dies_per_wafer=...)``, ``live.max_dies_per_wafer``):
#: twice the largest real wafers (about 100,000 dies: 300 mm, small dies), so no real
#: wafer reaches it, while invented X/Y cannot grow a map -- its memory and its snapshot
#: (at the cap 6.6 MB of JSON, 2.7 MB of CBOR) -- without bound.  Per gateway
#: (``WaferState.dies_of``): one gateway's invented X/Y in a shared wafer leave another's
#: new dies their room
DIES_PER_WAFER = 200_000
#: Values of one site's part waiting for its PartResult (which names wafer and die).
PENDING_PER_SITE = 4_096
#: (head, site) of one gateway whose values may wait in one lot for their part results at
#: once: a gateway may number its sites and heads with any int, and each new one would
#: hold its own list (STDF numbers them 0..255).  Per gateway: one gateway using them all
#: must not leave another's values in the same lot without a list
PENDING_SITES_PER_LOT = 4_096
#: sites a test keeps figures of (``sites``) per gateway, counted by the gateway that
#: brought the site first: every test delta carries them all, so a gateway sending
#: thousands of site numbers would make each delta that long; per gateway, so one that
#: does leaves the others' sites their rows
SITES_PER_TEST = 1_024
#: Distinct TEST_TXTs a test lists (``TestStats.names``): a test number a tester reuses for
#: other tests shows it; the list is bounded, every delta carries it
TEST_NAMES = 8
#: Stretches of a gateway's records applied apart from the rest (frames out of record-id
#: order) kept waiting to join their neighbours, per gateway (``Run``); over it the
#: oldest one's waiting values are dropped (counted).
WAITING_RUNS = 16
#: (lot, head, site) whose first part result a stretch remembers (``Run.heads``).
RUN_HEADS = 1_024


class Running:
    """Count, mean and sample sigma of a stream of values (Welford: no sample list)."""

    __slots__ = ("m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    def row(self) -> list[Any]:
        sigma = _sigma(self.m2, self.n)
        return [self.n, self.mean, sigma]


def _sigma(m2: float, n: int) -> float | None:
    """The standard deviation from Welford's running ``m2`` of ``n`` values.  Values near
    the largest float overflow the sums (``inf - inf``): ``m2`` is then NaN or -inf, and the
    figure is NaN (null in JSON), not a ``math.sqrt`` domain error in every snapshot."""
    if n < 2:
        return None
    variance = m2 / (n - 1)
    return math.sqrt(variance) if variance >= 0 else math.nan


def _limited(lo_limit: float | None, hi_limit: float | None) -> bool:
    """Whether a histogram's range is set by these limits: both there, in order, and
    spanning a finite range (a gateway may send an infinite limit, or limits whose span
    no float holds)."""
    return (lo_limit is not None and hi_limit is not None and hi_limit > lo_limit
            and math.isfinite((hi_limit - lo_limit) * 2))


class Histogram:
    """Exact counts in ``HIST_BINS`` equal bins over a range that widens to take any value
    (pairs of bins merge), so its size is fixed whatever the count.  The first range is set
    around the limits (a quarter of their span either side) so bins line up with them;
    with limits, values beyond twice their span outside are counted as ``below``/``above``
    rather than widening the range (an open contact's 9.9e37 would flatten the picture)."""

    __slots__ = ("above", "below", "counts", "lo", "width")

    def __init__(self) -> None:
        self.lo: float | None = None
        self.width = 0.0
        self.counts = [0] * HIST_BINS
        self.below = 0
        self.above = 0

    def add(self, value: float, lo_limit: float | None, hi_limit: float | None) -> None:
        limited = _limited(lo_limit, hi_limit)
        if limited:
            assert lo_limit is not None and hi_limit is not None
            span = hi_limit - lo_limit
            if value < lo_limit - 2 * span:
                self.below += 1
                return
            if value > hi_limit + 2 * span:
                self.above += 1
                return
        if self.lo is None:
            if limited:
                assert lo_limit is not None and hi_limit is not None
                span = hi_limit - lo_limit
                self.lo, self.width = lo_limit - span / 4, span * 1.5 / HIST_BINS
            else:
                self.width = (abs(value) * 0.1 or 1.0) / HIST_BINS * 2
                self.lo = value - self.width * HIST_BINS / 2
        # The range stays finite: a value it could only take by growing past the largest
        # float (limits or values near +-1.8e308) is counted outside it instead.
        while value < self.lo:
            if not math.isfinite(self.lo - self.width * 2 * HIST_BINS):
                self.below += 1
                return
            half = HIST_BINS // 2
            merged = [self.counts[2 * j] + self.counts[2 * j + 1] for j in range(half)]
            self.counts = [0] * half + merged
            self.lo -= self.width * HIST_BINS
            self.width *= 2
        while value >= self.lo + self.width * HIST_BINS:
            if not math.isfinite(self.lo + self.width * 2 * HIST_BINS):
                self.above += 1
                return
            half = HIST_BINS // 2
            merged = [self.counts[2 * j] + self.counts[2 * j + 1] for j in range(half)]
            self.counts = merged + [0] * half
            self.width *= 2
        self.counts[min(int((value - self.lo) / self.width), HIST_BINS - 1)] += 1

    def as_dict(self) -> dict[str, Any] | None:
        if self.lo is None and not (self.below or self.above):
            return None
        return {"lo": self.lo, "width": self.width, "counts": list(self.counts),
                "below": self.below, "above": self.above}


class TestStats:
    """Running statistics of one test in one lot (Welford's algorithm: no sample list)."""

    __test__ = False  # not a pytest class, whatever the name says

    def __init__(self, lot_id: str, test_num: int, kind: str,
                 wafer_order: WaferOrder | None = None) -> None:
        self.lot_id = lot_id
        self.test_num = test_num
        self.kind = kind
        self.topic = topics.test(lot_id, test_num)
        self.test_txt = ""
        #: the distinct TEST_TXTs its results carried, sorted (the same whatever order the
        #: frames came in; the first ``TEST_NAMES`` seen): more than one is a test number
        #: shared by other tests, whose figures are mixed in this one's
        self.names: list[str] = []
        self.units = ""
        self.lo: float | None = None
        self.hi: float | None = None
        self.executions = 0
        #: results flagged "test not executed" (TEST_FLG bit 4): not in ``executions``
        self.not_executed = 0
        self.fails = 0
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.histogram = Histogram()
        self.by_site: dict[SiteId, Running] = {}
        #: gateway -> how many of ``by_site`` it made (at most ``SITES_PER_TEST``): a site is
        #: the first gateway's to bring it; any gateway's values of it count in it
        self.sites_of: dict[str, int] = {}
        #: wafer id -> its values' running figures, the newest TEST_WAFERS wafers, in the
        #: lot's wafer order (``wafer_order``; re-sorted when it or the rows changed)
        self.by_wafer: OrderedDict[str, Running] = OrderedDict()
        self.wafer_order = wafer_order
        self._rows_at = -1  # the wafer order's version the rows are sorted for

    def name(self, test_txt: str) -> bool:
        """``test_txt`` (not empty, not ``self.test_txt``) is the test's name from now on;
        True if the test number has a second name with it (a test number shared)."""
        self.test_txt = test_txt
        names = self.names
        if test_txt in names or len(names) >= TEST_NAMES:
            return False
        names.append(test_txt)
        names.sort()
        return len(names) == 2

    def add_site_value(self, site: SiteId, value: float, gateway: str) -> bool:
        """``value`` into its site's figures; False if the site is not kept (``gateway``
        has made ``SITES_PER_TEST`` sites of this test already): the value is then in the
        test's own figures only."""
        running = self.by_site.get(site)
        if running is None:
            running = self._new_site(site, gateway)
            if running is None:
                return False
        running.add(value)
        return True

    def _new_site(self, site: SiteId, gateway: str) -> Running | None:
        made = self.sites_of.get(gateway, 0)
        if made >= SITES_PER_TEST:
            return None
        self.sites_of[gateway] = made + 1
        running = self.by_site[site] = Running()
        return running

    def add_wafer_value(self, wafer_id: str, value: float) -> None:
        running = self.by_wafer.get(wafer_id)
        if running is None:
            running = self.by_wafer[wafer_id] = Running()
            self._rows_at = -1
            while len(self.by_wafer) > TEST_WAFERS:
                self.by_wafer.popitem(last=False)
        running.add(value)

    def add_value(self, value: float) -> None:
        self.histogram.add(value, self.lo, self.hi)
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def add_values(self, flat: list[Any], gateway: str) -> int:
        """``add_value`` then ``add_site_value`` for each ``value, site`` pair of ``flat``
        (``[value, site, value, site, ...]``, every value finite, every site a ``site_key``,
        all from ``gateway``), under the current limits: the same float operations in the same
        order, so the figures are exactly those of the one-at-a-time calls, without a
        method call per value (``LiveState`` applies a frame's parametric results a test
        at a time).  Returns how many values' sites were not kept (``add_site_value``
        False)."""
        hist = self.histogram
        lo_limit, hi_limit = self.lo, self.hi
        limited = _limited(lo_limit, hi_limit)
        lo_cut = hi_cut = 0.0
        if limited:
            assert lo_limit is not None and hi_limit is not None
            span = hi_limit - lo_limit
            lo_cut, hi_cut = lo_limit - 2 * span, hi_limit + 2 * span
        h_lo, width, counts = hist.lo, hist.width, hist.counts
        top = h_lo + width * HIST_BINS if h_lo is not None else 0.0
        last = HIST_BINS - 1
        n, mean, m2, low, high = self.count, self.mean, self.m2, self.min, self.max
        by_site = self.by_site
        not_kept = 0
        it = iter(flat)
        for value, site in zip(it, it, strict=True):
            # Histogram.add: its common case (inside the range) here, the rest in it
            if limited and value < lo_cut:
                hist.below += 1
            elif limited and value > hi_cut:
                hist.above += 1
            elif h_lo is not None and h_lo <= value < top:
                counts[min(int((value - h_lo) / width), last)] += 1
            else:
                hist.add(value, lo_limit, hi_limit)
                h_lo, width, counts = hist.lo, hist.width, hist.counts
                top = h_lo + width * HIST_BINS if h_lo is not None else 0.0
            n += 1
            delta = value - mean
            mean += delta / n
            m2 += delta * (value - mean)
            if low is None or value < low:
                low = value
            if high is None or value > high:
                high = value
            running = by_site.get(site)
            if running is None:
                running = self._new_site(site, gateway)
                if running is None:
                    not_kept += 1  # (in the test's own figures only: add_site_value)
                    continue
            running.n += 1
            delta = value - running.mean
            running.mean += delta / running.n
            running.m2 += delta * (value - running.mean)
        self.count, self.mean, self.m2, self.min, self.max = n, mean, m2, low, high
        return not_kept

    def add_wafer_values(self, flat: list[Any]) -> None:
        """``add_wafer_value`` for each ``wafer_id, value`` pair of ``flat``, in order."""
        by_wafer = self.by_wafer
        current: Any = None
        running = Running()
        it = iter(flat)
        for wafer_id, value in zip(it, it, strict=True):
            if wafer_id != current:
                current = wafer_id
                got = by_wafer.get(wafer_id)
                if got is None:
                    got = by_wafer[wafer_id] = Running()
                    self._rows_at = -1
                    while len(by_wafer) > TEST_WAFERS:
                        by_wafer.popitem(last=False)
                running = got
            running.n += 1
            delta = value - running.mean
            running.mean += delta / running.n
            running.m2 += delta * (value - running.mean)

    @property
    def sigma(self) -> float | None:
        return _sigma(self.m2, self.count)

    @property
    def cpk(self) -> float | None:
        sigma = self.sigma
        if not sigma or (self.lo is None and self.hi is None):
            return None
        sides = []
        if self.hi is not None:
            sides.append((self.hi - self.mean) / (3 * sigma))
        if self.lo is not None:
            sides.append((self.mean - self.lo) / (3 * sigma))
        return min(sides)

    @property
    def cp(self) -> float | None:
        sigma = self.sigma
        if not sigma or self.lo is None or self.hi is None:
            return None
        return (self.hi - self.lo) / (6 * sigma)

    def snapshot(self) -> dict[str, Any]:
        return {
            "lot_id": self.lot_id,
            "test_num": self.test_num,
            "kind": self.kind,
            "test_txt": self.test_txt,
            "test_txts": list(self.names),
            # a test known by name: its number is test_number(name) (docs/plugins.md)
            "named": bool(self.test_txt) and test_number(self.test_txt) == self.test_num,
            "units": self.units,
            "lo_limit": self.lo,
            "hi_limit": self.hi,
            "executions": self.executions,
            "not_executed": self.not_executed,
            "fails": self.fails,
            "count": self.count,
            "mean": self.mean if self.count else None,
            "sigma": self.sigma,
            "min": self.min,
            "max": self.max,
            "cp": self.cp,
            "cpk": self.cpk,
            "histogram": self.histogram.as_dict(),
            "sites": {name: self.by_site[s].row() for s, name in site_names(self.by_site)},
            "wafers": self.wafer_rows(),
        }

    def wafer_rows(self) -> list[list[Any]]:
        """``[wafer, count, mean, sigma]`` per wafer, oldest first: in the lot's wafer order
        (``start_order``; wafers no longer live first), not in the order values came."""
        by_wafer = self.by_wafer
        order = self.wafer_order
        if order is not None and self._rows_at != order.version:
            if len(by_wafer) > 1:
                rank = order.rank
                ranked = sorted(by_wafer.items(), key=lambda kv: (rank.get(kv[0], -1), kv[0]))
                by_wafer.clear()
                by_wafer.update(ranked)
            self._rows_at = order.version
        return [[w, *r.row()] for w, r in by_wafer.items()]


class LotState:
    def __init__(self, lot_id: str) -> None:
        self.lot_id = lot_id
        self.topic = topics.lot(lot_id)
        self.info: dict[str, Any] = {
            "part_type": "", "node_name": "", "tester_type": "", "job_name": ""
        }
        self.status = "open"
        self.started: float | None = None
        self.ended: float | None = None
        #: the start times of its passes (MIRs): a lot tested again under its id after its
        #: MRR is open again (``Passes``)
        self.passes = Passes()
        #: None: its figures are of every pass; else the start of the pass they count
        #: from -- a lot back in memory after it left (``LiveState._reopen_lot``): the
        #: history store merges them with the archive of the passes before
        self.counts_from: float | None = None
        self.gateways: set[str] = set()
        self.wafers: dict[str, WaferState] = {}  # the live ones, in start order
        self.wafer_order = WaferOrder()  # the same order, for the lot's tests
        #: wafers that left memory for the store: a late record for one is not applied
        #: (it would start the wafer afresh and overwrite its archive)
        self.archived_wafers: set[str] = set()
        #: of those, the ones a retest under their wafer id may bring back (``WaferRest``),
        #: oldest first, at most ``max_wafers_per_lot``
        self.wafer_rests: dict[str, WaferRest] = {}
        self.tests: dict[int, TestStats] = {}
        #: gateway -> tests it made (each at most ``max_tests_per_lot``): one gateway's
        #: invented test numbers leave another's new tests their room
        self.tests_of: dict[str, int] = {}
        #: gateway -> (head, site) -> (test, value) of the part under test: its PartResult
        #: (after its tests, as in STDF) names the wafer and die they belong to.  By
        #: gateway: each has its own cap (``PENDING_SITES_PER_LOT``), and a gateway's frame
        #: that switches stretch moves its own lists in one step, never looking at
        #: another's (``LiveState._switch_run``)
        self.pending_of: dict[str, dict[tuple[int, int], list[tuple[TestStats, float]]]] = {}
        self.tally = Tally()
        self.part_times: deque[float] = deque(maxlen=_UPH_WINDOW)
        self.test_time_sum = 0
        self.test_time_n = 0
        self.reported_hard: dict[str, int] = {}
        self.reported_soft: dict[str, int] = {}
        self.reported_counts: dict[str, Any] = {}
        self.updated = 0.0

    @property
    def pending(self) -> dict[tuple[str, int, int], list[tuple[TestStats, float]]]:
        """Every (gateway, head, site)'s waiting values, flat (a new dict: for checks and
        reports, not for the apply)."""
        return {(g, h, s): values for g, mine in self.pending_of.items()
                for (h, s), values in mine.items()}

    def order_wafers(self) -> None:
        """Put ``wafers`` back in start order (``start_order``) after a wafer was made,
        left memory or learned its start: a few times per wafer, never per record."""
        wafers = self.wafers
        ranked = sorted(wafers.values(), key=start_order)
        ids = [w.wafer_id for w in ranked]
        if ids != list(wafers):
            wafers.clear()
            wafers.update((w.wafer_id, w) for w in ranked)
        self.wafer_order.set(ids)

    @property
    def units_per_hour(self) -> float | None:
        if len(self.part_times) < 2:
            return None
        span = max(self.part_times) - min(self.part_times)
        return (len(self.part_times) - 1) * 3600.0 / span if span > 0 else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "lot_id": self.lot_id,
            **self.info,
            "status": self.status,
            "started": self.started,
            "ended": self.ended,
            **self.passes.as_dict(),
            "gateways": sorted(self.gateways),
            # parts without a wafer id (final test) are counted, but are no wafer
            "wafers": [w for w in self.wafers if w],
            "wafer_count": len(self.wafers) + len(self.archived_wafers) - (
                "" in self.wafers) - ("" in self.archived_wafers),
            "archived_wafers": len(self.archived_wafers) - ("" in self.archived_wafers),
            **self.tally.as_dict(),
            "units_per_hour": self.units_per_hour,
            "test_time_ms": self.test_time_sum / self.test_time_n if self.test_time_n else None,
            "tests": sorted(self.tests),
            "reported": {
                "hard_bins": dict(self.reported_hard),
                "soft_bins": dict(self.reported_soft),
                **self.reported_counts,
            },
            "updated": self.updated,
            **({} if self.counts_from is None else {"counts_from": self.counts_from}),
        }


class SensorState:
    def __init__(self, channel: str, history: int, gateway: str = "") -> None:
        self.channel = channel
        #: the gateway whose record made it: at ``max_sensors`` a new channel pushes out
        #: one of the gateway holding the most (``LiveState._new_sensor``)
        self.gateway = gateway
        self.topic = topics.sensor(channel)
        self.unit = ""
        self.latest: dict[str, Any] | None = None
        self.history: deque[list[Any]] = deque(maxlen=history)
        self.source = ""

    def add(self, rec: SensorWindow | SensorReading) -> list[Any]:
        if isinstance(rec, SensorWindow):
            self.latest = {
                "ts": rec.ts, "t0": rec.t0, "t1": rec.t1, "last": rec.last, "min": rec.min,
                "max": rec.max, "mean": rec.mean, "count": rec.count,
            }
            point = [rec.t1, rec.last, rec.min, rec.max, rec.mean]
        else:
            self.latest = {
                "ts": rec.ts, "t0": rec.ts, "t1": rec.ts, "last": rec.value, "min": rec.value,
                "max": rec.value, "mean": rec.value, "count": 1,
            }
            point = [rec.ts, rec.value, rec.value, rec.value, rec.value]
        self.unit = rec.unit or self.unit
        self.source = rec.source
        self.history.append(point)
        return point

    def snapshot(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "unit": self.unit,
            "source": self.source,
            "latest": self.latest,
            "history": list(self.history),
        }


#: a part result a stretch starts with, for its (lot, head, site): wafer id, rid, X, Y
Head = tuple[str, int, int | None, int | None]
#: (lot id, head, site)
SiteKey = tuple[str, int, int]
#: what a stretch's sites owe, or a gateway's values waiting in a lot: (head, site) -> the
#: values (test, value), in rid order
Owed = dict[tuple[int, int], list[tuple[TestStats, float]]]


class Run:
    """A stretch of one gateway's records applied contiguously (rids ``lo..hi``).

    A part's results are the records of its (head, site) between its previous part
    result and its own, by rid.  Frames applied in rid order make one stretch and the
    values wait in ``LotState.pending`` for the next part result of their site, as in
    STDF.  A frame that does not follow the last one (after an outage the gateway sends
    its newest frames first) starts another stretch; the one it left waits in
    ``GatewayState.waiting`` with what its ends still owe: ``owed``, per lot and (head,
    site), the values after its last part result there (they belong to a part result in
    a stretch to the right; each lot's are the gateway's ``LotState.pending_of`` lists,
    moved whole), and ``heads``, per (lot, head, site), its first part result there
    (values at the end of a stretch to the left belong to it).  When two stretches meet,
    the left one's owed values go to the right one's heads (``LiveState._join_right``).
    While ``lo`` is 1 nothing can come from the left, so no heads are kept.
    """

    __slots__ = ("heads", "hi", "lo", "owed")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi
        self.heads: dict[SiteKey, Head] = {}
        #: lot id -> (head, site) -> values
        self.owed: dict[str, Owed] = {}

    @property
    def tails(self) -> dict[SiteKey, list[tuple[TestStats, float]]]:
        """``owed`` flat, by (lot, head, site) (a new dict: for checks and reports)."""
        return {(lot_id, h, s): values for lot_id, owed in self.owed.items()
                for (h, s), values in owed.items()}


def run_row(run: Run | None) -> list[Any] | None:
    """A stretch as plain data for a checkpoint (a value by its test's number)."""
    if run is None:
        return None
    return [run.lo, run.hi, [[*k, *h] for k, h in run.heads.items()],
            [[lot_id, h, s, [[stats.test_num, v] for stats, v in values]]
             for lot_id, owed in run.owed.items() for (h, s), values in owed.items()]]


def run_from(row: list[Any] | None, lots: dict[str, LotState]) -> Run | None:
    """``run_row`` back, its values' tests looked up in ``lots`` (a lot gone: not kept)."""
    if row is None:
        return None
    lo, hi, heads, tails = row
    run = Run(lo, hi)
    for lot_id, head, site, wafer_id, rid, x, y in heads:
        run.heads[(lot_id, head, site)] = (wafer_id, rid, x, y)
    for lot_id, head, site, values in tails:
        lot = lots.get(lot_id)
        if lot is not None:
            run.owed.setdefault(lot_id, {})[(head, site)] = [(lot.tests[num], v)
                                                             for num, v in values]
    return run


class GatewayState:
    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.topic = topics.gateway(gateway_id)
        self.online = False
        self.last_seen: float | None = None
        self.connected_at: float | None = None
        self.disconnected_at: float | None = None
        self.records = 0
        self.frames = 0
        self.last_rid: int | None = None
        self.per_second: dict[int, int] = {}
        self.rate_now = 0.0
        self.events: deque[dict[str, Any]] = deque(maxlen=topics.GATEWAY_EVENTS)
        #: the stretch of rids the frames applied last extend (None: no frame yet); what
        #: its sites owe waits in its lots' ``pending_of``
        self.run: Run | None = None
        #: ids of the lots where that is (a lot in it may have left memory since): a frame
        #: that switches stretch moves those lists, and only those
        self.pending_lots: set[str] = set()
        #: other stretches, waiting to meet their neighbours (``LiveState.max_waiting_runs``)
        self.waiting: list[Run] = []

    def count(self, n: int, now: float) -> None:
        sec = int(now)
        if now < self.rate_now - 1:
            # The wall clock was set back (NTP): the seconds counted ahead of it would stay in
            # the window, and the rate doubled, for as long as the step.
            self.per_second = {s: c for s, c in self.per_second.items() if s <= sec}
        self.per_second[sec] = self.per_second.get(sec, 0) + n
        if len(self.per_second) > RATE_WINDOW_S + 2:
            for old in [s for s in self.per_second if s <= sec - RATE_WINDOW_S]:
                del self.per_second[old]
        self.rate_now = now

    def records_per_s(self, now: float | None = None) -> float:
        now = self.rate_now if now is None else now
        low = now - RATE_WINDOW_S
        total = sum(n for s, n in self.per_second.items() if s > low)
        return total / RATE_WINDOW_S

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        return {
            "gateway_id": self.gateway_id,
            "online": self.online,
            "last_seen": self.last_seen,
            "connected_at": self.connected_at,
            "disconnected_at": self.disconnected_at,
            "records": self.records,
            "frames": self.frames,
            "last_rid": self.last_rid,
            "records_per_s": self.records_per_s(now),
            # newest first, as topics.GATEWAY_EVENTS and the "prepend" merge rule say: a
            # client (or a cluster node's mirror) prepends each new event to this list
            "events": list(reversed(self.events)),
        }


def lot_archive(lot: LotState) -> dict[str, Any]:
    """Everything the history API serves about a lot, as plain JSON-able data: its summary,
    every wafer's map and counts, every test's statistics."""
    return {
        "lot": lot.snapshot(),
        "wafers": {w.wafer_id: w.snapshot() for w in lot.wafers.values()},
        "tests": {str(t.test_num): t.snapshot() for t in lot.tests.values()},
    }
