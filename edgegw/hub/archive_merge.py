"""Archives of the passes of a lot (wafer) tested again after it left memory, merged.

A lot that left the live state's memory and is tested again under its lot id comes back as
its next pass, its figures counted from that pass's start (``counts_from`` in its archive
and its wafers', docs/live-topics.md "A lot tested again under its lot id").  Its archive
then holds the passes from ``counts_from`` on, the stored one those before: neither
replaces the other (the stored one is the only place the first pass's figures live once
its frames are pruned), they merge.  Each die keeps its latest result (a wafer's dies are
keyed by X/Y, as live), every part result is counted, and a die the later pass tested
again is a retest:

* a wafer: its die map the earlier one's overlaid with the later one's; its counts
  (``die_count``, ``good``, ``yield``, bins, ``sites``) the two passes' less the dies the
  later pass replaced; ``parts`` and the tested bins the two passes'; ``retests`` the two
  passes' plus the dies replaced;
* a lot: the same sums over the lot, less what every wafer merge replaced.  A wafer that
  left memory while the later pass was live merges into its stored archive then, and its
  correction goes into the lot's stored figures at once (``merge_wafer_archive``); the
  wafers still live when the lot left merge with the lot's archive
  (``merge_lot_archive``).  Each correction is applied once: a pass already in a stored
  archive (its latest start at or after ``counts_from``) is not merged again -- a replay
  after a restart archives the same pass again, and that changes nothing.

Parts without X/Y (final test: no die map) are counted in every pass and cannot be told
apart across archives: a lot tested again as packaged parts counts both passes' parts.
A test's statistics are those of the latest pass that ran it.  Pure functions over plain
data; the stores (``HistoryStore``, the cluster's PostgreSQL store) read and write the
rows through ``ArchiveRows``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

#: counts summed over the passes (dicts: by bin or site)
_SUMMED = ("die_count", "parts", "retests")
_BINS = ("hard_bins", "soft_bins", "hard_bins_tested", "soft_bins_tested")


class ArchiveRows(Protocol):
    """A store's archived lots and wafers, read and written in one transaction."""

    def lot(self, lot_id: str) -> dict[str, Any] | None: ...
    def wafer(self, lot_id: str, wafer_id: str) -> dict[str, Any] | None: ...
    def wafer_ids(self, lot_id: str) -> set[str]: ...
    def put_lot(self, lot_id: str, archive: dict[str, Any]) -> None: ...
    def put_wafer(self, lot_id: str, wafer_id: str, snap: dict[str, Any]) -> None: ...


def latest_start(snap: dict[str, Any]) -> float | None:
    """The start of the latest pass a lot's (wafer's) figures hold."""
    reopened = snap.get("reopened_at")
    return reopened if reopened is not None else snap.get("started")


def holds(stored: dict[str, Any], later: dict[str, Any]) -> bool:
    """Whether ``stored`` already holds the passes ``later`` counts from (or ``later``
    counts every pass): then ``later`` is not merged into it."""
    since = later.get("counts_from")
    if since is None:
        return True
    latest = latest_start(stored)
    return latest is not None and latest >= since


def _site_name(row: list[Any], sites: dict[str, Any]) -> str:
    # a die row's site as the snapshot names it (``site_names``): the plain number while
    # every site is of one head, else "HEAD/SITE"
    head = row[6] if len(row) > 6 else 1
    plain = str(row[5])
    return plain if plain in sites and head == 1 else f"{head}/{row[5]}"


def _ratio(num: int | None, den: int) -> float | None:
    return num / den if num is not None and den else None


class Correction:
    """What the dies a later pass tested again took out of the earlier pass's counts."""

    def __init__(self) -> None:
        self.dies = 0
        self.good = 0
        self.hard: dict[str, int] = {}
        self.soft: dict[str, int] = {}
        self.sites: dict[str, list[int]] = {}

    def replaced(self, row: list[Any], sites: dict[str, Any]) -> None:
        """``row`` (an earlier die result, ``[x, y, hard, soft, passed, site(, head)]``)
        replaced by a later one."""
        self.dies += 1
        good = row[4] is True
        self.good += good
        for counts, value in ((self.hard, row[2]), (self.soft, row[3])):
            if value is not None:
                counts[str(value)] = counts.get(str(value), 0) + 1
        site = self.sites.setdefault(_site_name(row, sites), [0, 0])
        site[0] += 1
        site[1] += good

    def add(self, other: Correction) -> None:
        self.dies += other.dies
        self.good += other.good
        for mine, theirs in ((self.hard, other.hard), (self.soft, other.soft)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
        for name, (dies, good) in other.sites.items():
            site = self.sites.setdefault(name, [0, 0])
            site[0] += dies
            site[1] += good

    def as_dict(self) -> dict[str, Any]:
        return {"dies": self.dies, "good": self.good, "hard": self.hard, "soft": self.soft,
                "sites": self.sites}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Correction:
        c = cls()
        c.dies, c.good = d["dies"], d["good"]
        c.hard, c.soft = dict(d["hard"]), dict(d["soft"])
        c.sites = {k: list(v) for k, v in d["sites"].items()}
        return c


def _sum_counts(base: dict[str, Any], later: dict[str, Any], fix: Correction,
                out: dict[str, Any]) -> None:
    """The counts of ``base`` and ``later`` added, less ``fix``, into ``out``."""
    for key in _SUMMED:
        out[key] = (base.get(key) or 0) + (later.get(key) or 0)
    out["die_count"] -= fix.dies
    out["retests"] += fix.dies
    goods = [g for g in (base.get("good"), later.get("good")) if g is not None]
    out["good"] = sum(goods) - fix.good if goods else None
    for key in _BINS:
        counts = dict(base.get(key) or {})
        for k, n in (later.get(key) or {}).items():
            counts[k] = counts.get(k, 0) + n
        for k, n in (fix.hard if key == "hard_bins" else fix.soft if key == "soft_bins"
                     else {}).items():
            counts[k] = counts.get(k, 0) - n
        out[key] = {k: n for k, n in sorted(counts.items(), key=lambda kv: _num(kv[0]))
                    if n}
    sites: dict[str, list[int]] = {}
    for snap in (base, later):
        for name, s in (snap.get("sites") or {}).items():
            site = sites.setdefault(name, [0, 0])
            site[0] += s.get("dies") or 0
            site[1] += s.get("good") or 0
    for name, (dies, good) in fix.sites.items():
        site = sites.setdefault(name, [0, 0])
        site[0] -= dies
        site[1] -= good
    out["sites"] = {name: {"dies": d, "good": g, "yield": _ratio(g, d)}
                    for name, (d, g) in sorted(sites.items(), key=lambda kv: _site_key(kv[0]))
                    if d}
    out["yield"] = _ratio(out["good"], out["die_count"])
    # applicable when either pass could say it
    out["not_applicable"] = [n for n in later.get("not_applicable") or ()
                             if not base.get("die_count") or n in (
                                 base.get("not_applicable") or ())]


def _num(key: str) -> Any:
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)


def _site_key(name: str) -> Any:
    return tuple(_num(p) for p in name.split("/"))


def _passes(base: dict[str, Any], later: dict[str, Any], out: dict[str, Any]) -> None:
    """``started``, ``starts``, ``reopened_at`` of the two merged: ``later``'s carry the
    earlier passes when the live state knew them (a lot or wafer back in memory keeps its
    passes), else they are added here."""
    base_latest, later_first = latest_start(base), later.get("started")
    if (later_first is not None and base_latest is not None and later_first > base_latest):
        out["started"] = base.get("started")
        out["starts"] = (base.get("starts") or 1) + (later.get("starts") or 1)
        out["reopened_at"] = latest_start(later)


def merge_wafer(base: dict[str, Any], later: dict[str, Any]
                ) -> tuple[dict[str, Any], Correction]:
    """A wafer's snapshot of the passes from ``later["counts_from"]`` on merged into the
    one of the passes before (``base``); and what the merge took out of the earlier
    counts (for its lot's)."""
    fix = Correction()
    sites = base.get("sites") or {}
    dies = {(r[0], r[1]): r for r in base.get("dies") or ()}
    for row in later.get("dies") or ():
        old = dies.pop((row[0], row[1]), None)
        if old is not None:
            fix.replaced(old, sites)
        dies[(row[0], row[1])] = row
    out = dict(later)
    out.pop("counts_from", None)
    out["dies"] = list(dies.values())
    _sum_counts(base, later, fix, out)
    _passes(base, later, out)
    return out, fix


def _without_since(snap: dict[str, Any]) -> dict[str, Any]:
    out = dict(snap)
    out.pop("counts_from", None)
    return out


def merge_wafer_archive(rows: ArchiveRows, lot_id: str, wafer_id: str,
                        snap: dict[str, Any]) -> bool:
    """A wafer that left memory with ``counts_from`` (of a lot back in memory): merged
    into its stored archive -- as the history API reads it: in its lot's archive, else its
    own row -- and the lot's stored figures corrected for the dies it tested again.
    False: the stored one holds its pass already (nothing written)."""
    lot = rows.lot(lot_id)
    lot_wafers: dict[str, Any] = lot["wafers"] if lot is not None else {}
    in_lot = wafer_id in lot_wafers
    base = lot_wafers[wafer_id] if in_lot else rows.wafer(lot_id, wafer_id)
    if base is None:
        rows.put_wafer(lot_id, wafer_id, _without_since(snap))
        return True
    if holds(base, snap):
        return False
    merged, fix = merge_wafer(base, snap)
    corrected = lot is not None and not holds(lot["lot"], snap)
    if corrected:
        # the lot's row is of the passes before: the later pass's figures join it when
        # the lot leaves memory again; what this wafer's retests took out, now
        assert lot is not None
        pending = Correction.from_dict(lot.get("corrections") or Correction().as_dict())
        pending.add(fix)
        lot["corrections"] = pending.as_dict()
    if in_lot:
        assert lot is not None
        lot["wafers"][wafer_id] = merged
    if in_lot or corrected:
        assert lot is not None
        rows.put_lot(lot_id, lot)
    if not in_lot:
        rows.put_wafer(lot_id, wafer_id, merged)
    return True


def archive_key(kind: str, data: dict[str, Any]) -> tuple[float, bool]:
    """Where an archive (``kind`` "lot" or "wafer") goes in a batch written at once, as
    far as merging needs the order they were made in: by the pass they count from (every
    pass first), and within a pass a lot's wafers before the lot (a wafer leaves memory
    before its lot does).  A writer gets lots and wafers in two lists; a merge of a later
    pass must find the archives of the passes before it, and a wafer's correction its
    lot's row."""
    since = (data["lot"] if kind == "lot" else data).get("counts_from")
    return (-math.inf if since is None else since, kind == "lot")


def archive_order(lots: list[tuple[str, dict[str, Any]]],
                  wafers: list[tuple[str, str, dict[str, Any]]]
                  ) -> list[tuple[str, str, str, dict[str, Any]]]:
    """A batch of archives as ``(kind, lot_id, wafer_id, data)``, in ``archive_key``
    order."""
    out = [("lot", lot_id, "", a) for lot_id, a in lots]
    out.extend(("wafer", lot_id, wafer_id, snap) for lot_id, wafer_id, snap in wafers)
    return sorted(out, key=lambda item: archive_key(item[0], item[3]))


def merge_lot_archive(rows: ArchiveRows, lot_id: str, archive: dict[str, Any]) -> bool:
    """A lot archive with ``counts_from`` (a lot back in memory, evicted again): merged
    into the stored one.  False: the stored one holds its pass already."""
    stored = rows.lot(lot_id)
    later = archive["lot"]
    if stored is None:
        rows.put_lot(lot_id, {**archive, "lot": _without_since(later),
                              "wafers": {w: _without_since(s)
                                         for w, s in archive["wafers"].items()}})
        return True
    if holds(stored["lot"], later):
        return False
    fix = Correction.from_dict(stored.get("corrections") or Correction().as_dict())
    wafers = dict(stored["wafers"])
    for wafer_id, snap in archive["wafers"].items():
        # (as the history API reads it: the lot's archive's first, else its own row)
        base = wafers.get(wafer_id) or rows.wafer(lot_id, wafer_id)
        if base is None:
            wafers[wafer_id] = _without_since(snap)
        elif holds(base, snap):
            wafers[wafer_id] = base
        else:
            wafers[wafer_id], wafer_fix = merge_wafer(base, snap)
            fix.add(wafer_fix)
    base_lot = stored["lot"]
    lot = _without_since(later)
    _sum_counts(base_lot, later, fix, lot)
    _passes(base_lot, later, lot)
    lot["gateways"] = sorted(set(base_lot.get("gateways") or ()) | set(later.get("gateways")
                                                                     or ()))
    lot["tests"] = sorted(set(base_lot.get("tests") or ()) | set(later.get("tests") or ()))
    known = (rows.wafer_ids(lot_id) | set(wafers)) - {""}
    lot["wafer_count"] = len(known)
    lot["archived_wafers"] = len(known - set(later.get("wafers") or ()))
    rows.put_lot(lot_id, {"lot": lot, "wafers": wafers,
                          "tests": {**stored.get("tests", {}), **archive.get("tests", {})}})
    return True


def apply_archive(rows: ArchiveRows, kind: str, lot_id: str, wafer_id: str,
                  data: dict[str, Any]) -> bool:
    """One archive of an ``archive_order`` batch written into ``rows`` as the stores write
    it: a later pass merged, a first pass replacing the stored one only if at least as
    full.  False: not written (the stored one is fuller, or holds its pass already).  The
    history API applies archives held in memory this way over the stored ones."""
    if kind == "wafer":
        if data.get("counts_from") is not None:
            return merge_wafer_archive(rows, lot_id, wafer_id, data)
        stored = rows.wafer(lot_id, wafer_id)
        if stored is not None and (data.get("parts") or 0) < (stored.get("parts") or 0):
            return False
        rows.put_wafer(lot_id, wafer_id, data)
        return True
    if data["lot"].get("counts_from") is not None:
        return merge_lot_archive(rows, lot_id, data)
    stored_lot = rows.lot(lot_id)
    if stored_lot is not None and ((data["lot"].get("parts") or 0)
                                   < (stored_lot["lot"].get("parts") or 0)):
        return False
    rows.put_lot(lot_id, data)
    return True


__all__ = ["ArchiveRows", "Correction", "apply_archive", "archive_key", "archive_order", "holds",
           "latest_start", "merge_lot_archive", "merge_wafer", "merge_wafer_archive"]
