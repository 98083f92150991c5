"""WAT CSV, a line-based parametric e-test export, as an edgegw tester format (``wat``).

The layout is in this package's README.md.  In short, one CSV line per record group::

    WATCSV,1,<lot>,<product>,<tester>,<program>,<start yyyy-mm-dd hh:mm:ss>,<wafers>
    WAFER,<wafer id>,<sites>
    SITE,X,Y,<name>[<unit>],<name>[<unit>],...
    <site>,<x>,<y>,<value>,<value>,...

Measurements only: no limits, no pass/fail, no bins.  Each line becomes STDF records
(docs/plugins.md, "Records speak STDF"), all at the offset of the line's first byte:

- the ``WATCSV`` line: FAR and MIR (START_T from the start time in ``Options.timezone``);
- ``WAFER``: WIR;
- the ``SITE`` header: one TSR per parameter, naming it (no STDF record holds column
  names, and a TSR is what names a test);
- a site row: PIR, one PTR per value (TEST_NUM from the parameter's name, see
  ``Options.test_numbers``; no limits; TEST_FLG "no pass/fail"), PRR with pass/fail
  invalid and HARD_BIN 65535 ("no bin"); then WRR once the wafer has its declared sites.

There is no end-of-file line: the file is whole once the declared wafers have their
declared sites, and the parser says so (``complete``), so the tail closes it at once;
``close()`` then yields the MRR.  A file that ends early yields no MRR (the lot stays open
at the hub, as for an STDF file without its MRR).  A line is complete only with its
newline: ``close()`` on a last line without one raises ``FormatError`` (it may be a value
cut short).  Anything else malformed is a ``FormatError`` with the offset of its line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from edgegw.formats import FormatError
from edgegw.stdf import stdf_fields, test_number

__all__ = ["WAT", "WatFormat", "WatOptions", "WatParser", "WatRecord"]

#: Longest line accepted (a row of a few thousand parameters fits many times over); a
#: longer one is not WAT CSV, and memory stays bounded whatever the input.
MAX_LINE_BYTES = 1 << 20
_HEADER = re.compile(r"^([^\[\]]+?)\s*(?:\[([^\[\]]*)\])?$")
_TZ = re.compile(r"^(?:UTC|Z|([+-])(\d{2}):(\d{2}))$")
#: PTR OPT_FLAG for a result without limits: no RES_SCAL (bit 0), no spec limits (2, 3),
#: no low/high test limit (6, 7); bit 1 is reserved and set, as writers do
_NO_LIMITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x40 | 0x80
_NO_PASS_FAIL = 0x40  # PTR TEST_FLG bit 6: no pass/fail indication
_PART_NO_PASS_FAIL = 0x10  # PRR PART_FLG bit 4: pass/fail invalid
_NO_BIN = 65535


class WatRecord(NamedTuple):
    name: str
    offset: int
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WatOptions:
    """Per-source settings (the tail source's ``options`` table)."""

    #: the zone the file's start time is written in: "UTC" or "+hh:mm" / "-hh:mm"
    timezone: str = "UTC"
    #: TEST_NUM of a parameter: "name" -- the CRC-32 of its name (edgegw.stdf.
    #: test_number), the same in every file; "column" -- its column (1 = the first
    #: parameter), only for files that always have the same columns
    test_numbers: Literal["name", "column"] = "name"

    def validate(self) -> list[tuple[str, str]]:
        if _TZ.match(self.timezone) is None:
            return [("timezone", f"expected 'UTC' or an offset like '+01:00', got "
                                 f"{self.timezone!r}")]
        return []

    @property
    def tzinfo(self) -> dt.tzinfo:
        m = _TZ.match(self.timezone)
        if m is None or m.group(1) is None:
            return dt.UTC
        sign = -1 if m.group(1) == "-" else 1
        return dt.timezone(sign * dt.timedelta(hours=int(m.group(2)),
                                               minutes=int(m.group(3))))


class _Param(NamedTuple):
    name: str
    units: str
    test_num: int


class WatParser:
    """Incremental WAT CSV parser (see the module docstring)."""

    def __init__(self, options: WatOptions | None = None) -> None:
        self.options = options or WatOptions()
        self._buf = b""
        self._base = 0  # stream offset of _buf[0]
        self._lot = False
        self._start_t = 0  # the lot's start: the file has no wafer times
        self._wafers_declared = 0
        self._wafers_done = 0
        self._wafer: str | None = None
        self._sites_declared = 0
        self._sites = 0
        self._params: list[_Param] = []
        self._units_sent: set[int] = set()
        self.complete = False  # the declared wafers all have their declared sites

    @property
    def position(self) -> int:
        return self._base

    def feed(self, data: bytes) -> None:
        self._buf += bytes(data)

    def state(self) -> dict[str, Any]:
        return {"wafers_done": self._wafers_done}

    def records(self) -> Iterator[WatRecord]:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE_BYTES:
                    raise FormatError(f"a line longer than {MAX_LINE_BYTES} bytes: not WAT CSV",
                                      self._base)
                return
            line, offset = self._buf[:nl], self._base
            out = self._line(line.rstrip(b"\r"), offset)
            self._buf = self._buf[nl + 1:]
            self._base += nl + 1
            yield from out

    def close(self) -> Iterator[WatRecord]:
        yield from self.records()
        if self._buf:
            raise FormatError("the file ends inside a line (no newline after it): the "
                              "tester was still writing it", self._base)
        if self.complete:
            yield WatRecord("MRR", self._base, stdf_fields("MRR", {}))

    # -- one line ------------------------------------------------------------------------

    def _line(self, raw: bytes, offset: int) -> list[WatRecord]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("not UTF-8 text: not WAT CSV", offset) from None
        cells = [c.strip() for c in text.split(",")]
        try:
            if not self._lot:
                return self._lot_line(cells, offset)
            if self.complete:
                raise ValueError("a line after the last declared wafer")
            if cells[0] == "WAFER":
                return self._wafer_line(cells, offset)
            if cells[0] == "SITE":
                return self._header(cells, offset)
            return self._row(cells, offset)
        except FormatError:
            raise
        except ValueError as exc:  # int(), float(), strptime(), stdf_fields() ranges
            raise FormatError(str(exc)[:200], offset) from None

    def _lot_line(self, cells: list[str], offset: int) -> list[WatRecord]:
        if cells[0] != "WATCSV":
            raise FormatError("not WAT CSV: the first line does not start with WATCSV",
                              offset)
        if len(cells) != 8 or cells[1] != "1":
            raise ValueError("the WATCSV line must be WATCSV,1,lot,product,tester,program,"
                             "start,wafers")
        _, _, lot, product, tester, program, start, wafers = cells
        when = dt.datetime.strptime(start, "%Y-%m-%d %H:%M:%S")
        start_t = int(when.replace(tzinfo=self.options.tzinfo).timestamp())
        self._wafers_declared = _count(wafers, "wafers")
        self._start_t = start_t
        self._lot = True
        return [WatRecord("FAR", offset, stdf_fields("FAR", {"CPU_TYPE": 2, "STDF_VER": 4})),
                WatRecord("MIR", offset, stdf_fields("MIR", {
                    "SETUP_T": start_t, "START_T": start_t, "STAT_NUM": 1, "LOT_ID": lot,
                    "PART_TYP": product, "NODE_NAM": tester, "TSTR_TYP": tester,
                    "JOB_NAM": program}))]

    def _wafer_line(self, cells: list[str], offset: int) -> list[WatRecord]:
        if len(cells) != 3 or not cells[1]:
            raise ValueError("the WAFER line must be WAFER,wafer id,sites")
        if self._wafer is not None:
            raise ValueError(f"wafer {cells[1]!r} starts before wafer {self._wafer!r} has "
                             f"its {self._sites_declared} sites")
        self._wafer = cells[1]
        self._sites_declared = _count(cells[2], "sites")
        self._sites = 0
        return [WatRecord("WIR", offset, stdf_fields("WIR", {
            "HEAD_NUM": 1, "SITE_GRP": 255, "START_T": self._start_t,
            "WAFER_ID": self._wafer}))]

    def _header(self, cells: list[str], offset: int) -> list[WatRecord]:
        if cells[:3] != ["SITE", "X", "Y"] or len(cells) < 4:
            raise ValueError("the header must be SITE,X,Y then one column per parameter")
        params = []
        for column, cell in enumerate(cells[3:], start=1):
            m = _HEADER.match(cell)
            if m is None:
                raise ValueError(f"parameter column {column}: {cell!r} is not name[unit]")
            name, units = m.group(1), m.group(2) or ""
            num = test_number(name) if self.options.test_numbers == "name" else column
            params.append(_Param(name, units, num))
        if len({p.test_num for p in params}) != len(params):
            raise ValueError("two parameters with the same name (or the same CRC-32)")
        self._params = params
        return [WatRecord("TSR", offset, stdf_fields("TSR", {
            "HEAD_NUM": 255, "SITE_NUM": 0, "TEST_TYP": "P", "TEST_NUM": p.test_num,
            "TEST_NAM": p.name})) for p in params]

    def _row(self, cells: list[str], offset: int) -> list[WatRecord]:
        if self._wafer is None:
            raise ValueError("a site row outside a wafer (no WAFER line before it)")
        if not self._params:
            raise ValueError("a site row before the SITE,X,Y,... header")
        if len(cells) != 3 + len(self._params):
            raise ValueError(f"a site row of {len(cells)} cells: the header has "
                             f"{3 + len(self._params)}")
        site, x, y = _count(cells[0], "site"), int(cells[1]), int(cells[2])
        head = {"HEAD_NUM": 1, "SITE_NUM": 1}
        out = [WatRecord("PIR", offset, stdf_fields("PIR", head))]
        measured = 0
        for param, cell in zip(self._params, cells[3:], strict=True):
            if cell == "":
                continue  # not measured at this site
            value = float(cell)
            fields: dict[str, Any] = {"TEST_NUM": param.test_num, **head,
                                      "TEST_FLG": _NO_PASS_FAIL, "PARM_FLG": 0,
                                      "RESULT": value, "TEST_TXT": param.name}
            if param.test_num not in self._units_sent:  # the test's defaults, once
                self._units_sent.add(param.test_num)
                fields.update(OPT_FLAG=_NO_LIMITS, UNITS=param.units)
            out.append(WatRecord("PTR", offset, stdf_fields("PTR", fields)))
            measured += 1
        out.append(WatRecord("PRR", offset, stdf_fields("PRR", {
            **head, "PART_FLG": _PART_NO_PASS_FAIL, "NUM_TEST": measured, "HARD_BIN": _NO_BIN,
            "X_COORD": x, "Y_COORD": y, "PART_ID": f"{self._wafer}/{site}"})))
        self._sites += 1
        if self._sites == self._sites_declared:
            out.append(WatRecord("WRR", offset, stdf_fields("WRR", {
                "HEAD_NUM": 1, "FINISH_T": 0, "PART_CNT": self._sites,
                "WAFER_ID": self._wafer})))
            self._wafer = None
            self._wafers_done += 1
            self.complete = self._wafers_done == self._wafers_declared
        return out


def _count(text: str, what: str) -> int:
    n = int(text)
    if not 1 <= n <= 65535:
        raise ValueError(f"{what} must be 1 to 65535, got {n}")
    return n


class WatFormat:
    name = "wat"
    description = "WAT CSV: parametric wafer-acceptance (e-test) results (plugin edgegw-wat)"
    suffixes = (".wat.csv", ".wat")
    Options = WatOptions

    def new_parser(self, options: WatOptions | None = None) -> WatParser:
        return WatParser(options)


WAT = WatFormat()
