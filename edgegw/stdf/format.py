"""STDF V4 as a tester-format plugin (``edgegw.formats`` entry point ``stdf``).

A thin adapter from the sans-IO ``StdfDecoder`` to the format interface of
``edgegw.formats``: decoder errors become ``FormatError`` with the same byte offset, and
``close()`` turns a record cut at the very end of a finished file into an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..formats import FormatError
from .decoder import StdfDecoder, StdfError, StdfRecord


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
        try:
            yield from self._decoder.records()
        except StdfError as exc:
            raise FormatError(_message(exc), _offset(exc, self.position)) from exc

    def close(self) -> Iterator[StdfRecord]:
        yield from self.records()
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
    suffixes = (".stdf", ".std")

    def new_parser(self) -> StdfParser:
        return StdfParser()


STDF = StdfFormat()
