"""Store the dead-letter file's records again in the spool, for the hub to take now.

The dead-letter file keeps what the hub could not take: a frame it rejected (a hub since
mended), records over its limits (limits since raised).  Once the cause is gone, an
operator wants those records at the hub; ``requeue`` stores each entry's records as a new
frame in the stopped gateway's spool, which sends them at its next start, as any frame.

Exactly once, across a crash of the tool at any point:

- each entry becomes one frame, numbered with **new record ids** past the spool's next
  one (the ids it had may be applied already: an over-limit record's stand-in event went
  under its first id), so the hub applies every one;
- each frame carries among its checkpoints the progress (``REQUEUE_KEY``: the file's
  device and inode, the offset after the entry, the record id the run began at, the
  largest body it stores), durable with the frame: an interrupted run goes on after the
  last entry stored, never storing one twice, and makes the same decisions again for the
  entries before (one it kept is kept again), under the limit it began with -- a config
  that now allows less than an entry still to store stops it, nothing changed;
- only then is the file replaced, atomically, by one holding the entries not stored
  (their reasons in the report), the original kept beside it as
  ``dead-letter.requeued-<UTC time>.cborseq``; a last frame with no records clears the
  progress.

Not stored (kept in the file, with the reason): a body that does not decode; records
that do not fit ``uplink.max_frame_bytes`` or a spool frame; and a record refused before
any frame held it whose record id is at or past the spool's next one (a crash before the
checkpoint past it was durable: its source reads it again at the next start, and it must
not be there twice).  The gateway must be stopped: the spool's lock says so.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from pathlib import Path

import trio

from .. import failpoints
from ..dirsync import fsync_dir
from ..protocol import encode_body
from ..spool import DiskSpool, SpoolConfig
from ..startup import StartupError
from .config import GatewayConfig
from .deadletters import (
    BODY_ERRORS,
    DEAD_LETTER_FILE,
    DeadLetterScan,
    entry_records,
    scan_dead_letters,
)
from .uplink import RID_KEY

#: kept among the spool's checkpoints while a requeue is under way: ``[st_dev, st_ino,
#: offset, first_rid]``, the dead-letter file's, the offset after the last entry stored and
#: the spool's next record id when the requeue began; ``[]`` once the file is replaced
REQUEUE_KEY = "__requeue__"


@dataclasses.dataclass
class RequeueReport:
    """What ``requeue`` did."""

    path: str
    #: entries stored as frames (this run), and their records
    entries: int = 0
    records: int = 0
    #: the seqs of the frames stored
    seqs: list[int] = dataclasses.field(default_factory=list)
    #: (offset, why) of each entry kept in the file
    kept: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    #: where an interrupted run went on from (0: from the start)
    resumed_at: int = 0
    #: the name the original file is kept under (None: no file, or nothing to do)
    original: str | None = None


async def requeue(config: GatewayConfig) -> RequeueReport:
    """Store the records of ``config``'s gateway's dead-letter file in its spool (see the
    module's note).  Raises StartupError when the gateway runs (its spool is locked) or
    has no disk spool."""
    state_dir = Path(config.gateway.state_dir)
    path = state_dir / DEAD_LETTER_FILE
    report = RequeueReport(str(path))
    if config.spool is None:
        raise StartupError("requeue needs the gateway's disk spool ([spool]); a gateway "
                           "with frames in memory cannot be given frames while stopped")
    spool_cfg = config.spool
    if not spool_cfg.dir:
        spool_cfg = dataclasses.replace(spool_cfg, dir=str(state_dir / "spool"))
    try:
        f = await trio.to_thread.run_sync(open, path, "rb")
    except FileNotFoundError:
        return report
    with f:
        st = os.fstat(f.fileno())
        if not st.st_size:
            return report
        # mapped, not read: a file of many rejected frames is not held in memory at once
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            scan = await trio.to_thread.run_sync(scan_dead_letters, data)
            await _store(config, spool_cfg, path, data, scan, [st.st_dev, st.st_ino], report)
    if report.original is not None:
        await trio.to_thread.run_sync(_same_owner, state_dir, Path(spool_cfg.dir))
    return report


async def _store(config: GatewayConfig, spool_cfg: SpoolConfig, path: Path, data: mmap.mmap,
                 scan: DeadLetterScan, ident: list[int], report: RequeueReport) -> None:
    async with DiskSpool.open(spool_cfg) as spool:  # DirectoryInUse: the gateway runs
        stored_rid = int(spool.checkpoints.get(RID_KEY, 1))
        progress = spool.checkpoints.get(REQUEUE_KEY)
        next_rid = stored_rid
        # the largest entry body stored, fixed for the whole run (see _room)
        limit = allowed = _room(config, spool)
        if isinstance(progress, list) and len(progress) in (4, 5) and progress[:2] == ident:
            # an interrupted run: its decisions are made again from where it began (the
            # same entries, ids and limit give the same ones), storing nothing before
            # the offset it reached -- an entry it kept is kept again, not dropped
            report.resumed_at, next_rid = int(progress[2]), int(progress[3])
            if len(progress) == 5:  # (4: a run that did not record its limit)
                limit = int(progress[4])
        base_rid = next_rid
        kept: list[tuple[int, bytes]] = []  # in file order
        for offset, entry in scan.entries:
            end = offset + 4 + int.from_bytes(data[offset:offset + 4], "big")
            why = None
            try:
                _, records = entry_records(entry)
            except BODY_ERRORS as exc:
                why, records = f"its body does not decode: {exc}", []
            rid = entry.get("rid")
            if why is None and entry.get("seq") is None and isinstance(rid, int) \
                    and rid >= base_rid and entry.get("epoch") == spool.epoch:
                why = ("a refused record its source may read again (the checkpoint past it "
                       "was not durable): start the gateway once, then requeue")
            body = encode_body(next_rid, records)
            checkpoints = {RID_KEY: next_rid + len(records),
                           REQUEUE_KEY: [*ident, end, base_rid, limit]}
            if why is None and len(body) > limit:
                why = (f"{len(body)} bytes, more than a frame may hold ({limit}: "
                       "uplink.max_frame_bytes, spool.max_bytes / 4)")
            if why is not None:
                report.kept.append((offset, why))
                kept.append((offset, data[offset:end]))
                continue
            if not records:
                continue  # nothing to send
            if offset < report.resumed_at:
                next_rid += len(records)  # stored by the interrupted run
                continue
            if len(body) > allowed:  # a limit lowered since the interrupted run began
                raise StartupError(
                    f"an interrupted requeue of {path} decided with a frame limit of {limit} "
                    f"bytes; this config allows {allowed}, less than the next entry to "
                    f"store (byte {offset}, {len(body)} bytes): run it with the "
                    "uplink.max_frame_bytes and spool.max_bytes it began with (nothing "
                    "more was stored)")
            # never below an id the spool has given (a config changed between the runs)
            if next_rid < stored_rid:
                next_rid = stored_rid
                body = encode_body(next_rid, records)
                checkpoints[RID_KEY] = next_rid + len(records)
            # past the cap: a stopped gateway frees no room to wait for
            report.seqs.append(await spool.append(body, len(records), checkpoints,
                                                  over_cap=True))
            failpoints.hit("requeue.entry_stored")
            next_rid += len(records)
            report.entries += 1
            report.records += len(records)
        # what does not decode is kept as it is (the gateway's reader reports damage; it
        # cuts a torn end, whose records it writes again)
        for start, size in [*scan.damaged, *([scan.junk_tail] if scan.junk_tail else [])]:
            kept.append((start, data[start:start + size]))
            report.kept.append((start, "damaged bytes"))
        if scan.torn_at is not None:
            kept.append((scan.torn_at, data[scan.torn_at:]))
        if not report.entries and not report.resumed_at:
            return  # nothing stored: the file stays as it is
        report.original = await trio.to_thread.run_sync(
            _replace, path, b"".join(b for _, b in sorted(kept)))
        await spool.append(encode_body(next_rid, []), 0,
                           {RID_KEY: next_rid, REQUEUE_KEY: []}, over_cap=True)


def _room(config: GatewayConfig, spool: DiskSpool) -> int:
    """The largest body of an entry stored: ``uplink.max_frame_bytes``, and what a spool
    frame may hold with the largest metadata a requeued frame can have.  One figure for the
    run, kept in its progress: an interrupted run that goes on with a limit changed between
    (or a frame's metadata a few bytes longer) decides each entry as before -- an entry it
    stored is not kept too (and stored twice), one it kept is not taken for stored (and
    lost)."""
    widest = {RID_KEY: 2**64 - 1, REQUEUE_KEY: [2**64 - 1] * 5}
    return min(config.uplink.max_frame_bytes,
               spool.max_body_bytes(2**32, widest) - _SEQ_SLACK)


#: the bytes a frame's seq may grow by past the spool's next one (CBOR: 9 at most)
_SEQ_SLACK = 9


def _replace(path: Path, kept: bytes) -> str:
    """Keep the original under a new name and put ``kept`` in its place, atomically
    (blocking)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while True:
        original = path.with_name(f"dead-letter.requeued-{stamp}{f'-{n}' if n else ''}"
                                  ".cborseq")
        try:
            os.link(path, original)
            break
        except FileExistsError:
            n += 1
    if kept:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        os.unlink(path)
    fsync_dir(path.parent)
    return str(original)


def _same_owner(*dirs: Path) -> None:
    """Run as root (on a service whose files its own user owns), give what this run
    created the owner of the directory it is in: a root-owned segment would stop the
    service at its next start (blocking)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    for top in dirs:
        if not top.is_dir():
            continue
        owner = top.stat()
        for p in [top, *top.rglob("*")]:
            st = p.lstat()
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.lchown(p, owner.st_uid, owner.st_gid)


__all__ = ["REQUEUE_KEY", "RequeueReport", "requeue"]
