"""The tail's registry of finished files: what a restart must not read again.

The checkpoint stays small by not naming finished files: its watermark covers every file
that changed at or before it (docs/tail.md, "The checkpoint's size").  A finished file
changed *while the gateway is stopped* (touched, chmod-ed, renamed, appended to) changes
after the watermark and would look new.  This registry remembers each finished file the
checkpoint stopped listing -- its inode, the fingerprint of its first KiB (``head``), its
size and path -- in a file of the source's own (``<state_dir>/finished.jsonl``), so that
such a file is recognised (``recognised``) and not read again.

Two orders make it exact (docs/tail.md, "Finished files changed while stopped"):

- an entry is written, and fsynced, *before* any checkpoint that stops listing its file is
  handed to the gateway, so a durable checkpoint never relies on an entry a crash lost;
- an entry is *relied on* only when the durable checkpoint's watermark is at or past its
  ``since`` (its file's change time when it was first registered): a checkpoint whose
  watermark passed that time and does not list the file took it as finished, with its
  records stored.  An entry written ahead of a checkpoint that never became durable (a
  crash in between) is not relied on: its file is read from that checkpoint as before.

An entry also keeps ``end``: where its file's last MRR ends (None: it was not complete at
an MRR), where a lot appended to it would begin (docs/tail.md, "Appending to a finished
file").  A file read on past its entry (such a lot) gets a new version of its entry, with
its own ``since`` (relied on only once a durable checkpoint covers that lot's records); the
versions before it stay (``older``), so that a restart from a checkpoint that has not
covered the lot yet still knows the file as it was then -- every one a durable checkpoint
may still rely on, however many lots were appended since: only those before the version
a durable checkpoint relies on are forgotten (``settle``, told of each durable checkpoint;
a later one's watermark is at or past it), and ``OLDER_KEPT`` is a backstop.

The file is a log of JSON lines, appended to: ``[inode, path, n, crc, size, since]`` sets
an entry whose file ends at its last MRR (``end`` = ``size``: what an older gateway wrote,
taken so), ``[inode, path, n, crc, size, since, end, [[n, crc, size, since, end], ...]]``
any other (the list: ``older``), ``[inode]`` removes one; a torn last line (a crash
mid-write) is ignored.  It is
rewritten (to a new file, renamed over) once it holds twice the entries' lines.  Bounded:
at most ``kept`` entries; beyond, the oldest (earliest ``since``) are forgotten (down to
nine tenths of ``kept``), and those
files are read again if changed while the gateway is stopped (as before the registry).

``load`` and ``flush`` do blocking I/O: call them in a worker thread.  ``recognised`` is the
decision, pure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Literal

from ..dirsync import fsync_dir
from .fingerprint import Fingerprint

log = logging.getLogger(__name__)

FILE_NAME = "finished.jsonl"


#: at most this many versions of an entry are kept before its latest (lots appended to its
#: file and read): a backstop, met only when no checkpoint became durable while as many
#: lots were appended and read (``settle`` forgets the versions no restart can need)
OLDER_KEPT = 1000


@dataclasses.dataclass(frozen=True)
class Entry:
    path: str
    head: Fingerprint
    size: int
    #: its file's change time (ns) when it was first registered as finished with this head
    #: (with this size, for a file read on past an earlier version); the tail gives no
    #: earlier than just after the watermark it resumed from (``TailSource._register``)
    since: int
    #: where its last MRR ends (None: not complete at an MRR): an appended lot starts here
    end: int | None = None
    #: the versions before this one, latest first (a file read on past them)
    older: tuple[Entry, ...] = ()


def relied_on(entry: Entry | None, durable_watermark: int) -> Entry | None:
    """The latest version of ``entry`` a restart from a durable checkpoint with this
    watermark may rely on (its ``since`` at or before it; None: none)."""
    if entry is None:
        return None
    for version in (entry, *entry.older):
        if version.since <= durable_watermark:
            return version
    return None


def _needed(entry: Entry, durable_watermark: int) -> tuple[Entry, ...] | None:
    """The older versions of ``entry`` a restart may still rely on, given a durable
    checkpoint with this watermark: those down to the one it relies on (None: it relies on
    none, so every one may still be needed)."""
    for i, version in enumerate((entry, *entry.older)):
        if version.since <= durable_watermark:
            return entry.older[:i]
    return None


def recognised(entry: Entry | None, path: str, size: int, starts_alike: bool | None,
               durable_watermark: int) -> Literal["unchanged", "grew"] | None:
    """Whether a file that looks new (at ``path``, ``size`` bytes, changed after the durable
    checkpoint's watermark, which does not list it) is the finished file ``entry`` describes,
    ``starts_alike`` telling whether its first bytes match the entry's ``head``:
    "unchanged" (its size is the same: touched, chmod-ed or renamed), "grew" (appended to
    at the same path: as the running tail, which reads on a lot appended after its last
    MRR and logs any other growth), or None: a file to read from its start (no entry, one
    not to be relied on yet, another start, shorter, or grown under another name -- the
    running tail reads a finished file renamed with another size again too).  The version
    compared is ``relied_on``'s."""
    version = relied_on(entry, durable_watermark)
    if entry is None or version is None or starts_alike is not True:
        return None
    if size == version.size:
        return "unchanged"
    if size > version.size and path == entry.path:
        return "grew"
    return None


class FinishedFiles:
    """The registry: inode -> ``Entry``, in memory, and its log on disk (``path``)."""

    def __init__(self, path: str, kept: int) -> None:
        self.path = path
        self.kept = kept
        self.entries: dict[int, Entry] = {}
        self._unwritten: list[str] = []  # log lines not yet appended
        self._lines = 0  # lines in the log on disk
        self._rewrite = False  # the log must be rewritten (cleared, or entries forgotten)
        self._warned = False
        #: the inodes whose entries may have older versions (what ``settle`` looks at)
        self._versioned: set[int] = set()
        #: as loaded (``load``): the change times from which every finished file a durable
        #: checkpoint stopped listing has an entry (0: all; None: none -- no log on disk,
        #: an older gateway's state or nothing registered yet).  A file changed from then
        #: on that has none was never taken as finished (``TailSource._unregistered_new``)
        self.whole_from: int | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, inode: int) -> Entry | None:
        return self.entries.get(inode)

    def holds(self, inode: int, path: str, head: Fingerprint, size: int) -> bool:
        """Whether the entry at ``inode`` describes this file as it is now."""
        e = self.entries.get(inode)
        return e is not None and e.path == path and e.head == head and e.size == size

    def add(self, inode: int, path: str, head: Fingerprint, size: int, changed: int,
            end: int | None = None, *, read_on: bool = False) -> None:
        """Register a finished file (``changed``: its change time now; ``end``: where its
        last MRR ends, None when it was not complete at one).  The same file (inode and
        head) keeps the ``since`` it was first registered with: it has been finished since
        then, renamed or touched or not -- unless it was read on past its entry
        (``read_on``: a lot appended to it, at the same path, larger): then this is a new
        version, since ``changed``, and the entry before it is kept as an older one (a
        restart from a checkpoint that does not cover the new version's records relies on
        that one)."""
        old = self.entries.get(inode)
        if old is not None and read_on and old.path == path and size > old.size:
            # (an older version has no path of its own: the entry's is the file's)
            older = (dataclasses.replace(old, path="", older=()), *old.older)[:OLDER_KEPT]
            entry = Entry(path, head, size, changed, end, older)
        elif old is not None and old.head == head:
            # (its first ``since``, never a lower ``changed``: a file touched once the clock
            # was set back has a change time below it, and a durable checkpoint whose
            # watermark lies between the two need not cover its records)
            entry = Entry(path, head, size, old.since, end, old.older)
        else:
            entry = Entry(path, head, size, changed, end)
        if entry == old:
            return
        self.entries[inode] = entry
        if entry.older:
            self._versioned.add(inode)
        self._unwritten.append(json.dumps(_line(inode, entry)))
        if len(self.entries) > self.kept:
            self._forget_oldest()

    def settle(self, durable_watermark: int) -> None:
        """A checkpoint with this watermark is durable: forget the versions before the one
        it relies on (``relied_on``), which no restart can rely on any more -- a later
        durable checkpoint's watermark is at or past this one.  In memory (the log on
        disk may hold more versions until the entry is written again: harmless)."""
        for inode in list(self._versioned):
            e = self.entries.get(inode)
            keep = None if e is None else _needed(e, durable_watermark)
            if e is None or keep is None:  # (none relied on yet: every version may still be)
                if e is None or not e.older:
                    self._versioned.discard(inode)
                continue
            if keep != e.older:
                self.entries[inode] = dataclasses.replace(e, older=keep)
            if not keep:
                self._versioned.discard(inode)

    def remove(self, inode: int) -> None:
        """Forget an entry (its file is gone).  Written with the next flush; until then a
        restart may still hold it, which costs nothing but a look at a new file's head."""
        if self.entries.pop(inode, None) is not None:
            self._unwritten.append(json.dumps([inode]))

    def missing(self, inodes: set[int]) -> dict[int, str]:
        """The entries whose inode no file the tail found holds: inode -> directory."""
        return {i: os.path.dirname(e.path) for i, e in self.entries.items() if i not in inodes}

    def clear(self) -> None:
        """Forget everything (a start without a checkpoint: the entries belong to another)."""
        if self.entries or self._lines:
            self.entries.clear()
            self._versioned.clear()
            self._unwritten.clear()
            self._rewrite = True

    def _forget_oldest(self) -> None:
        """Down to nine tenths of ``kept`` (so not a sort per file added beyond it)."""
        by_age = sorted(self.entries.items(), key=lambda item: item[1].since)
        for inode, _ in by_age[:len(self.entries) - self.kept + self.kept // 10]:
            del self.entries[inode]
        if not self._warned:
            self._warned = True
            log.warning("%s: more than %d finished files; the oldest are forgotten (read "
                        "again if changed while the gateway is stopped)", self.path, self.kept)
        self._rewrite = True

    @property
    def dirty(self) -> bool:
        return bool(self._unwritten) or self._rewrite

    # -- blocking I/O -----------------------------------------------------------------------

    def load(self) -> None:
        """Read the log (blocking).  A missing file is an empty registry; a line that does
        not parse (a torn write) ends it."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            self.whole_from = None
            return
        lines = 0
        if data and not data.endswith(b"\n"):  # torn: the next append must not join it
            self._rewrite = True
        for raw in data.split(b"\n"):
            if not raw:
                continue
            try:
                item = json.loads(raw)
                if len(item) == 1:
                    self.entries.pop(int(item[0]), None)
                else:
                    self.entries[int(item[0])] = e = _entry(item)
                    if e.older:
                        self._versioned.add(int(item[0]))
            except (ValueError, TypeError):
                log.warning("%s: unreadable line %d and after ignored", self.path, lines + 1)
                self._rewrite = True
                break
            lines += 1
        self._lines = lines
        if len(self.entries) > self.kept:
            self._forget_oldest()
        # Forgetting keeps nine tenths, the latest ``since``: a registry that holds as many
        # may have forgotten files finished before its earliest (not after: read again)
        full = len(self.entries) >= self.kept - self.kept // 10
        self.whole_from = min((e.since for e in self.entries.values()), default=0) if full else 0

    def flush(self) -> None:
        """Make every change durable (blocking): append the new lines and fsync, or write
        the log afresh when it has grown to twice its entries (or must be rewritten)."""
        if not self.dirty:
            return
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        if self._rewrite or self._lines + len(self._unwritten) > 2 * len(self.entries) + 64:
            lines = [json.dumps(_line(inode, e)) for inode, e in self.entries.items()]
            tmp = self.path + ".new"
            with open(tmp, "wb") as handle:
                handle.write("".join(line + "\n" for line in lines).encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            fsync_dir(directory)
            self._lines = len(lines)
        else:
            new = not os.path.exists(self.path)
            with open(self.path, "ab") as handle:
                handle.write("".join(line + "\n" for line in self._unwritten).encode())
                handle.flush()
                os.fsync(handle.fileno())
            if new:  # its name durable too
                fsync_dir(directory)
            self._lines += len(self._unwritten)
        self._unwritten.clear()
        self._rewrite = False


def _line(inode: int, e: Entry) -> list[Any]:
    """An entry as a log line: the short form when its file ends at its last MRR and it
    has no older version (what an older gateway wrote, and can read)."""
    line: list[Any] = [inode, e.path, e.head[0], e.head[1], e.size, e.since]
    if e.end != e.size or e.older or _gz(e.path):
        line += [e.end, [[o.head[0], o.head[1], o.size, o.since, o.end] for o in e.older]]
    return line


def _entry(item: list[Any]) -> Entry:
    """A log line back (``_line``); the short form: ``end`` = ``size`` (an older gateway's
    entry does not say; docs/tail.md, "Upgrading")."""
    if len(item) == 6:  # (a gzip file's size is not an offset of its stream: not known)
        _, path, n, crc, size, since = item
        return Entry(str(path), (int(n), int(crc)), int(size), int(since),
                     None if _gz(str(path)) else int(size))
    _, path, n, crc, size, since, end, older = item
    return Entry(str(path), (int(n), int(crc)), int(size), int(since), _end(end),
                 tuple(Entry("", (int(on), int(ocrc)), int(osize), int(osince), _end(oend))
                       for on, ocrc, osize, osince, oend in older))


def _gz(path: str) -> bool:
    """A gzip file's ``end`` is an offset of its decompressed stream, its ``size`` the
    file's: the short line (``end`` = ``size``) never describes one."""
    return path.lower().endswith(".gz")


def _end(value: Any) -> int | None:
    return None if value is None else int(value)
