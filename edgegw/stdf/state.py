"""Per-file STDF state a live reader needs: PTR/MPR defaults and the open part per site.

**Default state.**  The first PTR (or MPR) of a test number carries the semi-static
information about the test: scales, limits, units, formats, spec limits.  Later records
of that test may omit those fields (REC_LEN stops early) or flag them invalid in
OPT_FLAG, and then the default applies.  Some testers write that first full record once
per site, with per-site limits; so defaults are kept per (test number, head, site) and
per test number, and the per-site one wins.

OPT_FLAG bits (PTR/MPR): 0 RES_SCAL invalid; 2/3 no low/high spec limit; 4/5 LO/HI
limit (and its scale) invalid, use the default; 6/7 there is no LO/HI limit at all.

**Open parts.**  PTR/MPR/FTR results belong to the open PIR of the same HEAD/SITE; sites
interleave (PIR s0, PIR s1, PTR s0, PTR s1, ..., PRR s0, PRR s1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the flag bits live in .flags (it imports nothing: for readers that keep no state);
# the functions stay importable from here, where they were defined first
from .flags import (
    HI_LIMIT_INVALID,
    LO_LIMIT_INVALID,
    NO_HI_LIMIT,
    NO_HI_SPEC,
    NO_LO_LIMIT,
    NO_LO_SPEC,
    RES_SCAL_INVALID,
)
from .flags import part_passed as part_passed
from .flags import part_supersedes as part_supersedes
from .flags import result_passed as result_passed
from .flags import test_passed as test_passed

#: fields after OPT_FLAG that the first record of a test number establishes
_SCALAR_DEFAULTS = ("UNITS", "C_RESFMT", "C_LLMFMT", "C_HLMFMT")
_MPR_DEFAULTS = ("START_IN", "INCR_IN", "RTN_INDX", "UNITS_IN")
#: a PTR's field names in row order (edgegw.stdf.decoder.FIELD_NAMES["PTR"])
_PTR_FIELDS = ("TEST_NUM", "HEAD_NUM", "SITE_NUM", "TEST_FLG", "PARM_FLG", "RESULT",
               "TEST_TXT", "ALARM_ID", "OPT_FLAG", "RES_SCAL", "LLM_SCAL", "HLM_SCAL",
               "LO_LIMIT", "HI_LIMIT", "UNITS", "C_RESFMT", "C_LLMFMT", "C_HLMFMT",
               "LO_SPEC", "HI_SPEC")

@dataclass
class OpenPart:
    """A part between its PIR and its PRR."""

    head: int
    site: int
    #: stream offset of the PIR (None when results arrived without one)
    pir_offset: int | None
    #: ordinal of the part in the file (0, 1, ...)
    index: int
    results: int = 0
    failed: int = 0


class TestState:
    """Resolves PTR/MPR defaults and tracks open PIRs per (head, site) for one file."""

    __test__ = False  # not a pytest test class despite the name
    #: ``ptr_limits`` plans kept at most (then forgotten and made again)
    PTR_PLANS = 4096

    def __init__(self) -> None:
        # (keys as the records have them: None where a field is missing)
        self._by_test: dict[int | None, dict[str, Any]] = {}
        self._by_site: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
        self._open: dict[tuple[int, int], OpenPart] = {}
        self.parts_started = 0
        #: results (PTR/MPR/FTR) with no open PIR on their head/site
        self.orphan_results = 0
        #: PIRs that opened a head/site whose previous part had no PRR
        self.unclosed_parts = 0
        #: ``ptr_limits`` memo: (TEST_NUM, HEAD_NUM, SITE_NUM, the row from OPT_FLAG on) ->
        #: where LO_LIMIT, HI_LIMIT, UNITS come from, and the defaults it was made with
        self._ptr_plans: dict[tuple[Any, ...], tuple[Any, ...]] | None = {}
        self._plan_hits = 0

    # ---------------------------------------------------------------- default state
    def _learn(self, fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """Take what this record says validly about its test; return its own valid values."""
        own: dict[str, Any] = {}
        opt = fields.get("OPT_FLAG")
        if opt is not None:
            if "RES_SCAL" in fields and not opt & RES_SCAL_INVALID:
                own["RES_SCAL"] = fields["RES_SCAL"]
            if opt & NO_LO_LIMIT:
                own["LO_LIMIT"] = None
                own["LLM_SCAL"] = None
            elif "LO_LIMIT" in fields and not opt & LO_LIMIT_INVALID:
                own["LO_LIMIT"] = fields["LO_LIMIT"]
                own["LLM_SCAL"] = fields.get("LLM_SCAL")
            if opt & NO_HI_LIMIT:
                own["HI_LIMIT"] = None
                own["HLM_SCAL"] = None
            elif "HI_LIMIT" in fields and not opt & HI_LIMIT_INVALID:
                own["HI_LIMIT"] = fields["HI_LIMIT"]
                own["HLM_SCAL"] = fields.get("HLM_SCAL")
            if opt & NO_LO_SPEC:
                own["LO_SPEC"] = None
            elif "LO_SPEC" in fields:
                own["LO_SPEC"] = fields["LO_SPEC"]
            if opt & NO_HI_SPEC:
                own["HI_SPEC"] = None
            elif "HI_SPEC" in fields:
                own["HI_SPEC"] = fields["HI_SPEC"]
        for name in names:
            value = fields.get(name)
            if value is not None and value != "" and value != []:
                own[name] = value
        if not own:
            return own
        test = fields.get("TEST_NUM")
        key = (test, fields.get("HEAD_NUM"), fields.get("SITE_NUM"))
        site_defaults = self._by_site.setdefault(key, {})
        test_defaults = self._by_test.setdefault(test, {})
        for name, value in own.items():
            site_defaults.setdefault(name, value)
            test_defaults.setdefault(name, value)
        return own

    def _resolve(self, fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        own = self._learn(fields, names)
        test = fields.get("TEST_NUM")
        site = self._by_site.get((test, fields.get("HEAD_NUM"), fields.get("SITE_NUM")), {})
        common = self._by_test.get(test, {})
        out = dict(fields)
        for name in ("RES_SCAL", "LLM_SCAL", "HLM_SCAL", "LO_LIMIT", "HI_LIMIT",
                     "LO_SPEC", "HI_SPEC", *names):
            if name in own:
                out[name] = own[name]
            elif name in site:
                out[name] = site[name]
            elif name in common:
                out[name] = common[name]
            else:
                out[name] = None
        return out

    def resolve_ptr(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A copy of a PTR's fields with RES_SCAL, LLM_SCAL, HLM_SCAL, LO_LIMIT, HI_LIMIT,
        LO_SPEC, HI_SPEC, UNITS and the C_*FMT formats resolved from the record itself
        or the test's defaults, honouring OPT_FLAG.  A limit is None when the test has
        none (OPT_FLAG bit 6/7) or nothing ever said what it is."""
        return self._resolve(fields, _SCALAR_DEFAULTS)

    def resolve_mpr(self, fields: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`resolve_ptr`, plus START_IN, INCR_IN, RTN_INDX, UNITS_IN."""
        return self._resolve(fields, _SCALAR_DEFAULTS + _MPR_DEFAULTS)

    def ptr_limits(self, row: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        """LO_LIMIT, HI_LIMIT and UNITS of a PTR given as the values of a row
        (``StdfDecoder.rows()``, at least TEST_NUM, HEAD_NUM and SITE_NUM), exactly as
        :meth:`resolve_ptr` resolves them, learning what the record says as it does.

        Why: the gateway maps every PTR and a test repeats the same limits part after
        part.  What a PTR's limits resolve to depends only on its own fields from
        OPT_FLAG on and on the defaults of its test and site, which only ever gain
        entries; so the plan made for the first PTR of a test, head, site and tail (each
        value from the row at an index, or a default) holds for every repeat while those
        defaults have not grown, and a repeat has nothing new to teach them.  The row's
        own values are taken from the row itself, so -0.0 and 0.0 (equal keys) come out
        as written.  Bounded, and off for the rest of the file when plans rarely repeat
        (limits that drift per part), as the decoder's PTR tail memo is."""
        plans = self._ptr_plans
        if plans is not None:
            key = (row[0], row[1], row[2], row[8:])
            plan = plans.get(key)
            if plan is not None:
                site, common, site_n, common_n, lo_i, lo, hi_i, hi, units_i, units = plan
                if len(site) == site_n and len(common) == common_n:
                    self._plan_hits += 1
                    return (row[lo_i] if lo_i else lo, row[hi_i] if hi_i else hi,
                            row[units_i] if units_i else units)
        fields = dict(zip(_PTR_FIELDS, row, strict=False))
        own = self._learn(fields, _SCALAR_DEFAULTS)
        test = fields.get("TEST_NUM")
        # made if missing (an empty one reads as a missing one) so a plan sees them grow
        site = self._by_site.setdefault((test, fields.get("HEAD_NUM"),
                                         fields.get("SITE_NUM")), {})
        common = self._by_test.setdefault(test, {})
        picks: list[Any] = []
        for name, index in (("LO_LIMIT", 12), ("HI_LIMIT", 13), ("UNITS", 14)):
            if name in own:  # the row's own value, or None: OPT_FLAG says "no limit"
                picks += (0, None) if own[name] is None else (index, None)
            else:
                picks += (0, site[name] if name in site else common.get(name))
        if plans is not None:
            if len(plans) >= self.PTR_PLANS:
                # full: PTR_PLANS misses since the last clear; with fewer hits than half
                # of them, this file's limits do not repeat: off for the rest of it
                if self._plan_hits * 2 < len(plans):
                    self._ptr_plans = None
                self._plan_hits = 0
                plans.clear()  # bounded
            plans[key] = (site, common, len(site), len(common), *picks)
        lo_i, lo, hi_i, hi, units_i, units = picks
        return (row[lo_i] if lo_i else lo, row[hi_i] if hi_i else hi,
                row[units_i] if units_i else units)

    # ------------------------------------------------------------------ open parts
    def open_part(self, fields: dict[str, Any], offset: int | None = None) -> OpenPart:
        """A PIR: start a part on its head/site."""
        key = (fields.get("HEAD_NUM", 1), fields.get("SITE_NUM", 1))
        if key in self._open:
            self.unclosed_parts += 1
        part = OpenPart(key[0], key[1], offset, self.parts_started)
        self.parts_started += 1
        self._open[key] = part
        return part

    def part_for(self, fields: dict[str, Any]) -> OpenPart | None:
        """The open part a PTR/MPR/FTR belongs to (same HEAD/SITE), counting the result;
        None (and counted as an orphan) when that head/site has no open PIR."""
        part = self._open.get((fields.get("HEAD_NUM", 1), fields.get("SITE_NUM", 1)))
        if part is None:
            self.orphan_results += 1
            return None
        part.results += 1
        if result_passed(fields.get("TEST_FLG", 0)) is False:
            part.failed += 1
        return part

    def close_part(self, fields: dict[str, Any]) -> OpenPart | None:
        """A PRR: end and return the open part of its head/site (None if none was open)."""
        return self._open.pop((fields.get("HEAD_NUM", 1), fields.get("SITE_NUM", 1)), None)

    @property
    def open_parts(self) -> dict[tuple[int, int], OpenPart]:
        return dict(self._open)

    def observe(self, name: str, fields: dict[str, Any],
                offset: int | None = None) -> dict[str, Any]:
        """Feed any decoded record; returns its fields, resolved for PTR/MPR.  Keeps both
        the default state and the open parts up to date."""
        if name == "PTR":
            self.part_for(fields)
            return self.resolve_ptr(fields)
        if name == "MPR":
            self.part_for(fields)
            return self.resolve_mpr(fields)
        if name == "FTR":
            self.part_for(fields)
        elif name == "PIR":
            self.open_part(fields, offset)
        elif name == "PRR":
            self.close_part(fields)
        return fields
