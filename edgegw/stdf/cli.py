"""``edgegw stdf dump FILE`` and ``edgegw stdf stats FILE``: inspect an STDF file.

``dump`` prints one JSON object per record, ``{"rec": "PTR", "TEST_NUM": ..., ...}``
with the spec's field names (R*4 values as the shortest decimal that is the same
float32, bytes as hex, D*n as ``{"bits": n, "hex": ...}``, GDR data
as ``[type_code, value]`` pairs, NaN and infinities as the strings "nan", "inf", "-inf").
``stats`` prints one JSON object: record counts by type, parts, good parts, counts per
hard and soft bin, per site (retests counted once), and the file's own HBR/SBR/PCR.
Both read gzip-compressed files too.  A file that is not STDF exits with status 1 and a
one-line message.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .decoder import StdfDecoder, StdfError, StdfRecord
from .spec import BY_NAME, Bits
from .stats import StdfStats

CHUNK = 1 << 20


def add_commands(sub: Any) -> None:
    p = sub.add_parser("stdf", help="inspect STDF files (dump, stats)")
    stdf_sub = p.add_subparsers(dest="stdf_command", metavar="ACTION")
    stdf_sub.required = True
    dump = stdf_sub.add_parser("dump", help="one JSON object per record")
    dump.add_argument("file", type=Path, help="STDF file (.gz too)")
    dump.add_argument("--rec", action="append", default=[], metavar="TYPE",
                      help="only records of this type (repeatable), e.g. --rec PRR")
    dump.add_argument("--offset", action="store_true",
                      help='add each record\'s byte offset as "_offset"')
    dump.set_defaults(func=run_dump)
    stats = stdf_sub.add_parser("stats", help="part, bin and record counts as one JSON object")
    stats.add_argument("file", type=Path, help="STDF file (.gz too)")
    stats.set_defaults(func=run_stats)


def open_stdf(path: Path) -> BinaryIO:
    """Open a plain or gzip-compressed file (recognised by its magic bytes)."""
    f = path.open("rb")
    if f.read(2) == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def read_records(path: Path, decoder: StdfDecoder) -> Iterator[StdfRecord]:
    with open_stdf(path) as f:
        while chunk := f.read(CHUNK):
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


def _run(args: argparse.Namespace, each: Any) -> int:
    decoder = StdfDecoder()
    try:
        for rec in read_records(args.file, decoder):
            each(rec)
    except StdfError as exc:
        return _fail(args.file, str(exc))
    except BrokenPipeError:
        raise
    except (OSError, EOFError) as exc:  # missing file, bad gzip data, truncated gzip
        return _fail(args.file, str(exc) or type(exc).__name__)
    if decoder.byte_order is None and decoder.position == 0:
        return _fail(args.file, "not STDF: too short to hold a FAR")
    if decoder.buffered:
        print(f"edgegw stdf: {args.file}: warning: file ends inside a record "
              f"({decoder.buffered} bytes after offset {decoder.position}; still being "
              "written?)", file=sys.stderr)
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

    try:
        return _run(args, each)
    except BrokenPipeError:  # `edgegw stdf dump f | head`
        sys.stderr.close()
        return 0


def run_stats(args: argparse.Namespace) -> int:
    stats = StdfStats()
    status = _run(args, lambda rec: stats.add(rec.name, rec.fields))
    if status == 0:
        try:
            print(json.dumps(stats.as_dict(), indent=2))
        except BrokenPipeError:
            sys.stderr.close()
    return status
