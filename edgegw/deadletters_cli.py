"""``edgegw dead-letters list``: what a gateway's dead-letter file holds, readable;
``edgegw dead-letters requeue``: its records stored again for the hub
(``edgegw/gateway/requeue.py``).

The dead-letter file (docs/spool.md, "The dead-letter file") keeps what the hub can never
take: frames it rejected, frames or records over its limits, records refused before any
frame held them.  An operator who sees ``edgegw_uplink_frames_rejected_total`` move wants
to know which records those were and why, without writing a CBOR reader: this prints one
line per entry (when, epoch, frame, record ids, kinds, sources, the reason), or each
record too, or JSON lines for a script.  It only reads: safe beside a running gateway (an
entry being written shows as a torn end).

``describe`` is the pure part (an entry in, a summary out); the command does the reading.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import add_override_option

#: where the packaged service keeps the gateway's state (packaging/systemd, the WinSW
#: service of packaging/windows)
DEFAULT_STATE_DIR = (r"C:\edgegw\state\gateway" if sys.platform == "win32"
                     else "/var/lib/edgegw-gateway")


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "dead-letters", help="list what a gateway's dead-letter file holds",
        description="Read a gateway's dead-letter file (<state_dir>/dead-letter.cborseq: "
                    "frames the hub rejected, frames or records over its limits, records "
                    "refused before any frame held them; docs/spool.md) and print what it "
                    "holds.  Read only: safe while the gateway runs.")
    actions = p.add_subparsers(dest="dead_letters_command", metavar="ACTION", title="actions")
    actions.required = True
    ls = actions.add_parser(
        "list", help="one line per entry, or its records too",
        description="One line per entry: when it was written, the epoch, the frame's seq "
                    "(or 'refused record'), its record ids and kinds by source, and the "
                    "reason.  Damage in the file is reported on stderr and the entries "
                    "after it are listed; exit status 1 when there is damage, 0 otherwise "
                    "(a missing file holds no dead letters).",
        epilog="examples:\n"
               "  edgegw dead-letters list                      "
               f"# the file in {DEFAULT_STATE_DIR}\n"
               "  edgegw dead-letters list ./edgegw-gateway-data --records\n"
               "  edgegw dead-letters list --config /etc/edgegw/gateway.toml --json")
    ls.add_argument("path", nargs="?", metavar="PATH",
                    help="the dead-letter file, or the gateway's state directory holding it "
                         f"(default: {DEFAULT_STATE_DIR}, where the packaged service keeps it)")
    ls.add_argument("--config", metavar="FILE",
                    help="take the state directory from this gateway config instead")
    add_override_option(ls, "gateway.state_dir=/var/lib/edgegw-gateway")
    ls.add_argument("--records", action="store_true",
                    help="print each entry's records too, one JSON object per line")
    ls.add_argument("--json", action="store_true",
                    help="one JSON object per entry (with --records: its records in it)")
    ls.set_defaults(func=run_list)
    rq = actions.add_parser(
        "requeue", help="store the records again for the hub (gateway stopped)",
        description="Once the cause is mended (a hub that rejected valid frames upgraded, "
                    "its max_frame_bytes raised), store each entry's records as a new frame "
                    "in the stopped gateway's spool, under new record ids: the gateway sends "
                    "them at its next start, and the hub applies each record once.  Entries "
                    "that cannot be stored (a body that does not decode, records over the "
                    "frame limits) stay in the file, each with its reason; the original file "
                    "is kept as dead-letter.requeued-<time>.cborseq.  An interrupted run "
                    "goes on where it stopped at the next one, storing nothing twice.  The "
                    "gateway must be stopped (exit status 3 while it runs); run it as the "
                    "service's user, or as root (what it creates is given the state "
                    "directory's owner).  docs/spool.md, \"The dead-letter file\".",
        epilog="examples:\n"
               "  edgegw dead-letters requeue --config /etc/edgegw/gateway.toml "
               "--set gateway.state_dir=/var/lib/edgegw-gateway\n"
               "  edgegw dead-letters requeue --config conf/gateway.toml")
    rq.add_argument("--config", metavar="FILE", required=True,
                    help="the gateway's config (its state directory and spool settings)")
    add_override_option(rq, "gateway.state_dir=/var/lib/edgegw-gateway")
    rq.set_defaults(func=run_requeue)


def dead_letter_file(args: argparse.Namespace) -> Path:
    """The file the command reads: PATH (a file, or a directory holding it), else
    ``--config``'s ``gateway.state_dir``, else the packaged unit's."""
    from .gateway import DEAD_LETTER_FILE, load_gateway_config

    if args.path is not None and args.config is not None:
        from .config import ConfigError

        raise ConfigError(["dead-letters list: give PATH or --config, not both"])
    if args.config is not None:
        cfg = load_gateway_config(args.config, args.overrides)
        return Path(cfg.gateway.state_dir) / DEAD_LETTER_FILE
    path = Path(args.path if args.path is not None else DEFAULT_STATE_DIR)
    return path / DEAD_LETTER_FILE if path.is_dir() else path


def describe(offset: int, entry: dict[str, Any], *, with_records: bool = False
             ) -> dict[str, Any]:
    """What one entry holds, as plain values: ``offset``, ``at`` (ISO 8601 UTC), ``epoch``,
    ``seq`` (None: a record refused before any frame held it, then ``source`` and ``rid``
    too), ``reason``, and of its body ``first_rid``, ``n``, ``kinds`` (count per record
    kind) and ``sources`` -- or ``body_error`` and ``body_bytes`` when the body does not
    decode (a frame the hub rejected for that); ``records`` with ``with_records``."""
    from .gateway import BODY_ERRORS, entry_records

    out: dict[str, Any] = {"offset": offset, "at": _when(entry.get("at")),
                           "epoch": entry.get("epoch"), "seq": entry.get("seq"),
                           "reason": entry.get("reason")}
    if out["seq"] is None:
        out["source"], out["rid"] = entry.get("source"), entry.get("rid")
    body = entry.get("body")
    try:
        first_rid, records = entry_records(entry)
    except BODY_ERRORS as exc:
        out["body_error"] = str(exc)
        out["body_bytes"] = len(body) if isinstance(body, (bytes, str)) else None
        return out
    out["first_rid"], out["n"] = first_rid, len(records)
    out["kinds"] = dict(Counter(type(r).__name__ for r in records))
    out["sources"] = sorted({r.source for r in records})
    if with_records:
        out["records"] = [{"rid": first_rid + i, "kind": type(r).__name__, **r._asdict()}
                          for i, r in enumerate(records)]
    return out


def _when(at: Any) -> str | None:
    if not isinstance(at, (int, float)) or isinstance(at, bool):
        return None
    try:
        return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace(
            "+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def line_of(d: dict[str, Any]) -> str:
    """One entry as one line of text."""
    what = (f"frame {d['seq']}" if d["seq"] is not None
            else f"refused record of {d.get('source')} (next rid {d.get('rid')})")
    if "body_error" in d:
        body = f"{d['body_bytes']} bytes that do not decode ({d['body_error']})"
    elif d["n"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(d["kinds"].items()))
        last = d["first_rid"] + d["n"] - 1
        body = (f"records {d['first_rid']}..{last} ({kinds}) from "
                f"{', '.join(d['sources'])}")
    else:
        body = "no records"
    return (f"{d['at'] or '?'}  epoch {d['epoch']}  {what}: {body}; "
            f"reason: {d['reason']}")


def run_list(args: argparse.Namespace) -> int:
    from .gateway import scan_dead_letter_file
    from .jsonutil import dumps

    path = dead_letter_file(args)
    out = sys.stdout
    try:
        with open(path, "rb") as f:
            scan = scan_dead_letter_file(f)
    except FileNotFoundError:
        print(f"{path}: no such file: no dead letters", file=sys.stderr)
        return 0
    records = 0
    for offset, entry in scan.entries:
        d = describe(offset, entry, with_records=args.records)
        records += d.get("n", 0)
        if args.json:
            out.write(dumps(d) + "\n")
            continue
        out.write(line_of(d) + "\n")
        for r in d.get("records", ()):
            out.write("  " + dumps(r) + "\n")
    damaged = False
    for offset, n in scan.damaged:
        damaged = True
        print(f"{path}: {n} bytes at byte {offset} do not decode as entries (damage); "
              "the entries after them are listed", file=sys.stderr)
    if scan.junk_tail is not None:
        damaged = True
        print(f"{path}: its last {scan.junk_tail[1]} bytes, at byte {scan.junk_tail[0]}, do "
              "not decode as an entry (damage)", file=sys.stderr)
    if scan.torn_at is not None:
        print(f"{path}: its last entry, at byte {scan.torn_at}, is torn (being written, or "
              "a crash in its write: the gateway cuts it off and writes it again at its "
              "next start)", file=sys.stderr)
    print(f"{path}: {len(scan.entries)} entries, {records} records", file=sys.stderr)
    return 1 if damaged else 0


def run_requeue(args: argparse.Namespace) -> int:
    import trio

    from .gateway import load_gateway_config, requeue
    from .startup import StartupError, leaves

    cfg = load_gateway_config(args.config, args.overrides)
    try:
        report = trio.run(requeue, cfg)
    except (OSError, BaseExceptionGroup) as exc:
        # one line, exit status 3: the gateway runs (its spool's lock), a file it cannot
        # open (run as the service's user)
        for leaf in leaves(exc):
            if isinstance(leaf, StartupError):
                raise leaf from None
            if isinstance(leaf, OSError):
                raise StartupError(f"dead-letters requeue: {leaf}") from None
        raise
    if report.original is None and not report.kept:
        print(f"{report.path}: no dead letters to requeue")
        return 0
    if report.resumed_at:
        print(f"{report.path}: an interrupted requeue went on from byte {report.resumed_at}")
    if report.seqs:
        print(f"{report.path}: {report.entries} entries ({report.records} records) stored "
              f"as frames {report.seqs[0]}..{report.seqs[-1]} of the spool: the gateway "
              "sends them at its next start")
    for offset, why in report.kept:
        print(f"{report.path}: the entry at byte {offset} stays: {why}")
    if report.original is not None:
        print(f"{report.path}: the original is kept as {report.original}")
    return 0


__all__ = ["DEFAULT_STATE_DIR", "add_commands", "dead_letter_file", "describe",
           "line_of", "run_list", "run_requeue"]
