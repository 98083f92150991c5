"""``edgegw stdf dump FILE`` and ``edgegw stdf stats FILE``: inspect an STDF file.

``dump`` prints one JSON object per record, ``{"rec": "PTR", "TEST_NUM": ..., ...}``
with the spec's field names (R*4 values as the shortest decimal that is the same
float32, bytes as hex, D*n as ``{"bits": n, "hex": ...}``, GDR data
as ``[type_code, value]`` pairs, NaN and infinities as the strings "nan", "inf", "-inf";
a record of unknown type as ``{"rec": "UNKNOWN", "REC_TYP", "REC_SUB", "REC_LEN", "DATA"}``,
its first bytes in hex).
``stats`` prints one JSON object: record counts by type, parts, good parts, counts per
hard and soft bin, per site (retests counted once), and the file's own HBR/SBR/PCR.
Both read gzip-, bzip2- and xz-compressed files too.

A file is read as complete: anything wrong with it is one line on stderr naming the file
and the byte offset, and exit status 1 (what was printed before it stays printed) -- a file
that is not STDF, corrupt compressed data, a record that cannot be STDF, a file that ends inside
a record (truncated, or corrupt from an earlier record of unknown type on), and an STDF_VER
other than 4.  A record cut before a field it must have (a PTR without TEST_NUM, an HBR
without HBIN_NUM) is not: ``stats`` skips and counts it as the gateway does
(``cut_records``, a warning on stderr, exit 0).  ``--partial`` reads a file still
being written (a record cut at the end is a warning); ``--any-version`` reads another
STDF_VER as if it were V4, best effort.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .compressed import MAGIC, StreamsReader, TrailingBytes
from .decoder import RESERVED_REC_TYPS, StdfDecoder, StdfError, StdfRecord
from .spec import BY_NAME, Bits
from .stats import StdfStats

#: read size; small enough that a dump prints the records before a gzip error
CHUNK = 1 << 16
#: ``dump`` shows this many first bytes of a record of unknown type (its REC_LEN: all)
UNKNOWN_SHOWN = 32
#: these commands never log: ``edgegw.cli.main`` does not set logging up for them
LOGS = False


#: the actions of ``edgegw stdf``: ``edgegw.cli.main`` given one of them builds its parser
#: alone (``add_commands(sub, only=...)``): building ``dump``'s is half of ``stats``' start
ACTIONS = ("dump", "stats")


def add_commands(sub: Any, only: str | None = None) -> None:
    """The ``stdf`` command and its actions; ``only``: just that action's parser."""
    p = sub.add_parser(
        "stdf", help="inspect STDF files (dump, stats)",
        description="Inspect an STDF V4 file (plain, gzip, bzip2 or xz) with edgegw's own "
                    "decoder: dump its records as JSON lines, or count its parts, bins and "
                    "records.  A file that is not usable STDF is one line on stderr naming "
                    "the byte offset, and exit status 1.",
        epilog="examples:\n"
               "  edgegw stdf dump lot.stdf --rec PRR | head\n"
               "  edgegw stdf stats lot.stdf.gz\n"
               "  edgegw stdf dump --partial /data/stdf/growing.stdf")
    stdf_sub = p.add_subparsers(dest="stdf_command", metavar="ACTION", title="actions")
    stdf_sub.required = True
    for name in ACTIONS if only is None else (only,):
        action = _ADD[name](stdf_sub)
        action.add_argument("--partial", action="store_true",
                            help="the file may still be being written: a record cut at its "
                                 "end is a warning, not an error")
        action.add_argument("--any-version", action="store_true",
                            help="read a FAR STDF_VER other than 4 as V4 (best effort)")


def _add_dump(stdf_sub: Any) -> Any:
    dump = stdf_sub.add_parser(
        "dump", help="one JSON object per record",
        description="Print one JSON object per record, {\"rec\": \"PTR\", \"TEST_NUM\": ..., "
                    "...}, with the spec's field names: R*4 values as the shortest decimal "
                    "that is the same float32, bytes as hex, D*n as {\"bits\": n, \"hex\": "
                    "...}, NaN and infinities as the strings \"nan\", \"inf\", \"-inf\"; "
                    "a record of unknown type as {\"rec\": \"UNKNOWN\", \"REC_TYP\", "
                    "\"REC_SUB\", \"REC_LEN\", \"DATA\": its first 32 bytes in hex} "
                    "(--rec UNKNOWN: those alone).",
        epilog="examples:\n"
               "  edgegw stdf dump lot.stdf --rec PIR --rec PRR\n"
               "  edgegw stdf dump lot.stdf --offset | head -20")
    dump.add_argument("file", type=Path, metavar="FILE", help="STDF file (.gz, .bz2, .xz too)")
    dump.add_argument("--rec", action="append", default=[], metavar="TYPE",
                      help="only records of this type (repeatable), e.g. --rec PRR")
    dump.add_argument("--offset", action="store_true",
                      help='add each record\'s byte offset as "_offset"')
    dump.set_defaults(func=run_dump)
    return dump


def _add_stats(stdf_sub: Any) -> Any:
    stats = stdf_sub.add_parser(
        "stats", help="part, bin and record counts as one JSON object",
        description="Print one JSON object: record counts by type, parts, good parts, "
                    "counts per hard and soft bin and per site (retests counted once), and "
                    "the file's own HBR/SBR/PCR summaries.",
        epilog="example:\n  edgegw stdf stats lot.stdf")
    stats.add_argument("file", type=Path, metavar="FILE", help="STDF file (.gz, .bz2, .xz too)")
    stats.set_defaults(func=run_stats)
    return stats


_ADD = {"dump": _add_dump, "stats": _add_stats}


#: compressed files read as a stream, by their magic bytes: (magic, name)
COMPRESSED = ((b"\x1f\x8b", "gzip"), *((magic, kind) for kind, magic in MAGIC.items()))
#: what is not read, named rather than called "not STDF" by its first bytes
_NOT_READ = ((b"PK\x03\x04", "a zip archive"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
             (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"))


def open_stdf(path: Path) -> tuple[Any, str | None]:
    """Open a plain, gzip-, bzip2- or xz-compressed file (recognised by its magic bytes):
    the file and its compression's name (None for a plain file)."""
    with path.open("rb") as f:
        head = f.read(6)
    for magic, what in _NOT_READ:
        if head.startswith(magic):
            raise _Bad(f"not STDF: {what}; extract or decompress the STDF file first "
                       "(this reads plain, gzip, bzip2 and xz files)")
    kind = next((name for magic, name in COMPRESSED if head.startswith(magic)), None)
    # the modules only for such a file: start-up of the plain ones
    if kind == "gzip":
        import gzip

        return gzip.open(path, "rb"), kind
    if kind is not None:  # bzip2 or xz: what follows the streams is told, as gzip's is
        return StreamsReader(path, kind), kind
    return path.open("rb"), None


def read_records(f: Any, decoder: StdfDecoder) -> Iterator[StdfRecord]:
    """The records of the open file ``f`` (``open_stdf``) as ``decoder`` decodes them."""
    with f:
        # read1: one read of the file (compressed: one piece decompressed) per chunk --
        # read() would gather several, and an error in a later one loses the earlier ones
        # (the records before a corrupt gzip member, the MRR before a junk trailer)
        while chunk := f.read1(CHUNK):
            decoder.feed(chunk)
            yield from decoder.records()


def jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Bits):
        return {"bits": value.count, "hex": value.data.hex()}
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


_F32 = struct.Struct("<f")


def short_r4(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (-0.9, not
    -0.8999999761581421): R*4 fields print as the tester meant them."""
    if not math.isfinite(value):
        return value
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if _F32.unpack(_F32.pack(candidate))[0] == value:
            return candidate
    return value


def _r4_fields(name: str) -> frozenset[str]:
    spec = BY_NAME.get(name)
    return frozenset(f.name for f in spec.fields if f.type == "R4") if spec else frozenset()


def _fail(path: Path, message: str) -> int:
    print(f"edgegw stdf: {path}: {message}", file=sys.stderr)
    return 1


class _Bad(Exception):
    """The file is not usable STDF; ``str()`` is the one-line reason."""


def _records(args: argparse.Namespace, decoder: StdfDecoder, *,
             unknown: bool = False) -> Iterator[StdfRecord]:
    """The file's records, known types only (and those of unknown type too, ``unknown``:
    ``dump`` shows them); ``_Bad`` for anything wrong with the file, a warning for
    anything after its MRR that is not STDF (trailing garbage)."""
    first_unknown: int | None = None
    #: the MRR just read, while nothing but records of unknown type followed it: the file
    #: is whole, and what cannot be read after it (zero fill, a text trailer) loses nothing
    mrr_at: int | None = None
    lot_at: int | None = None  # the MIR of a lot whose MRR has not come (yet)
    kind: str | None = None
    try:
        f, kind = open_stdf(args.file)
        for rec in read_records(f, decoder):
            if rec.name == "UNKNOWN":
                if first_unknown is None and rec.fields["REC_TYP"] not in RESERVED_REC_TYPS:
                    first_unknown = rec.offset
                if unknown:
                    yield rec
                continue
            mrr_at = rec.offset if rec.name == "MRR" else None
            if rec.name == "MIR":
                lot_at = rec.offset
            elif rec.name == "MRR":
                lot_at = None
            if rec.name == "FAR" and not args.any_version:
                version = rec.fields.get("STDF_VER")
                if version != 4:
                    raise _Bad(f"STDF_VER {version} in the FAR at byte {rec.offset}: this "
                               "reads STDF V4 (--any-version reads it as V4, best effort)")
            yield rec
    except StdfError as exc:
        if mrr_at is not None:
            _trailing(args, mrr_at, f"not STDF ({exc})")
            return
        raise _Bad(str(exc)) from None
    except zlib.error as exc:  # gzip data corrupt inside a member
        raise _Bad(f"corrupt gzip data after {_fed(decoder)} bytes of STDF: {exc}") from None
    except EOFError as exc:  # a compressed stream cut short
        raise _Bad(f"{kind} file cut short after {_fed(decoder)} bytes of STDF "
                   f"({exc})") from None
    except OSError as exc:  # missing file, not gzip after all, ...
        if isinstance(exc, BrokenPipeError):
            raise
        gz = sys.modules.get("gzip")  # imported only for a gzip file (start-up)
        bad_gzip = gz is not None and isinstance(exc, gz.BadGzipFile)
        if bad_gzip or isinstance(exc, TrailingBytes):
            # bytes after the compressed data that begin no member or stream: after the
            # MRR, the compressed file's text trailer (a warning, as one in a plain file)
            if mrr_at is not None:
                _trailing(args, mrr_at, f"bytes after the gzip data that are not gzip ({exc})"
                          if bad_gzip else str(exc))
                return
            raise _Bad(f"not {kind} data after {_fed(decoder)} bytes of STDF: {exc}") from None
        if kind == "bzip2":  # bz2's one error for data it cannot decompress
            raise _Bad(f"corrupt bzip2 data after {_fed(decoder)} bytes of STDF: "
                       f"{exc}") from None
        raise _Bad(str(exc) or type(exc).__name__) from None
    except Exception as exc:
        xz = sys.modules.get("lzma")  # imported only for an xz file (start-up)
        if xz is None or not isinstance(exc, xz.LZMAError):
            raise
        raise _Bad(f"corrupt xz data after {_fed(decoder)} bytes of STDF: {exc}") from None
    if decoder.byte_order is None and decoder.position == 0:
        raise _Bad("not STDF: too short to hold a FAR")
    if decoder.buffered:
        where = (f"the file ends inside the record at byte {decoder.position} "
                 f"({decoder.buffered} bytes of it present)")
        if mrr_at is not None:
            _trailing(args, mrr_at, f"{decoder.buffered} bytes that are not a whole record")
        elif args.partial:
            print(f"edgegw stdf: {args.file}: warning: {where}; still being written?",
                  file=sys.stderr)
        elif first_unknown is not None:
            raise _Bad(f"corrupt: {where}, after a record of unknown type at byte "
                       f"{first_unknown}, where the damage probably starts")
        else:
            raise _Bad(f"truncated: {where} (--partial for a file still being written)")
    elif lot_at is not None and not args.partial:
        # whole records to the end, but the lot's end is not there: figures of part of a
        # lot, which nothing else would say (a file cut at a record's end reads clean)
        print(f"edgegw stdf: {args.file}: warning: the lot of the MIR at byte {lot_at} has "
              f"no MRR (the file ends at byte {decoder.position}): still being written "
              "(--partial), or the tester stopped before the lot's end; the figures are "
              "those of the records there", file=sys.stderr)


def _trailing(args: argparse.Namespace, mrr_at: int, what: str) -> None:
    print(f"edgegw stdf: {args.file}: warning: after the MRR at byte {mrr_at} (the end of "
          f"the file's data): {what}; ignored", file=sys.stderr)


def _fed(decoder: StdfDecoder) -> int:
    return decoder.position + decoder.buffered


def _run(args: argparse.Namespace, each: Any, decoder: StdfDecoder | None = None, *,
         unknown: bool = False) -> int:
    if decoder is None:
        decoder = StdfDecoder(keep_unknown=True)
    try:
        for rec in _records(args, decoder, unknown=unknown):
            try:
                each(rec)
            except (KeyError, TypeError, ValueError) as exc:
                reason = (f"without its {exc.args[0]} field" if isinstance(exc, KeyError)
                          else f"that cannot be read ({exc})")
                raise _Bad(f"a {rec.name} record {reason} at byte {rec.offset}") from None
    except _Bad as exc:
        return _fail(args.file, str(exc))
    return 0


def run_dump(args: argparse.Namespace) -> int:
    wanted = {name.upper() for name in args.rec}
    write = sys.stdout.write
    r4_by_name: dict[str, frozenset[str]] = {}

    def each(rec: StdfRecord) -> None:
        if wanted and rec.name not in wanted:
            return
        obj: dict[str, Any] = {"rec": rec.name}
        if args.offset:
            obj["_offset"] = rec.offset
        if rec.name == "UNKNOWN":
            # shown, not hidden: ``stats`` counts them (``unknown_records``), and a run of
            # them is where a REC_LEN too short further up shows (docs/stdf.md)
            body = rec.fields["DATA"]
            obj.update(REC_TYP=rec.fields["REC_TYP"], REC_SUB=rec.fields["REC_SUB"],
                       REC_LEN=len(body), DATA=body[:UNKNOWN_SHOWN].hex())
            write(json.dumps(obj) + "\n")
            return
        r4 = r4_by_name.get(rec.name)
        if r4 is None:
            r4 = r4_by_name[rec.name] = _r4_fields(rec.name)
        for key, value in rec.fields.items():
            if key in r4:
                value = [short_r4(v) for v in value] if isinstance(value, list) else \
                    short_r4(value)
            elif key == "GEN_DATA":
                value = [(c, short_r4(v) if c == 7 else v) for c, v in value]
            obj[key] = jsonable(value)
        write(json.dumps(obj, allow_nan=False) + "\n")

    # types not asked for are not decoded (skipped GDRs are checked: the same errors);
    # the MRR is, to tell trailing garbage from a corrupt file
    try:
        return _run(args, each, StdfDecoder(keep_unknown=True, types=(
            (wanted & BY_NAME.keys()) | {"MRR"} if wanted else None)), unknown=True)
    except BrokenPipeError:  # `edgegw stdf dump f | head`
        sys.stderr.close()
        return 0


def indented_json(value: Any) -> str:
    """``json.dumps(value, indent=2)``, the same text, for the dicts, lists, strings,
    numbers, booleans and None that ``stats`` prints: with ``indent`` set, ``json``
    encodes in Python rather than C, a tenth of a small file's whole ``stats``.  Here the
    C encoder writes every scalar and a recursion only the layout."""
    out: list[str] = []
    scalar, key = _scalar, _key

    def put(v: Any, pad: str) -> None:
        if isinstance(v, dict):
            if not v:
                out.append("{}")
                return
            inner = pad + "  "
            sep = "{\n" + inner
            for k, item in v.items():
                out.append(sep)
                out.append(key(k))
                out.append(": ")
                put(item, inner)
                sep = ",\n" + inner
            out.append("\n" + pad + "}")
        elif isinstance(v, (list, tuple)):
            if not v:
                out.append("[]")
                return
            inner = pad + "  "
            sep = "[\n" + inner
            for item in v:
                out.append(sep)
                put(item, inner)
                sep = ",\n" + inner
            out.append("\n" + pad + "]")
        else:
            out.append(scalar(v))

    try:
        put(value, "")
    except TypeError:  # a key or value json does not take: its own error, or the text
        return json.dumps(value, indent=2)
    return "".join(out)


def _scalar(v: Any) -> str:
    """A value as ``json`` writes it (``JSONEncoder``'s rules, without a call into it:
    its ``encode`` makes a new C encoder per call)."""
    if isinstance(v, str):
        return _quote(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return int.__repr__(v)
    if isinstance(v, float):
        if v != v:
            return "NaN"
        if v in (_INF, -_INF):
            return "Infinity" if v > 0 else "-Infinity"
        return float.__repr__(v)
    raise TypeError(f"Object of type {type(v).__name__} is not JSON serializable")


def _key(k: Any) -> str:
    """A dict key as ``json`` writes it: a number, a boolean or None as a string."""
    if isinstance(k, str):
        return _quote(k)
    if k is None or isinstance(k, (int, float)):
        return _quote(_scalar(k))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


_quote = json.encoder.encode_basestring_ascii
_INF = float("inf")


#: record types ``stats`` does not read: counted by the decoder, never decoded (most of a
#: file's bytes).  The decoder still checks a skipped GDR's type codes, so that a file's
#: errors are the same whichever command reads it.  The MRR is decoded: what cannot be
#: read after it is trailing garbage, a warning (``_records``)
STATS_SKIP = frozenset(BY_NAME) - StdfStats.READS - {"FAR", "MRR"}
#: skipped record types that name their test by TEST_NUM, their first field (U*4): one
#: whose REC_LEN is below 4 is cut before it, a record the gateway skips and counts
#: (``edgegw_tail_cut_records_total``); the decoder counts them without decoding any
TEST_NUM_FIRST = ("PTR", "MPR", "FTR")


def run_stats(args: argparse.Namespace) -> int:
    stats = StdfStats()
    decoder = StdfDecoder(keep_unknown=True, skip=STATS_SKIP, short=4)
    status = _run(args, lambda rec: stats.add(rec.name, rec.fields), decoder)
    stats.records.update({name: n for name, n in decoder.skipped.items() if n})
    stats.cut.update({name: decoder.skipped_short[name] for name in TEST_NUM_FIRST
                      if decoder.skipped_short.get(name)})
    if status == 0:
        figures = stats.as_dict()
        if decoder.unknown_types:
            # skipped by REC_LEN: a vendor's records, or a REC_LEN too short further up
            # whose record's rest read as headers (records swallowed: the counts above
            # are short by them, exit 0 all the same) -- said, never silent
            figures["unknown_records"] = {
                f"{typ}/{sub}": n for (typ, sub), n in sorted(decoder.unknown_types.items())}
        if stats.cut:
            # records cut before a field they must have: read on, as the gateway does
            # (it skips and counts them): the figures are what it sent; exit 0, said on
            # stderr and in the figures (docs/stdf.md, "exit status")
            figures["cut_records"] = dict(sorted(stats.cut.items()))
            print(f"edgegw stdf: {args.file}: warning: records cut before a field they must "
                  "have skipped: " + ", ".join(f"{n} {name}" for name, n
                                                in sorted(stats.cut.items())),
                  file=sys.stderr)
        try:
            print(indented_json(figures))
        except BrokenPipeError:
            sys.stderr.close()
    return status
