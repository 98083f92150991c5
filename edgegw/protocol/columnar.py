"""Columnar frame bodies (protocol v2, docs/protocol.md section 5.2), sans-IO.

Why columns: the hub decodes every record, so its decode is the ceiling of gateway -> hub
throughput.  With per-record arrays (the v1 body) cbor2 builds one list per record and
the hub then one record per list; with columns cbor2 builds one list per *field* per
frame, a field whose value is the same in every record (lot id, head, units, flags) is
sent once, and the hub builds every record of a kind in one ``zip`` (C, no Python code
per field).  ``bench/record_layout.py`` and ``bench/gateway_hub.py`` measure it.

Layout (a CBOR array of four items; the v1 body has three, which is how the two are told
apart -- stored and spooled bodies of both kinds live side by side)::

    [first_rid, [source...], [kind, count, kind, count, ...], [[kind, [column...]], ...]]

The runs list gives the record order: ``count`` records of ``kind``, taken in order from
that kind's table.  A table's columns are the positional v1 record form without its kind
(``source_index, ts, field...``); each column is an array of one value per record of the
table, or of exactly one value that every record of the table has.  Trailing columns with
defaults may be left out, and columns beyond the ones a receiver knows are ignored (as
trailing fields are in v1).

Protocol v3 (section 5.2, "Typed float columns") lets a column of floats go as an RFC 8746
typed array instead: tag 86 (IEEE 754 binary64, little endian) around the values' bytes,
8 per record (or 8 for one value every record has).  The encoder writes a column's bytes
in one C call (``struct.pack``) instead of cbor2 walking each float, the receiver's
``cbor2.loads`` copies one byte string instead of building a float object per value, and
every bit of every value (``-0.0``, NaN payloads) travels exactly.  The hub checks the
byte count and keeps the bytes; they become floats only when something reads them
(``array.frombytes().tolist()``, C speed).
"""

from __future__ import annotations

import itertools
import operator
import struct
import sys
from array import array
from collections.abc import Sequence
from functools import partial
from typing import Any

import cbor2

from ..records import BY_KIND, KIND_OF, Record

_repeat = itertools.repeat
_islice = itertools.islice
_compress = itertools.compress
_eq = operator.eq
_new = tuple.__new__
_Tag = cbor2.CBORTag

#: RFC 8746 typed array: IEEE 754 binary64, little endian
TAG_FLOAT64_LE = 86
_LITTLE = sys.byteorder == "little"
_unpack_f64 = struct.Struct("<d").unpack


class ColumnarError(ValueError):
    """A columnar body that does not match the layout (the frame is rejected)."""


def is_columnar(body: bytes) -> bool:
    """Whether a body encoded by this module (a definite CBOR array of 4) is columnar.
    For bodies this implementation wrote (its spool); a received body is told apart by
    its decoded shape."""
    return body[:1] == b"\x84"


def _column(col: tuple[Any, ...]) -> Any:
    """A column as sent: one value when every record has the same one.

    Only strings, None and ints/bools of one type are folded: ``==`` alone would
    merge 1, True and 1.0, or 0.0 and -0.0, and the receiver must get back exactly the
    values it was given.  Floats (measurements, times) rarely repeat; they go whole."""
    first = col[0]
    t = type(first)
    if col[-1] != first:  # varies (site, part id, test number...): no need to count
        return col
    if t is str or first is None:
        if col.count(first) == len(col):
            return (first,)
    elif (t is int or t is bool) and col.count(first) == len(col):
        if list(map(type, col)).count(t) == len(col):
            return (first,)
    return col


def _typed_column(col: tuple[Any, ...]) -> Any:
    """A column as sent on a v3 connection: a column of floats (every value exactly a
    ``float``) as a typed array -- its bytes, one value's 8 when every value has the same
    bits -- anything else as ``_column`` sends it."""
    if type(col[0]) is not float:
        return _column(col)
    n = len(col)
    if list(map(type, col)).count(float) != n:
        return col
    b = struct.pack(f"<{n}d", *col)  # bit for bit: -0.0, infinities, NaN payloads
    one = b[:8]
    # the same bits throughout: the last and the middle value first, as most columns that
    # are not constant differ there (comparing the whole column costs a copy of it)
    if n > 1 and b[-8:] == one and b[n // 2 * 8:n // 2 * 8 + 8] == one and b == one * n:
        b = one
    return _Tag(TAG_FLOAT64_LE, b)


def encode_columns(first_rid: int, records: Sequence[Record], *, typed: bool = False
                   ) -> bytes:
    """The columnar body of ``records`` (numbered from ``first_rid``): v2, or v3 with
    ``typed`` (columns of floats as typed arrays: for a connection that agreed v3)."""
    runs: list[int] = []
    append = runs.append
    by_kind: dict[type[Any], list[Record]] = {}
    # groupby runs in C: the Python loop turns once per run, not once per record
    for cls, group in itertools.groupby(records, type):
        rows = by_kind.get(cls)
        if rows is None:
            rows = by_kind[cls] = []
        before = len(rows)
        rows.extend(group)
        kind = KIND_OF.get(cls)
        if kind is None:
            raise TypeError(f"not a record: a {cls.__name__}")
        append(kind)
        append(len(rows) - before)
    column = _typed_column if typed else _column
    index: dict[str, int] = {}
    tables = []
    for cls, rows in by_kind.items():
        columns = list(zip(*rows, strict=True))
        names = columns[0]
        if names.count(names[0]) == len(names):
            i = index.get(names[0])
            if i is None:
                i = index[names[0]] = len(index)
            source_col: Any = (i,)
        else:
            source_col = [index[n] if n in index else index.setdefault(n, len(index))
                          for n in names]
        tables.append((KIND_OF[cls], [source_col, *map(column, columns[1:])]))
    if not all(type(name) is str for name in index):  # (a few names: the distinct ones)
        raise TypeError("a record's source must be text")
    return cbor2.dumps((first_rid, list(index), runs, tables))


def _bad(reason: str) -> ColumnarError:
    return ColumnarError(reason)


class _Same:
    """A column whose every value is the same (sent once, or left out for its default)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _F64:
    """A typed float column (v3) as received: its bytes, checked to hold one value per
    record, turned into floats only when something reads them (``_plain``)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def values(self) -> list[float]:
        a = array("d")
        a.frombytes(self.data)
        if not _LITTLE:
            a.byteswap()
        return a.tolist()


def _plain(columns: list[Any]) -> list[Any]:
    """``columns`` with its typed float columns made lists of floats, in place (once: the
    table keeps the lists)."""
    for j, c in enumerate(columns):
        if type(c) is _F64:
            columns[j] = c.values()
    return columns


class Columns:
    """A columnar body, checked against the layout, whose records are built on first use
    (``records``).  Checking is per column; building is per record (a tuple each), so a
    receiver that commits and acknowledges a frame before anything reads its records
    (the hub) builds them off that path, and one that never reads them never pays."""

    __slots__ = ("_built", "_counts", "_kinds", "_tables", "n")

    def __init__(self, kinds: list[int], counts: list[int],
                 tables: dict[int, tuple[type[Any], list[Any], int]], n: int) -> None:
        self._kinds = kinds
        self._counts = counts
        #: kind -> (record class, its columns: lists of its row count or ``_Same``, rows)
        self._tables = tables
        self._built: list[Record] | None = None
        #: how many records
        self.n = n

    def records(self) -> list[Record]:
        """The records, in order (built once; the same list on every call)."""
        if self._built is None:
            self._built = self._build()
        return self._built

    def _build(self) -> list[Record]:
        rows_of = {kind: _rows(*table) for kind, table in self._tables.items()}
        kinds = self._kinds
        if len(kinds) == 1:
            return rows_of[kinds[0]]
        its = {k: iter(v) for k, v in rows_of.items()}
        out: list[Record] = []
        extend = out.extend
        for k, c in zip(kinds, self._counts, strict=True):
            extend(_islice(its[k], c))
        return out

    def runs(self) -> list[tuple[type[Any], int]]:
        """The record order without the records: (record class, how many in a row), in
        order, as the body's runs list gives it."""
        tables = self._tables
        return [(tables[k][0], c) for k, c in zip(self._kinds, self._counts, strict=True)]

    def columns(self, cls: type[Any]) -> list[Any] | None:
        """The columns of ``cls``'s table, one per field of the record (source names
        resolved, left-out columns filled in): each a list of one value per record of the
        table, or a 1-tuple ``(value,)`` when every record has that value; None when the
        frame has no record of ``cls``.  The frame's own lists: read, never change them.
        For a consumer that reads some kind's fields without building its records."""
        table = self._tables.get(KIND_OF[cls])
        if table is None:
            return None
        return [(c.value,) if type(c) is _Same else c for c in _plain(table[1])]

    def rows(self, cls: type[Any]) -> list[Record]:
        """The records of kind ``cls`` only, in order (built on each call; the frame's
        other kinds are not built)."""
        table = self._tables.get(KIND_OF[cls])
        return [] if table is None else _rows(*table)

    def timestamps(self) -> list[Any]:
        """Every record's ``ts`` as sent (of any type), grouped by kind, not in record
        order: what the hub's record-age histogram needs, without building records."""
        out: list[Any] = []
        for _, columns, rows in self._tables.values():
            ts = columns[1]
            if type(ts) is _F64:
                ts = columns[1] = ts.values()
            out.extend(_repeat(ts.value, rows) if type(ts) is _Same else ts)
        return out


def _rows(cls: type[Any], columns: list[Any], rows: int) -> list[Record]:
    """One table's records (a tuple of ``cls`` each): one ``zip``, no Python code per
    field."""
    return list(map(partial(_new, cls), zip(
        *[_repeat(c.value, rows) if type(c) is _Same else c for c in _plain(columns)],
        strict=True)))


def check_columns(item: list[Any], max_records: int | None = None, *, typed: bool = True
                  ) -> tuple[int, Columns]:
    """A decoded columnar body (the CBOR item, already checked to be a list of four) to
    (first_rid, its checked ``Columns``).  ``typed``: whether typed float columns (v3)
    are allowed (not on a v2 connection).  Raises ColumnarError for anything malformed,
    and ``OverflowError`` (carrying the count) when it holds more than ``max_records``.
    What is checked is everything ``Columns.records`` relies on: building them cannot
    fail."""
    first_rid, sources, runs, tables = item
    if type(first_rid) is not int or first_rid < 1:
        raise _bad(f"first_rid must be an integer >= 1, got {first_rid!r:.40}")
    if type(sources) is not list or not all(type(s) is str for s in sources):
        raise _bad("sources must be an array of strings")
    if type(runs) is not list or len(runs) % 2:
        raise _bad("runs must be an array of kind, count pairs")
    if type(tables) is not list:
        raise _bad("tables must be an array of [kind, columns]")
    kinds = runs[0::2]
    counts = runs[1::2]
    # in C passes, no Python code per run (a frame of tester data has a run per part)
    if list(map(type, counts)).count(int) != len(counts) or (counts and min(counts) < 1):
        raise _bad("each run's count must be an integer >= 1")
    if list(map(type, kinds)).count(int) != len(kinds):
        raise _bad("each run's kind must be an integer")
    n = sum(counts)
    if max_records is not None and n > max_records:
        raise OverflowError(n)
    per_kind: dict[Any, int] = dict.fromkeys(kinds, 0)
    if len(per_kind) == 1:
        per_kind[kinds[0]] = n
    else:
        for k in per_kind:
            per_kind[k] = sum(_compress(counts, map(_eq, kinds, _repeat(k))))
    checked: dict[int, tuple[type[Any], list[Any], int]] = {}
    for table in tables:
        if type(table) is not list or len(table) != 2 or type(table[1]) is not list:
            raise _bad("each table must be [kind, [column...]]")
        kind, columns = table
        cls = BY_KIND.get(kind) if type(kind) is int else None
        if cls is None:
            raise _bad(f"unknown record kind {kind!r:.40}")
        if kind in checked:
            raise _bad(f"two tables of kind {kind}")
        rows = per_kind.get(kind)
        if rows is None:
            raise _bad(f"a table of kind {kind} that no run uses")
        checked[kind] = (cls, _table(cls, kind, columns, rows, sources, typed), rows)
    if len(checked) != len(per_kind):
        missing = [k for k in per_kind if k not in checked]
        raise _bad(f"runs name kind(s) {missing!r:.60} without a table")
    return first_rid, Columns(kinds, counts, checked, n)


def decode_columns(item: list[Any], max_records: int | None = None
                   ) -> tuple[int, list[Record], int]:
    """A decoded columnar body (the CBOR item, already checked to be a list of four) to
    (first_rid, records, n).  Raises ColumnarError for anything malformed, and
    ``OverflowError`` (carrying the count) when it holds more than ``max_records``."""
    first_rid, columns = check_columns(item, max_records)
    return first_rid, columns.records(), columns.n


def _table(cls: type[Any], kind: int, columns: list[Any], n: int, sources: list[str],
           typed: bool = True) -> list[Any]:
    """A table's columns, checked: each a list of ``n`` values, ``_F64`` (a typed float
    column of ``n`` values, if ``typed``) or ``_Same``, as many as ``cls`` has fields (the
    source indexes resolved to names)."""
    n_fields = len(cls._fields)  # source, ts, fields: as many columns
    n_required = n_fields - len(cls._field_defaults)
    if len(columns) < n_required:
        required = cls._fields[2:n_required]
        raise _bad(f"{cls.__name__} (kind {kind}) needs {n_required} columns (source, ts, "
                   f"{', '.join(required)}), got {len(columns)}")
    cols: list[Any] = []
    for j, col in enumerate(columns[:n_fields]):
        if type(col) is not list:
            if typed and type(col) is _Tag and col.tag == TAG_FLOAT64_LE and j:
                cols.append(_f64(cls, j, col.value, n))
                continue
            raise _bad(f"{cls.__name__} column {j} must be an array"
                       + (" or a float64 typed array" if typed and j else ""))
        if len(col) == n:
            cols.append(col)
        elif len(col) == 1:
            cols.append(_Same(col[0]))
        else:
            raise _bad(f"{cls.__name__} column {j} has {len(col)} values for {n} records "
                       f"(must be {n} or 1)")
    src = columns[0]
    try:
        if len(src) == 1:
            i = src[0]
            if type(i) is not int or i < 0:
                raise IndexError
            cols[0] = _Same(sources[i])
        else:
            if not all(type(i) is int for i in src) or min(src) < 0:
                raise IndexError
            cols[0] = list(map(sources.__getitem__, src))
    except IndexError:
        raise _bad(f"{cls.__name__}: a source index out of range of the "
                   f"{len(sources)} source(s)") from None
    for name in cls._fields[len(cols):]:  # left out: every record has the default
        cols.append(_Same(cls._field_defaults[name]))
    return cols


def _f64(cls: type[Any], j: int, data: Any, n: int) -> Any:
    """A typed float column's bytes, checked: ``_F64``, or ``_Same`` for one value."""
    if type(data) is not bytes or len(data) not in (8 * n, 8):
        size = len(data) if type(data) is bytes else "not a byte string"
        raise _bad(f"{cls.__name__} column {j}: a float64 typed array must hold {8 * n} "
                   f"or 8 bytes for {n} records, got {size}")
    if len(data) == 8:
        return _Same(_unpack_f64(data)[0])
    return _F64(data)


#: what follows tag 86's head in a typed column: a byte string of 8 or 16 bytes, or one
#: whose length follows in 1, 2 or 4 bytes
_TYPED_NEXT = frozenset(b"\x48\x50\x58\x59\x5a")


def _may_be_typed(body: bytes) -> bool:
    """Whether a body may hold a typed column: tag 86's head followed by a byte string's.
    A few C searches; the float bytes of a v2 body hold the two bytes ``d8 56`` now and
    then (a few times in a frame of thousands of floats), rarely with a byte string's
    head after them, so a v2 body is seldom decoded to find it has none."""
    find = body.find
    i = find(b"\xd8\x56")
    while i >= 0:
        if i + 2 < len(body) and body[i + 2] in _TYPED_NEXT:
            return True
        i = find(b"\xd8\x56", i + 1)
    return False


def plain_floats(body: bytes) -> bytes:
    """A columnar body as a v2 connection takes it: typed float columns (v3) made arrays
    of floats; any other body as it is.  For a gateway whose spool holds v3 bodies and
    whose hub speaks v2 (docs/protocol.md section 9).  NaNs then go as cbor2 writes them
    (one quiet NaN): a v2 body does not carry their payloads."""
    if not is_columnar(body) or not _may_be_typed(body):
        return body
    changed = False
    try:
        item = cbor2.loads(body)
        for table in item[3]:
            columns = table[1]
            for j, col in enumerate(columns):
                if type(col) is _Tag and col.tag == TAG_FLOAT64_LE:
                    columns[j] = _F64(col.value).values()
                    changed = True
    except Exception:  # not a body this module wrote: the hub judges it as it is
        return body
    return cbor2.dumps(item) if changed else body


def to_rows(item: list[Any]) -> list[Any]:
    """A decoded columnar body as the v1 body ``[first_rid, sources, [record...]]``
    (positional records): for a v1 peer, and for tools that read stored bodies."""
    first_rid, records, _ = decode_columns(item)
    index: dict[str, int] = {}
    wire = []
    for r in records:
        i = index.get(r[0])
        if i is None:
            i = index[r[0]] = len(index)
        wire.append([KIND_OF[type(r)], i, *r[1:]])
    return [first_rid, list(index), wire]


__all__ = ["TAG_FLOAT64_LE", "ColumnarError", "Columns", "check_columns", "decode_columns",
           "encode_columns", "is_columnar", "plain_floats", "to_rows"]
