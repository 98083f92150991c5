"""ATDF, the ASCII form of STDF, as an edgegw tester format (entry point ``atdf``).

An ATDF file is text: one record per line, ``REC:field|field|...``; a line starting with a
space continues the record above (the space is dropped, the text joined).  The fields are
those of the STDF record of the same name, in ATDF's own order, with a few STDF bit fields
written as letters (PRR pass/fail, retest and abort codes; PTR/FTR pass/fail and alarm
flags).  This parser turns each ATDF record into the STDF record it stands for: the same
name, the STDF field names and value types, flag letters turned back into TEST_FLG /
PARM_FLG / PART_FLG / OPT_FLAG bits, and STDF's conventions for missing values (an empty
field in the middle of a record gets the spec's "missing" value, e.g. X_COORD -32768; empty
trailing fields are absent).  So ``edgegw.stdf.mapping`` maps ATDF exactly as it maps STDF.

Sans-IO and incremental, like every format: ``feed`` bytes, iterate ``records()``.  A record
is complete when the next line starts with a record name (it might still get continuation
lines before that), or at ``close()`` once its line has ended; MRR, the last record of a
file, is complete at the end of its line (a line after it starting with a space is not
its continuation but an error, so a file parses the same however its bytes arrive).  A
last line without its newline is a record the tester was still writing: ``close()``
raises ``FormatError`` for it rather than yield a value cut short.

Covered record types (the ones a live monitor needs): FAR, ATR, MIR, MRR, PCR, HBR, SBR,
SDR, WIR, WRR, WCR, PIR, PRR (its PART_FIX, repair data in hexadecimal, as bytes), TSR,
PTR, MPR (its returned states, one hexadecimal digit each, results and pin indexes as
comma-separated lists), FTR (without its pin/index arrays), BPS, EPS, DTR;
field orders and flag letters as in the ATDF specification (and Semi-ATE STDF's ATDF
output).  An empty HEAD_NUM in a PCR, HBR, SBR or TSR is 255: the spec writes the
summary "for all test sites" as ``PCR:||3976|54|76|2311|3809``.
Other valid record names (PMR, PGR, PLR, RDR, GDR, ...) are skipped and counted in
``skipped``.  Values are taken as written (the FAR scaling flag is not applied).

Hostile input gets ``FormatError`` and nothing else: an integer outside its STDF type's
range (a HEAD_NUM of 300, a time before 1970), and a record longer than
``MAX_RECORD_BYTES`` without an end (memory stays bounded whatever the input).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from edgegw.formats import FormatError
from edgegw.stdf import stdf_fields

__all__ = ["ATDF", "AtdfFormat", "AtdfParser", "AtdfRecord"]


class AtdfRecord(NamedTuple):
    name: str
    offset: int
    fields: dict[str, Any]


# ATDF field order per record: (STDF field name, value type).  Names starting with "_" are
# ATDF-only codes turned into STDF flag bits by the record's post-processing below.
_I, _F, _S, _C, _T, _L, _X = "int", "float", "str", "char", "time", "ints", "hex"
_R, _N = "floats", "nibbles"  # comma-separated lists: numbers; hexadecimal digits
_LAYOUT: dict[str, tuple[tuple[str, str], ...]] = {
    "FAR": (("_FILE_TYP", _S), ("STDF_VER", _I), ("_ATDF_VER", _I), ("_SCAL_FLG", _S)),
    "ATR": (("MOD_TIM", _T), ("CMD_LINE", _S)),
    "MIR": (("LOT_ID", _S), ("PART_TYP", _S), ("JOB_NAM", _S), ("NODE_NAM", _S),
            ("TSTR_TYP", _S), ("SETUP_T", _T), ("START_T", _T), ("OPER_NAM", _S),
            ("MODE_COD", _C), ("STAT_NUM", _I), ("SBLOT_ID", _S), ("TEST_COD", _S),
            ("RTST_COD", _C), ("JOB_REV", _S), ("EXEC_TYP", _S), ("EXEC_VER", _S),
            ("PROT_COD", _C), ("CMOD_COD", _C), ("BURN_TIM", _I), ("TST_TEMP", _S),
            ("USER_TXT", _S), ("AUX_FILE", _S), ("PKG_TYP", _S), ("FAMLY_ID", _S),
            ("DATE_COD", _S), ("FACIL_ID", _S), ("FLOOR_ID", _S), ("PROC_ID", _S),
            ("OPER_FRQ", _S), ("SPEC_NAM", _S), ("SPEC_VER", _S), ("FLOW_ID", _S),
            ("SETUP_ID", _S), ("DSGN_REV", _S), ("ENG_ID", _S), ("ROM_COD", _S),
            ("SERL_NUM", _S), ("SUPR_NAM", _S)),
    "MRR": (("FINISH_T", _T), ("DISP_COD", _C), ("USR_DESC", _S), ("EXC_DESC", _S)),
    "PCR": (("HEAD_NUM", _I), ("SITE_NUM", _I), ("PART_CNT", _I), ("RTST_CNT", _I),
            ("ABRT_CNT", _I), ("GOOD_CNT", _I), ("FUNC_CNT", _I)),
    "HBR": (("HEAD_NUM", _I), ("SITE_NUM", _I), ("HBIN_NUM", _I), ("HBIN_CNT", _I),
            ("HBIN_PF", _C), ("HBIN_NAM", _S)),
    "SBR": (("HEAD_NUM", _I), ("SITE_NUM", _I), ("SBIN_NUM", _I), ("SBIN_CNT", _I),
            ("SBIN_PF", _C), ("SBIN_NAM", _S)),
    "SDR": (("HEAD_NUM", _I), ("SITE_GRP", _I), ("SITE_NUM", _L), ("HAND_TYP", _S),
            ("HAND_ID", _S), ("CARD_TYP", _S), ("CARD_ID", _S), ("LOAD_TYP", _S),
            ("LOAD_ID", _S), ("DIB_TYP", _S), ("DIB_ID", _S), ("CABL_TYP", _S),
            ("CABL_ID", _S), ("CONT_TYP", _S), ("CONT_ID", _S), ("LASR_TYP", _S),
            ("LASR_ID", _S), ("EXTR_TYP", _S), ("EXTR_ID", _S)),
    "WIR": (("HEAD_NUM", _I), ("START_T", _T), ("SITE_GRP", _I), ("WAFER_ID", _S)),
    "WRR": (("HEAD_NUM", _I), ("FINISH_T", _T), ("PART_CNT", _I), ("WAFER_ID", _S),
            ("SITE_GRP", _I), ("RTST_CNT", _I), ("ABRT_CNT", _I), ("GOOD_CNT", _I),
            ("FUNC_CNT", _I), ("FABWF_ID", _S), ("FRAME_ID", _S), ("MASK_ID", _S),
            ("USR_DESC", _S), ("EXC_DESC", _S)),
    "WCR": (("WF_FLAT", _C), ("POS_X", _C), ("POS_Y", _C), ("WAFR_SIZ", _F), ("DIE_HT", _F),
            ("DIE_WID", _F), ("WF_UNITS", _I), ("CENTER_X", _I), ("CENTER_Y", _I)),
    "PIR": (("HEAD_NUM", _I), ("SITE_NUM", _I)),
    "PRR": (("HEAD_NUM", _I), ("SITE_NUM", _I), ("PART_ID", _S), ("NUM_TEST", _I),
            ("_PASS_FAIL", _S), ("HARD_BIN", _I), ("SOFT_BIN", _I), ("X_COORD", _I),
            ("Y_COORD", _I), ("_RETEST", _S), ("_ABORT", _S), ("TEST_T", _I),
            ("PART_TXT", _S), ("PART_FIX", _X)),
    "TSR": (("HEAD_NUM", _I), ("SITE_NUM", _I), ("TEST_NUM", _I), ("TEST_NAM", _S),
            ("TEST_TYP", _C), ("EXEC_CNT", _I), ("FAIL_CNT", _I), ("ALRM_CNT", _I),
            ("SEQ_NAME", _S), ("TEST_LBL", _S), ("TEST_TIM", _F), ("TEST_MIN", _F),
            ("TEST_MAX", _F), ("TST_SUMS", _F), ("TST_SQRS", _F)),
    "PTR": (("TEST_NUM", _I), ("HEAD_NUM", _I), ("SITE_NUM", _I), ("RESULT", _F),
            ("_PASS_FAIL", _S), ("_ALARMS", _S), ("TEST_TXT", _S), ("ALARM_ID", _S),
            ("_LIMIT_CMP", _S), ("UNITS", _S), ("LO_LIMIT", _F), ("HI_LIMIT", _F),
            ("C_RESFMT", _S), ("C_LLMFMT", _S), ("C_HLMFMT", _S), ("LO_SPEC", _F),
            ("HI_SPEC", _F), ("RES_SCAL", _I), ("LLM_SCAL", _I), ("HLM_SCAL", _I)),
    "MPR": (("TEST_NUM", _I), ("HEAD_NUM", _I), ("SITE_NUM", _I), ("RTN_STAT", _N),
            ("RTN_RSLT", _R), ("_PASS_FAIL", _S), ("_ALARMS", _S), ("TEST_TXT", _S),
            ("ALARM_ID", _S), ("_LIMIT_CMP", _S), ("UNITS", _S), ("LO_LIMIT", _F),
            ("HI_LIMIT", _F), ("START_IN", _F), ("INCR_IN", _F), ("UNITS_IN", _S),
            ("RTN_INDX", _L), ("C_RESFMT", _S), ("C_LLMFMT", _S), ("C_HLMFMT", _S),
            ("LO_SPEC", _F), ("HI_SPEC", _F), ("RES_SCAL", _I), ("LLM_SCAL", _I),
            ("HLM_SCAL", _I)),
    "FTR": (("TEST_NUM", _I), ("HEAD_NUM", _I), ("SITE_NUM", _I), ("_PASS_FAIL", _S),
            ("_ALARMS", _S), ("VECT_NAM", _S), ("TIME_SET", _S), ("CYCL_CNT", _I),
            ("REL_VADR", _I), ("REPT_CNT", _I), ("NUM_FAIL", _I), ("XFAIL_AD", _I),
            ("YFAIL_AD", _I), ("VECT_OFF", _I), ("_RTN_INDX", _S), ("_RTN_STAT", _S),
            ("_PGM_INDX", _S), ("_PGM_STAT", _S), ("_FAIL_PIN", _S),
            ("OP_CODE", _S), ("TEST_TXT", _S), ("ALARM_ID", _S), ("PROG_TXT", _S),
            ("RSLT_TXT", _S), ("PATG_NUM", _I), ("_SPIN_MAP", _S)),
    "BPS": (("SEQ_NAME", _S),),
    "EPS": (),
    "DTR": (("TEXT_DAT", _S),),
}

#: alarm-flag letters -> TEST_FLG bits (PTR/FTR): alarm, unreliable, timeout, not executed,
#: aborted (TEST_FLG bit 1 "result invalid" has no letter: the result field is empty)
_TEST_FLAG_LETTERS = {"A": 0x01, "U": 0x04, "T": 0x08, "N": 0x10, "X": 0x20}
#: alarm-flag letters -> PARM_FLG bits (PTR): scale error, drift, oscillation, higher than
#: the high limit, lower than the low limit
_PARM_FLAG_LETTERS = {"S": 0x01, "D": 0x02, "O": 0x04, "H": 0x08, "L": 0x10}
#: Longest ATDF record accepted: the biggest STDF record (65,535 bytes) written as text
#: takes about a quarter of this.  A longer one is not ATDF (and would hold memory).
MAX_RECORD_BYTES = 1 << 20
_MONTHS = {m.upper(): i for i, m in enumerate(calendar.month_abbr) if m}
_TIME = re.compile(r"\s*(\d{1,2}):(\d{1,2}):(\d{1,2})\s+(\d{1,2})-([A-Za-z]{3})-(\d{4})\s*$")
_NAME = re.compile(rb"[A-Z]{3}:")
#: a returned state's text -> its value (0-15): one hexadecimal digit, as the spec writes
#: it; or 10-15 in decimal, as Semi-ATE STDF's ATDF output writes them (unambiguous: two
#: digits are not one hexadecimal digit)
_STATES = {**{f"{n:x}": n for n in range(16)}, **{f"{n:X}": n for n in range(16)},
           **{str(n): n for n in range(10, 16)}}
#: records whose empty HEAD_NUM means 255, "all test sites" (the spec's samples
#: ``HBR:||1|1346|P|PASSED``, ``PCR:||3976|54|76|2311|3809``); SITE_NUM, which STDF
#: ignores then, empty too
_SUMMARIES = frozenset({"PCR", "HBR", "SBR", "TSR"})


def parse_time(text: str) -> int:
    """ATDF date-time ``hh:mm:ss dd-MON-yyyy`` (UTC) -> seconds since 1970; digits only are
    taken as seconds already."""
    if text.strip().isdigit():
        return int(text)
    m = _TIME.match(text)
    if m is None or m.group(5).upper() not in _MONTHS:
        raise ValueError(f"{text!r} is not a date-time like 10:08:20 23-SEP-1990")
    hh, mm, ss, day, mon, year = m.groups()
    return calendar.timegm((int(year), _MONTHS[mon.upper()], int(day), int(hh), int(mm),
                            int(ss), 0, 0, 0))


def _value(kind: str, text: str) -> Any:
    if kind == _S:
        return text
    if kind == _C:
        return text[:1] or " "
    if kind == _I:
        return int(text)
    if kind == _F:
        return float(text)
    if kind == _T:
        return parse_time(text)
    if kind == _X:  # B*n written in hexadecimal, two digits a byte
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{text!r} is not bytes in hexadecimal (two digits a byte)") from None
    items = [v.strip() for v in text.split(",")]
    if kind == _R:
        return [float(v) for v in items]
    if kind == _N:  # returned states: one hexadecimal digit each (STDF N*1)
        bad = [v for v in items if v not in _STATES]
        if bad:
            raise ValueError(f"returned state {bad[0]!r} is not one hexadecimal digit")
        return [_STATES[v] for v in items]
    return [int(v) for v in items if v]  # _L


def _flags(letters: str, table: dict[str, int]) -> int:
    bits = 0
    for ch in letters.upper():
        bits |= table.get(ch, 0)
    return bits


def _test_flags(f: dict[str, Any], *, parametric: bool, one_result: bool = True) -> None:
    """Pass/fail and alarm letters -> TEST_FLG (and PARM_FLG for a PTR or MPR); a PTR
    (``one_result``) without its RESULT gets TEST_FLG bit 1, which an MPR reserves."""
    # P, F or A (passed alternate limits; Semi-ATE STDF writes an MPR's as "PA")
    pf = f.pop("_PASS_FAIL", "").strip().upper()
    alarms = f.pop("_ALARMS", "")
    test_flg = _flags(alarms, _TEST_FLAG_LETTERS)
    alternate = pf in ("A", "PA")
    if pf == "F":
        test_flg |= 0x80
    elif pf != "P" and not alternate:
        test_flg |= 0x40  # no pass/fail indication
    f["TEST_FLG"] = test_flg
    if parametric:
        parm = _flags(alarms, _PARM_FLAG_LETTERS)
        if alternate:
            parm |= 0x20  # passed alternate limits
        cmp_ = f.pop("_LIMIT_CMP", "").upper()
        parm |= (0x40 if "L" in cmp_ else 0) | (0x80 if "H" in cmp_ else 0)
        f["PARM_FLG"] = parm
        if one_result and "RESULT" not in f:
            f["TEST_FLG"] |= 0x02  # no result: the result is not valid


_STATIC = ("UNITS", "LO_LIMIT", "HI_LIMIT", "LO_SPEC", "HI_SPEC", "RES_SCAL", "LLM_SCAL",
           "HLM_SCAL", "C_RESFMT", "C_LLMFMT", "C_HLMFMT")
_MPR_STATIC = (*_STATIC, "START_IN", "INCR_IN", "UNITS_IN", "RTN_INDX")


def _opt_flag(f: dict[str, Any], static: tuple[str, ...], reserved: int) -> None:
    """OPT_FLAG of a PTR/MPR that gives any of its test's default data (else the record
    ends before OPT_FLAG, and every default applies).  An absent limit means "the test's
    default", as when STDF flags it invalid (bits 4/5); a test whose first record gives no
    limit has none."""
    if any(k in f for k in static):
        opt = reserved
        for name, bit in (("RES_SCAL", 0x01), ("LO_SPEC", 0x04), ("HI_SPEC", 0x08),
                          ("LO_LIMIT", 0x10), ("HI_LIMIT", 0x20)):
            if name not in f:
                opt |= bit
        f["OPT_FLAG"] = opt


def _post_ptr(f: dict[str, Any]) -> None:
    _test_flags(f, parametric=True)
    _opt_flag(f, _STATIC, 0x02)  # PTR: bit 1 reserved, must be 1


def _post_mpr(f: dict[str, Any]) -> None:
    _test_flags(f, parametric=True, one_result=False)
    states = f.setdefault("RTN_STAT", [])
    indexes = f.get("RTN_INDX")
    if states and indexes and len(indexes) != len(states):
        raise ValueError(f"{len(states)} returned states but {len(indexes)} pin indexes")
    # RTN_ICNT counts both arrays; either may be absent (the indexes are default data a
    # later MPR omits; the spec's own sample gives indexes and no states): the count is
    # the one given, and states that were not written stay unknown, never invented
    f["RTN_ICNT"] = len(states) or len(indexes or ())
    f["RSLT_CNT"] = len(f.setdefault("RTN_RSLT", []))
    # MPR: bit 1 set = START_IN and INCR_IN are not valid
    _opt_flag(f, _MPR_STATIC, 0 if "START_IN" in f and "INCR_IN" in f else 0x02)


def _post_ftr(f: dict[str, Any]) -> None:
    _test_flags(f, parametric=False)
    # the pin/index arrays are not converted (a live monitor does not use them)
    for name in ("_RTN_INDX", "_RTN_STAT", "_PGM_INDX", "_PGM_STAT", "_FAIL_PIN", "_SPIN_MAP"):
        f.pop(name, None)
    opt = 0
    for names, bit in ((("CYCL_CNT",), 0x01), (("REL_VADR",), 0x02), (("REPT_CNT",), 0x04),
                       (("NUM_FAIL",), 0x08), (("XFAIL_AD", "YFAIL_AD"), 0x10),
                       (("VECT_OFF",), 0x20)):
        if not all(n in f for n in names):
            opt |= bit
    f["OPT_FLAG"] = opt


def _post_prr(f: dict[str, Any]) -> None:
    pf = f.pop("_PASS_FAIL", "").strip().upper()
    retest = f.pop("_RETEST", "").strip().upper()
    abort = f.pop("_ABORT", "").strip().upper()
    flg = 0x08 if pf == "F" else 0 if pf == "P" else 0x10
    flg |= (0x01 if retest == "I" else 0) | (0x02 if retest == "C" else 0)
    flg |= 0x04 if abort == "Y" else 0
    f["PART_FLG"] = flg


def _post_tsr(f: dict[str, Any]) -> None:
    opt = 0
    for name, bit in (("TEST_MIN", 0x01), ("TEST_MAX", 0x02), ("TEST_TIM", 0x04),
                      ("TST_SUMS", 0x10), ("TST_SQRS", 0x20)):
        if name not in f:
            opt |= bit
    f["OPT_FLAG"] = opt


def _post_sdr(f: dict[str, Any]) -> None:
    f["SITE_CNT"] = len(f.get("SITE_NUM", []))


def _post_far(f: dict[str, Any]) -> None:
    if f.pop("_FILE_TYP", "A") != "A":
        raise ValueError("FAR data file type must be 'A' (ATDF)")
    for name in ("_ATDF_VER", "_SCAL_FLG"):
        f.pop(name, None)


_POST = {"PTR": _post_ptr, "MPR": _post_mpr, "FTR": _post_ftr, "PRR": _post_prr,
         "TSR": _post_tsr,
         "SDR": _post_sdr, "FAR": _post_far}


def _is_stdf_name(name: str) -> bool:
    try:
        stdf_fields(name, {})
    except ValueError:
        return False
    return True


class AtdfParser:
    """Incremental ATDF parser (see the module docstring)."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0  # index into _buf of the next record
        self._base = 0  # stream offset of _buf[0]
        self._first = True
        #: valid records of types this parser does not convert, by name
        self.skipped: dict[str, int] = {}

    @property
    def position(self) -> int:
        return self._base + self._pos

    def feed(self, data: bytes) -> None:
        self._base += self._pos
        self._buf = self._buf[self._pos:] + bytes(data)
        self._pos = 0

    def state(self) -> dict[str, Any]:
        return {}

    def records(self) -> Iterator[AtdfRecord]:
        yield from self._records(final=False)

    def close(self) -> Iterator[AtdfRecord]:
        yield from self._records(final=True)

    def _records(self, final: bool) -> Iterator[AtdfRecord]:
        buf = self._buf
        n = len(buf)
        while self._pos < n:
            pos = self._pos
            if buf[pos] in b"\r\n":  # blank line between records
                self._pos = pos + 1
                continue
            end = self._record_end(buf, pos, final, self._base + pos)
            if (end if end >= 0 else n) - pos > MAX_RECORD_BYTES:
                raise FormatError(f"a record longer than {MAX_RECORD_BYTES} bytes: not ATDF",
                                  self._base + pos)
            if end < 0:
                return
            rec = self._parse(buf[pos:end], self._base + pos)
            self._pos = end
            if rec is not None:
                yield rec

    @staticmethod
    def _record_end(buf: bytes, pos: int, final: bool, offset: int) -> int:
        """End (exclusive) of the record starting at ``pos`` (stream ``offset``), or -1 if
        not known yet.  At ``final`` a record whose last line has no newline is cut: the
        tester was still writing it (``idds,645.65e-12`` cut to ``idds,645.6`` must not
        become a value), so it is a ``FormatError``, never a record."""
        i = pos
        while True:
            nl = buf.find(b"\n", i)
            if nl < 0:
                if final:  # the input ends inside a line: a cut record, not a short one
                    raise FormatError("the file ends inside a record (its last line has no "
                                      "newline)", offset)
                return -1
            if buf.startswith(b"MRR:", pos):
                # MRR is complete at the end of its line, whatever follows: so it is the
                # same record whether the next line has arrived yet or not (a tail yields
                # it as soon as its line ends); a line continuing it is an error
                return nl + 1
            if nl + 1 < len(buf):
                if buf[nl + 1] != 0x20:  # the next line starts a new record
                    return nl + 1
                i = nl + 1  # a continuation line
                continue
            # the line ends the data: complete only if nothing can follow
            if final:
                return nl + 1
            return -1

    def _parse(self, raw: bytes, offset: int) -> AtdfRecord | None:
        if self._first:
            if not raw.startswith(b"FAR:"):
                raise FormatError("not ATDF: the first record is not a FAR:", offset)
            self._first = False
        if not _NAME.match(raw):
            text = raw[:20].decode("latin-1", "replace")
            raise FormatError(f"not an ATDF record (no 'XXX:' name): {text!r}", offset)
        lines = raw.decode("latin-1").replace("\r", "").split("\n")
        text = lines[0] + "".join(line[1:] for line in lines[1:])
        name = text[:3]
        layout = _LAYOUT.get(name)
        if layout is None:
            if not _is_stdf_name(name):
                raise FormatError(f"unknown ATDF record type {name!r}", offset)
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return None
        values = text[4:].split("|") if len(text) > 4 else []
        if len(values) > len(layout):
            raise FormatError(f"{name} has {len(values)} fields, ATDF defines {len(layout)}",
                              offset)
        present: dict[str, Any] = {}
        try:
            for (field, kind), value in zip(layout, values, strict=False):
                if value != "" and not (kind != _S and value.strip() == ""):
                    present[field] = _value(kind, value.strip() if kind != _S else value)
            if name in _SUMMARIES and "HEAD_NUM" not in present:
                present["HEAD_NUM"] = 255
                present.setdefault("SITE_NUM", 255)
            post = _POST.get(name)
            if post is not None:
                post(present)
            # the STDF fields (missing values in the middle) and their STDF ranges
            fields = stdf_fields(name, present)
        except ValueError as exc:
            raise FormatError(f"{name}: {str(exc)[:200]}", offset) from None
        return AtdfRecord(name, offset, fields)


class AtdfFormat:
    name = "atdf"
    description = "ATDF, the ASCII form of STDF V4 (plugin edgegw-atdf)"
    suffixes = (".atdf", ".atd")

    def new_parser(self) -> AtdfParser:
        return AtdfParser()


ATDF = AtdfFormat()
