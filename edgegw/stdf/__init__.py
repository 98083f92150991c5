"""STDF V4 (incl. V4-2007 additions): sans-IO incremental decoder, writer and test state.

Public API::

    from edgegw.stdf import StdfDecoder, StdfRecord, StdfWriter, StdfError, TestState

    dec = StdfDecoder()               # sans-IO, incremental, any chunking
    dec.feed(data)
    for rec in dec.records():         # complete records only; a cut tail waits for more
        rec.name, rec.offset, rec.fields
    for name, offset, values in dec.rows():  # the same records without a dict: fastest
        row_fields((name, offset, values))   # values of the fields present, in spec order
    dec.position                      # resume point: just after the last record returned
    StdfDecoder(start_offset=N, byte_order="<")   # resume mid-file at a record boundary

    w = StdfWriter(byte_order="<")
    w.encode("PTR", {...}) -> bytes

    state = TestState()               # PTR/MPR/FTR default state + open PIRs per head/site
    state.resolve_ptr(fields) -> dict

See ``docs/stdf.md``.  Public face: the names in ``__all__`` (``spec``: the record tables;
``decoder``: its tuning knobs, for benches and tests); the other modules are internal.
"""

from . import decoder, spec
from .decoder import StdfDecoder, StdfError, StdfRecord, StdfRow, row_fields
from .fields import stdf_fields, test_number
from .mapping import RecordMapper
from .spec import BY_NAME, BY_TYPE, RECORDS, Bits, Field, RecordSpec, missing_value
from .state import TestState, part_passed, part_supersedes, result_passed
from .stats import ALL_SITES, StdfStats
from .writer import StdfWriter

__all__ = [
    "ALL_SITES", "BY_NAME", "BY_TYPE", "RECORDS", "Bits", "Field", "RecordMapper", "RecordSpec",
    "StdfDecoder", "StdfError", "StdfRecord", "StdfRow", "StdfStats", "StdfWriter", "TestState",
    "decoder",
    "missing_value", "part_passed", "part_supersedes", "result_passed", "row_fields", "spec",
    "stdf_fields",
    "test_number",
]
