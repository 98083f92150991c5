"""A bzip2 or xz file read as its streams one after another -- and what follows them.

``bz2.open`` and ``lzma.open`` read a file of several streams as one, as the tools do,
but stop without a word at bytes that begin no stream: a transfer tool's trailer, a
file half overwritten, junk after half a lot all read as a file that simply ends there.
A gzip file says so (``gzip.BadGzipFile``), and ``edgegw stdf`` tells a trailer after
the lot's MRR (a warning) from bytes where the lot should go on (an error); this reader
lets it do the same for bzip2 and xz: the same streams, the same data, and
``TrailingBytes`` for what follows them (xz's stream padding, zero bytes, is part of the
format, not trailing).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

#: the first bytes of a stream of each kind this reads
MAGIC = {"bzip2": b"BZh", "xz": b"\xfd7zXZ\x00"}
_RAW_READ = 1 << 16


class TrailingBytes(OSError):
    """Bytes after the last stream of a compressed file that begin no stream (an OSError,
    as gzip's ``BadGzipFile`` for the same)."""


class StreamsReader:
    """The decompressed data of ``path`` (``kind``: "bzip2" or "xz"), a piece at a time
    (``read1``), as ``bz2.open``/``lzma.open`` would give it up to where they stop.
    Errors as theirs: ``EOFError`` for a stream cut short, ``OSError`` (bzip2) or
    ``lzma.LZMAError`` for corrupt data; ``TrailingBytes`` for bytes after the streams."""

    def __init__(self, path: Path, kind: str) -> None:
        if kind not in MAGIC:
            raise ValueError(f"not a kind of stream this reads: {kind!r}")
        self.kind = kind
        self._magic = MAGIC[kind]
        self._raw = path.open("rb")
        self._dec: Any = self._new()
        self._input = b""  # compressed bytes read but not yet given to the decompressor

    def _new(self) -> Any:
        # the codec's module only once a file of its kind is read (``stdf stats`` start-up)
        if self.kind == "bzip2":
            import bz2

            return bz2.BZ2Decompressor()
        import lzma

        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def read1(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of data (one piece: at least one byte until the end);
        b"" at the end of the last stream."""
        limit = size if size > 0 else _RAW_READ
        while True:
            if self._dec.eof:
                if not self._next_stream():
                    return b""
            if self._dec.needs_input:
                data = self._input or self._raw.read(_RAW_READ)
                self._input = b""
                if not data:
                    raise EOFError("Compressed file ended before the end-of-stream marker "
                                   "was reached")
            else:
                data = b""  # output held back by ``limit`` last time
            out = self._dec.decompress(data, limit)
            if out:
                return out
            if not data and not self._dec.eof and not self._dec.needs_input:
                raise EOFError("no progress in the compressed data")  # (never seen)

    def _next_stream(self) -> bool:
        """After a stream's end: start the next one (True), or False at the file's end."""
        rest = self._dec.unused_data
        while True:
            if self.kind == "xz":
                rest = rest.lstrip(b"\0")  # stream padding
            if len(rest) >= len(self._magic):
                break
            more = self._raw.read(_RAW_READ)
            if not more:
                if not rest:
                    return False
                break
            rest += more
        if not rest.startswith(self._magic):
            raise TrailingBytes(f"bytes after the {self.kind} data that begin no "
                                f"{self.kind} stream: {rest[:16]!r}")
        self._dec = self._new()
        self._input = rest
        return True

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> StreamsReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
