"""Sans-IO incremental STDF V4 decoder: bytes in (any chunking), decoded records out.

Speed comes from generating Python source, once per record type and byte order, from the
spec table (:mod:`edgegw.stdf.spec`): runs of fixed-size fields are read by one
precompiled ``struct.Struct.unpack_from`` (which also reads the length byte of a C*n
that follows), C*n fields are slices of a latin-1 view of the buffer, and the result dict
is one dict literal (for ``rows()``, one tuple: the same decoders generated a second
time), so there is no per-field dispatch on the common path.  The record
loop is generated too, with the bulk types (PTR, PIR, PRR, MPR, FTR) and GDRs decoded
inline; what a decoder learns about its file (tail memos, GDR layouts) is its own.
Records whose fields stop early (optional trailing fields omitted) return the fields
present so far.  Each type has three decoders: an optimistic one (one bound check per
run of C*n fields; in the loop, the PTR and FTR tail memo), a careful one (a check per
field) it falls back to, and the generic field-by-field one, which is the reference the
others are tested against and handles a field cut in its middle.

Framing rules:

* the first record must be a FAR; the order in which its REC_LEN reads as 2 is the
  byte order (what CPU_TYPE 1 big and 2 little say, when a writer sets it right);
* REC_LEN may be longer than the fields: the rest of the record is ignored;
* a record cut at the end of the available bytes is kept for the next :meth:`feed`;
* unknown record types are skipped by REC_LEN and counted (``unknown_count``), or
  returned as ``UNKNOWN`` records with the raw body when ``keep_unknown`` is set; those
  of the REC_TYPs the spec reserves for vendor software (180, 181) never make garbage;
* :class:`StdfError` (with the byte offset) for input that cannot be STDF: a first record
  that is not a FAR, a REC_LEN larger than the record type can possibly hold, a run of
  records of unknown type (garbage or a zero-filled region), an unknown GDR type code.

Why one module of this size: the decoder is the gateway's hottest loop (``bench/stdf_decode.py``);
its field readers are built once per record type and closed over local names, and they
live beside the loop that calls them on purpose.  The spec tables are in ``spec.py``.
"""

from __future__ import annotations

import os
import struct
from binascii import hexlify
from collections.abc import Callable, Generator, Iterable, Iterator
from functools import partial
from typing import Any, NamedTuple

from ..formats import FormatError
from .codecache import compiled
from .gdrlayout import Layouts
from .spec import BY_NAME, BY_TYPE, GDR_TYPES, STRUCT_CODES, Bits, Field, RecordSpec

try:  # the optional compiled record loop (setup.py); pure Python is the reference
    from . import _accel
except ImportError:  # pragma: no cover - a build without a C compiler
    _accel = None  # type: ignore[assignment]

#: consecutive records of unknown type after which the input is declared garbage
MAX_UNKNOWN_RUN = 8
#: REC_TYPs the spec reserves for Image (180) and IG900 (181) software: their records are
#: skipped like any unknown one but do not count towards a run of garbage
RESERVED_REC_TYPS = frozenset({180, 181})
#: bytes a REC_LEN may exceed the largest encoding of its record's fields (padding)
LENGTH_SLACK = 8


class StdfError(FormatError):
    """Input that is not (or no longer) valid STDF; ``offset`` is the stream byte offset."""


class StdfRecord(NamedTuple):
    name: str
    #: byte offset of the record header in the whole stream
    offset: int
    #: field values under the spec's names; absent trailing fields are not in the dict
    fields: dict[str, Any]


#: record name -> its field names in spec order (a row's values are in this order)
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    **{spec.name: tuple(f.name for f in spec.fields) for spec in BY_NAME.values()},
    "UNKNOWN": ("REC_TYP", "REC_SUB", "DATA"),
}


#: A record as a row, ``(name, offset, values)``: its type name, the byte offset of its
#: header in the whole stream, and the values of the fields present in the order of
#: ``FIELD_NAMES[name]`` (a record whose trailing fields are absent has fewer).  A plain
#: tuple, the cheapest thing to make per record (a named tuple costs a call more).
StdfRow = tuple[str, int, tuple[Any, ...]]


def row_fields(row: StdfRow) -> dict[str, Any]:
    """A row's fields as the dict :class:`StdfRecord` carries."""
    return dict(zip(FIELD_NAMES[row[0]], row[2], strict=False))


class _Short(Exception):
    """A field does not fit in what is left of the record (internal)."""


_new_record = tuple.__new__
_SIZES = {"U1": 1, "U2": 2, "U4": 4, "U8": 8, "I1": 1, "I2": 2, "I4": 4, "I8": 8,
          "R4": 4, "R8": 8, "B1": 1, "C1": 1}
_UF_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


# --------------------------------------------------------------------------- field readers
# Each reader returns (value, next_position) or raises _Short.  They serve the generic
# decoder and the variable-size fields of the compiled decoders.

def _read_cn(buf: bytes, p: int, end: int) -> tuple[str, int]:
    if p >= end:
        raise _Short
    q = p + 1 + buf[p]
    if q > end:
        raise _Short
    return buf[p + 1:q].decode("latin-1"), q


def _read_bn(buf: bytes, p: int, end: int) -> tuple[bytes, int]:
    if p >= end:
        raise _Short
    q = p + 1 + buf[p]
    if q > end:
        raise _Short
    return buf[p + 1:q], q


class _Readers:
    """Readers that depend on the byte order."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.u2 = struct.Struct(order + "H").unpack_from
        self.scalar: dict[str, Callable[[bytes, int], tuple[Any, ...]]] = {
            t: struct.Struct(order + c).unpack_from for t, c in STRUCT_CODES.items()}

    def sn(self, buf: bytes, p: int, end: int) -> tuple[str, int]:
        if p + 2 > end:
            raise _Short
        q = p + 2 + self.u2(buf, p)[0]
        if q > end:
            raise _Short
        return buf[p + 2:q].decode("latin-1"), q

    def dn(self, buf: bytes, p: int, end: int) -> tuple[Bits, int]:
        if p + 2 > end:
            raise _Short
        nbits = self.u2(buf, p)[0]
        q = p + 2 + (nbits + 7) // 8
        if q > end:
            raise _Short
        return Bits(nbits, buf[p + 2:q]), q

    def one(self, typ: str, buf: bytes, p: int, end: int, size: int = 0) -> tuple[Any, int]:
        """Read one value of STDF type ``typ`` (``size`` for Uf/Cf)."""
        if typ == "Cn":
            return _read_cn(buf, p, end)
        if typ == "Bn":
            return _read_bn(buf, p, end)
        if typ == "Sn":
            return self.sn(buf, p, end)
        if typ == "Dn":
            return self.dn(buf, p, end)
        if typ == "Vn":
            return self.vn(buf, p, end)
        if typ == "Cf":
            if p + size > end:
                raise _Short
            return buf[p:p + size].decode("latin-1"), p + size
        if typ == "Uf":
            code = _UF_CODES.get(size)
            if code is None:
                raise _Short
            if p + size > end:
                raise _Short
            return struct.unpack_from(self.order + code, buf, p)[0], p + size
        if typ == "N1":
            if p >= end:
                raise _Short
            return buf[p] & 0x0F, p + 1
        n = _SIZES[typ]
        if p + n > end:
            raise _Short
        value = self.scalar[typ](buf, p)[0]
        if typ == "C1":
            value = value.decode("latin-1")
        return value, p + n

    def array(self, typ: str, count: int, buf: bytes, p: int, end: int,
              size: int = 0) -> tuple[list[Any], int]:
        """Read a ``kxTYPE`` array of ``count`` elements."""
        if typ == "N1":
            q = p + (count + 1) // 2
            if q > end:
                raise _Short
            out = []
            for b in buf[p:q]:
                out.append(b & 0x0F)
                out.append(b >> 4)
            del out[count:]
            return out, q
        code = STRUCT_CODES.get(typ)
        if code is not None and typ != "C1":
            q = p + count * _SIZES[typ]
            if q > end:
                raise _Short
            return list(struct.unpack_from(f"{self.order}{count}{code}", buf, p)), q
        values = []
        for _ in range(count):
            value, p = self.one(typ, buf, p, end, size)
            values.append(value)
        return values, p

    def vn(self, buf: bytes, p: int, end: int) -> tuple[list[tuple[int, Any]], int]:
        """GDR GEN_DATA: a list of ``(type_code, value)``; a pad byte is ``(0, None)``."""
        if p + 2 > end:
            raise _Short
        count = self.u2(buf, p)[0]
        p += 2
        out: list[tuple[int, Any]] = []
        for _ in range(count):
            if p >= end:
                raise _Short
            code = buf[p]
            p += 1
            typ = GDR_TYPES.get(code)
            if typ is None:
                raise _BadGdr(code, p - 1)
            if code == 0:
                out.append((0, None))
                continue
            if code == 13:  # N*1 in a GDR occupies a whole byte: keep it for exact round trip
                if p >= end:
                    raise _Short
                out.append((13, buf[p]))
                p += 1
                continue
            value, p = self.one(typ, buf, p, end)
            out.append((code, value))
        return out, p


class _BadGdr(Exception):
    def __init__(self, code: int, pos: int) -> None:
        self.code = code
        self.pos = pos


def decode_generic(spec: RecordSpec, readers: _Readers, buf: bytes, p: int,
                   end: int) -> dict[str, Any]:
    """Field-by-field decoding: the reference semantics.  A field that does not fit in
    the record ends the record: it and every later field are absent."""
    out: dict[str, Any] = {}
    for f in spec.fields:
        size = out.get(f.size, 0) if f.size else 0
        try:
            if f.count is not None:
                value, p = readers.array(f.type, out[f.count], buf, p, end, size)
            else:
                value, p = readers.one(f.type, buf, p, end, size)
        except _Short:
            break
        out[f.name] = value
    return out


# --------------------------------------------------------------------- compiled decoders

class _ArrayUnpackers(dict):
    """element count -> ``unpack_from`` of that many elements of one struct code."""

    def __init__(self, order: str, code: str) -> None:
        super().__init__()
        self.fmt = order + "%d" + code

    def __missing__(self, count: int) -> Callable[[bytes, int], tuple]:
        unpack = struct.Struct(self.fmt % count).unpack_from
        if count <= 1024:  # bounded: a hostile file cannot grow it past 1,024 entries
            self[count] = unpack
        return unpack


_ARRAYS: dict[tuple[str, str], _ArrayUnpackers] = {}


def _arrays(order: str, code: str) -> _ArrayUnpackers:
    table = _ARRAYS.get((order, code))
    if table is None:
        table = _ARRAYS[order, code] = _ArrayUnpackers(order, code)
    return table


#: kxN*1 arrays pack the first element in the low nibble: the bytes with their nibbles
#: swapped, in hex, are the elements in order as hex digits, and _HEX_VALUE turns each
#: digit into its value -- all in C, about half the instructions of a table lookup per
#: byte and a join, or of two translates and an interleave
_SWAP_NIBBLES = bytes(((b >> 4) | (b << 4)) & 0xFF for b in range(256))
_HEX_VALUE = bytes(b"0123456789abcdef".find(c) & 0xFF for c in range(256))


def unpack_nibbles(packed: bytes, count: int) -> list[int]:
    out = list(hexlify(packed.translate(_SWAP_NIBBLES)).translate(_HEX_VALUE))
    if count & 1:
        del out[count:]
    return out


def _gdr_reader(order: str) -> Callable[[bytes, str, int, int], tuple[list, int]]:
    """The compiled decoders' GDR ``V*n`` reader: ``_Readers.vn`` with a table lookup per
    value instead of the generic per-type dispatch: a fixed-size value is one
    ``unpack_from`` at its type byte, which gives the ``(type_code, value)`` pair itself;
    a C*n is a slice of the latin-1 view."""
    u2 = struct.Struct(order + "H").unpack_from
    #: type code -> bytes a fixed-size value takes after its type byte (0: not fixed)
    sizes = [0] * 256
    #: type code -> unpack of the type byte and the value: the (code, value) pair
    pairs: list[Any] = [None] * 256
    for code, typ in GDR_TYPES.items():
        if typ in STRUCT_CODES:
            sizes[code] = struct.calcsize(STRUCT_CODES[typ])
            pairs[code] = struct.Struct(order + "B" + STRUCT_CODES[typ]).unpack_from
    # N*1 in a GDR occupies a whole byte: kept as it is, for an exact round trip
    sizes[13], pairs[13] = 1, struct.Struct("BB").unpack_from
    new = _new_record

    def vn(buf: bytes, txt: str, p: int, end: int) -> tuple[list, int]:
        if p + 2 > end:
            raise _Short
        count = u2(buf, p)[0]
        p += 2
        out: list[tuple[int, Any]] = []
        append = out.append
        for _ in range(count):
            if p >= end:
                raise _Short
            code = buf[p]
            size = sizes[code]
            if size:
                q = p + 1 + size
                if q > end:
                    raise _Short
                append(pairs[code](buf, p))
                p = q
            elif code == 10:
                q = p + 2 + buf[p + 1]  # p + 1 == end: q > end (or IndexError)
                if q > end:
                    raise _Short
                append((10, txt[p + 2:q]))
                p = q
            elif code == 0:
                append((0, None))
                p += 1
            elif code == 11:
                value, p = _read_bn(buf, p + 1, end)
                append((11, value))
            elif code == 12:
                if p + 3 > end:
                    raise _Short
                nbits = u2(buf, p + 1)[0]
                q = p + 3 + ((nbits + 7) >> 3)
                if q > end:
                    raise _Short
                append((12, new(Bits, (nbits, buf[p + 3:q]))))
                p = q
            else:
                raise _BadGdr(code, p)
        return out, p

    return vn


class _GdrParts(NamedTuple):
    """What every GDR reader of one byte order shares (built once per order)."""

    careful: Callable[[bytes, str, int, int], tuple[list, int]]
    u2: Callable[[bytes, int], tuple]
    #: type code -> bytes of a fixed-size value with its type byte (0: not fixed)
    steps: list[int]
    #: type code -> unpack of (code, value)
    pairs: list[Any]


_GDR_PARTS: dict[str, _GdrParts] = {}


def _gdr_parts(order: str) -> _GdrParts:
    parts = _GDR_PARTS.get(order)
    if parts is None:
        steps = [0] * 256
        pairs: list[Any] = [None] * 256
        for code, typ in GDR_TYPES.items():
            if typ in STRUCT_CODES:
                steps[code] = 1 + struct.calcsize(STRUCT_CODES[typ])
                pairs[code] = struct.Struct(order + "B" + STRUCT_CODES[typ]).unpack_from
        steps[13], pairs[13] = 2, struct.Struct("BB").unpack_from
        parts = _GDR_PARTS[order] = _GdrParts(_gdr_reader(order),
                                              struct.Struct(order + "H").unpack_from,
                                              steps, pairs)
    return parts


def _gdr_fast(order: str, table: Layouts | None = None) -> Callable[[bytes, str, int, int],
                                                                    tuple[list, int]]:
    """The GDR reader: one bound check per GDR instead of two per value, the careful
    reader (``_gdr_reader``) taking over when the values run past the record's end.
    ``table``: the layouts learnt by one decoder (its own: one file's learning is not
    another's); a GDR whose type codes repeat an earlier one's is read by that
    layout's compiled reader (:mod:`.gdrlayout`), no loop step per value.  None: the
    value-by-value reader only."""
    careful, u2, steps, pairs = _gdr_parts(order)
    if table is None:
        state: list[Any] = [False, 0]
        nothing: dict[int, Any] = {}
        get: Callable[[int], Any] = nothing.get
        learn: Callable[[int, list], None] = lambda count, values: None  # noqa: E731
    else:
        # [learning, hits]: off for the rest of a file whose layouts do not repeat
        state, get, learn = table.state, table.by_key.get, table.learn
    new = _new_record
    error = struct.error

    def vn(buf: bytes, txt: str, p0: int, end: int) -> tuple[list, int]:
        if p0 + 2 > end:
            raise _Short
        p = p0 + 2
        count = u2(buf, p0)[0]
        if state[0] and p < end:
            layout = get(count << 8 | buf[p])
            if layout is not None:
                done = layout(buf, txt, p, end)
                if done is not None:
                    state[1] += 1
                    return done
        out: list[tuple[int, Any]] = []
        append = out.append
        try:
            for _ in range(count):
                code = buf[p]
                pair = pairs[code]
                if pair is not None:
                    append(pair(buf, p))
                    p += steps[code]
                elif code == 10:
                    q = p + 2 + buf[p + 1]
                    append((10, txt[p + 2:q]))
                    p = q
                elif code == 0:
                    append((0, None))
                    p += 1
                elif code == 11:
                    q = p + 2 + buf[p + 1]
                    append((11, buf[p + 2:q]))
                    p = q
                elif code == 12:
                    nbits = u2(buf, p + 1)[0]
                    q = p + 3 + ((nbits + 7) >> 3)
                    append((12, new(Bits, (nbits, buf[p + 3:q]))))
                    p = q
                elif p < end:
                    raise _BadGdr(code, p)
                else:
                    raise _Short
        except (IndexError, error):
            p = end + 1  # past the buffer: the careful reader decides
        if p > end:
            return careful(buf, txt, p0, end)
        if state[0]:
            learn(count, out)
        return out, p

    return vn


def _gdr_checker(order: str) -> Callable[[bytes, int, int], None]:
    """A skipped GDR's check: walk its type codes without making values; raise
    ``_BadGdr`` where decoding it would (an unknown code before the record ends), stop
    quietly where decoding would find the record cut short.

    No bound check per value: positions only grow, so once a value starts or ends past
    the record's end every later one does, and an unknown code is an error only where
    it starts before the end (reading past the buffer stops the walk)."""
    u2 = struct.Struct(order + "H").unpack_from
    steps = [0] * 256  # bytes of a fixed-size value with its type byte
    for code, typ in GDR_TYPES.items():
        if typ in STRUCT_CODES:
            steps[code] = 1 + struct.calcsize(STRUCT_CODES[typ])
    steps[13] = 2  # N*1 in a GDR occupies a whole byte
    steps[0] = 1  # a pad byte
    error = struct.error

    def check(buf: bytes, p: int, end: int) -> None:
        if p + 2 > end:
            return
        count = u2(buf, p)[0]
        p += 2
        try:
            for _ in range(count):
                code = buf[p]
                step = steps[code]
                if step:
                    p += step
                elif code == 10 or code == 11:
                    p += 2 + buf[p + 1]
                elif code == 12:
                    p += 3 + ((u2(buf, p + 1)[0] + 7) >> 3)
                elif p < end:
                    raise _BadGdr(code, p)
                else:
                    return
        except (IndexError, error):
            return

    return check


def _segments(fields: tuple[Field, ...]) -> list[list[int]]:
    """Group field indexes: runs of fixed-size scalars together, every other field alone."""
    segs: list[list[int]] = []
    run: list[int] = []
    for i, f in enumerate(fields):
        if f.count is None and f.type in _SIZES:
            run.append(i)
            continue
        if run:
            segs.append(run)
            run = []
        segs.append([i])
    if run:
        segs.append(run)
    return segs


#: PTR: the fields from TEST_TXT on are the test's name and semi-static information
#: (limits, scales, units, formats).  Testers that do not truncate PTRs repeat the same
#: bytes there for every result of a test, so the decoded values of the last MEMO_SIZE
#: distinct tails are kept, keyed by their bytes: a repeat costs one slice and one dict
#: lookup instead of decoding twelve fields.  FTR: the fields from VECT_NAM on (seven
#: C*n, PATG_NUM, SPIN_MAP) are the same bytes in every passing result of a test
#: (names, mostly empty texts), half a passing FTR's instructions (from FAIL_PIN on
#: measured worse: ftr-heavy 416M -> 459M instructions).  MPR: from UNITS on (five C*n
#: and the spec limits), after RTN_INDX, whose element count is in the record's head (so
#: its bytes alone do not say what they decode to) and whose value is a list (mutable:
#: never shared between records).  The values kept are immutable (int, float, str,
#: Bits).
MEMO_FROM = {"PTR": [f.name for f in BY_NAME["PTR"].fields].index("TEST_TXT"),
             "FTR": [f.name for f in BY_NAME["FTR"].fields].index("VECT_NAM"),
             "MPR": [f.name for f in BY_NAME["MPR"].fields].index("UNITS")}
#: PTR: tails cut before OPT_FLAG (TEST_TXT, ALARM_ID: testers that write a test's
#: information only in its first PTR) are never kept: their hits would keep the memo on
#: for a file whose full tails never repeat (the catalyst shape: limits drifting per
#: part), where its misses cost more than the hits save
MEMO_KEEP_FROM = {"PTR": [f.name for f in BY_NAME["PTR"].fields].index("OPT_FLAG")}
#: PTR: a second memo from UNITS on (UNITS, three formats, the spec limits: four C*n and
#: eight bytes), for the PTRs the first one misses: adaptive limits that move part to
#: part (the ptr-varied and catalyst shapes) make every whole tail new, but the test's
#: units, formats and spec limits are still the same bytes in every result of it.  A hit
#: saves four slices, an ``unpack_from`` and the walk over the C*n lengths; only whole
#: tails (up to HI_SPEC) are kept.  Values kept as a tuple (immutable), for rows and
#: dicts alike.
MEMO2_FROM = {"PTR": [f.name for f in BY_NAME["PTR"].fields].index("UNITS")}
MEMO_SIZE = 4096


def _memo(rows: bool = False) -> tuple[Callable[[bytes], Any], Callable[[bytes, Any], Any],
                                       list[Any]]:
    """A bounded map from tail bytes to a template of the record's field dict: a repeat
    copies the template (one C-level copy of the whole dict) and sets the fields before
    the tail, cheaper than building the dict anew.  For rows, the tail's values as a
    tuple (immutable: no copy), which the row's head is prepended to."""
    memo: dict[bytes, Any] = {}
    state: list[Any] = [True, 0]  # [on, hits since the last clear]

    def put(tail: bytes, fields: Any) -> Any:
        if len(memo) >= MEMO_SIZE:
            # full: MEMO_SIZE misses since the last clear.  A hit saves about twice what
            # a miss costs, so with fewer hits than half the misses the file's tails do
            # not repeat (limits per part, per site on many sites): off for the rest
            # of this decoder's file
            if state[1] * 2 < len(memo):
                state[0] = False
            state[1] = 0
            memo.clear()  # bounded: memory stays flat on files whose tails never repeat
        memo[tail] = fields if rows else fields.copy()  # the consumer owns its dict
        return fields

    return memo.get, put, state


def tail_memo_active(decoder: StdfDecoder) -> bool:
    """Whether every tail memo of ``decoder`` and its GDR layouts are still consulted
    (each turns itself off, for that decoder, after too many misses; a memo not yet
    used is on).  For benchmarks and tests."""
    return all(learnt[-1][0] for learnt in decoder._learnt.values())


def set_tail_memo(size: int) -> None:
    """Set how many distinct PTR tails are remembered (0 turns the memo off); the
    compiled decoders with and without the memo are each built once.  For benchmarks
    and tests."""
    global MEMO_SIZE
    MEMO_SIZE = size


#: C*n fields of a run after which the optimistic code ends a record without an
#: exception (``_body``: ``run_end``)
RUN_ENDS = 8


def _literal(fields: tuple[Field, ...], n: int, rows: bool = False) -> str:
    """Source of the dict literal of the first ``n`` fields (values in locals f0, f1...),
    or of the tuple of their values (``rows``)."""
    if rows:
        return _tuple(0, n)
    return "{" + ", ".join(f"{fields[i].name!r}: f{i}" for i in range(n)) + "}"


def _tuple(start: int, n: int) -> str:
    """Source of the tuple of the values of fields ``start`` to ``n - 1``."""
    return "(" + "".join(f"f{i}, " for i in range(start, n)) + ")"


def _cn_run(fields: tuple[Field, ...], start: int) -> list[int]:
    """Indexes of the consecutive plain C*n fields from ``start`` on."""
    run = []
    for i in range(start, len(fields)):
        if fields[i].type != "Cn" or fields[i].count is not None:
            break
        run.append(i)
    return run


def _compile(spec: RecordSpec, readers: _Readers,
             rows: bool = False) -> Callable[[bytes, str, int, int], Any]:
    """Generate and exec a decoding function specialised for one record type and order:
    an optimistic one, falling back to a careful one, falling back to the generic.
    ``rows``: the functions return the tuple of the values present, not a dict."""
    ns: dict[str, Any] = {"_spec": spec, "_generic": _generic_row if rows else decode_generic}
    lines = ["def careful(buf, txt, p0, end):", "  p = p0", "  try:",
             *_body(spec, readers, ns, "    ", "return {}", "c", rows=rows),
             "  except (_Short, IndexError):",
             # IndexError: a record at the very end of the buffer indexed buf[end]
             "    return _generic(_spec, _r, buf, p0, end)",
             "def decode(buf, txt, p0, end):", "  p = p0", "  try:",
             *_body(spec, readers, ns, "    ", "return {}", "o", optimistic=True, rows=rows),
             "  except (_Short, IndexError):",
             "    return careful(buf, txt, p0, end)"]
    src = "\n".join(lines) + "\n"
    exec(compiled(src, f"<stdf {spec.name} {readers.order}>"), ns)
    return ns["decode"]


def _body(spec: RecordSpec, readers: _Readers, ns: dict[str, Any], ind: str, ret: str,
          prefix: str, optimistic: bool = False, rows: bool = False,
          learnt: list[str] | None = None) -> list[str]:
    """Source lines decoding ``spec``'s fields from ``p`` into locals and ending with
    ``ret`` formatted with the field dict literal (also for a record that ends early).
    Raises ``_Short`` (or IndexError at the end of the buffer) for the generic decoder.

    The code takes the buffer twice: as bytes (for numbers and lengths) and as the
    same bytes decoded latin-1 (``txt``), so a ``C*n`` field is one str slice.  The
    bound check each field needs anyway doubles as the "record ends here" check: only
    when a field does not fit does the code look at whether the record ended exactly
    before it (trailing fields absent) or inside it (the generic decoder decides).

    ``optimistic``: a run of consecutive C*n fields is read with one bound check at its
    end (positions only grow, so the last one fitting means all fit); a record that ends
    inside the run raises ``_Short`` and the careful code takes over.

    ``learnt``: the code is the record loop's, whose decoder's own tail memo and GDR
    layouts are in locals (``_memo_get<prefix>``..., ``_vn``) the loop sets when it
    starts; the line that sets them is appended to ``learnt``.  Otherwise (None) no memo
    and no layouts: the code is shared by every decoder.
    """
    fields = spec.fields
    ns.update({"_Short": _Short, "_chr": chr, "Bits": Bits, "_bn": _read_bn, "_r": readers,
               "_new": _new_record})
    lines: list[str] = []

    memo_from = MEMO_FROM.get(spec.name, -1) if optimistic and learnt is not None else -1
    memo2_from = MEMO2_FROM.get(spec.name, -1) if memo_from >= 0 else -1
    # a record with fewer fields is looked up but never kept (nor counted as a miss)
    keep_from = max(memo_from, MEMO_KEEP_FROM.get(spec.name, memo_from))

    def literal(n: int) -> str:
        # with the memo off (``tail`` None) the record is made as without a memo: one
        # tuple, not the tail's and the head's joined
        if n <= keep_from:
            return ret.format(_literal(fields, n, rows))
        if 0 <= memo_from < n and rows:
            return ret.format(f"{_tuple(0, n)} if tail is None else {_tuple(0, memo_from)} + "
                              f"_memo_put{prefix}(tail, {_tuple(memo_from, n)})")
        if 0 <= memo_from < n:
            return ret.format(f"{_literal(fields, n)} if tail is None else "
                              f"_memo_put{prefix}(tail, {_literal(fields, n)})")
        return ret.format(_literal(fields, n, rows))

    def run_end(run: list[int], starts: dict[int, str], last: str) -> None:
        """The bound check of a run of C*n fields: a record that ends right after one
        of them (fields omitted, as testers write PRRs ending at PART_ID) ends here,
        without the cost of an exception; one that ends inside a field raises.  Only
        after one of the first RUN_ENDS: these lines grow with the square of the run's
        length (the MIR's run of 30: 3x the source, 14 -> 4.5 ms to compile it when
        the code cache is off or cold); a record that ends later in a run is the
        careful code's."""
        lines.append(f"{ind}if {last} > end:")
        for k, j in enumerate(run[:-1][:RUN_ENDS]):
            # the ends only grow: the first one at or past ``end`` decides
            lines.append(f"{ind}  if e{j} == end:")
            for m in run[:k + 1]:
                lines.append(f"{ind}    f{m} = txt[{starts[m]}:e{m}]")
            lines.append(f"{ind}    {literal(j + 1)}")
        lines.append(f"{ind}  raise _Short")

    def cut_in_run(seg: list[int], k: int, at: str) -> None:
        """A record that ends between two fields of a run of fixed-size fields (a PTR
        written up to OPT_FLAG) returns the fields before the cut here, instead of
        through two exceptions and the generic decoder (5x the time of a whole PTR).
        In the optimistic code only: the careful code is reached after it, and the lines
        cost compile time."""
        if not optimistic:
            return
        offset = 0
        for j, i in enumerate(seg[:-1]):
            offset += _SIZES[fields[i].type]
            part = seg[:j + 1]
            codes = "".join("B" if fields[x].type == "C1" else STRUCT_CODES[fields[x].type]
                            for x in part)
            ns[f"_s{prefix}{k}_{j}"] = struct.Struct(readers.order + codes).unpack_from
            lines.append(f"{at}if p + {offset} == end:")
            lines.append(f"{at}  {''.join(f'f{x}, ' for x in part)}= _s{prefix}{k}_{j}(buf, p)")
            lines.extend(f"{at}  f{x} = _chr(f{x})" for x in part if fields[x].type == "C1")
            lines.append(f"{at}  {literal(seg[j + 1])}")

    def memo_block(start: str, first: int | None) -> None:
        """The tail memo's lookup, the tail being the bytes from ``start`` to the end;
        ``first``: the record may end before the tail (checked here)."""
        # named per type: the record loop holds the PTR's and the FTR's
        assert learnt is not None
        learnt.append(f"_memo_get{prefix}, _memo_put{prefix}, _memo_on{prefix} = "
                      f"self._memo_for({spec.name!r}, {rows})")
        if first is not None:
            lines.append(f"{ind}if p >= end: {literal(first)}")
        lines.append(f"{ind}if _memo_on{prefix}[0]:")
        lines.append(f"{ind}  tail = buf[{start}:end]")
        lines.append(f"{ind}  hit = _memo_get{prefix}(tail)")
        lines.append(f"{ind}  if hit is not None:")
        lines.append(f"{ind}    _memo_on{prefix}[1] += 1")
        if rows:
            lines.append(f"{ind}    {ret.format(_tuple(0, memo_from) + ' + hit')}")
        else:
            lines.append(f"{ind}    _d = hit.copy()")
            for i in range(memo_from):
                lines.append(f"{ind}    _d[{fields[i].name!r}] = f{i}")
            lines.append(f"{ind}    {ret.format('_d')}")
        lines.append(f"{ind}else:")
        lines.append(f"{ind}  tail = None")

    def memo2_block() -> None:
        """The second memo's lookup (``MEMO2_FROM``), at the length byte of its first
        C*n (``p - 1``), after the first memo missed; a hit is the record's whole
        tail, which the first memo keeps as it keeps any (``literal``)."""
        assert learnt is not None
        learnt.append(f"_memo2_get{prefix}, _memo2_put{prefix}, _memo2_on{prefix} = "
                      f"self._memo_for({spec.name + '2'!r}, True)")
        lines.append(f"{ind}if _memo2_on{prefix}[0]:")
        lines.append(f"{ind}  tail2 = buf[p - 1:end]")
        lines.append(f"{ind}  hit = _memo2_get{prefix}(tail2)")
        lines.append(f"{ind}  if hit is not None:")
        lines.append(f"{ind}    _memo2_on{prefix}[1] += 1")
        whole = len(fields)
        if rows:
            # the first memo's tail is the head's fields after TEST_TXT and the hit
            kept = f"_memo_put{prefix}(tail, {_tuple(memo_from, memo2_from)} + hit)"
            lines.append(f"{ind}    " + ret.format(
                f"{_tuple(0, memo2_from)} + hit if tail is None else "
                f"{_tuple(0, memo_from)} + {kept}"))
        else:
            lines.append(f"{ind}    {_tuple(memo2_from, whole)[1:-1]}= hit")
            lines.append(f"{ind}    {literal(whole)}")
        lines.append(f"{ind}else:")
        lines.append(f"{ind}  tail2 = None")

    skip: set[int] = set()  # C*n fields read together with the run before them
    for k, seg in enumerate(_segments(fields)):
        first = seg[0]
        f = fields[first]
        if first == memo_from and first not in skip:
            memo_block("p", first)
        if f.count is None and f.type in _SIZES:
            size = sum(_SIZES[fields[i].type] for i in seg)
            names = ", ".join(f"f{i}" for i in seg)
            codes = "".join("B" if fields[i].type == "C1" else STRUCT_CODES[fields[i].type]
                            for i in seg)
            after = seg[-1] + 1
            cn_next = (after < len(fields) and fields[after].type == "Cn"
                       and fields[after].count is None)
            if cn_next:
                # one unpack also reads the length byte of the C*n that follows the run
                ns[f"_s{prefix}{k}"] = struct.Struct(readers.order + codes).unpack_from
                ns[f"_l{prefix}{k}"] = struct.Struct(readers.order + codes + "B").unpack_from
                lines.append(f"{ind}if p + {size + 1} > end:")
                lines.append(f"{ind}  if p >= end: {literal(first)}")
                lines.append(f"{ind}  if p + {size} > end:")
                cut_in_run(seg, k, f"{ind}    ")
                lines.append(f"{ind}    raise _Short")
                lines.append(f"{ind}  {names}, = _s{prefix}{k}(buf, p)")
                for i in seg:
                    if fields[i].type == "C1":
                        lines.append(f"{ind}  f{i} = _chr(f{i})")
                lines.append(f"{ind}  {literal(after)}")
                lines.append(f"{ind}{names}, ln = _l{prefix}{k}(buf, p)")
                # C*1 to str before the C*n run, which may end the record
                lines += [f"{ind}f{i} = _chr(f{i})" for i in seg if fields[i].type == "C1"]
                lines.append(f"{ind}p += {size + 1}")
                if after == memo_from:
                    # the memo's tail starts at the C*n's length byte, read above
                    memo_block("p - 1", None)
                if after == memo2_from:
                    memo2_block()
                if optimistic:
                    run = _cn_run(fields, after)
                    lines.append(f"{ind}e{after} = p + ln")
                    starts = {after: "p"}
                    prev = f"e{after}"
                    for i in run[1:]:
                        lines.append(f"{ind}e{i} = {prev} + 1 + buf[{prev}]")
                        starts[i] = f"{prev} + 1"
                        prev = f"e{i}"
                    run_end(run, starts, prev)
                    for i in run:
                        lines.append(f"{ind}f{i} = txt[{starts[i]}:e{i}]")
                    lines.append(f"{ind}p = {prev}")
                    skip.update(run)
                else:
                    lines.append(f"{ind}q = p + ln")
                    lines.append(f"{ind}if q > end: raise _Short")
                    lines.append(f"{ind}f{after} = txt[p:q]")
                    lines.append(f"{ind}p = q")
                    skip.add(after)
            elif size == 1:
                lines.append(f"{ind}if p >= end: {literal(first)}")
                lines.append(f"{ind}f{first} = buf[p]")
                if f.type == "I1":
                    lines.append(f"{ind}if f{first} > 127: f{first} -= 256")
                lines.append(f"{ind}p += 1")
            else:
                ns[f"_s{prefix}{k}"] = struct.Struct(readers.order + codes).unpack_from
                lines.append(f"{ind}if p + {size} > end:")
                lines.append(f"{ind}  if p >= end: {literal(first)}")
                cut_in_run(seg, k, f"{ind}  ")
                lines.append(f"{ind}  raise _Short")
                lines.append(f"{ind}{names}, = _s{prefix}{k}(buf, p)")
                lines.append(f"{ind}p += {size}")
            if not cn_next:
                lines += [f"{ind}f{i} = _chr(f{i})" for i in seg if fields[i].type == "C1"]
            continue
        if first in skip:
            continue
        i = first
        if f.count is not None:
            # an empty array costs no bytes, so an array is present whenever its count is
            cnt = f"f{[x.name for x in fields].index(f.count)}"
            size_of = f"f{[x.name for x in fields].index(f.size)}" if f.size else "0"
            if f.type in _SIZES and f.type != "C1":
                # one unpack of the whole array, by a Struct cached per element count
                code = STRUCT_CODES[f.type]
                ns[f"_a{code}"] = _arrays(readers.order, code)
                lines += [f"{ind}if {cnt}:",
                          f"{ind}  q = p + {cnt} * {_SIZES[f.type]}",
                          f"{ind}  if q > end: raise _Short",
                          f"{ind}  f{i} = list(_a{code}[{cnt}](buf, p))",
                          f"{ind}  p = q",
                          f"{ind}else:",
                          f"{ind}  f{i} = []"]
            elif f.type == "N1":
                # unpack_nibbles written out: no call
                ns["_hexlify"], ns["_swap"], ns["_hexv"] = hexlify, _SWAP_NIBBLES, _HEX_VALUE
                lines += [f"{ind}if {cnt}:",
                          f"{ind}  q = p + (({cnt} + 1) >> 1)",
                          f"{ind}  if q > end: raise _Short",
                          f"{ind}  f{i} = list(_hexlify(buf[p:q].translate(_swap))"
                          ".translate(_hexv))",
                          f"{ind}  if {cnt} & 1: del f{i}[{cnt}:]",
                          f"{ind}  p = q",
                          f"{ind}else:",
                          f"{ind}  f{i} = []"]
            else:
                lines.append(f"{ind}f{i}, p = _r.array({f.type!r}, {cnt}, buf, p, end, "
                             f"{size_of})")
        elif f.type == "Cn" and optimistic:
            run = _cn_run(fields, i)
            lines.append(f"{ind}if p >= end: {literal(first)}")
            prev = "p"
            starts = {}
            for j in run:
                lines.append(f"{ind}e{j} = {prev} + 1 + buf[{prev}]")
                starts[j] = f"{prev} + 1"
                prev = f"e{j}"
            run_end(run, starts, prev)
            for j in run:
                lines.append(f"{ind}f{j} = txt[{starts[j]}:e{j}]")
            lines.append(f"{ind}p = {prev}")
            skip.update(run)
        elif f.type == "Cn":
            # at p == end, buf[p] is the next record's first byte: q > end all the same
            lines.append(f"{ind}q = p + 1 + buf[p]")
            lines.append(f"{ind}if q > end:")
            lines.append(f"{ind}  if p >= end: {literal(first)}")
            lines.append(f"{ind}  raise _Short")
            lines.append(f"{ind}f{i} = txt[p + 1:q]")
            lines.append(f"{ind}p = q")
        elif f.type == "Dn":
            # an empty D*n (no fail pins, no SPIN_MAP: most FTRs) is one shared
            # Bits(0, b""): immutable, and equal to a new one
            ns["_u2"], ns["_no_bits"] = readers.u2, Bits(0, b"")
            lines += [f"{ind}if p + 2 > end:",
                      f"{ind}  if p >= end: {literal(first)}",
                      f"{ind}  raise _Short",
                      f"{ind}nb = _u2(buf, p)[0]",
                      f"{ind}if nb:",
                      f"{ind}  q = p + 2 + ((nb + 7) >> 3)",
                      f"{ind}  if q > end: raise _Short",
                      f"{ind}  f{i} = _new(Bits, (nb, buf[p + 2:q]))",
                      f"{ind}  p = q",
                      f"{ind}else:",
                      f"{ind}  f{i} = _no_bits",
                      f"{ind}  p += 2"]
        elif f.type == "Vn":
            if learnt is not None:
                learnt.append("_vn = self._gdr_for()")
            elif "_vn" not in ns:
                ns["_vn"] = _gdr_fast(readers.order)  # no layouts: shared
            lines.append(f"{ind}if p >= end: {literal(first)}")
            lines.append(f"{ind}f{i}, p = _vn(buf, txt, p, end)")
        else:
            reader = {"Bn": "_bn", "Sn": "_r.sn"}[f.type]
            lines.append(f"{ind}if p >= end: {literal(first)}")
            lines.append(f"{ind}f{i}, p = {reader}(buf, p, end)")
    if memo2_from >= 0:  # a whole record: its tail from UNITS on is kept
        lines.append(f"{ind}if tail2 is not None: _memo2_put{prefix}(tail2, "
                     f"{_tuple(memo2_from, len(fields))})")
    lines.append(f"{ind}{literal(len(fields))}")
    return lines


def _generic_row(spec: RecordSpec, readers: _Readers, buf: bytes, p: int,
                 end: int) -> tuple[Any, ...]:
    """The reference decoder's fields as a row: their values in spec order."""
    return tuple(decode_generic(spec, readers, buf, p, end).values())


def _max_size(spec: RecordSpec) -> int | None:
    """Largest possible encoding of the record's fields, or None when unbounded."""
    total = 0
    for f in spec.fields:
        if f.count is not None or f.type in ("Dn", "Vn", "Sn"):
            return None
        total += _SIZES.get(f.type, 256)  # Cn and Bn: length byte + up to 255 bytes
    return total


#: record types decoded inline in the scanning loop (the bulk of any file: no call), in
#: the order the loop tests them: the test results first (tens per part), PIR and PRR
#: (one each per part) after them
INLINE = ("PTR", "FTR", "MPR", "PIR", "PRR")


def _type_key(order: str, typ: int, sub: int) -> int:
    return typ * 256 + sub if order == ">" else sub * 256 + typ


def _too_long(name: str, rec_len: int, limit: int, offset: int) -> StdfError:
    return StdfError(f"impossible REC_LEN {rec_len} for a {name} "
                     f"(its fields take at most {limit - LENGTH_SLACK} bytes)", offset)


def _compile_scan(order: str, entries: dict[int, Any], readers: _Readers,
                  skip: frozenset[str] = frozenset(), rows: bool = False,
                  lists: list[dict[int, Any]] | None = None,
                  memo: bool = True,
                  inline: tuple[str, ...] = (*INLINE, "GDR"),
                  short: int = 0) -> Callable[..., Any]:
    """Generate the record loop of one byte order, with the INLINE types' decoding
    written into it and every other type dispatched through ``entries``.  Records of
    the types in ``skip`` are checked (REC_LEN), counted and stepped over (those whose
    REC_LEN is below ``short`` counted in ``skipped_short`` too).  ``rows``: the loop
    makes :class:`StdfRow` records (``entries`` then decode to tuples)."""
    check_gdr = _gdr_checker(order)
    if skip:
        # a skipped GDR is still walked for its type codes: the one error inside a
        # record the decoder reports, so skipping changes what is returned, not errors
        entries = dict(entries)
        for name in skip:
            spec = BY_NAME[name]
            key = _type_key(order, spec.typ, spec.sub)
            e = entries[key]
            entries[key] = (e[0], check_gdr if name == "GDR" else None, e[2])
        if lists is not None:  # its lazy decoders replace themselves here too
            lists.append(entries)
    ns: dict[str, Any] = {
        "_header": struct.Struct(order + "HH").unpack_from, "_entries": entries,
        "_new": _new_record, "_Record": StdfRecord, "_too_long": _too_long,
        "_generic": decode_generic, "_BadGdr": _BadGdr, "_gdr_error": _gdr_error,
        "_check_gdr": check_gdr,
    }
    # a row is a plain tuple; a record a named tuple made without a call to its __new__
    make = "({}, base + pos, {})" if rows else "_new(_Record, ({}, base + pos, {}))"
    lines = [
        "  while pos + 4 <= n:",
        "    rec_len, key = _header(buf, pos)",
        "    body = pos + 4",
        "    end = body + rec_len",
    ]
    #: the lines that set the decoder's own tail memos and GDR layouts as locals
    learnt: list[str] | None = [] if memo else None
    # GDRs inline too (their layouts are the decoder's own), unless skipped: a skipped
    # GDR is checked by the generic path below
    for k, name in enumerate(n for n in inline if not (n == "GDR" and "GDR" in skip)):
        spec = BY_NAME[name]
        limit = entries[_type_key(order, spec.typ, spec.sub)][2]
        lines += [
            f"    {'if' if k == 0 else 'elif'} key == {_type_key(order, spec.typ, spec.sub)}:",
            # REC_LEN is a U*2: no check for a type that may take any
            *([f"      if rec_len > {limit}: raise _too_long({name!r}, rec_len, {limit}, "
               "base + pos)"] if limit < 65535 else []),
            "      if end > n: return",
        ]
        if name in skip:
            lines += [f"      skipped[{name!r}] += 1",
                      *([f"      if rec_len < {short}: skipped_short[{name!r}] += 1"]
                        if short else []),
                      "      pos = end",
                      "      continue"]
            continue
        decode = entries[_type_key(order, spec.typ, spec.sub)][1]
        # the fallback of the inline code (a record cut inside a field): compiled when
        # it is first needed more than COMPILE_AFTER times, which it may never be
        ns[f"_decode_{name}"] = decode
        if isinstance(decode, _Lazy):
            decode.loops.append((ns, f"_decode_{name}"))
        block = [
            "      p = body",
            "      while True:",
            "        try:",
            *_body(spec, readers, ns, "          ", "fields = {}; break", name,
                   optimistic=True, rows=rows, learnt=learnt),
            "        except (_Short, IndexError):",
            f"          fields = _decode_{name}(buf, txt, body, end)",
            "        break",
        ]
        if name == "GDR":  # an unknown type code: the one error inside a record
            block = ["      try:", *("  " + line for line in block),
                     "      except _BadGdr as exc:",
                     "        pos = end",
                     "        raise _gdr_error(exc, base) from None"]
        lines += [*block, f"      record = {make.format(repr(name), 'fields')}"]
    lines += [
        "    else:",
        "      try:",
        "        entry = _entries[key]",
        "      except KeyError:",
        "        entry = None",
        "      if entry is None:",
        "        if end > n: return",
        f"        record = self._unknown(buf, pos, end, {rows})",
        "        pos = end",
        "        self._pos = pos",
        "        if record is None: continue",
        "        yield record",
        "        continue",
        "      name, decode, limit = entry",
        "      if rec_len > limit:",
        f"        if key != {_type_key(order, 0, 10)}:",
        "          raise _too_long(name, rec_len, limit, base + pos)",
        # every FAR comes here (its limit is 1): it may change the byte order and the
        # float format (StdfDecoder._far); once per lot, so it costs nothing per record
        "        try:",
        f"          done = yield from self._far(buf, txt, pos, base, {rows})",
        "        finally:",
        "          pos = self._pos",
        "        if done: return",
        "        continue",
        "      if end > n: return",
        *(["      if decode is None or decode is _check_gdr:",
            "        if decode is not None:",
            "          try:",
            "            _check_gdr(buf, body, end)",
            "          except _BadGdr as exc:",
            "            pos = end",
            "            raise _gdr_error(exc, base) from None"] if "GDR" in skip else
          ["      if decode is None:"]),
        "        skipped[name] += 1",
        *([f"        if rec_len < {short}: skipped_short[name] += 1"] if short else []),
        "        pos = end",
        "        continue",
        "      try:",
        f"        record = {make.format('name', 'decode(buf, txt, body, end)')}",
        "      except _BadGdr as exc:",
        "        pos = end",
        "        raise _gdr_error(exc, base) from None",
        "    pos = end",
        "    self._pos = pos",
        "    yield record",
    ]
    # ``self._pos`` (the decoder's position) is stored before each record returned, and
    # once when the loop stops for any reason -- not per skipped record
    lines = ["def scan(self, buf, txt, pos, base):",
             "  n = len(buf)",
             "  skipped = self.skipped",
             *(["  skipped_short = self.skipped_short"] if short else []),
             *("  " + line for line in dict.fromkeys(learnt or ())),
             "  try:", *("  " + line for line in lines),
             "  finally:", "    self._pos = pos"]
    src = "\n".join(lines) + "\n"
    exec(compiled(src, f"<stdf scan {order}>"), ns)
    return ns["scan"]


def _gdr_error(exc: _BadGdr, base: int) -> StdfError:
    return StdfError(f"GDR field of unknown type code {exc.code}", base + exc.pos)


#: records of a type decoded by the generic (reference) decoder before its decoders are
#: generated and compiled.  Making them costs 50-220 us a type even from the code cache
#: (generating the source is most of it; a MIR's 400 us), the generic decoder 1-4 us more
#: per record than the compiled one: compiling pays after 40-60 records.  A file holds
#: one MIR, some WIRs, tens of HBR/SBR/PCR/TSR: compiling them at their first record made
#: a short command (``stats`` on a small file) spend more compiling than decoding.  Past
#: the break-even point, as a rental is bought once it has cost the price: never more
#: than about twice the better choice's cost; the bulk types pass it within a few parts.
#: A knob for tests (``set_compile_after``).
COMPILE_AFTER = 64


def set_compile_after(count: int) -> None:
    """Set how many records of a type the generic decoder reads before its compiled
    decoders are made (0: at its first record).  For benchmarks and tests."""
    global COMPILE_AFTER
    COMPILE_AFTER = count


class _Lazy:
    """A record type's decoder: the generic one for its first ``COMPILE_AFTER`` records,
    then compiled (a command that reads a few types compiles only those it meets often,
    and a file holds a dozen of the thirty types).  Once compiled it takes its own place
    in every entry table and record loop that holds it, so later records call the
    compiled function directly."""

    __slots__ = ("func", "generic", "key", "lists", "loops", "readers", "rows", "seen",
                 "spec")

    def __init__(self, spec: RecordSpec, readers: _Readers, rows: bool, key: int,
                 lists: list[dict[int, Any]]) -> None:
        self.spec, self.readers, self.rows = spec, readers, rows
        self.key, self.lists = key, lists
        self.generic = _generic_row if rows else decode_generic
        self.seen = 0
        #: (namespace, name) of the record loops that call it (an inline type's fallback)
        self.loops: list[tuple[dict[str, Any], str]] = []
        self.func: Callable[[bytes, str, int, int], Any] | None = None

    def get(self) -> Callable[[bytes, str, int, int], Any]:
        func = self.func
        if func is None:
            func = self.func = _compile(self.spec, self.readers, self.rows)
            for entries in self.lists:
                entry = entries[self.key]
                if entry is not None and entry[1] is self:
                    entries[self.key] = (entry[0], func, entry[2])
            for ns, name in self.loops:
                if ns[name] is self:
                    ns[name] = func
        return func

    def __call__(self, buf: bytes, txt: str, p: int, end: int) -> Any:
        if self.seen < COMPILE_AFTER:
            self.seen += 1
            return self.generic(self.spec, self.readers, buf, p, end)
        return self.get()(buf, txt, p, end)


class _Table:
    """The compiled decoders of one byte order, for records or rows, each built on first
    use: the record loop, its variants that skip some types, each type's decoder."""

    def __init__(self, order: str, rows: bool, memo: bool) -> None:
        self.readers = readers = _Readers(order)
        self.rows = rows
        self.memo = memo  # with the PTR tail memo
        #: header -> (REC_LEN, type key); the type key is REC_TYP and REC_SUB read as one
        #: U2 in the file's byte order (one lookup, no arithmetic)
        self.header = struct.Struct(order + "HH").unpack_from
        #: type key -> (name, decode function, largest REC_LEN); a dict of the thirty
        #: types, not a list of all 65,536 keys: the garbage collector walks every slot
        #: of a list at each pass that reaches it (millions of instructions in a short
        #: command)
        self.entries: dict[int, Any] = {}
        #: every entry table made from ``entries`` (the skipping loops' copies)
        self.lists: list[dict[int, Any]] = [self.entries]
        for (typ, sub), spec in BY_TYPE.items():
            limit = _max_size(spec)
            key = _type_key(order, typ, sub)
            self.entries[key] = (spec.name, _Lazy(spec, readers, rows, key, self.lists),
                                 65535 if limit is None else limit + LENGTH_SLACK)
        far = _type_key(order, 0, 10)  # every FAR to the loop's cold path (_compile_scan)
        self.entries[far] = (*self.entries[far][:2], 1)
        #: the types decoded inline in the record loop (GDRs too: their layouts are the
        #: decoder's own)
        self.inline: tuple[str, ...] = (*INLINE, "GDR")
        #: the record loops, by the set of the names of the types they skip (and the
        #: REC_LEN below which a skipped record is counted short):
        #: scan(decoder, buf, txt, pos, base) -> records
        self.scans: dict[tuple[frozenset[str], int], Callable[..., Iterator[Any]]] = {}

    def scan_for(self, skip: frozenset[str], short: int = 0) -> Callable[..., Iterator[Any]]:
        scan = self.scans.get((skip, short))
        if scan is None:
            scan = self.scans[skip, short] = _compile_scan(
                self.readers.order, self.entries, self.readers, skip, self.rows, self.lists,
                self.memo, self.inline, short)
        return scan


_TABLES: dict[tuple[str, bool, bool], _Table] = {}
#: byte order -> GDR type-code sequence -> its compiled layout reader (``gdrlayout``),
#: shared by every decoder (a pure function of the codes), bounded there
_LAYOUT_READERS: dict[str, dict[bytes, Any]] = {}


def decoder_table(order: str, rows: bool = False) -> _Table:
    """The decoders of one byte order, for records (dicts) or rows (tuples), with the
    tail memo or without (``MEMO_SIZE`` 0); each compiled on first use."""
    table = _TABLES.get((order, rows, MEMO_SIZE > 0))
    if table is None:
        table = _TABLES[order, rows, MEMO_SIZE > 0] = _Table(order, rows, MEMO_SIZE > 0)
    return table


# -------------------------------------------------------------- the compiled record loop

#: whether the compiled record loop (``_accel``, built from ``_accel.c`` where a C compiler
#: was found at install) reads the records it can; EDGEGW_STDF_ACCEL=0 turns it off
_ACCEL = _accel is not None and os.environ.get("EDGEGW_STDF_ACCEL", "1") != "0"
#: its field type codes (``_accel.c``: the enum)
_ACCEL_TYPES = {t: i for i, t in enumerate(
    ("U1", "U2", "U4", "U8", "I1", "I2", "I4", "I8", "R4", "R8", "B1", "C1", "Cn", "Bn",
     "Sn", "Dn", "Cf", "Uf", "N1", "Vn"), 1)}
_ACCEL_TABLES: dict[str, Any] = {}
_ACCEL_SKIPS: dict[tuple[str, frozenset[str]], tuple[int, ...]] = {}


def set_accelerator(on: bool) -> bool:
    """Use the compiled record loop (when it was built) or not; returns whether it is now
    used.  For benchmarks and tests: the pure-Python decoder is the reference."""
    global _ACCEL
    _ACCEL = bool(on) and _accel is not None
    return _ACCEL


def accelerator_built() -> bool:
    """Whether the compiled record loop was built (at install, where a C compiler was)."""
    return _accel is not None


def accelerator_active() -> bool:
    """Whether decoders read through the compiled record loop (``_accel``)."""
    return _ACCEL


def _accel_table(order: str) -> Any:
    """The compiled loop's record table of one byte order: the spec table as tuples."""
    table = _ACCEL_TABLES.get(order)
    if table is None:
        entries = []
        for (typ, sub), spec in BY_TYPE.items():
            index = {f.name: i for i, f in enumerate(spec.fields)}
            limit = _max_size(spec)
            entries.append((
                _type_key(order, typ, sub), spec.name,
                65535 if limit is None else limit + LENGTH_SLACK,
                spec.name == "FAR",  # every FAR to the Python loop (StdfDecoder._far)
                tuple(f.name for f in spec.fields),
                tuple((_ACCEL_TYPES[f.type], index[f.count] if f.count else -1,
                       index[f.size] if f.size else -1) for f in spec.fields)))
        table = _ACCEL_TABLES[order] = _accel.Table(order == ">", entries, Bits, StdfRecord)
    return table


def _accel_skip(order: str, skip: frozenset[str]) -> tuple[int, ...]:
    keys = _ACCEL_SKIPS.get((order, skip))
    if keys is None:
        keys = _ACCEL_SKIPS[order, skip] = tuple(
            _type_key(order, BY_NAME[name].typ, BY_NAME[name].sub) for name in skip)
    return keys


# ------------------------------------------------------------------------------ decoder

class StdfDecoder:
    """Incremental decoder.  ``feed`` bytes as they arrive, then iterate ``records()``.

    ``start_offset`` and ``byte_order`` resume mid-file at a record boundary (the
    offsets of the records returned continue from ``start_offset``).  A new ``feed``
    ends any unfinished ``records()`` iterator; iterate to the end after each feed.

    ``skip``: names of record types the consumer does not want.  Their records are not
    decoded nor returned, only counted by name in ``skipped``; their REC_LEN is checked
    as for any record (an impossible one is still an error) and a cut one still waits
    for the rest, and a skipped GDR's type codes are checked (the one error inside a
    record), so skipping never changes the errors.  The FAR is never skipped: it gives
    the byte order.  ``types``: the record types wanted (every other one is skipped),
    instead of ``skip``.  ``short``: a skipped record whose REC_LEN is below it is also
    counted in ``skipped_short`` (``edgegw stdf stats`` is told of a PTR cut before its
    TEST_NUM, which it does not decode but the gateway skips as cut).

    Every FAR sets ``byte_order`` and ``cpu_type`` for the records after it (files of two
    testers merged: each lot in its own FAR's byte order); ``cpu_type`` 0 (VAX) reads
    R*4/R*8 as VAX F/D floating (:mod:`edgegw.stdf.vax`).  Resuming a CPU_TYPE 0 file
    mid-file needs ``cpu_type=0`` too.
    """

    def __init__(self, *, start_offset: int = 0, byte_order: str | None = None,
                 keep_unknown: bool = False, skip: Iterable[str] = (),
                 types: Iterable[str] | None = None, cpu_type: int | None = None,
                 short: int = 0) -> None:
        if byte_order not in (None, "<", ">"):
            raise ValueError(f"byte_order must be '<' or '>', not {byte_order!r}")
        if start_offset and byte_order is None:
            raise ValueError("resuming at start_offset > 0 needs the file's byte_order")
        if types is not None and skip:
            raise ValueError("skip or types, not both")
        #: records of the ``skip`` types stepped over, by type name
        self.skipped: dict[str, int] = {}
        #: of those, the records whose REC_LEN is below ``short``, by type name
        self.skipped_short: dict[str, int] = {}
        self._short = short
        self._skip: frozenset[str] = frozenset()
        self.select(types, skip)
        self._buf = b""
        self._txt: str | None = ""  # _buf decoded latin-1 (None: not yet)
        self._pos = 0  # index into _buf of the next record
        self._base = start_offset  # stream offset of _buf[0]
        #: this decoder's own tail memos and GDR layouts (one file's: see ``_memo``)
        self._learnt: dict[Any, tuple[Any, ...]] = {}
        #: iterators handed out since the last feed: a feed ends them
        self._open: list[Any] = []  # generators (their gi_frame is read)
        self.byte_order = byte_order
        #: the last FAR's CPU_TYPE (None: no FAR read yet)
        self.cpu_type = cpu_type
        self._switching = False  # a loop started by _far is running the records
        self._switched = False
        self.keep_unknown = keep_unknown
        #: records of unknown type skipped, in all and by (REC_TYP, REC_SUB)
        self.unknown_count = 0
        self.unknown_types: dict[tuple[int, int], int] = {}
        self._unknown_run = 0
        self._unknown_end = -1  # stream offset where the last unknown record ended

    def select(self, types: Iterable[str] | None = None, skip: Iterable[str] = ()) -> None:
        """Change ``types`` (None: every type) or ``skip`` from the next :meth:`records`
        or :meth:`rows` on; ``skipped`` keeps the counts of every type skipped so far."""
        if types is not None:
            wanted = frozenset(types)
            unknown = wanted - BY_NAME.keys()
            if unknown:
                raise ValueError(f"types: no STDF record type {', '.join(sorted(unknown))}")
            skip = BY_NAME.keys() - wanted - {"FAR"}
        new = frozenset(skip)
        unknown = new - BY_NAME.keys()
        if unknown:
            raise ValueError(f"skip: no STDF record type {', '.join(sorted(unknown))}")
        if "FAR" in new:
            raise ValueError("skip: the FAR cannot be skipped (it gives the byte order)")
        self._skip = new
        for name in sorted(new - self.skipped.keys()):
            self.skipped[name] = 0
            self.skipped_short[name] = 0

    def _memo_for(self, name: str, rows: bool) -> tuple[Any, ...]:
        """This decoder's tail memo of record type ``name`` (for rows or for dicts): its
        file's tails, and whether they repeat, are no other file's."""
        memo = self._learnt.get((name, rows))
        if memo is None:
            memo = self._learnt[name, rows] = _memo(rows)
        return memo

    def _gdr_for(self) -> Callable[[bytes, str, int, int], tuple[list, int]]:
        """This decoder's GDR reader, with its own layouts (the readers compiled for them
        are shared by every decoder of the byte order)."""
        learnt = self._learnt.get("GDR")
        if learnt is None:
            order = self.byte_order or "<"
            table = Layouts(order, _LAYOUT_READERS.setdefault(order, {}))
            learnt = self._learnt["GDR"] = (_gdr_fast(order, table), table.state)
        return learnt[0]

    @property
    def position(self) -> int:
        """Stream offset just after the last complete record returned."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as records (a cut record waiting for the rest)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        # an unfinished iterator would go on reading the old buffer: end it (closing it
        # here costs nothing per record, unlike a check at every record)
        for it in self._open:
            it.close()
        self._open.clear()
        self._txt = None
        if self._pos:
            self._base += self._pos
            self._buf = self._buf[self._pos:] + bytes(data)
            self._pos = 0
        elif self._buf:
            self._buf += bytes(data)
        else:
            self._buf = bytes(data)

    def _detect_order(self) -> str | None:
        buf, pos = self._buf, self._pos
        offset = self._base + pos
        if len(buf) - pos >= 4:
            head = buf[pos:pos + 4]
            if head[2:] != b"\x00\x0a" or head[:2] not in (b"\x00\x02", b"\x02\x00"):
                raise StdfError("not STDF: the first record is not a FAR "
                                f"(header bytes {head.hex()})", offset)
        if len(buf) - pos < 6:
            return None
        # the FAR's REC_LEN (2) says the order its writer used for every record header;
        # a CPU_TYPE that says otherwise (a writer's default left unchanged) would make
        # the FAR itself "impossible", so it is not asked (0, VAX, is little-endian too)
        return "<" if buf[pos] == 2 else ">"

    def records(self) -> Iterator[StdfRecord]:
        """Complete records from the bytes fed so far, in stream order."""
        return self._scan(False)

    def rows(self) -> Iterator[StdfRow]:
        """The same records as :meth:`records`, each as a row ``(name, offset, values)``
        (:data:`StdfRow`: the values in a tuple instead of a dict, the fastest way to
        read every field; :func:`row_fields` makes the dict)."""
        return self._scan(True)

    def _scan(self, rows: bool) -> Iterator[Any]:
        order = self.byte_order
        if order is None:
            order = self._detect_order()
            if order is None:
                return iter(())
            self.byte_order = order
        buf = self._buf
        self._switching = False
        if _ACCEL:
            it = self._accelerated(buf, rows)
        else:
            it = self._table(rows).scan_for(self._skip, self._short)(self, buf, self._text(),
                                                                     self._pos, self._base)
        self._keep(it)
        return it

    def _text(self) -> str:
        """The buffer decoded latin-1 (the Python loop's C*n fields are slices of it),
        made once per feed, when first needed."""
        txt = self._txt
        if txt is None:
            txt = self._txt = self._buf.decode("latin-1")
        return txt

    def _accelerated(self, buf: bytes, rows: bool) -> Iterator[Any]:
        """The records through the compiled loop, which stops at any record it does not
        read (a FAR, an unknown type, an impossible REC_LEN, a GDR's unknown type code):
        the Python loop reads that one -- and reports it, as without the compiled loop
        -- and the compiled loop goes on after it.  (It needs no latin-1 text of the
        buffer: made only if the Python loop is.)"""
        skip, short = self._skip, self._short
        while True:
            order = self.byte_order or "<"
            if self.cpu_type == 0 and order == "<":  # VAX floating point: Python's
                yield from self._table(rows).scan_for(skip, short)(self, buf, self._text(),
                                                                   self._pos, self._base)
                return
            scan = _accel.Scan(_accel_table(order), self, buf, self._pos, self._base, rows,
                               _accel_skip(order, skip), short)
            yield from scan
            if scan.done:
                return
            loop: Any = self._table(rows).scan_for(skip, short)(
                self, buf, self._text(), self._pos, self._base)
            try:
                for record in loop:
                    yield record
                    break
                else:
                    return
            finally:
                loop.close()

    def _table(self, rows: bool) -> _Table:
        if self.cpu_type == 0 and self.byte_order == "<":  # (VAX is little-endian)
            return vax_table(rows)
        return decoder_table(self.byte_order or "<", rows)

    def _far(self, buf: bytes, txt: str, pos: int, base: int,
             rows: bool) -> Generator[Any, None, bool]:
        """The FAR at ``pos`` (the record loop hands every one over): it sets the byte
        order and float format of the records after it, which may differ from those
        before it (files of two testers merged).  Returns True when the loop that
        handed it over must stop: the rest was read here, or the FAR waits for its end
        (``self._pos`` is where it goes on)."""
        order = self.byte_order
        rec_len = (buf[pos] << 8 | buf[pos + 1]) if order == ">" else (buf[pos + 1] << 8
                                                                        | buf[pos])
        limit = 2 + LENGTH_SLACK
        if rec_len > limit:
            swapped = (rec_len & 0xFF) << 8 | rec_len >> 8
            if swapped > limit:
                raise _too_long("FAR", rec_len, limit, base + pos)
            # a FAR of the other byte order: its lot is read in that order
            order, rec_len = ("<" if order == ">" else ">"), swapped
        end = pos + 4 + rec_len
        self._pos = pos
        if end > len(buf):
            return True
        values = tuple(buf[pos + 4:pos + 4 + min(rec_len, 2)])
        cpu = values[0] if values else self.cpu_type
        same = order == self.byte_order and (cpu == 0) == (self.cpu_type == 0)
        self.byte_order, self.cpu_type = order, cpu
        self._pos = end
        yield (("FAR", base + pos, values) if rows else
               StdfRecord("FAR", base + pos, row_fields(("FAR", pos, values))))
        if same:
            return False
        if self._switching:  # the loop that runs this one's goes on with the new table
            self._switched = True
            return True
        # read on with the new table; a loop never nests more than once (a file
        # switching at every lot would otherwise stack a generator per lot)
        self._switching = True
        try:
            while True:
                self._switched = False
                yield from self._table(rows).scan_for(self._skip, self._short)(
                    self, buf, txt, self._pos, base)
                if not self._switched:
                    return True
        finally:
            self._switching = False

    def _keep(self, it: Any) -> None:
        # the unfinished ones only: a consumer that drops iterators without feeding
        # must not grow the list
        self._open = [g for g in self._open if g.gi_frame is not None]
        self._open.append(it)

    def _unknown(self, buf: bytes, pos: int, end: int,
                 rows: bool = False) -> StdfRecord | StdfRow | None:
        typ, sub = buf[pos + 2], buf[pos + 3]
        self.unknown_count += 1
        self.unknown_types[(typ, sub)] = self.unknown_types.get((typ, sub), 0) + 1
        offset = self._base + pos
        if typ in RESERVED_REC_TYPS:
            # records the spec reserves for a vendor's software, which may write any
            # number of them in a row: skipped, but never a run of garbage
            self._unknown_run = 0
        else:
            self._unknown_run = self._unknown_run + 1 if offset == self._unknown_end else 1
        self._unknown_end = self._base + end
        if self._unknown_run >= MAX_UNKNOWN_RUN:
            raise StdfError(f"garbage: {self._unknown_run} consecutive records of unknown "
                            f"type (last REC_TYP {typ} REC_SUB {sub})", offset)
        if not self.keep_unknown:
            return None
        if rows:
            return ("UNKNOWN", self._base + pos, (typ, sub, buf[pos + 4:end]))
        return StdfRecord("UNKNOWN", self._base + pos,
                          {"REC_TYP": typ, "REC_SUB": sub, "DATA": buf[pos + 4:end]})


# ------------------------------------------------------------------ VAX (CPU_TYPE 0)

class _VaxReaders(_Readers):
    """The little-endian field readers with R*4 and R*8 read as VAX F and D floating."""

    def __init__(self) -> None:
        from .vax import d_float, f_float
        super().__init__("<")
        self.scalar = {**self.scalar, "R4": lambda buf, p: (f_float(buf, p),),
                       "R8": lambda buf, p: (d_float(buf, p),)}
        self.floats = {"R4": (f_float, 4), "R8": (d_float, 8)}

    def array(self, typ: str, count: int, buf: bytes, p: int, end: int,
              size: int = 0) -> tuple[list[Any], int]:
        read = self.floats.get(typ)
        if read is None:
            return super().array(typ, count, buf, p, end, size)
        func, width = read
        q = p + count * width
        if q > end:
            raise _Short
        return [func(buf, i) for i in range(p, q, width)], q


#: the record types with a float field (a GDR: its R*4 and R*8 values)
FLOAT_TYPES = frozenset(spec.name for spec in BY_NAME.values()
                        if any(f.type in ("R4", "R8", "Vn") for f in spec.fields))
_VAX_TABLES: dict[tuple[bool, bool], _Table] = {}


def vax_table(rows: bool = False) -> _Table:
    """The decoders of a CPU_TYPE 0 file: the little-endian ones, but the types with
    floats decoded field by field with VAX F/D readers (none inline).  Only such a file
    uses them: every other takes the same path as before."""
    memo = MEMO_SIZE > 0
    table = _VAX_TABLES.get((rows, memo))
    if table is None:
        table = _VAX_TABLES[rows, memo] = _Table("<", rows, memo)
        table.inline = tuple(name for name in table.inline if name not in FLOAT_TYPES)
        readers = _VaxReaders()
        generic = _generic_row if rows else decode_generic
        for name in FLOAT_TYPES:
            spec = BY_NAME[name]
            key = _type_key("<", spec.typ, spec.sub)
            entry = table.entries[key]
            table.entries[key] = (entry[0], partial(_vax_decode, generic, spec, readers),
                                  entry[2])
    return table


def _vax_decode(generic: Callable[..., Any], spec: RecordSpec, readers: _Readers,
                buf: bytes, txt: str, p: int, end: int) -> Any:
    return generic(spec, readers, buf, p, end)


def decode_all(data: bytes) -> list[StdfRecord]:
    """Decode a whole STDF byte string (convenience for tests and tools)."""
    dec = StdfDecoder()
    dec.feed(data)
    records = list(dec.records())
    if dec.buffered:
        raise StdfError(f"file ends inside a record ({dec.buffered} bytes left over)",
                        dec.position)
    return records


__all__ = [
    "COMPILE_AFTER",
    "FIELD_NAMES",
    "MEMO_SIZE",
    "StdfDecoder",
    "StdfError",
    "StdfRecord",
    "StdfRow",
    "accelerator_active",
    "accelerator_built",
    "decode_all",
    "decode_generic",
    "decoder_table",
    "row_fields",
    "set_accelerator",
    "set_compile_after",
    "set_tail_memo",
    "tail_memo_active",
    "unpack_nibbles",
]
