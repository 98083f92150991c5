"""Part and bin statistics of an STDF stream, derived from its PRRs (retests counted once).

A PRR whose PART_FLG has bit 0 set supersedes the earlier part with the same PART_ID;
bit 1 set, the earlier part at the same X/Y (on the same wafer) -- within its lot (its
MIR's LOT_ID): in a file of several lots, another lot's part of that id or place is
another part.  Only the final result
of a part counts towards parts, good parts and bins, as the tester's own final summary
does.  The file's own summaries (HBR/SBR/PCR; HEAD_NUM 255 means all sites) are
collected alongside, so the two can be compared.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from .flags import part_passed
from .spec import U4_MISSING

ALL_SITES = 255


def _summary_key(fields: dict[str, Any]) -> tuple[int, int]:
    """(head, site) of a summary record; HEAD_NUM 255 (all sites) ignores SITE_NUM."""
    head = fields.get("HEAD_NUM", ALL_SITES)
    return (ALL_SITES, ALL_SITES) if head == ALL_SITES else (head, fields.get("SITE_NUM", 0))


class _Part:
    """A part's final result.  A plain class: ``dataclasses`` would add its import (and
    ``inspect``'s) to every ``edgegw stdf stats``."""

    __slots__ = ("good", "hard_bin", "head", "lot", "site", "soft_bin")

    def __init__(self, lot: str, head: int, site: int, hard_bin: int, soft_bin: int | None,
                 good: bool) -> None:
        self.lot, self.head, self.site, self.hard_bin, self.soft_bin, self.good = (
            lot, head, site, hard_bin, soft_bin, good)


class StdfStats:
    """Feed records with :meth:`add`; read the figures with :meth:`as_dict`.  Records of
    types other than :attr:`READS` are only counted: a reader may count them without
    decoding them (``records[name] += n``)."""

    #: the record types whose fields the figures come from
    READS: ClassVar[frozenset[str]] = frozenset({"PRR", "WIR", "HBR", "SBR", "PCR", "MIR"})
    #: the fields a summary record cannot do without: one cut before them (REC_LEN too
    #: short) names no bin or count, so it is counted in ``cut`` and adds nothing -- as
    #: the gateway's mapping skips it (``RecordMapper.cut_short``)
    MUST_HAVE: ClassVar[dict[str, tuple[str, ...]]] = {
        "HBR": ("HBIN_NUM", "HBIN_CNT"), "SBR": ("SBIN_NUM", "SBIN_CNT"), "PCR": ("PART_CNT",)}

    def __init__(self) -> None:
        self.records: Counter[str] = Counter()
        #: records cut before a field they must have (``MUST_HAVE``), by type
        self.cut: Counter[str] = Counter()
        self.tested = 0  # PRRs seen, retests included
        self.retests = 0  # PRRs that superseded an earlier result found in this stream
        self._parts: list[_Part] = []
        self._by_id: dict[tuple[str, str, str], int] = {}
        self._by_xy: dict[tuple[str, str, int, int], int] = {}
        self._lot = ""
        self._wafer = ""
        #: the file's own summaries: (head, site) -> bin -> count; (255, 255) is all sites
        self.file_hbr: dict[tuple[int, int], dict[int, int]] = {}
        self.file_sbr: dict[tuple[int, int], dict[int, int]] = {}
        self.file_pcr: dict[tuple[int, int], dict[str, int]] = {}

    def add(self, name: str, fields: dict[str, Any]) -> None:
        self.records[name] += 1
        must = self.MUST_HAVE.get(name)
        if must is not None and not all(k in fields for k in must):
            self.cut[name] += 1
            return
        if name == "PRR":
            self._prr(fields)
        elif name == "WIR":
            self._wafer = fields.get("WAFER_ID", "")
        elif name == "MIR":  # a lot (of a file holding several): its parts are its own
            lot = fields.get("LOT_ID", "")
            if lot != self._lot:
                self._lot, self._wafer = lot, ""
        elif name == "HBR":
            key = _summary_key(fields)
            bins = self.file_hbr.setdefault(key, {})
            bins[fields["HBIN_NUM"]] = bins.get(fields["HBIN_NUM"], 0) + fields["HBIN_CNT"]
        elif name == "SBR":
            key = _summary_key(fields)
            bins = self.file_sbr.setdefault(key, {})
            bins[fields["SBIN_NUM"]] = bins.get(fields["SBIN_NUM"], 0) + fields["SBIN_CNT"]
        elif name == "PCR":
            # summed as the HBR/SBR counts are (a file of several lots: each lot's PCR
            # counts its own parts).  A count one of them leaves out (the spec's missing
            # value, or the record ending before it) is unknown for the sum: missing
            counts = {k: v for k, v in fields.items() if k not in ("HEAD_NUM", "SITE_NUM")}
            had = self.file_pcr.setdefault(_summary_key(fields), counts)
            if had is not counts:
                for k in [*had, *(k for k in counts if k not in had)]:
                    a, b = had.get(k, U4_MISSING), counts.get(k, U4_MISSING)
                    had[k] = U4_MISSING if U4_MISSING in (a, b) else a + b

    def _prr(self, f: dict[str, Any]) -> None:
        self.tested += 1
        flags = f.get("PART_FLG", 0)
        soft = f.get("SOFT_BIN", 65535)
        part = _Part(self._lot, f.get("HEAD_NUM", 1), f.get("SITE_NUM", 1), f.get("HARD_BIN", 0),
                     None if soft == 65535 else soft, part_passed(flags) is True)
        part_id = f.get("PART_ID", "")
        x, y = f.get("X_COORD", -32768), f.get("Y_COORD", -32768)
        id_key = (self._lot, self._wafer, part_id)
        xy_key = (self._lot, self._wafer, x, y)
        index = None
        if flags & 0x01 and part_id:
            index = self._by_id.get(id_key)
        elif flags & 0x02 and x != -32768 and y != -32768:
            index = self._by_xy.get(xy_key)
        if index is None:
            index = len(self._parts)
            self._parts.append(part)
        else:
            self.retests += 1
            self._parts[index] = part
        if part_id:
            self._by_id[id_key] = index
        if x != -32768 and y != -32768:
            self._by_xy[xy_key] = index

    def derived(self) -> dict[str, Any]:
        """Figures from the PRRs: parts, good, hard/soft bin counts, in all, per site and
        per lot (its MIR's LOT_ID, in the order the lots first appear: a file of several
        lots, or a lot tested again and appended, which is the same lot)."""
        def summary(parts: list[_Part]) -> dict[str, Any]:
            hard = Counter(p.hard_bin for p in parts)
            soft = Counter(p.soft_bin for p in parts if p.soft_bin is not None)
            return {
                "parts": len(parts),
                "good": sum(p.good for p in parts),
                "hard_bins": dict(sorted(hard.items())),
                "soft_bins": dict(sorted(soft.items())),
            }

        out = summary(self._parts)
        sites: dict[tuple[int, int], list[_Part]] = {}
        for p in self._parts:
            sites.setdefault((p.head, p.site), []).append(p)
        out["sites"] = {key: summary(parts) for key, parts in sorted(sites.items())}
        lots: dict[str, list[_Part]] = {}
        for p in self._parts:
            lots.setdefault(p.lot, []).append(p)
        out["lots"] = [{"lot_id": lot, **summary(parts)} for lot, parts in lots.items()]
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: keys are strings; a site is "HEAD/SITE"."""
        derived = self.derived()

        def jbins(bins: dict[int, int]) -> dict[str, int]:
            return {str(k): v for k, v in bins.items()}

        def jsite(s: dict[str, Any]) -> dict[str, Any]:
            return {**s, "hard_bins": jbins(s["hard_bins"]), "soft_bins": jbins(s["soft_bins"])}

        def jsummary(d: dict[tuple[int, int], dict[Any, int]]) -> dict[str, Any]:
            return {("all" if h == ALL_SITES else f"{h}/{s}"): {str(k): v for k, v in b.items()}
                    for (h, s), b in sorted(d.items())}

        return {
            "records": dict(sorted(self.records.items())),
            "tested": self.tested,
            "retests": self.retests,
            "parts": derived["parts"],
            "good": derived["good"],
            "hard_bins": jbins(derived["hard_bins"]),
            "soft_bins": jbins(derived["soft_bins"]),
            "sites": {f"{h}/{s}": jsite(v) for (h, s), v in derived["sites"].items()},
            "lots": [jsite(lot) for lot in derived["lots"]],
            "file_summary": {
                "hbr": jsummary(self.file_hbr),
                "sbr": jsummary(self.file_sbr),
                "pcr": jsummary(self.file_pcr),
            },
        }
