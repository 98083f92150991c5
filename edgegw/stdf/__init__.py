"""STDF V4 (incl. V4-2007 additions): sans-IO incremental decoder, writer and test state.

Public API::

    from edgegw.stdf import StdfDecoder, StdfRecord, StdfWriter, StdfError, TestState

    dec = StdfDecoder()               # sans-IO, incremental, any chunking
    dec.feed(data)
    for rec in dec.records():         # complete records only; a cut tail waits for more
        rec.name, rec.offset, rec.fields
    dec.position                      # resume point: just after the last record returned
    StdfDecoder(start_offset=N, byte_order="<")   # resume mid-file at a record boundary

    w = StdfWriter(byte_order="<")
    w.encode("PTR", {...}) -> bytes

    state = TestState()               # PTR/MPR/FTR default state + open PIRs per head/site
    state.resolve_ptr(fields) -> dict

See ``docs/stdf.md``.
"""

from .decoder import StdfDecoder, StdfError, StdfRecord
from .spec import BY_NAME, BY_TYPE, RECORDS, Bits, Field, RecordSpec
from .state import TestState
from .writer import StdfWriter

__all__ = [
    "BY_NAME",
    "BY_TYPE",
    "RECORDS",
    "Bits",
    "Field",
    "RecordSpec",
    "StdfDecoder",
    "StdfError",
    "StdfRecord",
    "StdfWriter",
    "TestState",
]
