"""Tester formats are plugins: a small sans-IO parser interface and its entry-point registry.

A tester format (STDF, ATDF, a vendor's own log format) is an object registered under the
``edgegw.formats`` entry-point group.  The built-in STDF format is registered exactly the
way a third party registers theirs (see ``pyproject.toml`` and ``docs/plugins.md``), so the
tail source knows no format by name: it looks the configured one up in the registry
(``edgegw.sources.formats``: ``installed_formats``, ``get_format``).  This module is the
interface alone, below every format (STDF included) so formats import it, not the reverse.

The interface is deliberately small and sans-IO (bytes in, records out, no files, no
clock), so a format is tested with plain bytes and any chunking:

- ``TesterFormat``: ``name``, ``description``, ``suffixes`` (file names the tail picks up in
  a watched directory) and ``new_parser()``.
- ``FormatParser``: ``feed(data)``; ``records()`` yields every *complete* record fed so far
  (a record cut at the end of the data is kept until the rest arrives — a file being written
  ends mid-record all the time); ``position`` is the byte offset just after the last record
  yielded (a record boundary: the resume point); ``close()`` says the input is complete and
  yields what was held back, or raises ``FormatError`` if the input ends inside a record;
  ``state()`` is a JSON-able dict describing the stream (STDF: its byte order), recorded in
  the tail's checkpoint for diagnosis.
- Parsed records have ``name`` (the STDF record name: "PIR", "PTR", ...), ``offset`` (of the
  record's first byte) and ``fields`` (a dict under the STDF V4 spec's field names, values
  of the spec's types; optional fields the input omits are absent).  Because every format
  yields STDF names and fields, one mapping (``edgegw.stdf.mapping``) turns any of them into
  edgegw records.
- Corrupt input raises ``FormatError(message, offset)`` with the byte offset of the problem.
- Optional additions (backwards compatible): a parser's ``complete`` says the file is whole
  before any idle timeout; a format's ``Options`` dataclass takes per-source settings from
  the gateway config (``edgegw.sources``: ``new_parser``, ``build_options``).  The built-in
  STDF parser also has a fast path the tail takes when it forwards no RawRecords:
  ``rows()``/``close_rows()`` (``edgegw.stdf.StdfRow`` tuples instead of records) and
  ``select(types)`` (record types the mapper does not read are not decoded).
- Helpers for plugins (``edgegw.stdf``): ``stdf_fields`` (STDF field dicts with the spec's
  missing values) and ``test_number`` (a stable TEST_NUM for a named test).
  ``edgegw.testing`` is the plugin test kit.

Why no "start at offset N" in the interface: records depend on earlier ones (the STDF byte
order from FAR, per-test PTR defaults, the open PIR of a site), so the tail resumes a file by
re-parsing it from the start up to its checkpoint without emitting anything.  That is
correct for every format without each plugin having to serialise its state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

ENTRY_POINT_GROUP = "edgegw.formats"


class FormatError(ValueError):
    """Input that is not valid in the format; ``offset`` is the byte where it goes wrong."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.message = message
        self.offset = offset


class ParsedRecord(Protocol):
    """One record a parser yields: its STDF ``name``, the stream ``offset`` of its first
    byte, and its ``fields`` under the STDF V4 names (``edgegw.stdf.stdf_fields`` builds
    them).  Read-only, so a named tuple is one."""

    @property
    def name(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def fields(self) -> dict[str, Any]: ...


class FormatParser(Protocol):
    """A sans-IO parser of one file (docs/plugins.md, "The rules a parser must keep").

    Optional: a ``complete`` attribute or property, True once the records yielded so far
    are the whole file (the format's end marker, a declared record count): the tail then
    calls ``close()`` at once instead of waiting ``idle_timeout`` -- what an MRR does for
    STDF.  Parsers without it are complete at their MRR or when idle
    (``edgegw.sources.is_complete``)."""

    @property
    def position(self) -> int: ...

    def feed(self, data: bytes) -> None: ...

    def records(self) -> Iterator[ParsedRecord]: ...

    def close(self) -> Iterator[ParsedRecord]: ...

    def state(self) -> dict[str, Any]: ...


class TesterFormat(Protocol):
    """A tester format, registered under the ``edgegw.formats`` entry-point group.

    Optional: ``Options``, a dataclass of the format's own settings (a limits file, a
    timezone, a numbering scheme).  A tail source's ``options`` table is built into it
    (checked like any config section: unknown keys, types, ``validate()``) and each parser
    is made by ``new_parser(options)``.  A format without ``Options`` takes no options and
    is called as ``new_parser()`` (``edgegw.sources.new_parser`` calls the right one)."""

    name: str
    description: str
    suffixes: tuple[str, ...]

    def new_parser(self) -> FormatParser: ...


__all__ = ["ENTRY_POINT_GROUP", "FormatError", "FormatParser", "ParsedRecord", "TesterFormat"]
