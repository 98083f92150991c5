"""``edgegw plugins``: the tester formats and source types installed, and where they come from.

Both are entry-point groups (``edgegw.formats``, ``edgegw.sources``); a plugin package
that fails to import is listed with its error instead of silently missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_override
from .formats import ENTRY_POINT_GROUP as FORMATS_GROUP
from .sources import ENTRY_POINT_GROUP as SOURCES_GROUP


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "plugins", help="list the installed tester formats and source types",
        description="List the tester formats (entry-point group edgegw.formats) and source "
                    "types (edgegw.sources) installed in this Python, with the package each "
                    "comes from; a plugin that fails to import is listed with its error "
                    "(docs/plugins.md).",
        epilog="examples:\n  edgegw plugins\n  edgegw plugins --json\n"
               "  edgegw plugins check stdf /data/lot42.stdf")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_run)
    checks = p.add_subparsers(dest="plugins_command", metavar="{check}")
    c = checks.add_parser(
        "check", help="run the plugin kit's checks on a real tester file",
        description="Check a tester format on a real file, as the plugin kit checks a "
                    "plugin's samples (docs/plugins.md, 'Checking a format on a real file'): "
                    "it parses whole; cut into pieces of other sizes it gives the same records; "
                    "cut short, the records before the cut or a FormatError; and the tail "
                    "reading it, resumed from checkpoints inside it, gives exactly the records "
                    "that followed each.  Sampled: a file of megabytes takes seconds.  Exit "
                    "status 0 when every check passes, 1 when one fails.",
        epilog="examples:\n  edgegw plugins check stdf /data/lot42.stdf.gz\n"
               "  edgegw plugins check wat w07.wat.csv --option timezone=+01:00",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("format", help="an installed tester format (edgegw plugins lists them)")
    c.add_argument("file", type=Path, help="a tester file (gzip-compressed when it ends .gz)")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="one of the format's options (a TOML value, else text); repeatable")
    c.add_argument("--seed", type=int, default=0, help="picks the random chunkings and cuts")
    c.add_argument("--json", action="store_true", help="one JSON object instead of text")
    c.set_defaults(func=_check)


def _describe(ep: EntryPoint, kind: str) -> dict[str, Any]:
    dist = ep.dist
    item: dict[str, Any] = {
        "name": ep.name, "entry_point": ep.value,
        "package": f"{dist.name} {dist.version}" if dist is not None else None,
    }
    try:
        obj = ep.load()
    except Exception as exc:  # show a broken plugin, never crash the listing
        item["error"] = f"{type(exc).__name__}: {exc}"
        return item
    if kind == "format":
        fmt = obj() if isinstance(obj, type) else obj
        item["description"] = getattr(fmt, "description", "")
        item["suffixes"] = list(getattr(fmt, "suffixes", ()))
    else:
        # the class docstring, else its module's: the first line says what it is
        module = sys.modules.get(getattr(obj, "__module__", ""))
        doc = (obj.__doc__ or getattr(module, "__doc__", None) or "").strip().splitlines()
        item["description"] = doc[0] if doc else ""
        alias_of = getattr(obj, "aliases", {}).get(ep.name)
        if alias_of:
            item["alias_of"] = alias_of
            item["description"] = f"alias of {alias_of!r}: {item['description']}"
    return item


def plugin_listing() -> dict[str, list[dict[str, Any]]]:
    """Every installed format and source type, sorted by name."""
    return {
        "formats": [_describe(ep, "format")
                    for ep in sorted(entry_points(group=FORMATS_GROUP), key=lambda e: e.name)],
        "sources": [_describe(ep, "source")
                    for ep in sorted(entry_points(group=SOURCES_GROUP), key=lambda e: e.name)],
    }


def _run(args: argparse.Namespace) -> int:
    listing = plugin_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for title, key, group in (("Tester formats", "formats", FORMATS_GROUP),
                              ("Source types", "sources", SOURCES_GROUP)):
        print(f"{title} (entry-point group {group}):")
        if not listing[key]:
            print("  (none)")
        for item in listing[key]:
            if "error" in item:
                print(f"  {item['name']:<10} BROKEN  {item['entry_point']}: {item['error']}")
                continue
            suffixes = " ".join(item.get("suffixes", []))
            line = f"  {item['name']:<10} {item['description']}"
            if suffixes:
                line += f"  [{suffixes}]"
            print(f"{line}  ({item['package']})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .plugins_check import check_file
    from .sources import UnknownFormat

    options: dict[str, Any] = {}
    try:
        for item in args.option:  # KEY=VALUE, read as --set reads it
            path, value = parse_override(item)
            options[".".join(path)] = value
        checks = check_file(args.format, args.file, options or None, seed=args.seed)
    except (ConfigError, UnknownFormat, OSError, EOFError, gzip.BadGzipFile) as exc:
        print(f"edgegw plugins check: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"format": args.format, "file": str(args.file),
                          "ok": all(c.ok for c in checks),
                          "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        print(f"{args.file} as {args.format}:")
        for c in checks:
            print(f"  {c.name:<12} {'PASS' if c.ok else 'FAIL'}  ({c.seconds:.1f} s)  "
                  f"{c.detail}")
    return 0 if all(c.ok for c in checks) else 1


__all__ = ["plugin_listing"]
