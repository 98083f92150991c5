"""``edgegw plugins check FORMAT FILE``: the plugin kit's checks on a real tester file.

A format plugin's tests check its parser on the samples its author has; a test floor has
files no author saw.  This runs the kit's checks (``edgegw.testing``, docs/plugins.md
"Testing a format") on one of them, from the command line, sampled so a file of
megabytes takes seconds: the whole file parses; cut into pieces of other sizes it gives
the same records with ``position`` at record boundaries; cut short, the records before
the cut or a ``FormatError`` inside a record; and the tail reading it, resumed from
checkpoints inside it, puts exactly the records that followed each.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .config import ConfigError
from .formats import FormatError, TesterFormat

#: records cut short (at four points each) past the file's first 4096 bytes
CUT_RECORDS = 8


@dataclasses.dataclass
class Check:
    """One check's outcome: ``ok``, what it found (or why it failed), how long it took."""

    name: str
    ok: bool
    detail: str
    seconds: float


def _timed(name: str, run: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail, ok = run(), True
    except (AssertionError, FormatError) as exc:
        detail, ok = _reason(exc), False
    return Check(name, ok, detail, time.perf_counter() - start)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FormatError):
        return f"FormatError at byte {exc.offset}: {exc.message}"
    return str(exc)


def check_file(fmt_name: str, path: Path, options: dict[str, Any] | None = None, *,
               seed: int = 0, resumes: int = 5) -> list[Check]:
    """The checks, in order; one that fails stops those that build on it (a file that does
    not parse whole has no records to compare pieces with).  ``UnknownFormat``,
    ``ConfigError`` (an option the format refuses) and ``OSError`` before any check."""
    from .sources import build_options, get_format
    from .testing import (
        check_chunkings,
        check_truncations,
        parse,
        sampled_chunkings,
        sampled_cut_points,
    )

    fmt = get_format(fmt_name)
    # an option the format refuses: ConfigError, no check can run
    if getattr(fmt, "Options", None) is not None:
        build_options(fmt, options, "--option", "")
    elif options:
        raise ConfigError([f"--option: the {fmt_name} format takes no options (got "
                           f"{', '.join(sorted(options))})"])
    raw = path.read_bytes()
    data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
    records: list[Any] = []

    def whole() -> str:
        records.extend(parse(fmt, data, options=options))
        counts = collections.Counter(r.name for r in records)
        shown = ", ".join(f"{name} {n:,}" for name, n in counts.most_common(12))
        more = len(counts) - 12
        return (f"{len(records):,} records in {len(data):,} bytes ({shown}"
                f"{f', {more} more types' if more > 0 else ''})")

    checks = [_timed("parse", whole)]
    if not checks[0].ok:
        return checks
    offsets = [r.offset for r in records]

    def pieces() -> str:
        chunkings = sampled_chunkings(len(data), seed=seed)
        check_chunkings(fmt, data, options=options, pieces=chunkings)
        return (f"{len(chunkings)} chunkings (pieces of 7, 61, 4093, 65536 bytes, random ones "
                "up to 1000): the same records, position at record boundaries")

    def cuts() -> str:
        # each cut parses the file up to it: eight records keep a 4 MB file to seconds
        points = sampled_cut_points(data, offsets, records=CUT_RECORDS, seed=seed)
        n = check_truncations(fmt, data, options=options, cuts=points)
        return (f"{n:,} cuts (every byte of the first 4096, 4 in each of {CUT_RECORDS} "
                "records): the records before each, or FormatError inside the cut record")

    checks += [_timed("chunkings", pieces), _timed("truncations", cuts),
               _timed("resumes", lambda: _resumes(fmt, fmt_name, path, options, resumes,
                                                  len(data)))]
    return checks


def _resumes(fmt: TesterFormat, fmt_name: str, path: Path, options: dict[str, Any] | None,
             restarts: int, size: int) -> str:
    """The tail reading the file (as found: gzip stays gzip), resumed from checkpoints
    spread over it: exactly the records that followed each (``check_replays``)."""
    from .sources import TailConfig, TailSource
    from .testing import check_replays

    suffix = next(iter(getattr(fmt, "suffixes", ())), "")
    with tempfile.TemporaryDirectory(prefix="edgegw-check-") as tmp:
        name = "checked" + suffix + (".gz" if path.name.endswith(".gz") else "")
        shutil.copyfile(path, Path(tmp) / name)
        # about 20 reads: checkpoints inside the file, not only at its end
        read_size = max(512, min(1 << 20, size // 20 or 512))
        config = TailConfig(paths=[tmp], format=fmt_name, poll_interval=0.01,
                            read_size=read_size, options=dict(options or {}))
        # (the tail logs the checkpoint it never wrote, which it is handed on purpose)
        quiet = logging.getLogger("edgegw.sources")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            first = trio.run(lambda: check_replays(TailSource, config, records=1 << 62,
                                                   restarts=restarts, idle_s=2.0))
        finally:
            quiet.setLevel(level)
    put = sum(len(p.records) for p in first)
    if not put:
        raise AssertionError(f"the tail put no record from {path.name} (its format's "
                             f"suffixes: {list(getattr(fmt, 'suffixes', ()))})")
    picked = min(restarts, sum(p.checkpoint is not None for p in first))
    return (f"the tail ({read_size:,}-byte reads) put {put:,} records in {len(first)} puts; "
            f"resumed from {picked} checkpoint(s) inside the file and from one it never "
            "wrote: exactly the records that followed each")


__all__ = ["Check", "check_file"]
