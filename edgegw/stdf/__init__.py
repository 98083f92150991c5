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

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazyface import lazy_face

# Names load on first use (PEP 562): ``edgegw stdf stats`` imports the decoder and the
# statistics, not the mapper, the live state or the writer (each import is start-up).
_EXPORTS = {
    "StdfDecoder": "decoder", "StdfError": "decoder", "StdfRecord": "decoder",
    "StdfRow": "decoder", "row_fields": "decoder",
    "stdf_fields": "fields", "test_number": "fields",
    "RecordMapper": "mapping",
    "BY_NAME": "spec", "BY_TYPE": "spec", "RECORDS": "spec", "Bits": "spec", "Field": "spec",
    "RecordSpec": "spec", "missing_value": "spec",
    "TestState": "state", "part_passed": "state", "part_supersedes": "state",
    "result_passed": "state",
    "ALL_SITES": "stats", "StdfStats": "stats",
    "StdfWriter": "writer",
    "StreamsReader": "compressed", "TrailingBytes": "compressed",
}
_SUBMODULES = ("decoder", "spec")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])

if TYPE_CHECKING:
    from . import decoder as decoder
    from . import spec as spec
    from .compressed import StreamsReader as StreamsReader
    from .compressed import TrailingBytes as TrailingBytes
    from .decoder import StdfDecoder as StdfDecoder
    from .decoder import StdfError as StdfError
    from .decoder import StdfRecord as StdfRecord
    from .decoder import StdfRow as StdfRow
    from .decoder import row_fields as row_fields
    from .fields import stdf_fields as stdf_fields
    from .fields import test_number as test_number
    from .mapping import RecordMapper as RecordMapper
    from .spec import BY_NAME as BY_NAME
    from .spec import BY_TYPE as BY_TYPE
    from .spec import RECORDS as RECORDS
    from .spec import Bits as Bits
    from .spec import Field as Field
    from .spec import RecordSpec as RecordSpec
    from .spec import missing_value as missing_value
    from .state import TestState as TestState
    from .state import part_passed as part_passed
    from .state import part_supersedes as part_supersedes
    from .state import result_passed as result_passed
    from .stats import ALL_SITES as ALL_SITES
    from .stats import StdfStats as StdfStats
    from .writer import StdfWriter as StdfWriter

__getattr__, __dir__ = lazy_face(__name__, globals(), _EXPORTS, _SUBMODULES)
