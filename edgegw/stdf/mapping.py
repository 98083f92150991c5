"""Decoded tester records (STDF names and fields, from any format plugin) -> edgegw records.

Sans-IO: ``RecordMapper.map(record, now)`` takes one parsed record (``name``, ``fields``) and
returns the edgegw records it completes; nothing here reads a file or a clock.  One mapper
per file: the state it keeps is the file's (lot and wafer ids, per-test defaults, open parts).

Results wait for their part.  A PTR/FTR/MPR belongs to the open PIR of its HEAD/SITE, but the
part's id only arrives with its PRR, so the results of an open part are held and emitted, with
the PRR's PART_ID, just before the PartResult.  On a multi-site tester the sites interleave
and each site's part completes on its own.  A result with no open part (a tester that writes
no PIRs) waits as if a PIR had opened one: the next PRR of its head/site gives it its part
id; a PIR instead (results before a site's first PIR) sends it on with an empty part id, and
so does growing past ``MAX_WAITING`` results.  The emitted sequence is a pure function of
the records fed, which is what lets the tail resume a file by re-mapping its start without
emitting it.

The lot id comes from the MIR, which the spec puts right after the FAR and ATRs; a file
whose MIR comes later (after parts, or never) would put what comes before it in a lot
without a name.  So in a file that starts with a FAR (STDF, ATDF; a format plugin's
records without one do not wait) what is mapped before the MIR waits for it and then goes
out, after its LotStart, with its lot id; past ``MAX_WAITING`` records (or at the file's
end) without a MIR it goes out as it is, with an empty lot id.

A FAR after an MRR starts another file's records (files concatenated, a retest lot
appended): the mapping starts afresh, as for a file of its own.  A second MIR of another lot
with no MRR before it ends the open lot with a LotEnd the mapping makes (``extra``
``{"ended_by": "MIR"}``) before starting its own; so does a FAR with no MRR before it
(a tester that crashed and restarted, appending to the file: ``{"ended_by": "FAR"}``),
after which the mapping starts afresh as after an MRR.

A record cut before a field it must have (REC_LEN too short: a PTR cut before TEST_NUM,
an HBR before HBIN_NUM) maps to nothing -- nothing it could be sent as names its test or
bin -- and is counted (``cut_short``, by type); the records after it map as ever.  STDF V4
lets a record end early, its missing fields taking their defaults, and the decoder gives
the fields present, as pystdf does: one that ends before a field the record cannot do
without is damage confined to it, not a reason to abandon the file (it was, with every
record after it lost).  A field of the wrong kind raises ``FormatError`` with the record's
offset, as the parsers do.

Missing values follow the spec: X/Y -32768, SOFT_BIN 65535, U4 counts 4294967295, TEST_T 0
become None; so does HARD_BIN 65535 ("no bin": parametric-only formats, docs/plugins.md).
Limits and units come from the test's default state (``TestState``): None when OPT_FLAG
says "no limit" or no record of the test ever gave one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..formats import FormatError
from ..records import (
    BinSummary,
    FunctionalResult,
    LotEnd,
    LotStart,
    MultiPinResult,
    ParametricResult,
    PartCount,
    PartResult,
    RawRecord,
    Record,
    WaferEnd,
    WaferStart,
)
from .decoder import StdfRecord, StdfRow, row_fields
from .state import TestState, part_passed, part_supersedes, result_passed

MISSING_COORD = -32768
MISSING_BIN = MISSING_SOFT_BIN = 65535
MISSING_U4 = 4294967295
#: records that wait for the MIR, and results that wait for a PRR without a PIR, at most
MAX_WAITING = 10_000

#: MIR fields carried as LotStart columns; every other present, non-empty one goes to extra
_MIR_COLUMNS = {"LOT_ID", "PART_TYP", "NODE_NAM", "TSTR_TYP", "JOB_NAM", "START_T"}
_MRR_COLUMNS = {"FINISH_T"}


def _unmappable(name: str, exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"{name} record without its {exc.args[0]} field (the record ends before it)"
    return f"{name} record with a field of the wrong kind ({type(exc).__name__}: {exc})"[:200]


def _u4(value: Any) -> int | None:
    return None if value is None or value == MISSING_U4 else int(value)


def _bin(value: Any) -> int | None:
    # 65535 is SOFT_BIN's missing value; for HARD_BIN (which STDF requires) edgegw reads
    # it the same way: "no bin", what a parametric-only format writes (docs/plugins.md)
    return None if value is None or value == MISSING_BIN else int(value)


def _coord(value: Any) -> int | None:
    return None if value is None or value == MISSING_COORD else int(value)


def _extra(fields: dict[str, Any], columns: set[str]) -> dict[str, Any] | None:
    out = {k: v for k, v in fields.items()
           if k not in columns and v not in (None, "", " ", b"") and not isinstance(v, bytes)}
    return out or None


class RecordMapper:
    """Maps the records of one file, in order.  ``forward_raw`` also emits every record
    as a RawRecord (in file order, as it arrives) so nothing in the file is lost."""

    #: records waiting for a late MIR, results of a part no PIR opened, at most
    MAX_WAITING = MAX_WAITING

    def __init__(self, source: str, *, format: str = "stdf", forward_raw: bool = False) -> None:
        self.source = source
        self.format = format
        self.forward_raw = forward_raw
        #: records cut before a field they must have, skipped, by type (``map``): the
        #: file's, not one lot's (the tail says so once the file is complete)
        self.cut_short: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        """The state of a file's start (a FAR after an MRR starts another file's records)."""
        self.tests = TestState()
        self.lot_id = ""
        self.wafer_of_head: dict[int, str] = {}
        # (head, site) -> results of the open part, waiting for its PRR
        self.open_parts: dict[tuple[int, int], list[Any]] = {}
        self.test_txt: dict[int, str] = {}
        self.parts_seen = 0
        #: (head, site) -> results with no PIR open there, waiting for its next PRR
        #: (kept apart from open_parts: a result of an open part costs no check of it)
        self.unclaimed: dict[tuple[int, int], list[Any]] = {}
        #: records mapped between the FAR and the MIR (None: no FAR yet, the MIR came, or
        #: they stopped waiting for it)
        self.before_mir: list[Record] | None = None
        self._far_seen = self._mir_seen = False
        #: a MIR's lot that no MRR has ended yet (a second MIR ends it)
        self._lot_open = False
        self._mrr_seen = False
        #: leading records of the next ones to wait for a MIR that go out at once: the
        #: end of the lot a FAR ended (``_far``), not the next lot's
        self._ended = 0

    def map_all(self, records: Iterable[Any], now: float) -> list[Record]:
        out: list[Record] = []
        for rec in records:
            out.extend(self.map(rec, now))
        return out

    def map_row(self, row: StdfRow, now: float) -> list[Record]:
        """As :meth:`map`, for a row of ``StdfDecoder.rows()`` ``(name, offset, values)``:
        the same records.  PTRs (most of a file; their limits resolved by
        ``TestState.ptr_limits``) and FTRs (28 fields, 6 of them read) are mapped from
        their values without making their dict; any other record, and every record with
        ``forward_raw``, goes through :meth:`map`."""
        name, offset, values = row
        if not self.forward_raw:
            fast = (self._ptr_row if name == "PTR" and len(values) >= 6 else
                    self._ftr_row if name == "FTR" and len(values) >= 4 else None)
            if fast is not None:
                try:
                    # (they send a result at once only through _unclaimed, which makes
                    # it wait for a late MIR: no check of it here, per result)
                    return fast(values, now)
                except (KeyError, TypeError, ValueError, AttributeError, IndexError,
                        OverflowError) as exc:
                    raise FormatError(_unmappable(name, exc), offset) from None
        return self.map(StdfRecord(name, offset, row_fields(row)), now)

    def map(self, rec: Any, now: float) -> list[Record]:
        name = rec.name
        fields = rec.fields
        out: list[Record] = []
        if self.forward_raw:
            out.append(RawRecord(self.source, now, self.format, name, fields))
        handler = self._handlers.get(name)
        if handler is not None:
            try:
                handler(self, fields, now, out)
            except FormatError as exc:  # the handler's own reason, at the record's offset
                raise FormatError(exc.message, rec.offset) from None
            except KeyError:
                # Cut before a field it must have (REC_LEN too short): what it holds
                # names no test or bin to send it as.  Skipped and counted, the file read
                # on (module docstring); its RawRecord, with ``forward_raw``, still goes.
                self.cut_short[name] = self.cut_short.get(name, 0) + 1
                del out[1 if self.forward_raw else 0:]
            except (TypeError, ValueError, AttributeError, IndexError,
                    OverflowError) as exc:
                # a plugin's field of the wrong type: corrupt input, like any other
                raise FormatError(_unmappable(name, exc), rec.offset) from None
        if self.before_mir is not None and out:
            return self._wait_for_mir(out)
        return out

    def _wait_for_mir(self, out: list[Record]) -> list[Record]:
        """``out`` waits with what came before it for the MIR (``_mir``); past
        ``MAX_WAITING`` records, all of it goes on without a lot id."""
        waiting = self.before_mir
        assert waiting is not None
        now: list[Record] = []
        if self._ended:
            now, out, self._ended = out[:self._ended], out[self._ended:], 0
        waiting.extend(out)
        if len(waiting) <= MAX_WAITING:
            return now
        self.before_mir = None
        return now + waiting

    def close(self, now: float) -> list[Record]:
        """The file is complete: results of parts that never got their PRR are emitted
        with an empty part id rather than lost (and records still waiting for a MIR,
        without a lot id)."""
        out: list[Record] = []
        if self.before_mir is not None:
            out, self.before_mir = self.before_mir, None
        for key in list(self.open_parts):
            out.extend(r._replace(ts=now) for r in self.open_parts.pop(key))
        for key in list(self.unclaimed):
            out.extend(r._replace(ts=now) for r in self.unclaimed.pop(key))
        return out

    # -- lot and wafer ---------------------------------------------------------------------

    def _far(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        version = f.get("STDF_VER", 4)
        if version != 4:
            # STDF V3 (or anything else) lays its records out otherwise: read as V4, its
            # bins, flags and values would be sent wrong without a word (`edgegw stdf`
            # refuses it too, docs/stdf.md)
            raise FormatError(f"STDF_VER {version} in the FAR: this reads STDF V4", 0)
        if self._lot_open:
            # a FAR inside a lot, no MRR before it: a tester that crashed and restarted,
            # appending to its file.  The lot ends here, as at a second MIR (its open
            # parts' results go on without a part id), with a LotEnd the mapping makes --
            # else it stays "in test" until evicted; a FAR has no time (finish_t 0: the
            # hub takes the time it arrives).  What follows is another file's records.
            ended = [*self.close(now), LotEnd(self.source, now, self.lot_id, 0,
                                              {"ended_by": "FAR"})]
            out[:0] = ended
            self._reset()
            self._ended = len(ended)  # (they go out now, not with the next lot's MIR)
        elif self._mrr_seen:
            # a FAR after a lot's MRR: another file's records follow (files concatenated,
            # a retest lot appended), mapped as that file on its own would be -- its
            # own test defaults, part numbering, lot
            self._reset()
        if not self._far_seen:  # (a second FAR before the MIR is ignored)
            self._far_seen = True
            if not self._mir_seen:
                self.before_mir = []

    def _mir(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        if self._lot_open and (f.get("LOT_ID", "") or "") != self.lot_id:
            # a second MIR with no MRR before it, of another lot: the first ends here, as at an MRR
            # (its open parts' results go on without a part id), with a LotEnd the
            # mapping makes -- else it stays "in test" until evicted.  Its finish time is
            # the second lot's start; ``extra`` says no MRR ended it.  (The same lot id
            # again is that lot going on: a LotEnd would show it closed while in test)
            out[:0] = [*self.close(now), LotEnd(self.source, now, self.lot_id,
                                                f.get("START_T", 0) or 0,
                                                {"ended_by": "MIR"})]
        self._mir_seen = self._lot_open = True
        lot = self.lot_id = f.get("LOT_ID", "") or ""
        start = LotStart(self.source, now, lot, f.get("PART_TYP", "") or "",
                         f.get("NODE_NAM", "") or "", f.get("TSTR_TYP", "") or "",
                         f.get("JOB_NAM", "") or "", f.get("START_T", 0) or 0,
                         _extra(f, _MIR_COLUMNS))
        waiting = self.before_mir
        self.before_mir = None
        # results of parts still open are this lot's too (a PIR and PTRs before the MIR)
        for results in (*self.open_parts.values(), *self.unclaimed.values()):
            results[:] = [r._replace(lot_id=lot) for r in results]
        if not waiting or all(type(r) is RawRecord for r in waiting):
            # the MIR where the spec puts it (with forward_raw, the FAR's and ATRs'
            # RawRecords waited for it): as if nothing had waited
            out[:0] = waiting or ()
            out.append(start)
            return
        # a late MIR: what came before it is this lot's (the LotStart first, then it in
        # file order; with forward_raw the MIR's own RawRecord follows them)
        out[:0] = [start, *(r._replace(lot_id=lot)  # type: ignore[call-arg]
                            if "lot_id" in r._fields else r for r in waiting)]

    def _mrr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        self._lot_open, self._mrr_seen = False, True
        out.extend(self.close(now))
        out.append(LotEnd(self.source, now, self.lot_id, f.get("FINISH_T", 0) or 0,
                          _extra(f, _MRR_COLUMNS)))

    def _wir(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        head = f.get("HEAD_NUM", 1)
        wafer = f.get("WAFER_ID", "") or ""
        self.wafer_of_head[head] = wafer
        out.append(WaferStart(self.source, now, self.lot_id, wafer, head, f.get("START_T", 0)))

    def _wrr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        head = f.get("HEAD_NUM", 1)
        # the WIR's id when it gave one: the wafer's parts went out under it, and the end
        # must close that wafer (the spec lets the WRR's id supersede it: a tester that
        # knows the real id only at the end -- it would close an empty wafer of that id)
        wafer = self.wafer_of_head.get(head) or f.get("WAFER_ID") or ""
        out.append(WaferEnd(self.source, now, self.lot_id, wafer, head, f.get("FINISH_T", 0),
                            _u4(f.get("PART_CNT")), _u4(f.get("GOOD_CNT"))))

    # -- parts and their results -----------------------------------------------------------

    def _pir(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        key = (f.get("HEAD_NUM", 1), f.get("SITE_NUM", 1))
        stale = self.open_parts.get(key) or self.unclaimed.pop(key, None)
        if stale:  # a PIR without a PRR before it, or results before a site's first PIR:
            out.extend(stale)  # sent on without a part id rather than lost
        self.open_parts[key] = []

    def _prr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        head = f.get("HEAD_NUM", 1)
        site = f.get("SITE_NUM", 1)
        self.parts_seen += 1
        part_id = f.get("PART_ID") or str(self.parts_seen)
        results = self.open_parts.pop((head, site), None)
        if results is None:
            results = self.unclaimed.pop((head, site), None)
        if results:
            out.extend(r._replace(part_id=part_id) for r in results)
        flg = f.get("PART_FLG", 0)
        soft = f.get("SOFT_BIN")
        test_t = f.get("TEST_T")
        num_test = f.get("NUM_TEST")
        out.append(PartResult(
            self.source, now, self.lot_id, self.wafer_of_head.get(head, ""), head, site,
            part_id, _coord(f.get("X_COORD")), _coord(f.get("Y_COORD")),
            _bin(f.get("HARD_BIN", 0)), _bin(soft),
            part_passed(flg), part_supersedes(flg), flg, test_t or None,
            None if num_test is None or num_test == 65535 else num_test))

    def _result(self, head: int, site: int, record: Any, out: list[Record]) -> None:
        pending = self.open_parts.get((head, site))
        if pending is None:
            out.extend(self._unclaimed(head, site, record))
        else:
            pending.append(record)

    def _unclaimed(self, head: int, site: int, record: Record) -> list[Record]:
        """A result of a head/site with no PIR open: it waits for the next PRR there as
        if a PIR had opened the part.  Past ``MAX_WAITING`` such results they go on at
        once without a part id (head/site numbers the PRRs never use must not grow them
        without bound) -- or to wait for a late MIR.  A part its PIR opened keeps every
        result for its PRR."""
        key = (head, site)
        waiting = self.unclaimed.get(key)
        if waiting is None:
            self.unclaimed[key] = [record]
            return []
        waiting.append(record)
        if len(waiting) <= MAX_WAITING:
            return []
        del self.unclaimed[key]
        return waiting if self.before_mir is None else self._wait_for_mir(waiting)

    def _text_of(self, test_num: int, f: dict[str, Any]) -> str:
        text = f.get("TEST_TXT")
        if text:
            self.test_txt[test_num] = text
            return text
        return self.test_txt.get(test_num, "")

    def _ptr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        f = self.tests.resolve_ptr(f)
        head = f.get("HEAD_NUM", 1)
        site = f.get("SITE_NUM", 1)
        num = f["TEST_NUM"]
        flg = f.get("TEST_FLG", 0)
        # TEST_FLG bit 1: the result is not valid
        value = None if flg & 0x02 else f.get("RESULT")
        self._result(head, site, ParametricResult(
            self.source, now, self.lot_id, head, site, "", num, self._text_of(num, f), value,
            f["LO_LIMIT"], f["HI_LIMIT"], f.get("UNITS", "") or "", result_passed(flg), flg,
            f.get("PARM_FLG", 0)), out)

    def _ptr_row(self, v: tuple[Any, ...], now: float) -> list[Record]:
        """``_ptr`` of a PTR row with every field up to RESULT (later PTRs of a test
        often end there)."""
        lo, hi, units = self.tests.ptr_limits(v)
        num, head, site, flg = v[0], v[1], v[2], v[3]
        text = v[6] if len(v) > 6 else None
        if text:
            self.test_txt[num] = text
        else:
            text = self.test_txt.get(num, "")
        record = ParametricResult(
            self.source, now, self.lot_id, head, site, "", num, text,
            None if flg & 0x02 else v[5], lo, hi, units or "", result_passed(flg), flg, v[4])
        pending = self.open_parts.get((head, site))
        if pending is None:
            return self._unclaimed(head, site, record)
        pending.append(record)
        return []

    def _ftr_row(self, v: tuple[Any, ...], now: float) -> list[Record]:
        """``_ftr`` of an FTR row with every field up to TEST_FLG."""
        n = len(v)
        num, head, site, flg = v[0], v[1], v[2], v[3]
        opt = v[4] if n > 4 else None
        # OPT_FLAG bit 3 set: NUM_FAIL is not valid
        fails = None if opt is None or opt & 0x08 or n <= 8 else v[8]
        text = v[22] if n > 22 else None
        if text:
            self.test_txt[num] = text
        else:
            text = self.test_txt.get(num, "")
        record = FunctionalResult(self.source, now, self.lot_id, head, site, "", num, text,
                                  result_passed(flg), flg, fails)
        pending = self.open_parts.get((head, site))
        if pending is None:
            return self._unclaimed(head, site, record)
        pending.append(record)
        return []

    def _mpr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        f = self.tests.resolve_mpr(f)
        head = f.get("HEAD_NUM", 1)
        site = f.get("SITE_NUM", 1)
        num = f["TEST_NUM"]
        flg = f.get("TEST_FLG", 0)
        self._result(head, site, MultiPinResult(
            self.source, now, self.lot_id, head, site, "", num, self._text_of(num, f),
            list(f.get("RTN_RSLT") or []), f["LO_LIMIT"], f["HI_LIMIT"],
            f.get("UNITS", "") or "", result_passed(flg), flg, f.get("PARM_FLG", 0)), out)

    def _ftr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        head = f.get("HEAD_NUM", 1)
        site = f.get("SITE_NUM", 1)
        num = f["TEST_NUM"]
        flg = f.get("TEST_FLG", 0)
        opt = f.get("OPT_FLAG")
        # OPT_FLAG bit 3 set: NUM_FAIL is not valid
        fails = None if opt is None or opt & 0x08 else f.get("NUM_FAIL")
        self._result(head, site, FunctionalResult(
            self.source, now, self.lot_id, head, site, "", num, self._text_of(num, f),
            result_passed(flg), flg, fails), out)

    # -- the tester's own summaries --------------------------------------------------------

    def _hbr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        out.append(BinSummary(self.source, now, self.lot_id, "H", f.get("HEAD_NUM", 255),
                              f.get("SITE_NUM", 0), f["HBIN_NUM"], f["HBIN_CNT"],
                              f.get("HBIN_PF", " ") or " ", f.get("HBIN_NAM", "") or ""))

    def _sbr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        out.append(BinSummary(self.source, now, self.lot_id, "S", f.get("HEAD_NUM", 255),
                              f.get("SITE_NUM", 0), f["SBIN_NUM"], f["SBIN_CNT"],
                              f.get("SBIN_PF", " ") or " ", f.get("SBIN_NAM", "") or ""))

    def _pcr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        out.append(PartCount(self.source, now, self.lot_id, f.get("HEAD_NUM", 255),
                             f.get("SITE_NUM", 0), f["PART_CNT"], _u4(f.get("RTST_CNT")),
                             _u4(f.get("ABRT_CNT")), _u4(f.get("GOOD_CNT")),
                             _u4(f.get("FUNC_CNT"))))

    def _tsr(self, f: dict[str, Any], now: float, out: list[Record]) -> None:
        # TSR is not mapped (RawRecord carries it), but it names tests for later FTRs
        name = f.get("TEST_NAM")
        if name and f.get("TEST_NUM") is not None:
            self.test_txt.setdefault(f["TEST_NUM"], name)

    _handlers: dict[str, Any] = {
        "FAR": _far, "MIR": _mir, "MRR": _mrr, "WIR": _wir, "WRR": _wrr, "PIR": _pir, "PRR": _prr,
        "PTR": _ptr, "MPR": _mpr, "FTR": _ftr, "HBR": _hbr, "SBR": _sbr, "PCR": _pcr,
        "TSR": _tsr,
    }
    #: the record types ``map`` reads: without ``forward_raw``, every other type maps to
    #: nothing, so a decoder need not decode it (``StdfDecoder(types=...)``)
    TYPES: frozenset[str] = frozenset(_handlers)
