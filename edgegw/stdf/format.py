"""STDF V4 as a tester-format plugin (``edgegw.formats`` entry point ``stdf``).

A thin adapter from the sans-IO ``StdfDecoder`` to the format interface of
``edgegw.formats``: decoder errors become ``FormatError`` with the same byte offset, and
``close()`` turns a record cut at the very end of a finished file into an error.

Beyond the interface, the fast path the tail takes when it needs no RawRecords
(``edgegw.formats``, "Optional"): ``rows()`` and ``close_rows()`` yield the decoder's rows
instead of records, and ``select(types)`` stops decoding the record types the consumer
does not read (``records_skipped`` counts them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ..formats import FormatError
from .decoder import RESERVED_REC_TYPS, StdfDecoder, StdfError, StdfRecord, StdfRow

T = TypeVar("T")


class StdfParser:
    def __init__(self) -> None:
        self._decoder = StdfDecoder()
        self._fed = 0

    @property
    def position(self) -> int:
        return self._decoder.position

    def feed(self, data: bytes) -> None:
        self._fed += len(data)
        self._decoder.feed(data)

    def records(self) -> Iterator[StdfRecord]:
        return self._read(self._decoder.records)

    def rows(self) -> Iterator[StdfRow]:
        """The same records as :meth:`records`, as ``StdfDecoder.rows()`` gives them."""
        return self._read(self._decoder.rows)

    def select(self, types: Iterable[str] | None) -> None:
        """Decode only these record types from now on (None: all); the others are
        counted in ``records_skipped`` (``StdfDecoder.select``)."""
        self._decoder.select(types)

    @property
    def records_unknown(self) -> int:
        """Records of unknown type stepped over by REC_LEN so far, but for the types the
        spec reserves for vendors (180, 181): a REC_LEN too short reads its record's rest
        as such headers, which may swallow the records after it."""
        return sum(n for (typ, _), n in self._decoder.unknown_types.items()
                   if typ not in RESERVED_REC_TYPS)

    @property
    def records_skipped(self) -> int:
        return sum(self._decoder.skipped.values())

    def _read(self, read: Callable[[], Iterator[T]]) -> Iterator[T]:
        try:
            yield from read()
        except StdfError as exc:
            raise FormatError(_message(exc), _offset(exc, self.position)) from exc

    def close(self) -> Iterator[StdfRecord]:
        yield from self.records()
        self._check_end()

    def close_rows(self) -> Iterator[StdfRow]:
        yield from self.rows()
        self._check_end()

    def _check_end(self) -> None:
        if self._fed > self.position:
            raise FormatError(
                f"file ends inside a record ({self._fed - self.position} bytes after the "
                "last complete record)", self.position)

    def state(self) -> dict[str, Any]:
        order = getattr(self._decoder, "byte_order", None)
        return {"byte_order": order} if order else {}


def _message(exc: StdfError) -> str:
    return str(getattr(exc, "message", None) or (exc.args[0] if exc.args else exc))


def _offset(exc: StdfError, default: int) -> int:
    offset = getattr(exc, "offset", None)
    return offset if isinstance(offset, int) else default


class StdfFormat:
    name = "stdf"
    description = "STDF V4 / V4-2007 binary (Standard Test Data Format)"
    suffixes: tuple[str, ...] = (".stdf", ".std")

    def new_parser(self) -> StdfParser:
        return StdfParser()


STDF = StdfFormat()
