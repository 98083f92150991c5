"""The live tail source: tester files (STDF, or any installed format) as the tester writes them.

Registered as source type ``tail`` (and ``stdf``, its first name, kept as an alias; entry
points in ``pyproject.toml``).  It watches
directories and globs, follows each file while the tester appends to it, and maps every
record through ``edgegw.stdf.mapping``.  The file format is a plugin (``edgegw.formats``),
looked up by name from the config, so an ATDF directory is tailed by the same code.

Reading never blocks the Trio loop: directory scans and ``stat`` run in a worker thread,
file reads go through ``trio.open_file``.  A record cut at the end of what the tester has
written so far is simply waited for.

A file is complete when its MRR arrives (one a FAR follows in what is written by then is
the end of one lot of several: read on, ``_map``), when the format's parser says so (its optional
``complete``: a format without an end-of-file record), or when it has not grown for
``idle_timeout`` seconds (a tester that crashed never writes its MRR).  A format's
``options`` table in the source config is built into the format's ``Options`` and given
to every parser.  A ``.gz`` file is decompressed as a
stream, so one still being written is followed too, member after member; it is complete
at its MRR, or idle at the end of a gzip member, and a gzip stream cut in the middle of a
member that stays idle is an error.  A lot appended to a finished one is decompressed from
where its reader was at the FAR of the lot read last (``gzpoint``), not from its start.

Checkpoint (passed with every batch; the gateway keeps the last durable one and hands it
back as ``context.checkpoint``)::

    {"version": 2, "files": {PATH: {"offset": N, "done": bool, "reason": str,
                                    "inode": int, "size": int, "state": {...},
                                    "head": [LENGTH, CRC32], "gen": GENERATION,
                                    "end": N | null, "from": N, "grew_logged": true}},
     "finished_before": NS, "gone": [[inode, NS], ...]}

``end`` (finished files): where the last MRR ends (null: not complete at an MRR).  A file
that grows past what was read, the bytes after its ``end`` beginning with a whole FAR
(after any whole DTRs and GDRs, passed over as within a read), is read on from that FAR
as another lot, by a parser and mapper of its own (``_next_lot``); ``from``: the offset
that parser starts at, where a restart re-reads it from.  Any other
growth of a finished file is logged (once: ``grew_logged``) and not read.

Bounded: ``files`` lists the unfinished files and the finished ones that changed (their
modification or status-change time, whichever is later, in ns) after ``finished_before``,
the watermark.  A file on disk that is not listed
and changed at or before the watermark is finished: not read again.  The watermark follows
the start of a directory scan less ``fold_after`` seconds, once every file that scan found
is known: a file that appears later (created, copied or renamed in) changes after it, so it
is read.  The scan's start by the gateway's clock, or by a watched file system's where a
directory's change showed it behind (a file server's: ``_fs_clock``).  A finished file
that changes after the watermark (touched, renamed) is listed again, and the checkpoint
handed over at once, without records.
``gone`` (the last ``GONE_KEPT``) names unfinished files that vanished (inode and
change time): one that comes back unchanged (a directory remounted) is read from its start,
as a vanished file always was, never taken as finished; a new file met at its inode ends
its entry.  A version 1 checkpoint (every file
listed) is read as one without a watermark.

A finished file changed while the gateway is stopped changes after the watermark and
looks new: the registry of finished files (``finished``, in the source's ``state_dir``)
recognises it.  A finished file the watermark covers stays listed until its entry is
durable there (``_register``), and an entry is relied on only when the resumed checkpoint's
watermark is at or past the time it was finished since.

``offset`` is always a record boundary, and every record before it has been mapped
(emitted, or held by the mapper for a part whose PRR comes later).  On restart a file is
re-read from its start up to ``offset`` through a fresh parser and mapper *without emitting
anything*, which rebuilds everything earlier records define (byte order, per-test PTR
defaults, the open parts, lot and wafer ids); reading then continues at ``offset``.  Since
the mapping is a pure function of the records fed, the records emitted after a restart are
exactly those an uninterrupted run would have emitted after that batch: nothing is sent
twice, nothing is skipped.  ``inode`` and ``size`` tell a file that was replaced at the
same path from the one the checkpoint describes; ``head``, the fingerprint of its first
KiB (``fingerprint``), a new file that got its inode (deleted, then a new one created under
another matched name or the same one) from the file renamed or grown.  An entry without
``head`` (an older checkpoint) goes by inode and size alone, as before.  ``gen``, the
inode's generation number where the file system keeps one, names the file's records'
stream with its inode (``_File.stream``): a new file at a reused inode is another stream.
A file with several names (hard links) is one file, followed under one of them
(``_one_name_each``): one stream, read once.

Corrupt input (``FormatError``) is logged with path and byte offset, counted in
``source_errors_total{kind="corrupt"}``, reported to the hub as a GatewayEvent, and the file is
abandoned (marked done in the checkpoint); the source keeps following every other file.
Every call into the format plugin is a failure boundary: any other exception from it is a
bug, counted in ``internal_errors_total{where="format_parser"}`` and handled the same way.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import stat
import sys
import time
import zlib
from typing import Annotated, Any, ClassVar, Literal

import trio

from ..config import ConfigError, Range
from ..formats import FormatError, FormatParser, TesterFormat
from ..metrics import report_internal_error
from ..records import GatewayEvent, RawRecord, Record, unicode_text
from ..stdf.mapping import RecordMapper
from . import RecordSink, SourceContext, source_errors
from .copies import WAIT, Finished, GzipHead, Originals, read_gzip_heads
from .fingerprint import (
    HEAD_BYTES,
    Fingerprint,
    complete,
    extended,
    from_checkpoint,
    open_file,
    read_at,
    read_fingerprints,
    to_checkpoint,
)
from .finished import FILE_NAME, FinishedFiles, recognised, relied_on
from .formats import UnknownFormat, build_options, get_format, is_complete, new_parser
from .gzpoint import START, GzPoint, check_of, checked
from .testerfile import open_shared

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2
#: at most this many vanished unfinished files are remembered in the checkpoint (``gone``)
GONE_KEPT = 64
#: the watermark stays this much further behind a scan's start than ``fold_after`` says:
#: a file system stamps change times with a coarse clock (a kernel tick behind the one
#: ``time.time_ns`` reads), so a file created just after the scan began can carry a time
#: just before it
CLOCK_SLACK_NS = 100_000_000
#: the record types whose first after an MRR says whether another lot follows (a FAR)
_DECIDES = RecordMapper.TYPES
#: finished files the checkpoint may go on listing while their registry entries wait to be
#: written (one fsync for them all): a put writes them first once there are this many
REGISTER_BATCH = 16
#: gzip files whose point to read on from (``_File.gz_point``) holds a decompressor's
#: state (about 40 KiB: inside a member), at most; those beyond, the least recently made,
#: are read from their start again (a point where a member begins is two integers: kept)
GZ_STATES_KEPT = 64


@dataclasses.dataclass(frozen=True)
class TailConfig:
    #: directories (every file with one of the format's suffixes, plain or .gz) or globs
    paths: list[str]
    #: an installed tester format (``edgegw plugins`` lists them)
    format: str = "stdf"
    #: "beginning": read every file found; "new_only": ignore the files that exist when the
    #: source first starts (no checkpoint yet), read only files that appear later
    start: Literal["beginning", "new_only"] = "beginning"
    poll_interval: Annotated[float, Range(0.001, 3600)] = 0.5
    #: a file that has not grown for this long without its MRR is complete
    idle_timeout: Annotated[float, Range(0.01, 604_800)] = 600.0
    #: also forward every decoded record as a RawRecord
    forward_raw: bool = False
    #: bytes read per step; one batch of records per step
    read_size: Annotated[int, Range(512, 1 << 20)] = 64 * 1024
    #: the format's own settings (its ``Options``; docs/plugins.md, "Format options")
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a finished file unchanged for this long leaves the checkpoint's list of files for
    #: its watermark (docs/tail.md, "The checkpoint's size"); best at least the largest lag
    #: of the file system's clock behind the gateway's (a network file system's: judged by
    #: the gateway's clock until a scan sees that file system's, "The file server's clock")
    fold_after: Annotated[float, Range(0, 31_536_000)] = 60.0
    #: at most this many finished files are remembered in the registry of finished files
    #: (docs/tail.md, "Finished files changed while stopped"); beyond, the oldest are
    #: forgotten; 0: none (a finished file changed while the gateway is stopped is read again)
    finished_kept: Annotated[int, Range(0, 100_000_000)] = 100_000

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.paths:
            problems.append(("paths", "must name at least one directory or glob"))
        try:
            fmt = get_format(self.format)
        except UnknownFormat as exc:
            problems.append(("format", str(exc)))
            return problems
        try:
            build_options(fmt, self.options, "", "options")
        except ConfigError as exc:
            for line in exc.errors:  # ": options.key: message" -> (options.key, message)
                key, _, message = line.removeprefix(": ").partition(": ")
                problems.append((key, message))
        return problems


@dataclasses.dataclass
class _FileInfo:
    path: str
    inode: int
    size: int
    mtime: float
    gz: bool
    #: its last change: the later of its modification and status-change times, in ns
    changed: int = 0
    #: the file system it is on (an inode number names a file only within one)
    dev: int = 0


@dataclasses.dataclass
class _File:
    """One tailed file: its checkpointed position and, while open, its reader state."""

    path: str
    inode: int
    gz: bool
    offset: int = 0
    done: bool = False
    reason: str = ""
    size: int = 0
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: its first bytes' fingerprint (None: not taken yet, or an older checkpoint's entry)
    head: Fingerprint | None = None
    # runtime only
    reader: Any = None
    parser: FormatParser | None = None
    mapper: RecordMapper | None = None
    last_growth: float = 0.0
    fed: int = 0  # bytes given to the parser
    skip_below: int = 0  # after a restart: records before this offset were already emitted
    #: the re-read passed ``skip_below`` as a parser position (see ``TailSource._map``)
    boundary_seen: bool = False
    #: where the last record read, an MRR, ends (0: the last one is not an MRR): the end
    #: of the file unless the next record is a FAR, another lot (``TailSource._map``)
    after_mrr: int = 0
    #: finished: where its last MRR ends, where a lot appended to it would begin (None:
    #: not complete at an MRR; its growth is not read: ``TailSource._next_lot``)
    end: int | None = None
    #: the offset its parser starts at: a lot appended after it was complete is read
    #: from its start, a file of its own (0: the file's start)
    base: int = 0
    #: its size when what follows its ``end`` was too short to tell (looked at again
    #: only once it changes)
    peeked: int = -1
    #: the offset in the last checkpoint handed to the sink: where the file's next
    #: records follow (their ``origin``, see ``TailSource._put``)
    origin: int = 0
    #: the parser's fast path (STDF): rows to ``RecordMapper.map_row``, and once past
    #: ``skip_below`` only the types the mapper reads (see ``TailSource._fast``)
    rows: bool = False
    selected: bool = False
    warned: bool = False
    #: finished, its growth logged as not a lot ("grew after it was complete"): kept in
    #: the checkpoint, so that a restart does not log it again
    grew_logged: bool = False
    io_failed: bool = False  # a read error was reported, no read has succeeded since
    changed: int = 0  # its last change as the latest scan saw it (``_FileInfo.changed``)
    #: its change time when its first bytes could not be read: tried again once it changes
    head_missed: int = -1
    #: its inode's generation number (``fingerprint.generation``; None: none known), taken
    #: when the tail first opens it, or from the checkpoint, and then kept (``stream``)
    gen: int | None = None
    gen_fixed: bool = False
    #: with ``forward_raw``, the records passed over between its last MRR and the FAR of
    #: a lot appended after it (``TailSource._lot_follows``): put first with that lot
    passed: list[Record] = dataclasses.field(default_factory=list)
    #: a gzip file: where its reader was at ``base`` (the FAR of the lot read last), read
    #: on from there when a lot is appended, not from its start (``gzpoint``; None: the
    #: start -- not in the checkpoint: a restart decompresses the file from its start)
    gz_point: GzPoint | None = None
    #: when the tail began to wait on it as a compressed copy it cannot tell yet (Trio
    #: time; ``TailSource._copy_check``)
    copy_wait: float | None = None
    #: a compressed copy read on from where the file it is a copy of was read to: that
    #: file's ``stream`` (``TailSource._read_on_in_copies``; None: its own)
    named: Any = None

    @property
    def stream(self) -> Any:
        """What its records' origins name it by: its inode, and its generation where the
        file system has one, so that a new file at a reused inode is another stream (a
        copy read on from where its original was read to: the original's)."""
        if self.named is not None:
            return self.named
        return self.inode if self.gen is None else [self.inode, self.gen]

    def checkpoint(self) -> dict[str, Any]:
        entry = {"offset": self.offset, "done": self.done, "reason": self.reason,
                 "inode": self.inode, "size": self.size, "state": dict(self.state)}
        if self.head is not None:
            entry["head"] = to_checkpoint(self.head)
        if self.gen is not None:
            entry["gen"] = self.gen
        if self.named is not None:
            entry["stream"] = self.named
        if self.base:
            entry["from"] = self.base
        if self.done:
            entry["end"] = self.end
            if self.grew_logged:
                entry["grew_logged"] = True
        return entry


def _stream_of(value: Any) -> Any:
    """A checkpoint entry's ``stream``: an inode, or an inode and its generation."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2:
        return [int(value[0]), int(value[1])]
    return int(value)


def checkpoint_key(path: str) -> str:
    """A file's key in the checkpoint: its path, or, for a name that is not Unicode (bytes
    that are not UTF-8, on Linux: ``os.fsdecode`` keeps them as lone surrogates, which the
    checkpoint's CBOR cannot hold), a NUL and the hex of its bytes -- no path holds a NUL,
    so the two never meet.  ``path_of_key`` is its inverse."""
    if path.isascii():
        return path
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "\0" + os.fsencode(path).hex()


def path_of_key(key: str) -> str:
    """The path ``checkpoint_key`` gave ``key`` for."""
    return os.fsdecode(bytes.fromhex(key[1:])) if key.startswith("\0") else key


def _after_end(path: str, inode: int, base: int, end: int, n: int
               ) -> tuple[bytes, bytes] | None:
    """The first bytes of the lot that begins at ``base`` and up to ``n`` bytes from
    ``end`` (``TailSource._lot_follows``; None: not readable, or another file).  Blocking."""
    head = read_at(path, inode, base, HEAD_BYTES)
    data = read_at(path, inode, end, n)
    return None if head is None or data is None else (head, data)


def _gz_after_end(path: str, inode: int, point: GzPoint, base: int, end: int, n: int
                  ) -> tuple[bytes, bytes, bool, int] | None:
    """``_after_end`` of a gzip file: its offsets are those of its decompressed stream
    (every member), so it is decompressed from ``point`` (at or before ``base``; from its
    start if the file changed before it), a chunk at a time, up to what is wanted; and
    whether that stream was readable to there (False: what follows is not gzip, junk
    appended), and the compressed bytes decompressed.  A member still being written ends
    what is read.  Blocking."""
    head, data = bytearray(), bytearray()
    fed = 0
    stop = max(base + HEAD_BYTES, end + n)

    def take(out: bytes, at: int, lo: int, hi: int, into: bytearray) -> None:
        a, b = max(lo, at), min(hi, at + len(out))
        if a < b:
            into += out[a - at:b - at]

    try:
        with open_shared(path) as handle:
            if os.fstat(handle.fileno()).st_ino != inode:
                return None
            point = checked(handle, point)
            d, at = point.decompressor(), point.out
            while at < stop:
                if d.eof and d.unused_data:  # the next member (first: ``_GzipReader._read``)
                    raw, d = d.unused_data, zlib.decompressobj(31)
                elif d.unconsumed_tail:
                    raw = d.unconsumed_tail
                else:
                    raw = handle.read(_GZ_CHUNK)
                    if not raw:
                        break
                    fed += len(raw)
                    if d.eof:
                        d = zlib.decompressobj(31)
                out = d.decompress(raw, _GZ_CHUNK)
                take(out, at, base, base + HEAD_BYTES, head)
                take(out, at, end, end + n, data)
                at += len(out)
    except zlib.error:
        return bytes(head), bytes(data), False, fed
    except OSError:
        return None
    return bytes(head), bytes(data), True, fed


#: compressed bytes read, and decompressed bytes made, per step of ``_gz_after_end``
_GZ_CHUNK = 64 * 1024


def _end_of(e: dict[str, Any], gz: bool) -> int | None:
    """A checkpoint entry's ``end``; an older tail's has none: a file complete at an MRR
    has its offset there (the MRR's end), one the watermark took as finished is taken to
    end at its size (docs/tail.md, "Upgrading") -- not a gzip file (``gz``), whose size is
    not an offset of its decompressed stream: not known."""
    if "end" in e:
        return None if e["end"] is None else int(e["end"])
    reason = str(e.get("reason", ""))
    if reason == "MRR":
        return int(e["offset"])
    return int(e["size"]) if reason.startswith("finished (") and not gz else None


class _GzipReader:
    """Async reads of the decompressed bytes of a gzip file (all members), streaming: a
    gzip file still being written is followed like a plain one."""

    def __init__(self, handle: Any, skip: int = 0, point: GzPoint = START) -> None:
        self.handle = handle
        self.d = point.decompressor()
        self.out = point.out  # decompressed bytes returned so far (and skipped)
        self.raw = point.raw  # compressed bytes read (the handle's position)
        self.fed = 0  # compressed bytes read by this reader
        #: at the start of a member, after one (``point``), nothing read since
        self.between = point.raw > 0 and point.state is None
        self.started = point.raw > 0
        #: decompressed bytes still to pass over before the first returned (a lot appended
        #: to the file is read from its FAR, an offset of the decompressed stream)
        self.skip = max(0, skip - point.out)
        #: where it was once past ``skip`` (the FAR its lot starts at): a lot appended
        #: later is read on from there (``_File.gz_point``)
        self.point: GzPoint | None = None if self.skip else point

    @property
    def complete(self) -> bool:
        """The data read so far ends exactly at the end of a gzip member."""
        return self.started and (self.between or (self.d.eof and not self.d.unused_data))

    async def read(self, n: int) -> bytes:
        if self.skip:
            while self.skip:
                data = await self._read(min(n, self.skip))
                if not data:
                    return b""
                self.skip -= len(data)
                await trio.lowlevel.checkpoint()  # (decompressing what is passed over)
            self.point = await self._here()
        return await self._read(n)

    async def _here(self) -> GzPoint | None:
        """Where it is: the compressed bytes it read and its decompressor's state, which
        holds those it has not taken yet (``unconsumed_tail``: taken first, as here); at a
        member's end, where the next one begins, without a state."""
        d = self.d
        ended = d.eof
        raw = self.raw - len(d.unused_data) if ended else self.raw
        check = await trio.to_thread.run_sync(check_of, self.handle.wrapped.fileno(), raw)
        if check is None:
            return None
        return GzPoint(raw, self.out, None if ended else d.copy(), check)

    async def _read(self, n: int) -> bytes:
        while True:
            if self.d.eof and self.d.unused_data:  # the next member of the file
                # (first: a member that ends just as ``n`` bytes are made leaves what
                # follows it in both ``unused_data`` and ``unconsumed_tail``, and an ended
                # stream makes nothing more of its tail -- it spun here for ever)
                rest = self.d.unused_data
                self.d = zlib.decompressobj(31)
                data = self._decompress(rest, n)
            elif self.d.unconsumed_tail:
                data = self._decompress(self.d.unconsumed_tail, n)
            else:
                raw = await self.handle.read(n)
                if not raw:
                    return b""
                self.raw += len(raw)
                self.fed += len(raw)
                if self.d.eof:
                    self.d = zlib.decompressobj(31)
                self.started, self.between = True, False
                data = self._decompress(raw, n)
            if data:
                self.out += len(data)
                return data

    def _decompress(self, raw: bytes, n: int) -> bytes:
        try:
            return self.d.decompress(raw, n)
        except zlib.error as exc:
            raise FormatError(f"not a valid gzip stream: {exc}", self.out) from None

    async def aclose(self) -> None:
        await self.handle.aclose()


class TailSource:
    """Tester files (STDF, or any installed format) followed as the tester writes them."""

    Config: ClassVar[type] = TailConfig
    replays: ClassVar[bool] = True  # resuming from a checkpoint re-emits what followed it
    #: other source type names this class is registered under -> its own name
    aliases: ClassVar[dict[str, str]] = {"stdf": "tail"}

    def __init__(self, name: str, config: TailConfig, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.format: TesterFormat = get_format(config.format)
        self.options = build_options(self.format, config.options)
        self.files: dict[str, _File] = {}
        #: the files the checkpoint lists: every file but the finished ones that changed
        #: at or before the watermark (filtered by ``_fold``; a superset in between)
        self._listed: dict[str, _File] = {}
        #: finished files that changed at or before it are not listed (ns)
        self.watermark = 0
        #: (inode, changed) of vanished unfinished files, the latest ``GONE_KEPT``
        self.gone: list[tuple[int, int]] = []
        self._scan_started = 0  # time.time_ns() when the latest scan began
        self._scan_mono = 0  # time.monotonic_ns() then
        #: the watched directories as the latest scan saw them: path -> (st_dev, ctime ns),
        #: and the monotonic time (ns) it began to look at them
        self._dirs: dict[str, tuple[int, int]] = {}
        self._dirs_looked = 0
        #: per file system (``st_dev``) where a scan saw a watched directory change since
        #: the scan before: how far its clock is at least ahead of the monotonic one (ns;
        #: ``_fs_clock``)
        self._fs_clocks: dict[int, int] = {}
        #: what the last checkpoint handed to the sink says is finished: the files it
        #: lists (path -> inode) and its watermark (see ``_hand_over_changes``)
        self._handed: dict[str, int] = {}
        self._handed_watermark = 0
        #: the registry of finished files (None without a ``state_dir``, or turned off)
        self.finished: FinishedFiles | None = None
        if context.state_dir and config.finished_kept:
            self.finished = FinishedFiles(os.path.join(context.state_dir, FILE_NAME),
                                          config.finished_kept)
        self._finished_loaded = False
        #: finished files the watermark covers, still listed until their entries are
        #: durable in the registry (``_register``)
        self._registering: dict[str, _File] = {}
        #: the watermark of the checkpoint resumed from: the durable one (0: none)
        self._durable_watermark = 0
        self._resumed = False
        #: the latest scan's clock is behind that watermark: set back since (``_unregistered_new``)
        self._behind = False
        #: the paths the latest scan took for another name of a file it followed under
        #: one (hard links): path -> inode (``_one_name_each``); and the scan's before
        self._aliases: dict[str, int] = {}
        self._aliases_before: dict[str, int] = {}
        #: the registry's finished plain files at the restart (``_registered_originals``;
        #: None: not looked at yet)
        self._registered: list[Finished] | None = None
        self.errors = source_errors(context.metrics)
        self.read_records = context.metrics.counter(
            "tail_records_total", "tester records parsed from tailed files (re-reads included)")
        self.unknown_records = context.metrics.counter(
            "tail_unknown_records_total", "records of unknown type skipped in files read to "
            "their end (not the vendor-reserved types): a REC_LEN too short further up?")
        self.gz_bytes = context.metrics.counter(
            "tail_gzip_bytes_total", "compressed bytes of gzip files decompressed (re-reads "
            "and looks after a finished file's end included)")
        #: the files whose ``gz_point`` holds a decompressor's state, oldest first
        self._gz_states: dict[str, _File] = {}
        self.cut_records = context.metrics.counter(
            "tail_cut_records_total", "records cut before a field they must have (REC_LEN "
            "too short: a PTR without TEST_NUM, an HBR without HBIN_NUM) skipped in files "
            "read to their end; the records after them are read")
        self.copies = context.metrics.counter(
            "tail_compressed_copies_total", "gzip files taken as compressed copies of "
            "files the tail read (gzip in place): not read again, or read on from where "
            "the unfinished original was read to (docs/tail.md)")
        self.removed_read = context.metrics.counter(
            "tail_removed_files_read_total", "unfinished files removed (deleted, moved "
            "away, compressed) before the tail read their end: read on from the open file")
        suffixes = tuple(s.lower() for s in self.format.suffixes)
        self._suffixes = suffixes + tuple(s + ".gz" for s in suffixes)

    # -- checkpoint ------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """The resume position of every listed file, and the watermark below which the
        finished ones are not listed (JSON-able, a fresh copy)."""
        out: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "files": {checkpoint_key(p): f.checkpoint() for p, f in self._listed.items()},
            "finished_before": self.watermark}
        if self.gone:
            out["gone"] = [[inode, changed] for inode, changed in self.gone]
        return out

    def _restore(self, checkpoint: Any) -> bool:
        if checkpoint is None:
            return False
        try:
            version = checkpoint.get("version")
            if version not in (1, CHECKPOINT_VERSION):  # 1: every file listed
                raise ValueError(f"version {version!r}")
            for key, e in checkpoint["files"].items():
                path = path_of_key(key)
                self.files[path] = self._listed[path] = _File(
                    path=path, inode=int(e["inode"]), gz=path.lower().endswith(".gz"),
                    offset=int(e["offset"]), done=bool(e["done"]), reason=str(e["reason"]),
                    size=int(e["size"]), state=dict(e.get("state") or {}),
                    head=from_checkpoint(e.get("head")), origin=int(e["offset"]),
                    gen=None if e.get("gen") is None else int(e["gen"]), gen_fixed=True,
                    end=_end_of(e, path.lower().endswith(".gz")),
                    base=int(e.get("from", 0)), grew_logged=bool(e.get("grew_logged")),
                    warned=bool(e.get("grew_logged")), named=_stream_of(e.get("stream")))
            self.watermark = int(checkpoint.get("finished_before", 0))
            self.gone = [(int(inode), int(changed))
                         for inode, changed in checkpoint.get("gone", [])]
            self._handed = {p: f.inode for p, f in self.files.items()}
            self._handed_watermark = self.watermark
            self._durable_watermark = self.watermark
            self._resumed = True
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.error("source %s: ignoring unreadable checkpoint (%s)", self.name, exc)
            self.files.clear()
            self._listed.clear()
            self.watermark, self.gone = 0, []
            return False
        return True

    def _fold(self, limit: int) -> None:
        """Move the watermark up to ``limit`` and list only the files it does not cover.
        At most the latest scan's start less ``fold_after`` (a file that appears after the
        scan began changes after it), and below every file that scan found that is not
        known yet (``_unknown_ahead``)."""
        if limit > self.watermark:
            self.watermark = limit
        w = self.watermark
        # (a file is listed when it is known, or when its change passes the watermark:
        # only the list itself can hold finished files the watermark now covers)
        listed = {}
        for p, f in self._listed.items():
            if not f.done or f.changed > w or self._relied_after(f, w):
                listed[p] = f
            elif self._unregistered(f):  # listed until its entry is durable
                listed[p] = self._registering[p] = f
        self._listed = listed
        if self.gone:
            self.gone = self.gone[-GONE_KEPT:]

    def _clock_set_back(self, horizon: int) -> None:
        """The clock is behind the watermark: it ran ahead (a PC booted with a wrong date)
        and was set back (NTP), or a watched file system's runs behind the gateway's (a
        file server's, ``_fs_clock``).  Files written from now on carry times below the
        watermark and would be taken as finished without being read: the watermark goes
        back to what this clock allows, and every known file above it is listed again (a
        restart must not take those as new: the registry of finished files recognises the
        rest).  At a restart from a checkpoint of the time ahead, a file below it that is
        neither known nor registered was written since: read (``_unregistered_new``)."""
        log.warning("source %s: the clock (the gateway's, or a watched file system's) is "
                    "%.0f s behind the watermark of finished files (set back, or a file "
                    "server's behind?): watermark lowered to it", self.name,
                    (self.watermark - horizon) / 1e9)
        self.watermark = horizon
        for p, f in self.files.items():
            if f.changed > horizon:
                self._listed[p] = f

    def _fs_clock(self) -> int:
        """The least time the clock of each watched file system can show at the latest
        scan's start, where the tail saw that clock at work (ns; no bound without): a
        watched directory's change, seen between two looks, dates a moment between them
        by that clock, which has run on with the monotonic one since (``_watch_clocks``).
        A directory changes when a file is created, renamed or deleted in it, and its
        status-change time is its file system's own (the server's, on NFS or SMB; no one
        can set it): so a file created after this scan began changes at or after this,
        whatever the gateway's clock says.  Only a change seen happen counts: an old
        change time says only that the clock is past it, not by how much (a directory
        idle for a week)."""
        return min((ahead + self._scan_mono for ahead in self._fs_clocks.values()),
                   default=sys.maxsize)

    def _unknown_ahead(self, found: list[_FileInfo]) -> list[int]:
        """For each index of ``found`` (and one past its end), the earliest change among
        the files from there on that are not known and that the watermark does not cover
        yet: until a poll reaches them, the watermark stays below them (a restart would not
        know them either)."""
        ahead = [sys.maxsize] * (len(found) + 1)
        w = self.watermark
        for i in range(len(found) - 1, -1, -1):
            info = found[i]
            ahead[i] = ahead[i + 1]
            if info.changed > w and info.path not in self.files:
                ahead[i] = min(ahead[i], info.changed)
        return ahead

    def _done(self, f: _File, reason: str) -> None:
        """Mark ``f`` finished; unlisted at once when the watermark covers it."""
        f.done = True
        f.reason = reason
        f.end = f.offset if reason == "MRR" else None
        if f.changed <= self.watermark:
            if self._unregistered(f):  # listed until its entry is durable
                self._registering[f.path] = f
            elif not self._relied_after(f, self.watermark):
                self._listed.pop(f.path, None)

    def _relied_after(self, f: _File, watermark: int) -> bool:
        """Whether ``f``'s registry entry is relied on only by a checkpoint whose
        watermark is past this one (its ``since`` is later): a file finished while the
        clock ran ahead, touched once it was set back, changed at or before this
        watermark.  A checkpoint that stopped listing it would take it, touched again
        while the gateway is stopped, for a new file (its entry not relied on): read
        again.  So it stays listed until the watermark reaches its entry's ``since``."""
        entry = self.finished.get(f.inode) if self.finished is not None else None
        return entry is not None and entry.since > watermark and entry.path == f.path

    def _unregistered(self, f: _File) -> bool:
        """A finished file the registry does not describe as it is (None: no registry)."""
        return self.finished is not None and not (
            f.head is not None and self.finished.holds(f.inode, f.path, f.head, f.size))

    async def _register(self) -> None:
        """Write the registry entries of the finished files held listed for them, durably,
        and only then stop listing them: a checkpoint that does not list a finished file it
        does not cover is never handed over before the file's entry is on disk.

        Finished since no earlier than just after the watermark of the checkpoint resumed
        from: that checkpoint did not take these as finished (it lists them, or they were
        read since), whatever their change times say -- a file written after the clock was
        set back has one below it (``_unregistered_new``), and a crash before a checkpoint
        covering its records is durable would otherwise take it as finished (lost).  In
        the time the clock is behind that watermark such a file stays listed
        (``_relied_after``); else the watermark is past it at once."""
        assert self.finished is not None
        held, self._registering = self._registering, {}
        since = self._durable_watermark + 1
        for p, f in held.items():
            if self.files.get(p) is f and f.done and f.head is not None:
                self.finished.add(f.inode, p, f.head, f.size, max(f.changed, since), f.end,
                                  read_on=f.base > 0)
        if self.finished.dirty:
            try:
                await trio.to_thread.run_sync(self.finished.flush)
            except OSError as exc:  # then as before the registry: the files leave the list
                log.error("source %s: cannot write the registry of finished files %s (%s): "
                          "a file changed while the gateway is stopped may be read again",
                          self.name, self.finished.path, exc)
        for p, f in held.items():
            if (self._listed.get(p) is f and f.done and f.changed <= self.watermark
                    and not self._relied_after(f, self.watermark)):
                del self._listed[p]

    def _recognised(self, info: _FileInfo, head: tuple[Fingerprint, bool | None] | None
                    ) -> _File | None:
        """A file that looks new (changed after the watermark, not listed) that the
        registry knows as finished: touched, chmod-ed, renamed or appended to while the
        gateway was stopped.  Known again as finished and listed (None: read it)."""
        if self.finished is None:
            return None
        entry = self.finished.get(info.inode)
        verdict = recognised(entry, info.path, info.size, None if head is None else head[1],
                             self._durable_watermark)
        version = relied_on(entry, self._durable_watermark)
        if verdict is None or entry is None or version is None:
            return None
        log.info("source %s: %s is %s, finished before the restart (%s): not read again",
                 self.name, info.path, entry.path if entry.path != info.path else "the file",
                 "changed" if verdict == "unchanged" else "grown since")
        # (the version the durable checkpoint relies on: a lot appended after it is read)
        # (at its end, where the running tail had it: the origin of what is read on)
        at = version.size if version.end is None else version.end
        return _File(info.path, info.inode, info.gz, offset=at, done=True,
                     reason="finished (registered)", size=version.size, head=version.head,
                     origin=at, changed=info.changed, end=version.end)

    def _finished_after_durable(self, info: _FileInfo,
                                head: tuple[Fingerprint, bool | None] | None) -> bool:
        """Whether a file the watermark covers by its change time (not known, changed at
        or before it) is one the registry knows as finished only since after the durable
        checkpoint's watermark (no version of its entry relied on).  Its change time went
        back below its entry's ``since`` -- touched once the clock was set back -- and
        that checkpoint never took it as finished: its records may not be stored (the
        checkpoints that covered them not durable when the gateway stopped).  Read again,
        not taken as finished (it was: lost).  Without a clock set back a file's change
        time never goes below its entry's ``since``, so this never holds."""
        if self.finished is None or head is None or head[1] is not True:
            return False
        entry = self.finished.get(info.inode)
        return entry is not None and relied_on(entry, self._durable_watermark) is None

    def _unregistered_new(self, info: _FileInfo,
                          head: tuple[Fingerprint, bool | None] | None) -> bool:
        """Whether a file the watermark covers by its change time (not known, changed at
        or before it) is new all the same: the clock is behind the durable checkpoint's
        watermark (``_behind``: it ran ahead, and was set back since), so that watermark
        covers files written after the set-back too -- while the gateway was stopped --
        and so does the one lowered to this clock less ``fold_after`` (``_clock_set_back``)
        when the restart came later than that.  A file a durable checkpoint took as
        finished is listed in it (known) or has a registry entry (written before the
        checkpoint stopped listing it; a file a restart took as finished by the watermark
        is registered then).  One that has neither, its first bytes not those of the
        entry at its inode if there is one, was never taken as finished: read (it was
        taken as finished: its lot lost).  Not below the change times the registry may
        have forgotten (``FinishedFiles.whole_from``; no log on disk, nothing), nor
        without a registry (nothing tells a new file from a finished one)."""
        if not self._behind or self.finished is None:
            return False
        whole_from = self.finished.whole_from
        if whole_from is None or info.changed < whole_from:
            return False
        entry = self.finished.get(info.inode)
        return entry is None or (head is not None and head[1] is False)

    def _registered_end(self, info: _FileInfo,
                        head: tuple[Fingerprint, bool | None] | None) -> int | None:
        """Where a file the watermark took as finished ends (its last MRR): its registry
        entry's ``end``, if the entry describes it as it is (start and size); otherwise
        not known, and taken to be its size (docs/tail.md, "Appending to a finished
        file")."""
        entry = self.finished.get(info.inode) if self.finished is not None else None
        if entry is not None and head is not None and head[1] and entry.size == info.size:
            return entry.end
        return None if info.gz else info.size  # (a gzip file's size is not an offset of it)

    async def _next_lot(self, f: _File, size: int) -> bool | None:
        """Whether another lot follows the end of the last MRR of ``f``, finished, now
        ``size`` bytes long: what follows that end begins with a whole FAR, after any whole
        records of the types a read passes over there (DTR, GDR: ``_lot_follows``).  True:
        ``f`` is read on from that FAR, unfinished again (``_read_on``); None: not looked
        at (not at this size again: too few bytes to tell stay so until it changes).  Only
        the bytes after that end (and the FAR its lot began with) are read, and only when
        the file has grown: a finished file is not read again."""
        if f.end is None or (size <= f.end and not f.gz):  # (a gzip file's: its stream's)
            return False
        if f.peeked == size:
            return None
        f.peeked = size
        verdict = await self._lot_follows(f, size)
        if verdict is None or verdict is False:
            return verdict
        self._read_on(f, verdict)
        return True

    def _read_on(self, f: _File, at: int) -> None:
        """``f`` is unfinished again: a lot appended after its last MRR is read from its FAR
        (``at``) by a parser of its own (either byte order), as a file of its own would be.
        Its ``origin`` stays the offset the last checkpoint handed over gives it."""
        assert f.end is not None
        log.info("source %s: %s: a lot appended after its last MRR (byte %d): read from "
                 "its FAR (byte %d)", self.name, f.path, f.end, at)
        f.done, f.reason, f.warned, f.peeked = False, "", False, -1
        f.grew_logged = False
        f.base = f.offset = at
        self._registering.pop(f.path, None)
        self._listed[f.path] = f

    async def _lot_follows(self, f: _File, size: int) -> int | Literal[False] | None:
        """Where the whole, valid FAR (STDF V4: its STDF_VER 4; either byte order) that the
        bytes after ``f.end`` begin with is -- after any whole records of the types a read
        passes over between an MRR and the next FAR (not ``_DECIDES``: DTR, GDR), in the
        file's byte order, as ``_map`` does -- False: something else; None: too few bytes
        yet.  Bounded: the bytes looked at are at most ``HEAD_BYTES`` after the end, and the
        FAR that began its lot (``f.base``), which a fresh parser reads first, so that it
        reads what follows in that lot's byte order (a FAR right after the end, in either
        order, reads as one)."""
        assert f.end is not None
        readable = True
        if f.gz:  # (decompressed from the FAR its last lot began at, ``gz_point``, or
            # from its start: a gzip file's offsets are its stream's)
            gz = await trio.to_thread.run_sync(_gz_after_end, f.path, f.inode,
                                               self._gz_from(f), f.base, f.end, HEAD_BYTES)
            got = None if gz is None else gz[:2]
            readable = gz is not None and gz[2]
            if gz is not None:
                self.gz_bytes.inc(gz[3], source=self.name)
        else:
            got = await trio.to_thread.run_sync(_after_end, f.path, f.inode, f.base, f.end,
                                                min(size - f.end, HEAD_BYTES))
        if got is None:  # (replaced since the scan, or unreadable: the next change tells)
            return None
        head, data = got
        try:
            prefix = self._far_of(head)
            parser = new_parser(self.format, self.options)
            parser.feed(prefix + data)
            passed: list[Record] = []
            for rec in parser.records():
                if rec.offset < len(prefix):
                    continue
                if rec.name not in _DECIDES:
                    # (passed over, as ``_map`` does; with ``forward_raw`` forwarded with
                    # the lot, as a read that met them would have: ``end`` is past those
                    # forwarded with the MRR, so none twice)
                    if self.config.forward_raw:
                        passed.append(RawRecord(self.name, time.time(), self.format.name,
                                                rec.name, rec.fields))
                    continue
                if rec.name == "FAR" and rec.fields.get("STDF_VER", 4) == 4:
                    f.passed = passed
                    return f.end + rec.offset - len(prefix)
                return False
        except FormatError:
            return False
        except Exception:  # a bug in the plugin: not read, as before
            report_internal_error(self.context.metrics, "format_parser", log,
                                  "source %s: %s parser on %s (after its end)", self.name,
                                  self.format.name, f.path)
            return False
        return None if len(data) < HEAD_BYTES and readable else False

    def _far_of(self, head: bytes) -> bytes:
        """The FAR ``head`` begins with, its bytes (empty: none, or not whole)."""
        try:
            parser = new_parser(self.format, self.options)
            parser.feed(head)
            for rec in parser.records():
                if rec.name == "FAR" and rec.offset == 0:
                    return head[:parser.position]
                break
        except FormatError:
            pass
        return b""

    def _finished_before(self, info: _FileInfo) -> bool | None:
        """A file not known: whether the watermark says it was finished (it changed at or
        before it; False: after) -- None: an unfinished file that vanished and came back."""
        if info.changed > self.watermark:
            return False
        for key in ((info.inode, info.changed), (info.inode, 0)):  # 0: vanished unseen
            if key in self.gone:
                self.gone.remove(key)
                return None
        return True

    # -- the service -----------------------------------------------------------------------

    async def run(self, sink: RecordSink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        resumed = self._restore(self.context.checkpoint)
        if not resumed and self.config.start == "new_only":
            for info in await trio.to_thread.run_sync(self._scan):
                self.files[info.path] = self._listed[info.path] = _File(
                    info.path, info.inode, info.gz, offset=info.size, done=True,
                    reason="existed at start", size=info.size, origin=info.size,
                    changed=info.changed)
        on_durable = getattr(sink, "on_durable", None)
        if on_durable is not None:  # (the gateway's sink; a test's may have none)
            on_durable(self._durable)
        task_status.started()
        try:
            while True:
                await self.poll_once(sink)
                await trio.sleep(self.config.poll_interval)
        finally:
            with trio.CancelScope(shield=True):
                for f in self.files.values():
                    await self._release(f)

    async def poll_once(self, sink: RecordSink) -> None:
        """One pass: find files, read what each has grown by, finish idle ones."""
        first = self.finished is not None and not self._finished_loaded
        if first:
            await self._load_finished()
        found = self._one_name_each(await trio.to_thread.run_sync(self._scan))
        seen = {info.path: info.inode for info in found}
        gone: dict[int, _File] = {}  # known files not found: inode -> file
        replaced: list[_File] = []  # known files whose path holds another inode now
        for p, known in self.files.items():
            inode = seen.get(p)
            if inode is None:
                gone[known.inode] = known
            elif inode != known.inode:
                replaced.append(known)
        if replaced:
            self._moved_aside(found, replaced)
        await self._read_removed(sink, found)
        wanted = self._heads_wanted(found, gone)
        # path -> (its fingerprint now, whether it starts like the one it was compared with)
        heads = await trio.to_thread.run_sync(read_fingerprints, wanted) if wanted else {}
        asked = {path for path, _, _ in wanted}
        copies, gz_heads = await self._copy_heads(found)
        if copies is not None:
            await self._read_on_in_copies(found, copies, gz_heads, heads, gone)
        clock = min(self._scan_started, self._fs_clock())
        horizon = clock - int(self.config.fold_after * 1e9) - CLOCK_SLACK_NS
        if clock - CLOCK_SLACK_NS < self.watermark:
            self._clock_set_back(horizon)
        self._behind = self._resumed and clock - CLOCK_SLACK_NS < self._durable_watermark
        ahead = self._unknown_ahead(found)
        self._fold(min(horizon, ahead[0] - 1))
        changed: list[_File] = []  # finished files this scan saw changed or renamed
        logged = False  # a finished file's growth logged (its checkpoint says so: handed over)
        for i, info in enumerate(found):
            f = self.files.get(info.path)
            unknown = f is None  # (not a file replaced or cut short: they are read whole)
            head = heads.get(info.path)
            if f is None and info.inode in gone:
                old = gone.pop(info.inode)
                if head is not None and head[1] is False:
                    log.warning("source %s: %s is a new file at the inode of %s (deleted): "
                                "reading it from the start", self.name, info.path, old.path)
                    await self._drop(sink, old, vanished=False)
                else:
                    f = self._renamed(old, info)
                unknown = f is None
                if f is not None and f.done:
                    changed.append(f)
            elif f is not None and head is not None and head[1] is False:
                log.warning("source %s: %s is a new file at the same inode (the one read was "
                            "deleted): reading it from the start", self.name, info.path)
                await self._release(f)
                await self._ended(sink, f)
                f = None
            if f is not None and f.inode != info.inode:
                log.warning("source %s: %s was replaced (new inode); reading it from the start",
                            self.name, info.path)
                await self._release(f)
                await self._ended(sink, f)
                f = None
            if (f is not None and not f.done and not f.gz and f.parser is None
                    and info.size < f.offset):
                log.warning("source %s: %s is shorter than its checkpoint; reading it from the "
                            "start", self.name, info.path)
                await self._ended(sink, f)
                f = None
            created = f is None
            before = self._finished_before(info) if f is None and unknown else None
            if before and self._finished_after_durable(info, head):
                before = False  # (read: ``_recognised`` relies on no version of it)
            if before and self._unregistered_new(info, head):
                before = False  # (read: written after the clock was set back)
            if before is False and (f := self._recognised(info, head)) is not None:
                self.files[info.path] = self._listed[info.path] = f
                changed.append(f)  # (handed over: it is listed again)
            if f is None and before:
                end = self._registered_end(info, head)
                at = info.size if end is None else end
                f = self.files[info.path] = _File(
                    info.path, info.inode, info.gz, offset=at, done=True,
                    reason="finished (before the checkpoint's watermark)", size=info.size,
                    origin=at, changed=info.changed, end=end)
            elif f is None:
                f = self.files[info.path] = self._listed[info.path] = _File(
                    info.path, info.inode, info.gz)
            if created and self.gone:
                # the inode holds this file now: a vanished one that had it (remembered by
                # it, perhaps by it alone) is not this one coming back after a restart
                self.gone = [g for g in self.gone if g[0] != info.inode]
            if head is not None and not (f.done and head[1] and f.head is not None):
                # (a finished file's stays the fingerprint of what was read: one that grew
                # after its end is the same file, and its registry entry stays as it was)
                f.head = head[0]
            elif head is None and info.path in asked:  # (unreadable: tried again once changed)
                f.head_missed = info.changed
            if before and self._unregistered(f) and f.head is not None:
                # finished by the durable checkpoint's watermark (and so since its change
                # time): registered too, in case it changes while the gateway is stopped
                self.finished.add(f.inode, f.path, f.head, f.size,  # type: ignore[union-attr]
                                  f.changed, f.end)
            if info.changed != f.changed:
                f.changed = info.changed
                if f.changed > self.watermark:
                    self._listed[info.path] = f
                if f.done:
                    changed.append(f)
            # every file this scan found up to here is known: the watermark may pass them
            # (a file finished from now on leaves the list at once, see _done)
            self.watermark = max(self.watermark, min(horizon, ahead[i + 1] - 1))
            if f.done:
                if info.size <= f.size or f.warned:
                    continue
                verdict: bool | str | None = await self._next_lot(f, info.size)
                if verdict is False:
                    f.warned = f.grew_logged = logged = True
                    log.warning("source %s: %s grew after it was complete (%s)%s; not read "
                                "again", self.name, info.path, f.reason,
                                "" if f.end is None else
                                f", and what follows its last MRR (byte {f.end}) is not a FAR")
                if not verdict:
                    continue
            if copies is not None and info.path in gz_heads and self._may_be_copy(f):
                verdict = self._copy_check(f, info, copies, gz_heads[info.path])
                if verdict == WAIT:
                    continue
                if verdict:
                    changed.append(f)  # (handed over: listed, finished)
                    continue
            try:
                await self._follow(f, info, sink)
                while (f.done and f.end is not None and f.fed > f.end
                       and await self._next_lot(f, max(f.fed, info.size))):
                    # bytes after its MRR that its parser did not take for a lot: a FAR
                    # in the other byte order is one, read by a parser of its own
                    await self._follow(f, info, sink)
            except OSError as exc:
                await self._release(f)
                if not f.warned:
                    f.warned = f.io_failed = True
                    await self._report(sink, f, "io", f"cannot read: {exc}", f.offset,
                                       level="warning", abandon=False)
            else:
                if f.io_failed and getattr(sink, "takes_origin", False):
                    # readable again: a replay will not bring its read error back either
                    f.io_failed = False
                    await sink.put([], None,  # type: ignore[call-arg]
                                   origin=(["io", f.inode], f.origin, None))
        for path in [p for p in self.files if p not in seen]:
            await self._drop(sink, self.files[path], vanished=True)
        self._fold(horizon)
        if self.finished is not None:
            if first:  # entries of files no longer there (removed while it was stopped)
                await self._prune_finished()
            if self._registering or self.finished.dirty:
                await self._register()
        await self._hand_over_changes(sink, changed, force=logged)

    async def _read_removed(self, sink: RecordSink, found: list[_FileInfo]) -> None:
        """Read to its end each unfinished file the tail holds open that is at none of the
        paths it watches now: deleted, or moved to another file system (copied, then
        deleted) -- a lot-end script that compresses the datalog or moves it away right
        after the tester wrote its MRR, while the tail was a poll behind.  An open file
        keeps its data until it is closed, so what the tail had not read yet is read
        there, once.  Before, it was lost; or, compressed, the copy was read from its
        start: what had been read went to the hub twice.  (Done first: finished, the file
        is the original a compressed copy found in this poll is taken for, ``copies``.)"""
        inodes = {info.inode for info in found} | set(self._aliases.values())
        for f in list(self.files.values()):
            if f.done or f.reader is None or f.inode in inodes:
                continue
            log.info("source %s: %s was removed before the tail read its end: read to its "
                     "end from the file it holds open", self.name, f.path)
            info = _FileInfo(f.path, f.inode, f.size, 0.0, f.gz, f.changed)
            try:
                await self._follow(f, info, sink)
            except OSError:  # (dropped as it was: the file ends where it was read to)
                await self._release(f)
            self.removed_read.inc(source=self.name)

    async def _prune_finished(self) -> None:
        """Forget the entries of files the first scan did not find -- in a directory that
        is there: one not mounted yet (a file server late at boot) keeps its files'."""
        assert self.finished is not None
        missing = self.finished.missing({f.inode for f in self.files.values()})
        if not missing:
            return
        dirs = set(missing.values())
        there = await trio.to_thread.run_sync(lambda: {d for d in dirs if os.path.isdir(d)})
        for inode, directory in missing.items():
            if directory in there:
                self.finished.remove(inode)

    async def _load_finished(self) -> None:
        """Read the registry of finished files, once; a start without a checkpoint
        forgets it (its entries are another checkpoint's)."""
        assert self.finished is not None
        self._finished_loaded = True
        try:
            await trio.to_thread.run_sync(self.finished.load)
        except OSError as exc:
            log.error("source %s: cannot read the registry of finished files %s (%s)",
                      self.name, self.finished.path, exc)
        if not self._resumed:
            self.finished.clear()
        else:  # (versions before the one the resumed checkpoint relies on: none needs them)
            self.finished.settle(self._durable_watermark)

    def _durable(self, checkpoint: Any) -> None:
        """A checkpoint of this source is durable (``sink.on_durable``): the registry's
        versions no restart can rely on any more are forgotten (``FinishedFiles.settle``)."""
        if self.finished is not None and isinstance(checkpoint, dict):
            self.finished.settle(int(checkpoint.get("finished_before", 0)))

    async def _hand_over_changes(self, sink: RecordSink, changed: list[_File], *,
                                 force: bool = False) -> None:
        """Finished files that changed (touched, chmod-ed, appended to, renamed) since the
        last checkpoint handed over, which neither lists them nor covers them with its
        watermark: hand the checkpoint over now, without records, or a restart from that
        one would take them as new files and read them again (no other file may put
        anything for hours)."""
        if not force and not any(
                self._handed.get(f.path) != f.inode and f.changed > self._handed_watermark
                for f in changed):
            return
        checkpoint = self.checkpoint()
        if await sink.put([], checkpoint=checkpoint) is not False:
            self._taken(checkpoint)

    def _taken(self, checkpoint: dict[str, Any]) -> None:
        """The sink took ``checkpoint``: a restart resumes from it."""
        for g in self.files.values():
            g.origin = g.offset
        self._handed = {path_of_key(k): e["inode"] for k, e in checkpoint["files"].items()}
        self._handed_watermark = checkpoint["finished_before"]

    @staticmethod
    def _may_be_copy(f: _File | None) -> bool:
        """A gzip file nothing has been read of yet (new, or waited on)."""
        return f is None or (f.gz and not f.done and f.offset == 0 and f.base == 0
                             and f.parser is None and f.fed == 0)

    async def _copy_heads(self, found: list[_FileInfo]
                          ) -> tuple[Originals | None, dict[str, GzipHead]]:
        """The files a new gzip file may be a compressed copy of, and the decompressed
        first bytes of each gzip file nothing has been read of yet (none read when there
        is nothing it could be a copy of: ``copies``)."""
        new = [(i.path, i.inode) for i in found
               if i.gz and self._may_be_copy(self.files.get(i.path))]
        if not new:
            return None, {}
        originals = Originals()
        for f in self.files.values():
            if f.gz or not complete(f.head, f.size) or f.head is None:
                continue
            if f.done:
                originals.add(Finished(f.path, f.head, f.offset, f.end))
            else:
                originals.add_unfinished(f.head, f.path)
        if self._registered is None:
            self._registered = self._registered_originals()
        for o in self._registered:
            originals.add(o)
        if not originals:
            return None, {}
        return originals, await trio.to_thread.run_sync(read_gzip_heads, new)

    async def _read_on_in_copies(self, found: list[_FileInfo], originals: Originals,
                                 gz_heads: dict[str, GzipHead],
                                 heads: dict[str, tuple[Fingerprint, bool | None]],
                                 gone: dict[int, _File]) -> None:
        """Each new gzip file that starts like an unfinished plain file the tail knows,
        gone from every watched path, which the tail cannot read to its end (it does not
        hold it open: listed by the checkpoint at a restart; or read to where it was found
        removed without its end, ``_read_removed``), is followed as that file: from where
        it was read to (its ``offset``: the records before it are passed over, as at a
        restart), its records still named by its stream, so that a gateway drops those it
        already holds.  Before, the copy was read as a new file: what had been read of the
        original went to the hub twice.  Before the files are gone through: the file at
        the original's inode now is then a new file, whatever the order they are met in."""
        at_inode = {info.inode: info for info in found}
        for info in found:
            if info.path not in gz_heads or not self._may_be_copy(self.files.get(info.path)):
                continue
            entry = self.finished.get(info.inode) if self.finished is not None else None
            if info.path not in self.files and (info.changed <= self.watermark or (
                    entry is not None and entry.path == info.path)):
                continue  # (finished before the checkpoint, or registered: a copy made
                # earlier, the loop below says)
            path = originals.unfinished_of(gz_heads[info.path].data)
            old = self.files.get(path) if path is not None else None
            if old is None or old.done or old.gz:
                continue
            there = at_inode.get(old.inode)
            if there is not None and there.path != info.path and (
                    heads.get(there.path) is None or heads[there.path][1] is not False):
                continue  # (still there, or renamed: the file at its inode starts like it)
            log.info("source %s: %s is a compressed copy of %s, removed before the tail "
                     "read its end: read on in the copy from byte %d", self.name, info.path,
                     old.path, old.offset)
            self.copies.inc(source=self.name)
            await self._release(old)  # (read to its end already, if it was open: see
            # _read_removed; the copy is read again from the offset its records were put to)
            if gone.get(old.inode) is old:
                del gone[old.inode]
            del self.files[old.path]
            self._listed.pop(old.path, None)
            old.named = old.stream
            old.gen, old.gen_fixed = None, False  # (its own, taken when it is opened)
            old.path, old.inode, old.gz, old.gz_point = info.path, info.inode, True, None
            head = heads.get(info.path)
            old.head = head[0] if head is not None else None
            if head is not None:  # (compared with a file gone from its inode, if with any)
                heads[info.path] = (head[0], None)
            old.size, old.changed, old.copy_wait = info.size, info.changed, None
            self.files[info.path] = self._listed[info.path] = old

    def _registered_originals(self) -> list[Finished]:
        """The finished plain files of the registry as the restart found it: those the
        checkpoint no longer lists, deleted while the gateway was stopped after a copy
        was made (the running tail knows every other as a file; later entries are of
        files it knows)."""
        out: list[Finished] = []
        if self.finished is not None and self._resumed:
            for entry in self.finished.entries.values():
                version = relied_on(entry, self._durable_watermark)
                if (version is not None and not entry.path.lower().endswith(".gz")
                        and complete(version.head, version.size)):
                    at = version.size if version.end is None else version.end
                    out.append(Finished(entry.path, version.head, at, version.end))
        return out

    def _copy_check(self, f: _File, info: _FileInfo, originals: Originals,
                    head: GzipHead) -> bool | Literal["wait"]:
        """Whether gzip file ``f``, nothing read of it yet, is a compressed copy of a
        finished file the tail read (``copies``): if so it is finished where that one is,
        and not read.  ``WAIT``: not read yet, it cannot be told (``gzip`` writing it, or
        its original not finished) -- for at most ``idle_timeout``, then read."""
        verdict = originals.copy_of(head.data, head.ended)
        now = trio.current_time()
        if verdict == WAIT:
            if f.copy_wait is None:
                f.copy_wait = now
            if now - f.copy_wait < self.config.idle_timeout:
                return WAIT
            log.warning("source %s: %s starts like a file not finished yet, or too few of "
                        "its bytes to tell, for %g s: read as a file of its own", self.name,
                        f.path, self.config.idle_timeout)
            return False
        if verdict is None:
            return False
        log.info("source %s: %s is a compressed copy of %s, finished (%s): not read",
                 self.name, f.path, verdict.path,
                 "at its MRR" if verdict.end is not None else "read to its end")
        self.copies.inc(source=self.name)
        f.done, f.reason = True, f"compressed copy of {unicode_text(verdict.path)}"
        f.offset = f.origin = verdict.at
        f.end, f.size, f.copy_wait = verdict.end, info.size, None
        self._listed[f.path] = f
        return True

    def _heads_wanted(self, found: list[_FileInfo], gone: dict[int, _File]
                      ) -> list[tuple[str, int, Fingerprint | None]]:
        """The files whose first bytes this poll reads, each with the fingerprint they must
        start like to be the file the tail knows at their inode (None: their own is only
        taken).  Not every file every poll: a file first met, or its fingerprint taken while
        its first KiB was being written; and an inode that may hold a new file -- seen under
        a new path, or changed at the same path while the tail did not hold the file open
        (finished, or the gateway stopped).  A file the tail holds open keeps its inode even
        once deleted, so no new file can get it."""
        wanted: list[tuple[str, int, Fingerprint | None]] = []
        for info in found:
            f = self.files.get(info.path)
            if f is None:
                old = gone.get(info.inode)
                known = old.head if old is not None and old.reader is None else None
                if old is None and self.finished is not None:  # (see _recognised)
                    entry = self.finished.get(info.inode)
                    known = entry.head if entry is not None else None
                wanted.append((info.path, info.inode, known))
            elif f.inode != info.inode:  # replaced: a new file, read whole anyway
                wanted.append((info.path, info.inode, None))
            elif f.reader is None and f.head is not None and f.changed != info.changed:
                wanted.append((info.path, info.inode, f.head))
            elif (not complete(f.head, f.size if f.done else info.size)
                  and f.head_missed != info.changed):
                wanted.append((info.path, info.inode, None))
        return wanted

    def _one_name_each(self, found: list[_FileInfo]) -> list[_FileInfo]:
        """``found`` with one path per file: a file with several names (hard links, in
        one watched directory or several) is one file, read once, under the name the tail
        already follows it by (else the one the registry of finished files has, else the
        first in order).  The others are left out, remembered in ``_aliases``: one of them
        left when that name goes is the file renamed (``_renamed``)."""
        self._aliases_before = self._aliases
        if len({info.inode for info in found}) == len(found):  # (every poll: kept cheap)
            self._aliases = {}
            return found
        by_file: dict[tuple[int, int], list[_FileInfo]] = {}
        for info in found:
            by_file.setdefault((info.dev, info.inode), []).append(info)
        aliases: dict[str, int] = {}
        for (_, inode), infos in by_file.items():
            if len(infos) == 1:
                continue
            entry = self.finished.get(inode) if self.finished is not None else None
            known = [i for i in infos
                     if (f := self.files.get(i.path)) is not None and f.inode == inode]
            named = [i for i in infos if entry is not None and i.path == entry.path]
            one = min(known or named or infos, key=lambda i: i.path)
            for info in infos:
                if info is not one:
                    aliases[info.path] = inode
                    if self._aliases.get(info.path) != inode:
                        log.info("source %s: %s is another name of %s (a hard link): "
                                 "read once, as %s", self.name, info.path, one.path, one.path)
        self._aliases = aliases
        return [i for i in found if i.path not in aliases]

    def _moved_aside(self, found: list[_FileInfo], replaced: list[_File]) -> None:
        """A known file whose path holds another inode now, while its own inode shows up
        (not known) under another path: it was renamed (or given another name, a hard link,
        and the first removed) and a new file created at its old path -- a tester rotating
        its file.  Followed on under its new name (``_renamed``; a file the tail does not
        hold open then has its first bytes compared there, as at any changed path), so the
        new file at the old path is read as new.  Before, the new name was a new file too:
        read again from its start."""
        at = {info.path: info for info in found}
        unknown = {info.inode: info for info in found if info.path not in self.files}
        for f in replaced:
            info, other = at[f.path], unknown.get(f.inode)
            if (other is not None and other.dev == info.dev  # (neither crosses devices)
                    and self._renamed(f, other) is not None):
                del unknown[f.inode]

    def _renamed(self, old: _File, info: _FileInfo) -> _File | None:
        """A file that vanished from one path while one with its inode appeared at another
        was renamed: keep following it (a finished one only if its size is unchanged, as
        an inode can be reused for a new file; the caller has compared their first bytes
        when it could) -- or, whatever its size, if the path was another name of the file
        at the last look (a hard link, the name the tail followed it by removed)."""
        if old.gz != info.gz:
            return None
        if (old.done and old.size != info.size
                and self._aliases_before.get(info.path) != old.inode):
            return None
        log.info("source %s: %s was renamed to %s", self.name, old.path, info.path)
        del self.files[old.path]
        self._listed.pop(old.path, None)
        old.path = info.path
        self.files[info.path] = self._listed[info.path] = old
        return old

    # -- one file --------------------------------------------------------------------------

    async def _follow(self, f: _File, info: _FileInfo, sink: RecordSink) -> None:
        if f.parser is None:
            failed = await self._open(f)
            f.last_growth = trio.current_time()
            if failed is not None:
                await self._corrupt(f, sink, failed, [])
                return
        assert f.parser is not None
        grew = False
        #: the records of a read that ended at an MRR, put with what the next read
        #: brings: the file's end (one put, "done" with its LotEnd) or the next lot
        pending: list[Record] = []
        while True:
            try:
                data = await f.reader.read(self.config.read_size)
            except FormatError as exc:  # a broken gzip stream
                f.size = info.size
                if f.after_mrr:
                    # bytes after the last gzip member that are not gzip (zero fill, a
                    # transfer tool's trailer) right after the MRR: not the file's data,
                    # as the same bytes after the MRR of a plain file
                    self._trailer(f, f.after_mrr, exc.message)
                    await self._finish(f, sink, "MRR", batch=pending, close_parser=False)
                    return
                await self._corrupt(f, sink, exc, pending)
                return
            except OSError:
                if pending:  # (mapped, and the file's offset is past them)
                    await self._put(sink, f, pending)
                raise
            if not data:
                if f.after_mrr:  # nothing (whole) follows the MRR: the file is complete
                    await self._finish(f, sink, "MRR", batch=pending, close_parser=False)
                    return
                break
            grew = True
            if f.head is not None and not f.gz:
                # (so what was read is covered even if the file grew since its first
                # bytes were read; a gzip file's are taken of its compressed bytes)
                f.head = extended(f.head, data, f.fed)
            f.fed += len(data)
            f.size = info.size if f.gz else f.fed
            if f.rows and not f.selected and not f.skip_below:
                f.selected = True
                f.parser.select(RecordMapper.TYPES)  # type: ignore[attr-defined]
            try:
                try:
                    f.parser.feed(data)
                except FormatError as exc:
                    exc.offset += f.base
                    raise
                except Exception:  # a bug in the format plugin: see _plugin_failed
                    raise self._plugin_failed(f) from None
                batch, mrr = self._map(f, f.parser.rows if f.rows  # type: ignore[attr-defined]
                                       else f.parser.records, time.time())
            except FormatError as exc:
                await self._corrupt(f, sink, exc, pending + getattr(exc, "batch", []))
                return
            if pending:
                batch, pending = pending + batch, []
            if mrr:
                await self._finish(f, sink, "MRR", batch=batch, close_parser=False)
                return
            if self._says_complete(f):
                await self._finish(f, sink, "complete", batch=batch)
                return
            if f.after_mrr:
                if not f.gz and len(data) < self.config.read_size:
                    # a short read of a plain file: its end, right after the MRR (so a
                    # one-lot file costs no read more than it did)
                    await self._finish(f, sink, "MRR", batch=batch, close_parser=False)
                    return
                pending = batch
            elif batch:
                await self._put(sink, f, batch)
        # The end of a gzip member is not the end of the file: a tester (or its
        # compressing writer) may append another member, as a plain file grows.  So a
        # gzip file without its MRR is complete only when idle, as a plain one is.
        if grew:
            f.last_growth = trio.current_time()
        elif trio.current_time() - f.last_growth >= self.config.idle_timeout:
            if f.gz and not f.reader.complete:
                # idle in the middle of a gzip member: it will never be complete.  (Its
                # size, for a file whose bytes gave no data yet, a gzip header cut short:
                # else it "grew after it was complete" at the next scan)
                f.size = info.size
                await self._corrupt(f, sink, FormatError("gzip stream is truncated",
                                                         f.reader.out), [])
                return
            log.info("source %s: %s idle for %g s without its end (MRR, or the %s "
                     "parser saying complete): complete", self.name, f.path,
                     self.config.idle_timeout, self.format.name)
            await self._finish(f, sink, "idle")

    def _says_complete(self, f: _File) -> bool:
        """The parser's optional ``complete``: the file is whole, no need to wait idle."""
        try:
            return f.parser is not None and not f.skip_below and is_complete(f.parser)
        except Exception:  # a bug in the plugin: the file ends at its idle timeout instead
            report_internal_error(self.context.metrics, "format_parser", log,
                                  "source %s: %s parser on %s (complete)", self.name,
                                  self.format.name, f.path)
            return False

    def _plugin_failed(self, f: _File) -> FormatError:
        """The format plugin (or the mapping of what it yielded) raised something other
        than FormatError: a bug, met at a failure boundary.  Counted in
        ``internal_errors_total{where="format_parser"}`` and logged; the file is then
        treated as corrupt (abandoned, reported to the hub), never the source."""
        report_internal_error(self.context.metrics, "format_parser", log,
                              "source %s: %s parser on %s", self.name, self.format.name, f.path)
        exc = sys.exc_info()[1]
        return FormatError(f"{self.format.name} parser failed: {exc!r:.200}", f.offset)

    def _map(self, f: _File, records: Any, now: float) -> tuple[list[Record], bool]:
        """Map parsed records; returns the batch to emit and whether MRR ended the file.
        ``records`` is the parser's ``records`` or ``close`` method.

        After a restart the file is read again from its start: records before the
        checkpoint offset (``skip_below``) go through the mapper, to rebuild its state,
        but are not emitted again.  The offset must be a boundary of this file, else the
        checkpoint does not belong to it: the first record at or after it starts there, or
        the parser's position was exactly there just after a record before it (input the
        parser skips, such as ATDF record types it does not convert, can follow a
        checkpoint: the next record then starts later)."""
        assert f.parser is not None and f.mapper is not None
        batch: list[Record] = f.passed  # (forwarded before the lot they came with)
        f.passed = []
        rows = f.rows
        map_one = f.mapper.map_row if rows else f.mapper.map
        parsed = 0
        skipped = f.parser.records_skipped if rows else 0  # type: ignore[attr-defined]
        after_mrr = f.after_mrr
        base = f.base  # (the parser's offsets count from there)
        try:
            for rec in records():
                parsed += 1
                name = rec[0] if rows else rec.name
                if after_mrr and name in _DECIDES:
                    # A FAR after an MRR is another lot (files concatenated, a retest
                    # lot appended): read on.  Anything else is not the file's data
                    # (zero fill, a trailer): the file ends at the MRR, as it always did.
                    # (Only types the mapper reads decide: the others a parser's fast
                    # path skips, so a re-read that yields them decides alike.)
                    if name != "FAR":
                        self._trailer(f, after_mrr, f"a {name} record")
                        return batch, True
                    after_mrr = 0
                mapped = map_one(rec, now)
                if name == "MRR":
                    after_mrr = f.parser.position + base
                elif after_mrr and self.config.forward_raw:
                    # (a record passed over after the MRR, forwarded here: the file ends
                    # after it, so a lot appended later is looked for, and what lies
                    # before its FAR forwarded, from there -- none twice)
                    after_mrr = f.parser.position + base
                if f.skip_below:
                    offset = (rec[1] if rows else rec.offset) + base
                    if offset < f.skip_below:
                        f.boundary_seen |= f.parser.position + base == f.skip_below
                        continue
                    if offset != f.skip_below and not f.boundary_seen:
                        raise FormatError(
                            f"checkpoint offset {f.skip_below} is not a record boundary of "
                            f"this file (a record starts at {offset})", f.skip_below - base)
                    f.skip_below = 0
                batch.extend(mapped)
        except FormatError as exc:
            if after_mrr:  # what follows the MRR cannot be read: not the file's data
                self._trailer(f, after_mrr, exc.message)
                return batch, True
            exc.offset += base
            exc.batch = batch  # type: ignore[attr-defined]
            raise
        except Exception:
            failed = self._plugin_failed(f)
            failed.batch = batch  # type: ignore[attr-defined]
            raise failed from None
        finally:
            if rows:  # records the parser stepped over (select) were parsed too
                parsed += f.parser.records_skipped - skipped  # type: ignore[attr-defined]
            self.read_records.inc(parsed, source=self.name)
            f.after_mrr = after_mrr
            try:
                if not f.skip_below:
                    # (the end of the MRR when what follows it ends the file)
                    f.offset = max(f.offset, after_mrr or f.parser.position + base)
                f.state = f.parser.state()
            except Exception:  # already counted if it is the same bug; the file ends
                f.state = {}
        return batch, False

    def _trailer(self, f: _File, end: int, what: str) -> None:
        log.info("source %s: %s: after the MRR ending at byte %d, %s, not another lot (a "
                 "FAR): the end of the file's data", self.name, f.path, end, what)

    async def _open(self, f: _File) -> FormatError | None:
        """Open the file and a parser for it; the error if the format plugin failed."""
        raw, gen = await trio.to_thread.run_sync(open_file, f.path, f.inode,
                                                 0 if f.gz else f.base)
        handle = trio.wrap_file(raw)
        if f.gz:  # (from where its reader was at the FAR of its last lot, if unchanged)
            point = await trio.to_thread.run_sync(checked, raw, self._gz_from(f))
            f.reader = _GzipReader(handle, f.base, point)
        else:
            f.reader = handle
        if not f.gen_fixed:  # (a file the checkpoint lists keeps the stream it had)
            f.gen, f.gen_fixed = gen, True
        try:
            f.parser = new_parser(self.format, self.options)
        except Exception:
            return self._plugin_failed(f)
        f.mapper = RecordMapper(self.name, format=self.format.name,
                                forward_raw=self.config.forward_raw)
        f.fed = f.base
        f.skip_below = f.offset if f.offset > f.base else 0
        f.boundary_seen = False
        f.after_mrr = 0
        f.rows = self._fast(f.parser)
        f.selected = False
        return None

    def _fast(self, parser: FormatParser) -> bool:
        """Whether to take the parser's fast path (the built-in STDF parser's: rows
        mapped by ``RecordMapper.map_row``, and once the file is past its checkpoint only
        the record types the mapper reads decoded).  Not with ``forward_raw``, which
        forwards every record as decoded; and the types are selected only past the
        checkpoint, because the re-read before it must see a record at every boundary
        to check the checkpoint is one."""
        return (not self.config.forward_raw
                and all(callable(getattr(parser, name, None))
                        for name in ("rows", "close_rows", "select"))
                and hasattr(parser, "records_skipped"))

    async def _finish(self, f: _File, sink: RecordSink, reason: str, *,
                      batch: list[Record] | None = None, close_parser: bool = True) -> None:
        """The file is complete: emit what the parser and mapper still hold, mark it done."""
        batch = list(batch or [])
        now = time.time()
        if f.parser is not None and f.mapper is not None:
            if close_parser:
                try:
                    more, _ = self._map(f, f.parser.close_rows if f.rows  # type: ignore
                                        else f.parser.close, now)
                except FormatError as exc:
                    await self._corrupt(f, sink, exc, batch + getattr(exc, "batch", []))
                    return
                batch.extend(more)
            batch.extend(f.mapper.close(now))
            self._unknown(f)
        self._done(f, reason)
        await self._release(f)
        if not complete(f.head, f.size):  # taken while its first KiB was being written
            got = await trio.to_thread.run_sync(read_fingerprints, [(f.path, f.inode, None)])
            if f.path in got:
                f.head = got[f.path][0]
        log.info("source %s: %s complete (%s) at byte %d", self.name, f.path, reason, f.offset)
        if batch:  # (no empty batches: "done" then rides along with the next one)
            await self._put(sink, f, batch)

    def _unknown(self, f: _File) -> None:
        """Say so when records of unknown type were stepped over: a complete file whose
        REC_LEN lied (too short) reads on, its record's rest taken for headers that may
        swallow records -- lost without a word otherwise; and when records cut before a
        field they must have were skipped (``RecordMapper.cut_short``)."""
        cut = f.mapper.cut_short if f.mapper is not None else {}
        if cut:
            self.cut_records.inc(sum(cut.values()), source=self.name)
            log.warning("source %s: %s: records cut before a field they must have skipped "
                        "(%s): their REC_LEN ends too early; the records after them were "
                        "read", self.name, f.path,
                        ", ".join(f"{n} {name}" for name, n in sorted(cut.items())))
        try:
            unknown = int(getattr(f.parser, "records_unknown", 0))
        except Exception:  # (a plugin's property: telling is not worth failing the file)
            return
        if unknown:
            self.unknown_records.inc(unknown, source=self.name)
            log.warning("source %s: %s: %d records of unknown type skipped (a REC_LEN too "
                        "short before them reads its record's rest as headers, which may "
                        "swallow records)", self.name, f.path, unknown)

    async def _corrupt(self, f: _File, sink: RecordSink, exc: FormatError,
                       batch: list[Record]) -> None:
        if f.mapper is not None and not f.skip_below:
            batch = batch + f.mapper.close(time.time())
        await self._report(sink, f, "corrupt", exc.message, exc.offset, batch=batch)

    async def _report(self, sink: RecordSink, f: _File, kind: str, message: str, offset: int,
                      *, level: str = "error", abandon: bool = True,
                      batch: list[Record] | None = None) -> None:
        """Log, count and forward a problem with one file; abandon the file unless told."""
        shown = unicode_text(f.path)  # (a name that is not UTF-8: its bytes as \xNN)
        text = f"{shown}: {message} at byte {offset}" + ("; file abandoned" if abandon else "")
        getattr(log, level)("source %s: %s", self.name, text)
        self.errors.inc(source=self.name, kind=kind)
        if abandon:
            self._done(f, f"{kind}: {message} at byte {offset}")
            await self._release(f)
        event = GatewayEvent(self.name, time.time(), level, f"source_{kind}", text,
                             {"path": shown, "offset": offset, "format": self.format.name})
        # a read error is not part of the file's replay: its event is a stream of its own
        await self._put(sink, f, [*(batch or []), event],
                        stream=None if abandon else ["io", f.inode])

    # -- to the sink -------------------------------------------------------------------------

    async def _put(self, sink: RecordSink, f: _File, batch: list[Record], *,
                   ended: bool = False, stream: Any = None) -> None:
        """Put records of ``f`` with the checkpoint, and, to a sink that takes it, their
        origin ``(stream, start, end)``: the file's inode, the offset they follow (the
        file's offset in the last checkpoint put) and its offset now (None when the file
        ends here).  A replay from a checkpoint puts the same records with the same
        origins, whatever the order of files, so a gateway skips exactly the replayed
        records its frames hold (docs/spool.md, "Source positions and split puts")."""
        if len(self._registering) >= REGISTER_BATCH:
            await self._register()
        checkpoint = self.checkpoint()
        origin = (f.stream if stream is None else stream, f.origin,
                  None if ended or stream is not None else f.offset)
        if not getattr(sink, "takes_origin", False):
            await sink.put(batch, checkpoint=checkpoint)
            self._taken(checkpoint)
            return
        taken = await sink.put(batch, checkpoint, origin=origin)  # type: ignore[call-arg]
        if taken is False:
            # The checkpoint was refused (too large for a frame): the previous one stays
            # the one a restart resumes from, so every other file's next records still
            # follow its offset there; only this file's next ones follow this put's end
            # (a replay puts a file's records in one run, each put where the last ended)
            if stream is None:
                f.origin = f.offset
            return
        self._taken(checkpoint)

    async def _ended(self, sink: RecordSink, f: _File) -> None:
        """Tell a sink that takes origins that ``f`` ends where it is (deleted, replaced or
        truncated): records it held past there never come again.  With the checkpoint, so
        that what the gateway then owes no more is durable at once."""
        if getattr(sink, "takes_origin", False) and not f.done:
            await self._put(sink, f, [], ended=True)

    async def _drop(self, sink: RecordSink, f: _File, *, vanished: bool) -> None:
        """Forget ``f``, gone from disk (``vanished``: deleted, no longer matched) or its
        inode now another file's, keeping what it still held; an unfinished file ends
        here, which the gateway is told."""
        del self.files[f.path]
        self._listed.pop(f.path, None)
        if f.done and self.finished is not None:
            entry = self.finished.get(f.inode)
            if entry is not None and entry.path == f.path:
                self.finished.remove(f.inode)
        batch: list[Record] = []
        if not f.done:
            if vanished and not any(g.inode == f.inode for g in self.files.values()):
                # back unchanged: read it whole (0: missing at the first scan after a
                # restart, its change time unknown; its inode alone then).  Not when a
                # file the tail knows holds its inode now: it cannot come back with it
                self.gone.append((f.inode, f.changed))
            if vanished:
                log.warning("source %s: %s disappeared before it was complete", self.name,
                            f.path)
            if f.mapper is not None and not f.skip_below:
                batch = f.mapper.close(time.time())
        await self._release(f)
        if batch or not f.done:
            # (a checkpoint that no longer lists it handed over at once, to a sink that
            # takes no origins too: a restart from one that does meets it missing again
            # and logs it again, once per start while nothing else is put)
            await self._put(sink, f, batch, ended=True)

    async def _release(self, f: _File) -> None:
        reader, f.reader, f.parser, f.mapper = f.reader, None, None, None
        if reader is not None:
            if f.gz:
                self.gz_bytes.inc(reader.fed, source=self.name)
                if reader.point is not None:
                    self._gz_point(f, reader.point)
            await reader.aclose()

    @staticmethod
    def _gz_from(f: _File) -> GzPoint:
        """Where a gzip file is decompressed from: its ``gz_point``, at or before the FAR
        its lot begins at (``base``), else its start."""
        point = f.gz_point
        return point if point is not None and point.out <= f.base else START

    def _gz_point(self, f: _File, point: GzPoint) -> None:
        """Keep where ``f``'s reader was at its lot's FAR; a decompressor's state for at
        most ``GZ_STATES_KEPT`` files (the others: read from their start again)."""
        f.gz_point = point
        self._gz_states.pop(f.path, None)
        if point.state is not None:
            self._gz_states[f.path] = f
            while len(self._gz_states) > GZ_STATES_KEPT:
                oldest = self._gz_states.pop(next(iter(self._gz_states)))
                oldest.gz_point = None

    # -- finding files (runs in a worker thread) --------------------------------------------

    def _wanted(self, name: str) -> bool:
        return name.lower().endswith(self._suffixes)

    def _scan(self) -> list[_FileInfo]:
        self._scan_started = time.time_ns()
        self._scan_mono = time.monotonic_ns()
        paths: set[str] = set()
        dirs: set[str] = set()  # (their change times: the file systems' clocks, _fs_clock)
        for spec in self.config.paths:
            expanded = os.path.expanduser(spec)
            if glob.has_magic(expanded):
                matched = [os.path.abspath(p) for p in glob.glob(expanded)]
                paths.update(matched)
                dirs.update(os.path.dirname(p) for p in matched)
            elif os.path.isdir(expanded):
                dirs.add(os.path.abspath(expanded))
                with os.scandir(expanded) as it:
                    paths.update(os.path.abspath(e.path) for e in it if self._wanted(e.name))
            elif os.path.exists(expanded):
                paths.add(os.path.abspath(expanded))
                dirs.add(os.path.dirname(os.path.abspath(expanded)))
        self._watch_clocks(dirs)
        found = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:  # vanished between listing and stat
                continue
            if not stat.S_ISREG(st.st_mode):  # (what Path.is_file says, without a stat)
                continue
            found.append(_FileInfo(p, st.st_ino, st.st_size, st.st_mtime,
                                   p.lower().endswith(".gz"),
                                   max(st.st_mtime_ns, st.st_ctime_ns), st.st_dev))
        found.sort(key=lambda i: (i.mtime, i.path))
        return found

    def _watch_clocks(self, dirs: set[str]) -> None:
        """Stat the watched directories; one that changed since the last scan (on the same
        file system) shows its file system's clock at work (``_fs_clock``).  Blocking."""
        before, self._dirs = self._dirs, {}
        since, self._dirs_looked = self._dirs_looked, time.monotonic_ns()
        changed: dict[int, int] = {}
        for d in dirs:
            try:
                st = os.stat(d)
            except OSError:
                continue
            self._dirs[d] = (st.st_dev, st.st_ctime_ns)
            dev, ctime = before.get(d, (-1, 0))
            if dev == st.st_dev and ctime != st.st_ctime_ns:
                changed[dev] = max(changed.get(dev, 0), st.st_ctime_ns)
        seen = time.monotonic_ns()
        for dev, ctime in changed.items():
            # The change came after the last look began and before this one ended: the
            # clock was at least ``low`` and at most ``high`` ahead of the monotonic one.
            # The tightest bound is kept, unless it no longer fits: the clock was set back
            # (or drifted back by more than the time between two looks).
            low, high = ctime - seen, ctime - since + CLOCK_SLACK_NS
            known = self._fs_clocks.get(dev)
            self._fs_clocks[dev] = low if known is None or high < known else max(known, low)
