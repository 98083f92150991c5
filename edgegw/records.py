"""The record model: everything a gateway carries to the hub.

Every record is a small immutable tuple (a ``NamedTuple``) whose first two fields are
``source`` (the name of the configured source that produced it) and ``ts`` (seconds since
the Unix epoch, float).  The per-gateway record id is not stored in the record: the frame
that carries a batch numbers its records consecutively from ``first_rid`` (see
``docs/protocol.md``), so the id costs nothing on the wire.

On the wire a record is a positional CBOR array ``[kind, source_index, ts, field...]``.
Positional arrays decode about twice as fast as per-record maps with cbor2 and are less
than half the size (``bench/record_layout.py`` measures it); the hub decodes every record,
so this is its ceiling.  ``kind`` is the small integer ``KIND`` of the record class.
Field order is part of the wire protocol: append new fields at the end only; a receiver
ignores trailing fields it does not know.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

from .unicodetext import unicode_text, unicode_value


class LotStart(NamedTuple):
    source: str
    ts: float
    lot_id: str
    part_type: str = ""
    node_name: str = ""
    tester_type: str = ""
    job_name: str = ""
    start_t: int = 0
    extra: dict[str, Any] | None = None


class LotEnd(NamedTuple):
    source: str
    ts: float
    lot_id: str
    finish_t: int = 0
    extra: dict[str, Any] | None = None


class WaferStart(NamedTuple):
    source: str
    ts: float
    lot_id: str
    wafer_id: str
    head: int = 1
    start_t: int = 0


class WaferEnd(NamedTuple):
    source: str
    ts: float
    lot_id: str
    wafer_id: str
    head: int = 1
    finish_t: int = 0
    part_count: int | None = None
    good_count: int | None = None


class PartResult(NamedTuple):
    """One tested part (STDF PRR).  ``passed`` is None when pass/fail is invalid.
    ``supersedes`` marks a retest that replaces an earlier result of the same
    part id or X/Y: yield counts only the final result."""

    source: str
    ts: float
    lot_id: str
    wafer_id: str
    head: int
    site: int
    part_id: str
    x: int | None
    y: int | None
    hard_bin: int | None  # None: no bin (PRR HARD_BIN 65535, a parametric-only format)
    soft_bin: int | None
    passed: bool | None
    supersedes: bool = False
    part_flag: int = 0
    test_time_ms: int | None = None
    num_tests: int | None = None


class ParametricResult(NamedTuple):
    """One parametric measurement (STDF PTR), limits/units resolved from the test's
    default state.  ``passed`` is None when the tester reports no pass/fail."""

    source: str
    ts: float
    lot_id: str
    head: int
    site: int
    part_id: str
    test_num: int
    test_txt: str
    value: float | None
    lo_limit: float | None
    hi_limit: float | None
    units: str
    passed: bool | None
    test_flag: int = 0
    parm_flag: int = 0


class FunctionalResult(NamedTuple):
    """One functional test result (STDF FTR)."""

    source: str
    ts: float
    lot_id: str
    head: int
    site: int
    part_id: str
    test_num: int
    test_txt: str
    passed: bool | None
    test_flag: int = 0
    fail_count: int | None = None


class MultiPinResult(NamedTuple):
    """A multi-pin parametric result (STDF MPR): one value per pin."""

    source: str
    ts: float
    lot_id: str
    head: int
    site: int
    part_id: str
    test_num: int
    test_txt: str
    values: list[float]
    lo_limit: float | None
    hi_limit: float | None
    units: str
    passed: bool | None
    test_flag: int = 0
    parm_flag: int = 0


class BinSummary(NamedTuple):
    """A tester's own bin count (STDF HBR/SBR).  ``bin_kind`` is "H" or "S";
    ``head`` 255 means all sites."""

    source: str
    ts: float
    lot_id: str
    bin_kind: str
    head: int
    site: int
    bin_num: int
    count: int  # type: ignore[assignment]  # (tuple.count: shadowed)
    pass_fail: str
    name: str = ""


class PartCount(NamedTuple):
    """The tester's own part counts (STDF PCR); ``head`` 255 means all sites."""

    source: str
    ts: float
    lot_id: str
    head: int
    site: int
    part_count: int
    retest_count: int | None = None
    abort_count: int | None = None
    good_count: int | None = None
    func_count: int | None = None


class SensorReading(NamedTuple):
    """One raw sensor value (forwarded unthrottled when a channel asks for it)."""

    source: str
    ts: float
    channel: str
    value: float
    unit: str = ""


class SensorWindow(NamedTuple):
    """A throttled sensor window: the statistics of every reading in [t0, t1)."""

    source: str
    ts: float
    channel: str
    last: float
    min: float
    max: float
    mean: float
    count: int  # type: ignore[assignment]  # (tuple.count: shadowed)
    t0: float
    t1: float
    unit: str = ""


class GatewayEvent(NamedTuple):
    """Something the gateway itself reports: an overflow, a corrupt input, a restart."""

    source: str
    ts: float
    level: str
    code: str
    message: str
    detail: dict[str, Any] | None = None


class RawRecord(NamedTuple):
    """A tester record forwarded as decoded, so nothing in the file is lost to the hub."""

    source: str
    ts: float
    format: str
    rec: str
    fields: dict[str, Any]


Record = (
    LotStart
    | LotEnd
    | WaferStart
    | WaferEnd
    | PartResult
    | ParametricResult
    | FunctionalResult
    | MultiPinResult
    | BinSummary
    | PartCount
    | SensorReading
    | SensorWindow
    | GatewayEvent
    | RawRecord
)

#: record class -> kind number, the wire's first item (docs/protocol.md): never renumber.
#: Each class also carries its number as ``KIND``, set here: a NamedTuple body holds only
#: fields (a plain ``KIND = 1`` there is a field to a type checker).
KIND_OF: dict[type[Any], int] = {
    LotStart: 1,
    LotEnd: 2,
    WaferStart: 3,
    WaferEnd: 4,
    PartResult: 5,
    ParametricResult: 6,
    FunctionalResult: 7,
    MultiPinResult: 8,
    BinSummary: 9,
    PartCount: 10,
    SensorReading: 11,
    SensorWindow: 12,
    GatewayEvent: 13,
    RawRecord: 14,
}
RECORD_TYPES: tuple[type[Any], ...] = tuple(KIND_OF)
#: kind number -> record class
BY_KIND: dict[int, type[Any]] = {kind: cls for cls, kind in KIND_OF.items()}
for _cls, _kind in KIND_OF.items():
    setattr(_cls, "KIND", _kind)  # noqa: B010 -- see KIND_OF
del _cls, _kind


class RecordError(ValueError):
    """A wire record that does not match the record model."""


def to_wire(record: Record, source_index: int) -> tuple[Any, ...]:
    """The positional wire form ``(kind, source_index, ts, field...)``."""
    return (KIND_OF[type(record)], source_index, *record[1:])


def from_wire(item: Any, sources: list[str]) -> Record:
    """Rebuild a record from its wire form; raises RecordError on anything malformed."""
    if not isinstance(item, list) or len(item) < 3:
        raise RecordError(f"record must be an array of at least 3 items, got {item!r:.80}")
    # type() is int, not isinstance: a CBOR true (or 1.0) would look up kind 1 and a false
    # source index 0 -- neither is an integer on the wire (docs/protocol.md section 1), and
    # the columnar layout's check refuses them the same way
    kind = item[0]
    cls = BY_KIND.get(kind) if type(kind) is int else None
    if cls is None:
        raise RecordError(f"unknown record kind {kind!r}")
    idx = item[1]
    if type(idx) is not int or not 0 <= idx < len(sources):
        raise RecordError(f"source index {idx!r} out of range")
    n_fields = len(cls._fields)
    n_required = n_fields - len(cls._field_defaults)
    if len(item) - 1 < n_required:
        # counted as docs/protocol.md's table counts them: the fields after ts
        required = cls._fields[2:n_required]
        raise RecordError(
            f"{cls.__name__} (kind {item[0]}) needs at least {len(required)} fields after "
            f"ts ({', '.join(required)}), got {len(item) - 3}"
        )
    # Fields appended by a newer v1 sender are ignored (docs/protocol.md sections 5 and 9).
    return cls(sources[idx], *item[2:n_fields + 1])


def unicode_record(value: Any) -> Any:
    """A record (or any value in one) with every text made ``unicode_text``: the same
    object when nothing needed it."""
    return unicode_value(value)


#: what a record's fields may hold and every CBOR encoder takes
_PLAIN = (str, bytes, bool, int, float, type(None))


def plain_record(value: Any) -> Any:
    """A record (or any value in one) with every value of another type than text, bytes,
    numbers, None, lists, tuples and maps, which CBOR cannot encode, made one: a number of
    another kind (numpy's ``int64``, ``float32`` or ``bool_`` in a test program's record, a
    ``Fraction``) the Python ``int``, ``float`` or ``bool`` of its value; anything else (an
    object a plugin left in a GatewayEvent's ``detail``) its ``str()``.  Every text made
    ``unicode_text``.  The same object when nothing needed it."""
    return unicode_value(value, _plain)


def _plain(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        try:  # a numpy scalar (a bool_ too, which is no number): its Python value
            plain = value.item()
        except Exception:
            plain = None
        if isinstance(plain, _PLAIN):
            return plain
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return unicode_text(str(value))


__all__ = [
    "BY_KIND", "KIND_OF", "RECORD_TYPES", "BinSummary", "FunctionalResult", "GatewayEvent",
    "LotEnd", "LotStart", "MultiPinResult", "ParametricResult", "PartCount", "PartResult",
    "RawRecord", "Record", "RecordError", "SensorReading", "SensorWindow", "WaferEnd",
    "WaferStart", "from_wire", "plain_record", "to_wire", "unicode_record", "unicode_text",
]
