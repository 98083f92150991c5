# The compiled record loop (_accel.c): its types, for the type checker.
from collections.abc import Iterator, Sequence
from typing import Any

VERSION: int

class Table:
    """The record table of one byte order: (type key, name, largest REC_LEN, read by the
    Python loop, field names, ((type code, count field index, size field index), ...))."""

    def __new__(cls, big: bool, records: Sequence[tuple[int, str, int, bool, tuple[str, ...],
                                                        tuple[tuple[int, int, int], ...]]],
                bits: type, record: type) -> Table: ...

class Scan(Iterator[Any]):
    """The records of ``buf`` from ``pos`` until one the Python loop must read."""

    done: bool

    def __new__(cls, table: Table, decoder: Any, buf: bytes, pos: int, base: int,
                rows: bool, skip_keys: Sequence[int], short: int) -> Scan: ...
    def __next__(self) -> Any: ...
    def close(self) -> None: ...
