"""Sans-IO checks of a tester-format parser: every chunking, every truncation.

Each check feeds plain bytes to fresh parsers of the format (no files, no event loop) and
raises ``AssertionError`` naming the chunking or cut point and what differed, so a plugin's
own tests call them directly.  They check the rules of ``docs/plugins.md`` ("The rules a
parser must keep") that the tail source relies on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..formats import FormatError, FormatParser, TesterFormat
from ..sources import new_parser

#: Data longer than this is not cut at every byte: see ``cut_points``.
EXHAUSTIVE_BYTES = 4096


def _key(rec: Any) -> tuple[str, int, dict[str, Any]]:
    return (rec.name, rec.offset, dict(rec.fields))


def _not_format_error(exc: Exception, where_: str) -> AssertionError:
    if isinstance(exc, FormatError):
        return AssertionError(f"{where_}: FormatError({exc.message!r}, {exc.offset}) though "
                              "the data parses without one when fed at once")
    return AssertionError(f"{where_}: the parser raised {type(exc).__name__}: {exc!s:.200} "
                          "-- only FormatError is allowed, whatever the bytes (rule 4)")


def parse(fmt: TesterFormat, data: bytes, chunks: Iterable[int] | None = None, *,
          options: dict[str, Any] | None = None) -> list[Any]:
    """Every record of ``data``: fed in pieces of the sizes in ``chunks`` (the rest in one
    piece; default: all at once), ``records()`` after each piece, then ``close()``.
    Checks on the way that ``position`` never moves back and ends at ``len(data)``.
    ``FormatError`` from the parser is raised as it is; any other exception becomes an
    ``AssertionError`` saying so."""
    try:
        return _parse(fmt, data, chunks, options)
    except (FormatError, AssertionError):
        raise
    except Exception as exc:
        raise _not_format_error(exc, "parse") from exc


def _parse(fmt: TesterFormat, data: bytes, chunks: Iterable[int] | None,
           options: dict[str, Any] | None) -> list[Any]:
    parser = new_parser(fmt, options)
    out: list[Any] = []
    pos = 0
    at = 0
    for size in [*(chunks or []), len(data)]:
        if at >= len(data):
            break
        parser.feed(data[at:at + size])
        at = min(len(data), at + size)
        out.extend(parser.records())
        pos = _moved(parser, pos, at)
    out.extend(parser.close())
    end = parser.position
    assert end == len(data), f"position after close() is {end}, not the end ({len(data)})"
    return out


def _moved(parser: FormatParser, before: int, fed: int) -> int:
    pos = parser.position
    assert before <= pos <= fed, (
        f"position {pos} after feeding {fed} bytes (it was {before}): it must not move back "
        "or past the bytes fed")
    return pos


def chunkings(size: int, *, seed: int = 0, random_count: int = 20) -> list[list[int]]:
    """The chunkings ``check_chunkings`` tries for ``size`` bytes: fixed piece sizes 1, 2, 3,
    7, 64 and 4096; a cut in two at every byte (when ``size`` is at most
    ``EXHAUSTIVE_BYTES``); and ``random_count`` random ones (reproducible by ``seed``)."""
    splits = [[k] for k in range(1, size)] if size <= EXHAUSTIVE_BYTES else []
    return _chunkings(size, (1, 2, 3, 7, 64, 4096), splits, (3, 50, 1000), seed, random_count)


def sampled_chunkings(size: int, *, seed: int = 0, random_count: int = 4) -> list[list[int]]:
    """Chunkings for data too large for ``chunkings`` (its 1-byte pieces feed a 4 MB file in
    4 million calls): pieces of 7, 61, 4093 and 65536 bytes, and ``random_count`` random
    chunkings of pieces up to 1000 bytes (reproducible by ``seed``)."""
    return _chunkings(size, (7, 61, 4093, 65536), [], (1000,), seed, random_count)


def _chunkings(size: int, fixed: tuple[int, ...], more: list[list[int]],
               largest: tuple[int, ...], seed: int, random_count: int) -> list[list[int]]:
    """Pieces of each ``fixed`` size, then ``more``, then ``random_count`` random chunkings
    whose every piece is at most one of ``largest`` (picked at random per piece)."""
    out = [[n] * (size // n + 1) for n in fixed if n < size] + more
    rng = random.Random(seed)
    for _ in range(random_count):
        pieces, left = [], size
        while left > 0:
            n = rng.randint(1, max(1, min(left, rng.choice(largest))))
            pieces.append(n)
            left -= n
        out.append(pieces)
    return out


def check_chunkings(fmt: TesterFormat, data: bytes, *, options: dict[str, Any] | None = None,
                    seed: int = 0, pieces: list[list[int]] | None = None) -> list[Any]:
    """``data`` gives the same records (name, offset, fields) however it is cut into
    ``feed`` calls (``pieces``, default ``chunkings``: for megabytes of data pass
    ``sampled_chunkings``), and after every ``records()`` call ``position`` is the
    offset of the next record still to come, or the end of input the parser skips before
    it (a position it also reports after a record when fed everything at once) -- rule 3:
    a record boundary, where the tail resumes -- or, once no record is to come, at most the
    bytes fed.  Returns the records."""
    whole = parse(fmt, data, options=options)
    keys = [_key(r) for r in whole]
    offsets = [r.offset for r in whole]
    assert offsets == sorted(offsets), f"record offsets must not decrease: {offsets[:20]}"
    resumable = _positions_after_records(fmt, data, options)
    for chunking in chunkings(len(data), seed=seed) if pieces is None else pieces:
        try:
            _check_chunking(fmt, data, chunking, options, keys, offsets, resumable)
        except AssertionError:
            raise
        except Exception as exc:  # FormatError too: the whole data parsed without one
            raise _not_format_error(exc, f"chunking {_show(chunking)}") from exc
    return whole


def _positions_after_records(fmt: TesterFormat, data: bytes,
                             options: dict[str, Any] | None) -> set[int]:
    """The parser's ``position`` just after each record it yields, all data fed at once:
    besides record offsets, where the tail accepts a checkpoint (input the parser skips,
    such as record types it does not convert, may lie between it and the next record)."""
    parser = new_parser(fmt, options)
    parser.feed(data)
    seen = {parser.position}
    for _ in parser.records():
        seen.add(parser.position)
    return seen


def _check_chunking(fmt: TesterFormat, data: bytes, pieces: list[int],
                    options: dict[str, Any] | None, keys: list[Any],
                    offsets: list[int], resumable: set[int]) -> None:
    parser = new_parser(fmt, options)
    got: list[Any] = []
    at = 0
    pos = 0
    for size in [*pieces, len(data)]:
        if at >= len(data):
            break
        parser.feed(data[at:at + size])
        at = min(len(data), at + size)
        got.extend(parser.records())
        pos = _moved(parser, pos, at)
        upcoming = offsets[len(got)] if len(got) < len(offsets) else None
        assert upcoming is None or pos == upcoming or (pos < upcoming and pos in resumable), (
            f"chunking {_show(pieces)}: position {pos} after {len(got)} record(s) is not "
            f"the offset of the next record ({upcoming}): the tail would resume there")
    got.extend(parser.close())
    assert [_key(r) for r in got] == keys, (
        f"chunking {_show(pieces)} gives other records than feeding all at once: "
        f"{_first_difference([_key(r) for r in got], keys)}")


def cut_points(data: bytes, offsets: Sequence[int]) -> list[int]:
    """Where ``check_truncations`` cuts: every byte when the data is at most
    ``EXHAUSTIVE_BYTES`` long; else each record's first two bytes, middle and last byte."""
    if len(data) <= EXHAUSTIVE_BYTES:
        return list(range(len(data)))
    ends = [*offsets[1:], len(data)]
    cuts: set[int] = set()
    for start, end in zip(offsets, ends, strict=True):
        cuts.update((start, start + 1, (start + end) // 2, end - 1))
    return sorted(c for c in cuts if 0 <= c < len(data))


def sampled_cut_points(data: bytes, offsets: Sequence[int], *, records: int = 32,
                       seed: int = 0) -> list[int]:
    """Cut points for data too large for ``cut_points`` (each cut parses the data up to it:
    quadratic): every byte of the first ``EXHAUSTIVE_BYTES``, and ``cut_points``' four
    points in each of ``records`` records picked at random (reproducible by ``seed``),
    the last record among them."""
    if len(data) <= EXHAUSTIVE_BYTES or not offsets:
        return cut_points(data, offsets)
    picked = sorted({*random.Random(seed).sample(range(len(offsets)),
                                                 min(records, len(offsets))),
                     len(offsets) - 1})
    ends = [*offsets[1:], len(data)]
    cuts = set(range(EXHAUSTIVE_BYTES))
    for i in picked:
        start, end = offsets[i], ends[i]
        cuts.update((start, start + 1, (start + end) // 2, end - 1))
    return sorted(c for c in cuts if 0 <= c < len(data))


def check_truncations(fmt: TesterFormat, data: bytes, *,
                      options: dict[str, Any] | None = None,
                      may_end: Callable[[bytes, int], bool] | None = None,
                      cuts: Sequence[int] | None = None) -> int:
    """``close()`` on ``data`` cut short at every point (``cuts``, default ``cut_points``:
    for megabytes of data pass ``sampled_cut_points``) keeps rule 5:

    - cut where a record starts: exactly the records before the cut, no error;
    - cut inside a record: the records before that one, then ``FormatError`` with an offset
      between that record's start and the cut -- never a record made of the cut bytes (a
      value cut from ``645.65e-12`` to ``645.6`` would reach the hub as a wrong number).

    ``may_end(data, cut)`` says a cut inside a record still leaves a whole one (ATDF: a cut
    just after a newline, as a record may or may not get continuation lines); there the
    cut record may be yielded, the records before it must be the same.  Returns the number
    of cuts checked."""
    whole = parse(fmt, data, options=options)
    keys = [_key(r) for r in whole]
    starts = [r.offset for r in whole]
    if cuts is None:
        cuts = cut_points(data, starts)
    for cut in cuts:
        before = [k for k in keys if k[1] < cut]
        inside = next((s for s in reversed(starts) if s < cut), None)
        got: list[Any] = []
        parser = new_parser(fmt, options)
        error: FormatError | None = None
        try:
            parser.feed(data[:cut])
            got.extend(parser.records())
            got.extend(parser.close())
        except FormatError as exc:
            error = exc
        except Exception as exc:
            raise _not_format_error(exc, where_=f"cut at byte {cut}") from exc
        got_keys = [_key(r) for r in got]
        where = f"cut at byte {cut} of {len(data)}"
        if inside is None or cut in starts:
            # a cut where a record starts (or before the first): the records before it,
            # no error -- the tail may end a file at any record boundary
            if error is not None:
                raise AssertionError(f"{where} (a record boundary): close() raised "
                                     f"FormatError({error.message!r}, {error.offset})")
            assert got_keys == before, (
                f"{where} (a record boundary): {_first_difference(got_keys, before)}")
            continue
        assert inside is not None
        prior = [k for k in keys if k[1] < inside]
        if error is None:
            if may_end is not None and may_end(data, cut):
                assert got_keys[:len(prior)] == prior and len(got_keys) <= len(prior) + 1, (
                    f"{where}: {_first_difference(got_keys, prior)}")
                continue
            cut_rec = next((k for k in got_keys if k[1] == inside), None)
            raise AssertionError(
                f"{where}, inside the record at {inside}: close() must raise FormatError, "
                f"it yielded {'a cut record ' + repr(cut_rec)[:200] if cut_rec else 'no error'}")
        assert inside <= error.offset <= cut, (
            f"{where}: FormatError offset {error.offset} is not in the cut record "
            f"({inside} to {cut})")
        assert got_keys == prior[:len(got_keys)], (
            f"{where}: records before the error differ: {_first_difference(got_keys, prior)}")
    return len(cuts)


def _show(pieces: list[int]) -> str:
    text = ",".join(map(str, pieces[:8]))
    return f"[{text}{',...' if len(pieces) > 8 else ''}]"


def _first_difference(got: list[Any], want: list[Any]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"record {i}: got {a!r:.300}, expected {b!r:.300}"
    return f"got {len(got)} record(s), expected {len(want)}"
